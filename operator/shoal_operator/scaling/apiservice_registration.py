"""Whom ``v1beta1.external.metrics.k8s.io`` points at, and keeping it pointed at us.

In a cluster the APIService is the Helm chart's or kustomize's (``--register-apiservice
none``): the operator only watches whom it points at, to tell ScalingPolicies whether
their metrics can be served (condition MetricsAvailable). An operator running outside
the cluster registers itself (``local``: an ExternalName Service to ``localhost``, see
``builders/apiservice.py``) and removes the APIService when it stops, as an APIService
without a server stalls namespace deletion. Kept apart from the server because it talks
to the Kubernetes API and the server does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from shoal_operator.builders import apiservice as reg
from shoal_operator.clients.kube import ApiError, Kube
from shoal_operator.scaling.metrics_api_server import MetricsApiConfig
from shoal_operator.settings import FIELD_MANAGER

log = logging.getLogger(__name__)

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
            with contextlib.suppress(ApiError):  # gone or replaced meanwhile
                await self.kube._call("DELETE", APISERVICE_PATH, {"preconditions": {"uid": uid}})
            log.info("metrics API: APIService %s deleted", reg.APISERVICE_NAME)
        with contextlib.suppress(ApiError):
            await self.kube._call("DELETE", self._service_path)

    async def _get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.kube._call("GET", path)
        except ApiError as exc:
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
