"""The registration of Shoal's external metrics API with the aggregation layer: the
APIService ``v1beta1.external.metrics.k8s.io``, the Service it names, and what an
observed APIService means for ScalingPolicies (served by us, by another provider, or
by nobody).

Only one server can hold ``external.metrics.k8s.io/v1beta1`` in a cluster; another
provider's APIService (KEDA's, Datadog's) is never taken over, only reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

GROUP = "external.metrics.k8s.io"
VERSION = "v1beta1"
GROUP_VERSION = f"{GROUP}/{VERSION}"
APISERVICE_NAME = f"{VERSION}.{GROUP}"
SERVICE_NAME = "shoal-metrics-api"
# The mark of every APIService Shoal creates (the operator's and the Helm chart's): a
# marked one is Shoal's even when it names another Service (a stale registration of an
# operator that died, or a chart install being replaced by a local operator).
PART_OF = {"app.kubernetes.io/part-of": "shoal"}
LABELS = {**PART_OF, "app.kubernetes.io/managed-by": "shoal"}


def local_service(namespace: str, port: int) -> dict[str, Any]:
    """A Service for an operator running outside the cluster (the local test bed).

    The aggregator resolves an ExternalName Service to ``https://<externalName>:<port of
    the APIService>`` itself, so ``localhost`` reaches the operator's loopback server,
    which Endpoints cannot point at.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICE_NAME, "namespace": namespace, "labels": dict(LABELS)},
        "spec": {
            "type": "ExternalName",
            "externalName": "localhost",
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        },
    }


def apiservice(namespace: str, service: str, port: int) -> dict[str, Any]:
    """The APIService routing ``external.metrics.k8s.io/v1beta1`` to ``service``.

    The serving certificate is self-signed, hence insecureSkipTLSVerify (what
    metrics-server and KEDA install by default too).
    """
    return {
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": {"name": APISERVICE_NAME, "labels": dict(LABELS)},
        "spec": {
            "group": GROUP,
            "version": VERSION,
            "service": {"namespace": namespace, "name": service, "port": port},
            "insecureSkipTLSVerify": True,
            "groupPriorityMinimum": 100,
            "versionPriority": 100,
        },
    }


def service_of(observed: Mapping[str, Any]) -> tuple[str, str] | None:
    """(namespace, name) of the Service an APIService routes to; None: the API server
    serves it itself."""
    svc = (observed.get("spec") or {}).get("service")
    if not svc:
        return None
    return str(svc.get("namespace", "")), str(svc.get("name", ""))


def is_shoals(observed: Mapping[str, Any], namespace: str, service: str) -> bool:
    labels = observed.get("metadata", {}).get("labels") or {}
    marked = all(labels.get(k) == v for k, v in PART_OF.items())
    return marked or service_of(observed) == (namespace, service)


@dataclass(frozen=True)
class MetricsProvider:
    """Whether Shoal's metrics reach the HPAs: what every ScalingPolicy's
    ``MetricsAvailable`` condition says."""

    status: Literal["True", "False"]
    reason: str
    message: str

    @property
    def foreign(self) -> bool:
        return self.reason == "ExternalMetricsProviderConflict"


def provider(observed: Mapping[str, Any] | None, namespace: str, service: str) -> MetricsProvider:
    """What the observed APIService means; ``namespace``/``service``: where ours points."""
    if observed is None:
        return MetricsProvider(
            "False",
            "APIServiceMissing",
            f"APIService {APISERVICE_NAME} does not exist, so the HPA cannot read Shoal's "
            "metrics: install it (Helm value metricsApi.enabled, manifests/base) or run the "
            "operator with --register-apiservice local",
        )
    if not is_shoals(observed, namespace, service):
        target = service_of(observed)
        where = f"Service {target[0]}/{target[1]}" if target else "the API server itself"
        return MetricsProvider(
            "False",
            "ExternalMetricsProviderConflict",
            f"APIService {APISERVICE_NAME} belongs to another external metrics provider "
            f"({where}); Shoal leaves it alone, so HPAs cannot read shoal_queue_lag or "
            "shoal_latency_p95_ms",
        )
    available = next(
        (
            c
            for c in (observed.get("status") or {}).get("conditions") or ()
            if c.get("type") == "Available"
        ),
        None,
    )
    if available is None or available.get("status") != "True":
        why = (available or {}).get("message") or "not checked by the aggregator yet"
        return MetricsProvider(
            "False", "APIServiceUnavailable", f"APIService {APISERVICE_NAME}: {why}"
        )
    target = service_of(observed)
    where = f"Service {target[0]}/{target[1]}" if target else "the API server"
    return MetricsProvider(
        "True", "Served", f"{GROUP_VERSION} is served by the Shoal operator ({where})"
    )
