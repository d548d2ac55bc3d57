"""The operator's few Kubernetes API calls: server-side apply, status patches, Events.

Raw JSON over aiohttp (which kopf runs on too): builders produce dicts, so no generated
models are needed, and no Kubernetes client library is installed. That matters for
memory: kopf imports kubernetes_asyncio whenever it is installed, and that library loads
all its generated models (~80 MiB RSS) at import.

Credentials come from where kopf's login looks (``watches._login``), in the same order:
the pod's service account (its projected token is read again whenever the file changes),
else the kubeconfig ($KUBECONFIG, a list of files where the first to name an entry wins,
or ~/.kube/config): server, CA (file or data), client certificate and key (file or data),
bearer token (inline, ``tokenFile`` or an auth-provider's access token), basic auth,
``insecure-skip-tls-verify``, ``tls-server-name`` and ``proxy-url``. Exec credential
plugins are not run (kopf's login does not run them either).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from shoal_api.base import GROUP, VERSION
from shoal_api.timestamps import micro_time
from shoal_operator.settings import FIELD_MANAGER

NotFound = 404
REQUEST_TIMEOUT = 30.0
"""Seconds for a whole request, connection included."""
CONNECTION_LIMIT = 100
"""Connections open to the API server at once (requests beyond wait for one)."""
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
IN_CLUSTER_SERVER = "https://kubernetes.default.svc"


class ApiError(Exception):
    """The API server answered with a status outside 2xx."""

    def __init__(
        self,
        status: int,
        reason: str,
        body: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        """The response body: usually a JSON ``Status`` whose ``message`` says why."""
        self.headers = dict(headers or {})
        super().__init__(status, reason)

    @property
    def message(self) -> str:
        """The ``Status`` message, or the HTTP reason when the body is not a Status."""
        try:
            doc = json.loads(self.body)
        except ValueError:
            return self.reason
        return str(doc.get("message") or self.reason) if isinstance(doc, dict) else self.reason

    def __str__(self) -> str:
        return f"({self.status}) {self.reason}: {self.message}"


class KubeConfigError(Exception):
    """No usable credentials: no service account, no kubeconfig, or an incomplete one."""


TOKEN_REREAD_SECONDS = 60.0
"""A token file is read again at least this often, even when it looks unchanged."""


class TokenFile:
    """A bearer token kept in a file that is replaced over time (a projected
    service-account token, a kubeconfig's ``tokenFile``): read again when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._read_at = 0.0
        self._token = ""
        self.read()  # fails now, not at the first request, when it is unreadable

    def read(self) -> str:
        try:
            st = self.path.stat()  # follows the ..data symlink a projected volume swaps
        except OSError:
            if self._token:
                return self._token  # mid-rotation: the previous token is still valid
            raise
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        now = time.monotonic()
        if stamp != self._stamp or now - self._read_at >= TOKEN_REREAD_SECONDS:
            self._read_at = now
            token = self.path.read_text().strip()
            if not token:
                if self._token:
                    return self._token
                raise KubeConfigError(f"token file {self.path} is empty")
            self._token, self._stamp = token, stamp
        return self._token


@dataclass
class Credentials:
    """Where the API server is and how to authenticate to it."""

    server: str
    ssl_context: ssl.SSLContext
    token: str | None = None
    token_file: TokenFile | None = None
    basic_auth: tuple[str, str] | None = None
    tls_server_name: str | None = None
    proxy: str | None = None
    namespace: str | None = None
    """The context's (or the pod's) namespace, if any."""

    def auth_headers(self) -> dict[str, str]:
        if self.token_file is not None:
            return {"Authorization": f"Bearer {self.token_file.read()}"}
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        if self.basic_auth is not None:
            pair = base64.b64encode(":".join(self.basic_auth).encode()).decode()
            return {"Authorization": f"Basic {pair}"}
        return {}


def tls_context(
    *,
    ca_file: Path | None = None,
    ca_data: str | None = None,
    cert_file: Path | None = None,
    cert_data: str | None = None,
    key_file: Path | None = None,
    key_data: str | None = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    """TLS as a kubeconfig describes it; ``*_data`` are base64 PEM, as in a kubeconfig,
    and win over the files. Without a CA, the system's trust store."""
    ca_pem = base64.b64decode(ca_data).decode() if ca_data else None
    ctx = ssl.create_default_context(
        cafile=None if ca_pem else (str(ca_file) if ca_file else None), cadata=ca_pem
    )
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_data or cert_file:
        if not (key_data or key_file):
            raise KubeConfigError("a client certificate without its key")
        # ssl loads a certificate chain from files only: data goes through a private
        # directory that is gone once loaded.
        with tempfile.TemporaryDirectory(prefix="shoal-kube-") as tmp:
            cert, key = cert_file, key_file
            if cert_data:
                cert = Path(tmp) / "client.crt"
                cert.write_bytes(base64.b64decode(cert_data))
            if key_data:
                key = Path(tmp) / "client.key"
                key.touch(0o600)
                key.write_bytes(base64.b64decode(key_data))
            ctx.load_cert_chain(str(cert), str(key))
    return ctx


def in_cluster(
    environ: Mapping[str, str] = os.environ, service_account: Path = SERVICE_ACCOUNT
) -> Credentials | None:
    """The pod's service account, as kopf's ``login_with_service_account`` finds it;
    None outside a pod."""
    token = service_account / "token"
    if not token.exists():
        return None
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if host and port:
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    else:
        server = IN_CLUSTER_SERVER
    ca = service_account / "ca.crt"
    ns = service_account / "namespace"
    return Credentials(
        server=server,
        ssl_context=tls_context(ca_file=ca if ca.exists() else None),
        token_file=TokenFile(token),
        namespace=(ns.read_text().strip() or None) if ns.exists() else None,
    )


def kubeconfig_paths(environ: Mapping[str, str] = os.environ) -> list[Path]:
    """$KUBECONFIG (a list, as kubectl reads it), else ~/.kube/config if it exists."""
    listed = [p.strip() for p in environ.get("KUBECONFIG", "").split(os.pathsep)]
    if any(listed):
        return [Path(p).expanduser() for p in listed if p]
    default = Path("~/.kube/config").expanduser()
    return [default] if default.exists() else []


def from_kubeconfig(paths: list[Path], context: str | None = None) -> Credentials:
    """The current (or the named) context of these kubeconfig files, merged as kubectl
    merges them: the first file to set a value or name an entry wins. Relative paths are
    relative to the file that holds them."""
    if not paths:
        raise KubeConfigError("no service account and no kubeconfig ($KUBECONFIG)")
    current: str | None = None
    entries: dict[str, dict[str, tuple[dict[str, Any], Path]]] = {
        "contexts": {},
        "clusters": {},
        "users": {},
    }
    for path in paths:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise KubeConfigError(f"cannot read kubeconfig {path}: {exc}") from exc
        if not isinstance(doc, dict):
            raise KubeConfigError(f"kubeconfig {path} is not a mapping")
        current = current or doc.get("current-context") or None
        for section, named in entries.items():
            for item in doc.get(section) or []:
                if isinstance(item, dict) and item.get("name") not in named:
                    named[str(item.get("name"))] = (
                        item.get(section[:-1]) or {},
                        path.resolve().parent,
                    )
    name = context or current
    if not name:
        raise KubeConfigError("the kubeconfig sets no current-context")
    if name not in entries["contexts"]:
        raise KubeConfigError(f"context {name!r} is not in the kubeconfig")
    ctx = entries["contexts"][name][0]
    cluster_name, user_name = str(ctx.get("cluster") or ""), str(ctx.get("user") or "")
    if cluster_name not in entries["clusters"]:
        raise KubeConfigError(f"cluster {cluster_name!r} of context {name!r} is not defined")
    cluster, cluster_base = entries["clusters"][cluster_name]
    user, user_base = entries["users"].get(user_name, ({}, Path.cwd()))
    if not cluster.get("server"):
        raise KubeConfigError(f"cluster {cluster_name!r} has no server")

    def rel(value: Any, base: Path) -> Path | None:
        return base / Path(str(value)).expanduser() if value else None

    provider_token = ((user.get("auth-provider") or {}).get("config") or {}).get("access-token")
    token_file = rel(user.get("tokenFile"), user_base)
    basic = (
        (str(user["username"]), str(user["password"]))
        if "username" in user and "password" in user
        else None
    )
    has_cert = user.get("client-certificate") or user.get("client-certificate-data")
    if "exec" in user and not (user.get("token") or token_file or provider_token or has_cert):
        raise KubeConfigError(
            f"user {user_name!r} authenticates with an exec plugin, which the operator "
            "does not run (nor does kopf's login): give it a token or a client certificate"
        )
    return Credentials(
        server=str(cluster["server"]).rstrip("/"),
        ssl_context=tls_context(
            ca_file=rel(cluster.get("certificate-authority"), cluster_base),
            ca_data=cluster.get("certificate-authority-data"),
            cert_file=rel(user.get("client-certificate"), user_base),
            cert_data=user.get("client-certificate-data"),
            key_file=rel(user.get("client-key"), user_base),
            key_data=user.get("client-key-data"),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
        ),
        token=user.get("token") or provider_token or None,
        token_file=TokenFile(token_file) if token_file and not user.get("token") else None,
        basic_auth=basic,
        tls_server_name=cluster.get("tls-server-name") or None,
        proxy=cluster.get("proxy-url") or None,
        namespace=ctx.get("namespace") or None,
    )


def load_credentials(environ: Mapping[str, str] = os.environ) -> Credentials:
    """The service account in a pod, else the kubeconfig: kopf's login, in its order."""
    return in_cluster(environ) or from_kubeconfig(kubeconfig_paths(environ))


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
    return isinstance(exc, ApiError) and exc.status == code


class Kube:
    """An API client of the operator; one per process."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        credentials: Credentials,
        instance: str | None = None,
    ) -> None:
        self.session = session
        self.credentials = credentials
        self.instance = instance or os.environ.get("POD_NAME") or socket.gethostname()
        """Who reports our Events (reportingInstance): the pod, or this host."""

    @classmethod
    async def connect(cls, instance: str | None = None) -> Kube:
        """Credentials as the environment gives them now (a pod's service account, else
        $KUBECONFIG or ~/.kube/config), and a pooled session for them."""
        credentials = load_credentials()
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONNECTION_LIMIT, ssl=credentials.ssl_context),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            headers={"User-Agent": "shoal-operator", "Accept": "application/json"},
            trust_env=True,  # HTTPS_PROXY / NO_PROXY, as before
        )
        return cls(session, credentials, instance)

    async def close(self) -> None:
        await self.session.close()

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        """One request; the response's JSON object (``{}`` for anything else). Raises
        :class:`ApiError` for a status outside 2xx, aiohttp's errors for the transport's."""
        creds = self.credentials
        headers = creds.auth_headers()
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        async with self.session.request(
            method,
            creds.server + path,
            params=query or None,
            data=data,
            headers=headers,
            proxy=creds.proxy,
            server_hostname=creds.tls_server_name,
        ) as resp:
            raw = await resp.read()
            if not 200 <= resp.status <= 299:
                raise ApiError(
                    resp.status, resp.reason or "", raw.decode(errors="replace"), resp.headers
                )
        if not raw:
            return {}
        result = json.loads(raw)
        return result if isinstance(result, dict) else {}

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", RESOURCES[kind].path(namespace, name))
        except ApiError as exc:
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
        except ApiError as exc:
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
