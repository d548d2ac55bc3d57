"""Shoal's external metrics API: ``external.metrics.k8s.io/v1beta1``, served over HTTPS
from inside the operator, so that the HPAs of ScalingPolicies can read queue figures.

- ``shoal_queue_lag``: pending + in-flight tasks of the Agent's JetStream consumer;
- ``shoal_latency_p95_ms``: the highest p95 latency its runtime pods reported to KV
  ``shoal-stats`` (0 when none reported within the bucket's TTL);
- ``shoal_arrival_rate``: tasks per second reaching the consumer.

Each names its Agent by the label selector ``shoal.dev/agent=NAME`` (what the HPAs built
from ScalingPolicies send). Values are read from JetStream when asked, at most
``max_age`` (0.5 s) old, so an HPA (which asks every 15 s) sees the queue as it is, not a
poll of it. :class:`QueueMetrics` is the same figures as a Python API.

Every operator replica serves (a Service spreads the aggregator's requests over them).
The APIService is the Helm chart's or kustomize's in a cluster (``--register-apiservice
none``); an operator running outside the cluster registers itself (``local``: an
ExternalName Service to ``localhost``, see ``builders/apiservice.py``) and removes the
APIService when it stops, as an APIService without a server stalls namespace deletion.

Requests are not authenticated here. Only the kube-apiserver is meant to call: it
authenticates and authorises the user (the HPA controller's bootstrap role may read
``external.metrics.k8s.io``) before proxying. Anything that reaches the operator's port
directly can read queue depths and latencies, nothing else; hardening would be to ask
for client certificates and accept only the front proxy's (the CA and allowed names in
ConfigMap ``kube-system/extension-apiserver-authentication``, readable through the Role
``extension-apiserver-authentication-reader``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import socket
import ssl
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes_asyncio.client.exceptions import ApiException

from shoal_api.runtime_state import PodStats
from shoal_operator.builders import apiservice as reg
from shoal_operator.builders.common import AGENT_LABEL
from shoal_operator.builders.hpa import LATENCY_METRIC, QUEUE_LAG_METRIC
from shoal_operator.jetstream_admin import queue_counts
from shoal_operator.kube import Kube
from shoal_operator.settings import FIELD_MANAGER

log = logging.getLogger(__name__)

ARRIVAL_RATE_METRIC = "shoal_arrival_rate"
METRICS = (QUEUE_LAG_METRIC, LATENCY_METRIC, ARRIVAL_RATE_METRIC)
DEFAULT_PORT = 6443
MAX_AGE_SECONDS = 0.5
RATE_WINDOW_SECONDS = 30.0
# Kubernetes names of namespaces and Agents: they end up in NATS subjects, where a dot
# or a wildcard would address something else.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SELECTOR = re.compile(
    rf"^\s*{re.escape(AGENT_LABEL)}\s*(?:==?\s*(?P<eq>[^\s,()]+)|\s+in\s*\(\s*(?P<in>[^()]*)\))\s*$"
)

T = TypeVar("T")

# -- values ------------------------------------------------------------------------------


def quantity(value: float) -> str:
    """A Kubernetes quantity: whole numbers as they are ("12"), anything else in milli
    units ("1500m"), which the HPA compares without rounding them away."""
    if not math.isfinite(value):
        return "0"
    milli = round(value * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


class SelectorError(ValueError):
    pass


def agent_from_selector(selector: str) -> str:
    """The one Agent a label selector names: ``shoal.dev/agent=NAME`` (``==`` too) or
    ``shoal.dev/agent in (NAME)``; anything else is refused."""
    if not selector.strip():
        raise SelectorError(
            f"labelSelector is required and must name one Agent ({AGENT_LABEL}=NAME)"
        )
    m = _SELECTOR.match(selector)
    if m is None:
        raise SelectorError(
            f"labelSelector {selector!r} is not supported: select exactly one Agent with "
            f"{AGENT_LABEL}=NAME"
        )
    names = [m["eq"]] if m["eq"] is not None else [n.strip() for n in m["in"].split(",")]
    if len(names) != 1 or not _DNS_LABEL.match(names[0]):
        raise SelectorError(
            f"labelSelector {selector!r} must name exactly one Agent by a valid name"
        )
    return names[0]


class ArrivalRate:
    """Tasks per second, from a count of tasks that ever arrived sampled now and then.

    The rate spans from the oldest sample inside ``window`` (or, if none is that recent,
    the newest one before it) to the latest: one sample gives 0.
    """

    def __init__(self, window: float = RATE_WINDOW_SECONDS, max_samples: int = 64) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque(maxlen=max_samples)

    def observe(self, at: float, arrived: int) -> float:
        if self._samples and arrived < self._samples[-1][1]:
            # The consumer was recreated (the Agent deleted and applied again): its
            # counters started over, and a difference across that means nothing.
            self._samples.clear()
        self._samples.append((at, arrived))
        while len(self._samples) > 2 and self._samples[1][0] <= at - self.window:
            self._samples.popleft()
        return self.rate()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, a0), (t1, a1) = self._samples[0], self._samples[-1]
        return (a1 - a0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass(frozen=True)
class QueueSample:
    pending: int
    in_flight: int
    arrived: int
    """Deliveries so far (the consumer sequence) + pending: grows by one per arriving
    task, and by one per redelivery, which is work arriving too."""

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> QueueSample:
        pending, in_flight = queue_counts(info)
        delivered = int((info.get("delivered") or {}).get("consumer_seq", 0))
        return cls(pending, in_flight, delivered + pending)


# -- the metric sources ------------------------------------------------------------------


class MetricsError(Exception):
    code = 500
    reason = "InternalError"


class AgentNotFound(MetricsError):  # noqa: N818  (an API answer: NotFound)
    code = 404
    reason = "NotFound"


class MetricsUnavailable(MetricsError):  # noqa: N818  (an API answer: ServiceUnavailable)
    code = 503
    reason = "ServiceUnavailable"


class MetricsSource(Protocol):
    """Where the figures come from (:class:`~shoal_operator.jetstream_admin.JetStreamAdmin`)."""

    async def consumer_info(self, namespace: str, agent: str) -> dict[str, Any] | None: ...

    async def pod_stats(self, namespace: str, agent: str) -> list[PodStats]: ...


@dataclass
class _Cached(Generic[T]):
    value: T | None = None
    at: float = -math.inf
    pending: asyncio.Task[T] | None = None
    used: float = 0.0


@dataclass
class _Agent:
    queue: _Cached[QueueSample] = field(default_factory=_Cached)
    stats: _Cached[list[PodStats]] = field(default_factory=_Cached)
    rate: ArrivalRate = field(default_factory=ArrivalRate)


class QueueMetrics:
    """Per-Agent queue figures, read from JetStream on demand and kept ``max_age``
    seconds, so that a burst of requests (replicas of the HPA controller, the
    autoscaler, a person with kubectl) costs one JetStream request per Agent.

    ``source`` returns the connection, or None while there is none (503).
    """

    PRUNE_AFTER = 600.0

    def __init__(
        self,
        source: Callable[[], MetricsSource | None],
        *,
        max_age: float = MAX_AGE_SECONDS,
        rate_window: float = RATE_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self.max_age = max_age
        self.rate_window = rate_window
        self._clock = clock
        self._agents: dict[tuple[str, str], _Agent] = {}
        self._pruned = clock()

    async def lag(self, namespace: str, agent: str) -> tuple[int, int]:
        """(pending, in flight) of the Agent's consumer."""
        sample = await self._sample(namespace, agent)
        return sample.pending, sample.in_flight

    async def arrival_rate(self, namespace: str, agent: str) -> float:
        """Tasks per second arriving for the Agent over the last ``rate_window`` seconds
        of samples (every read of the queue is a sample; the first gives 0)."""
        await self._sample(namespace, agent)
        return self._agent(namespace, agent).rate.rate()

    async def pod_stats(self, namespace: str, agent: str) -> list[PodStats]:
        """The live figures of the Agent's runtime pods (those that reported within the
        stats bucket's TTL)."""
        entry = self._agent(namespace, agent)
        return await self._cached(entry.stats, lambda src: src.pod_stats(namespace, agent))

    async def latency_p95_ms(self, namespace: str, agent: str) -> float:
        """The highest p95 latency among the Agent's pods: the slowest pod is the one
        that misses the target first."""
        return max((s.p95_ms for s in await self.pod_stats(namespace, agent)), default=0.0)

    async def value(self, metric: str, namespace: str, agent: str) -> float:
        """A metric of :data:`METRICS`; AgentNotFound when the Agent has no consumer."""
        pending, in_flight = await self.lag(namespace, agent)
        if metric == QUEUE_LAG_METRIC:
            return float(pending + in_flight)
        if metric == LATENCY_METRIC:
            return await self.latency_p95_ms(namespace, agent)
        if metric == ARRIVAL_RATE_METRIC:
            return await self.arrival_rate(namespace, agent)
        raise KeyError(metric)

    # -- caching -----------------------------------------------------------------------

    def _agent(self, namespace: str, agent: str) -> _Agent:
        now = self._clock()
        if now - self._pruned > self.PRUNE_AFTER:
            # Deleted Agents leave their entries behind; nobody asks about them again.
            self._pruned = now
            for key, old in list(self._agents.items()):
                if now - max(old.queue.used, old.stats.used) > self.PRUNE_AFTER:
                    del self._agents[key]
        key = (namespace, agent)
        entry = self._agents.get(key)
        if entry is None:
            entry = self._agents[key] = _Agent(rate=ArrivalRate(self.rate_window))
        return entry

    async def _sample(self, namespace: str, agent: str) -> QueueSample:
        entry = self._agent(namespace, agent)

        async def fetch(src: MetricsSource) -> QueueSample:
            info = await src.consumer_info(namespace, agent)
            if info is None:
                raise AgentNotFound(
                    f"Agent {agent} in namespace {namespace} has no JetStream consumer "
                    "(no such Agent, or not reconciled yet)"
                )
            sample = QueueSample.from_info(info)
            entry.rate.observe(self._clock(), sample.arrived)
            return sample

        return await self._cached(entry.queue, fetch)

    async def _cached(self, cache: _Cached[T], fetch: Callable[[MetricsSource], Awaitable[T]]) -> T:
        now = self._clock()
        cache.used = now
        if cache.value is not None and now - cache.at < self.max_age:
            return cache.value
        if cache.pending is None:
            src = self._source()
            if src is None:
                raise MetricsUnavailable("the operator is not connected to NATS yet")
            cache.pending = asyncio.create_task(self._fetch(cache, fetch, src))
            cache.pending.add_done_callback(_retrieve)
        # Shielded: a caller that gives up (the aggregator's timeout) does not cancel
        # the read the other callers wait for.
        return await asyncio.shield(cache.pending)

    async def _fetch(
        self, cache: _Cached[T], fetch: Callable[[MetricsSource], Awaitable[T]], src: MetricsSource
    ) -> T:
        try:
            value = await fetch(src)
        except MetricsError:
            raise
        except Exception as exc:
            raise MetricsUnavailable(f"reading JetStream: {type(exc).__name__}: {exc}") from exc
        finally:
            cache.pending = None
        cache.value, cache.at = value, self._clock()
        return value


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Every waiter may have gone: mark the outcome seen so asyncio does not warn.
    if not task.cancelled():
        task.exception()


# -- HTTP ------------------------------------------------------------------------------


def status_response(code: int, reason: str, message: str) -> web.Response:
    """A ``metav1.Status``: kubectl and the HPA show its message."""
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


def rfc3339(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def resource_list() -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": reg.GROUP_VERSION,
        "resources": [
            {
                "name": name,
                "singularName": "",
                "namespaced": True,
                "kind": "ExternalMetricValueList",
                "verbs": ["get"],
            }
            for name in METRICS
        ],
    }


# The aggregator merges every APIService's OpenAPI document into the API server's. It
# tolerates a 404 for v3 (then converts v2), but a v2 404 is retried with backoff and
# logged each time: hence a minimal, valid v2 document.
_OPENAPI_V2 = json.dumps(
    {
        "swagger": "2.0",
        "info": {"title": "Shoal external metrics", "version": reg.VERSION},
        "paths": {},
    },
    sort_keys=True,
).encode()
_OPENAPI_ETAG = '"' + hashlib.sha256(_OPENAPI_V2).hexdigest()[:32] + '"'


def make_app(metrics: QueueMetrics, wall_clock: Callable[[], float] = time.time) -> web.Application:
    async def values(request: web.Request) -> web.Response:
        namespace, metric = request.match_info["namespace"], request.match_info["metric"]
        if metric not in METRICS:
            return status_response(
                404, "NotFound", f"no external metric {metric!r}: served are {', '.join(METRICS)}"
            )
        if not _DNS_LABEL.match(namespace):
            return status_response(400, "BadRequest", f"invalid namespace {namespace!r}")
        try:
            agent = agent_from_selector(request.query.get("labelSelector", ""))
        except SelectorError as exc:
            return status_response(400, "BadRequest", str(exc))
        try:
            value = await metrics.value(metric, namespace, agent)
        except MetricsError as exc:
            return status_response(exc.code, exc.reason, str(exc))
        item = {
            "metricName": metric,
            "metricLabels": {AGENT_LABEL: agent},
            "timestamp": rfc3339(wall_clock()),
            "value": quantity(value),
        }
        return web.json_response(
            {
                "kind": "ExternalMetricValueList",
                "apiVersion": reg.GROUP_VERSION,
                "metadata": {},
                "items": [item],
            }
        )

    async def discovery(_: web.Request) -> web.Response:
        return web.json_response(resource_list())

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def openapi_v2(request: web.Request) -> web.Response:
        headers = {"ETag": _OPENAPI_ETAG}
        if request.headers.get("If-None-Match") == _OPENAPI_ETAG:
            return web.Response(status=304, headers=headers)
        return web.Response(body=_OPENAPI_V2, content_type="application/json", headers=headers)

    @web.middleware
    async def as_status(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return status_response(exc.status, exc.reason.replace(" ", ""), exc.text or "")
        except Exception:
            log.exception("metrics API: %s %s failed", request.method, request.path)
            return status_response(500, "InternalError", "internal error (see the operator log)")

    app = web.Application(middlewares=[as_status])
    base = f"/apis/{reg.GROUP_VERSION}"
    app.router.add_get(base, discovery)
    app.router.add_get(base + "/namespaces/{namespace}/{metric}", values)
    for path in ("/healthz", "/livez", "/readyz"):
        app.router.add_get(path, ok)
    app.router.add_get("/openapi/v2", openapi_v2)
    return app


# -- TLS --------------------------------------------------------------------------------


def self_signed_pem(hosts: Sequence[str], days: int = 365) -> bytes:
    """A fresh key and a self-signed certificate for ``hosts``, as one PEM (cert first)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, reg.SERVICE_NAME)])
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ssl_context(cert: str | None, key: str | None, hosts: Sequence[str]) -> ssl.SSLContext:
    """From the given files, or a self-signed certificate made now (the APIService skips
    verification: the aggregator cannot know a certificate made at start-up)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    if cert and key:
        ctx.load_cert_chain(cert, key)
        return ctx
    pem = self_signed_pem(hosts)
    # ssl loads certificates from files only, and the operator's root filesystem is
    # read-only: an anonymous in-memory file does (Linux), a temporary file elsewhere.
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("shoal-metrics-api.pem")
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return ctx
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tls.pem"
        path.write_bytes(pem)
        ctx.load_cert_chain(str(path))
    return ctx


# -- configuration and the server --------------------------------------------------------

RegistrationMode = Literal["local", "none"]


@dataclass(frozen=True)
class MetricsApiConfig:
    port: int | None = DEFAULT_PORT
    """None: no metrics API; 0: any free port (tests; ``local`` registers the one taken)."""
    cert: str | None = None
    key: str | None = None
    register: RegistrationMode = "none"
    service: str = reg.SERVICE_NAME
    """The Service an APIService of ours names (the chart's, in ``none`` mode)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> MetricsApiConfig:
        """``SHOAL_METRICS_API_PORT`` (a port, ``0`` = off, ``auto`` = any free port),
        ``SHOAL_METRICS_API_CERT``/``_KEY``, ``SHOAL_REGISTER_APISERVICE`` (local|none),
        ``SHOAL_METRICS_API_SERVICE``. Raises ValueError on nonsense."""
        raw = env.get("SHOAL_METRICS_API_PORT", "").strip() or str(DEFAULT_PORT)
        port: int | None
        if raw == "auto":
            port = 0
        else:
            port = int(raw)
            if not 0 <= port <= 65535:
                raise ValueError(f"SHOAL_METRICS_API_PORT {raw} is not a port")
            port = port or None
        register = env.get("SHOAL_REGISTER_APISERVICE", "").strip() or "none"
        if register not in ("local", "none"):
            raise ValueError(f"SHOAL_REGISTER_APISERVICE must be local or none, not {register!r}")
        cert = env.get("SHOAL_METRICS_API_CERT") or None
        key = env.get("SHOAL_METRICS_API_KEY") or None
        if bool(cert) != bool(key):
            raise ValueError("SHOAL_METRICS_API_CERT and SHOAL_METRICS_API_KEY go together")
        return cls(
            port=port,
            cert=cert,
            key=key,
            register="local" if register == "local" else "none",
            service=env.get("SHOAL_METRICS_API_SERVICE") or reg.SERVICE_NAME,
        )


class MetricsApiServer:
    """The HTTPS server; ``port`` is the one bound (useful with port 0)."""

    def __init__(
        self, metrics: QueueMetrics, config: MetricsApiConfig, host: str, hosts: Sequence[str]
    ) -> None:
        self.metrics = metrics
        self.config = config
        self.host = host
        self.hosts = hosts
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        ctx = ssl_context(self.config.cert, self.config.key, self.hosts)
        sock = socket.create_server((self.host, self.config.port or 0))
        runner = web.AppRunner(make_app(self.metrics), access_log=None, shutdown_timeout=2.0)
        try:
            await runner.setup()
            await web.SockSite(runner, sock, ssl_context=ctx).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(sock.getsockname()[1])
        log.info("serving %s on https://%s:%d", reg.GROUP_VERSION, self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# -- registration ------------------------------------------------------------------------

APISERVICE_PATH = f"/apis/apiregistration.k8s.io/v1/apiservices/{reg.APISERVICE_NAME}"
RECHECK_SECONDS = 30.0
RETRY_SECONDS = 5.0


class Registration:
    """Keeps the APIService pointing at this operator (``local``), or only watches whom
    it points at (``none``), and tells ``on_change`` what that means for policies.

    Another provider's APIService is never touched. Re-checked every 30 s (more often
    while ours is not Available yet), so a provider installed or removed later shows.
    """

    def __init__(
        self,
        kube: Kube,
        config: MetricsApiConfig,
        namespace: str,
        port: int,
        on_change: Callable[[reg.MetricsProvider], None],
    ) -> None:
        self.kube = kube
        self.config = config
        self.namespace = namespace
        self.port = port
        self.on_change = on_change
        self.state: reg.MetricsProvider | None = None

    @property
    def _service_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/services/{reg.SERVICE_NAME}"

    async def run(self) -> None:
        delay = 1.0
        while True:
            try:
                state = await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("metrics API registration: %s; retrying in %.0fs", exc, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            if state != self.state:
                level = logging.INFO if state.status == "True" else logging.WARNING
                log.log(level, "metrics API: %s: %s", state.reason, state.message)
            self.state = state
            self.on_change(state)
            if state.reason == "APIServiceUnavailable":
                # Just registered: the aggregator checks within seconds.
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECHECK_SECONDS)
            else:
                delay = 1.0
                await asyncio.sleep(RECHECK_SECONDS)

    async def sync(self) -> reg.MetricsProvider:
        existing = await self._get(APISERVICE_PATH)
        ours = (self.namespace, self.config.service)
        if self.config.register == "none" or (
            existing is not None and not reg.is_shoals(existing, *ours)
        ):
            return reg.provider(existing, *ours)
        await self._apply(self._service_path, reg.local_service(self.namespace, self.port))
        applied: dict[str, Any] | None = await self._apply(
            APISERVICE_PATH, reg.apiservice(self.namespace, reg.SERVICE_NAME, self.port)
        )
        # The aggregator checks a new APIService within a second or so: waiting for its
        # verdict spares every policy a False-then-True pair of status writes.
        for _ in range(20):
            if applied is None or _checked(applied):
                break
            await asyncio.sleep(0.25)
            applied = await self._get(APISERVICE_PATH)
        return reg.provider(applied, *ours)

    async def unregister(self) -> None:
        """Deletes the APIService if it still points at us, then our Service (local)."""
        if self.config.register != "local":
            return
        existing = await self._get(APISERVICE_PATH)
        if existing is not None and reg.service_of(existing) == (
            self.namespace,
            reg.SERVICE_NAME,
        ):
            uid = existing["metadata"]["uid"]
            with contextlib.suppress(ApiException):  # gone or replaced meanwhile
                await self.kube._call("DELETE", APISERVICE_PATH, {"preconditions": {"uid": uid}})
            log.info("metrics API: APIService %s deleted", reg.APISERVICE_NAME)
        with contextlib.suppress(ApiException):
            await self.kube._call("DELETE", self._service_path)

    async def _get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.kube._call("GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def _apply(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        # Kube.apply knows namespaced kinds of its own table only; same call, any path.
        return await self.kube._call(
            "PATCH",
            path,
            obj,
            "application/apply-patch+yaml",
            [("fieldManager", FIELD_MANAGER), ("force", "true")],
        )


def _checked(apiservice: Mapping[str, Any]) -> bool:
    conditions = (apiservice.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Available" for c in conditions)
