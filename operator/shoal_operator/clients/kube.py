"""The operator's few Kubernetes API calls: server-side apply, status patches, Events.

A thin layer over kubernetes_asyncio's transport (auth, TLS, kubeconfig or in-cluster)
with raw JSON in and out: builders produce dicts, so no generated models are needed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from shoal_api.base import GROUP, VERSION
from shoal_api.timestamps import micro_time
from shoal_operator.settings import FIELD_MANAGER

NotFound = 404


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API."""

    group: str  # "" for the core group
    version: str
    plural: str

    def path(self, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        out = f"{base}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            out += f"/{name}"
        if sub is not None:
            out += f"/{sub}"
        return out


RESOURCES: dict[str, Resource] = {
    "Agent": Resource(GROUP, VERSION, "agents"),
    "ScalingPolicy": Resource(GROUP, VERSION, "scalingpolicies"),
    "Workflow": Resource(GROUP, VERSION, "workflows"),
    "Approval": Resource(GROUP, VERSION, "approvals"),
    "Deployment": Resource("apps", "v1", "deployments"),
    "Pod": Resource("", "v1", "pods"),
    "ServiceAccount": Resource("", "v1", "serviceaccounts"),
    "HorizontalPodAutoscaler": Resource("autoscaling", "v2", "horizontalpodautoscalers"),
    "Event": Resource("", "v1", "events"),
    "Lease": Resource("coordination.k8s.io", "v1", "leases"),
}


def is_status(exc: BaseException, code: int) -> bool:
    return isinstance(exc, ApiException) and exc.status == code


class Kube:
    """An API client of the operator; one per process."""

    def __init__(self, api: client.ApiClient, instance: str | None = None) -> None:
        self.api = api
        self.instance = instance or os.environ.get("POD_NAME") or socket.gethostname()
        """Who reports our Events (reportingInstance): the pod, or this host."""

    @classmethod
    async def connect(cls, instance: str | None = None) -> Kube:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            # Read KUBECONFIG now: the library captured it when first imported.
            await config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        return cls(client.ApiClient(), instance)

    async def close(self) -> None:
        await self.api.close()

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        result = await self.api.call_api(
            path,
            method,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            response_types_map={200: "object", 201: "object", 202: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _request_timeout=30,
        )
        return result if isinstance(result, dict) else {}

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", RESOURCES[kind].path(namespace, name))
        except ApiException as exc:
            if exc.status == NotFound:
                return None
            raise

    async def list_items(self, kind: str, namespace: str, label_selector: str = "") -> list[Any]:
        query = [("labelSelector", label_selector)] if label_selector else []
        out = await self._call("GET", RESOURCES[kind].path(namespace), query=query)
        items: list[Any] = out.get("items", [])
        return items

    async def apply(self, obj: dict[str, Any], manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply under one field manager; unchanged input writes nothing."""
        meta = obj["metadata"]
        path = RESOURCES[obj["kind"]].path(meta["namespace"], meta["name"])
        return await self._call(
            "PATCH",
            path,
            obj,
            "application/apply-patch+yaml",
            [("fieldManager", manager), ("force", "true")],
        )

    async def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", RESOURCES[kind].path(namespace), body)

    async def replace(
        self, kind: str, namespace: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """PUT: fails with 409 when body's resourceVersion is no longer current."""
        return await self._call("PUT", RESOURCES[kind].path(namespace, name), body)

    async def merge_patch(
        self, kind: str, namespace: str, name: str, patch: dict[str, Any], sub: str | None = None
    ) -> dict[str, Any]:
        path = RESOURCES[kind].path(namespace, name, sub)
        return await self._call("PATCH", path, patch, "application/merge-patch+json")

    async def json_patch(
        self, kind: str, namespace: str, name: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        path = RESOURCES[kind].path(namespace, name)
        return await self._call("PATCH", path, ops, "application/json-patch+json")

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            await self._call("DELETE", RESOURCES[kind].path(namespace, name))
        except ApiException as exc:
            if exc.status != NotFound:
                raise

    async def event(self, regarding: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on an object (what `kubectl describe` shows)."""
        meta = regarding["metadata"]
        now = micro_time()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": regarding["apiVersion"],
                "kind": regarding["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "shoal-operator"},
            "reportingComponent": "shoal.dev/operator",
            "reportingInstance": self.instance,
            "action": "Reconcile",
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "eventTime": now,
            "count": 1,
        }
        await self._call("POST", RESOURCES["Event"].path(meta["namespace"]), body)
