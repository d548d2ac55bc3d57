"""Shoal's external metrics API: ``external.metrics.k8s.io/v1beta1``, served over HTTPS
from inside the operator, so that the HPAs of ScalingPolicies can read queue figures
(:mod:`~shoal_operator.scaling.queue_metrics` says which and how fresh).

Each figure names its Agent by the label selector ``shoal.dev/agent=NAME`` (what the
HPAs built from ScalingPolicies send). Every operator replica serves (a Service spreads
the aggregator's requests over them); which APIService points here is
:mod:`~shoal_operator.scaling.apiservice_registration`'s business, the certificate
:mod:`~shoal_operator.scaling.tls`'s.

Requests are not authenticated here. Only the kube-apiserver is meant to call: it
authenticates and authorises the user (the HPA controller's bootstrap role may read
``external.metrics.k8s.io``) before proxying. Anything that reaches the operator's port
directly can read queue depths and latencies, nothing else; hardening would be to ask
for client certificates and accept only the front proxy's (the CA and allowed names in
ConfigMap ``kube-system/extension-apiserver-authentication``, readable through the Role
``extension-apiserver-authentication-reader``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from shoal_api.timestamps import rfc3339
from shoal_operator.builders import apiservice as reg
from shoal_operator.builders.common import AGENT_LABEL
from shoal_operator.scaling.queue_metrics import METRICS, MetricsError, QueueMetrics
from shoal_operator.scaling.tls import ssl_context

log = logging.getLogger(__name__)

DEFAULT_PORT = 6443
# Kubernetes names of namespaces and Agents: they end up in NATS subjects, where a dot
# or a wildcard would address something else.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SELECTOR = re.compile(
    rf"^\s*{re.escape(AGENT_LABEL)}\s*(?:==?\s*(?P<eq>[^\s,()]+)|\s+in\s*\(\s*(?P<in>[^()]*)\))\s*$"
)


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
