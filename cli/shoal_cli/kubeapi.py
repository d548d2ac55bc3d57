"""A small Kubernetes API client for the few calls of the ``shoal`` CLI that are
Kubernetes writes (``shoal approve``): credentials from a kubeconfig or the pod's
service account, JSON over httpx.

Why it is kept rather than kubernetes_asyncio: the CLI is what users ``pip install``, and
these commands need a handful of requests; a small client on the httpx and PyYAML the CLI
has anyway spares every user a large generated client and its dependencies. What kubectl
users have configured works: client certificates, bearer tokens
and token files, basic auth, and exec credential plugins (EKS, GKE, AKS, OIDC logins).
Legacy ``auth-provider`` entries do not: they are reported as such.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
EXEC_API_VERSION = "client.authentication.k8s.io/v1"


class KubeConfigError(Exception):
    """No usable credentials: the kubeconfig is missing, incomplete or unsupported."""


class KubeUnreachableError(Exception):
    """The API server could not be reached (network, TLS)."""


class KubeApiError(Exception):
    """The API server answered with an error Status."""

    def __init__(self, status: int, reason: str, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.kind = kind
        """The Status's details.kind: what was not found, say ("namespaces")."""


@dataclass
class Credentials:
    """Where the API server is and how to authenticate to it."""

    server: str
    verify: ssl.SSLContext
    headers: dict[str, str] = field(default_factory=dict)
    namespace: str | None = None
    """The context's namespace, if it names one."""
    tls_server_name: str | None = None
    proxy: str | None = None


@dataclass(frozen=True)
class _Entry:
    value: Mapping[str, Any]
    base: Path
    """Relative paths in the entry are relative to the file that holds it."""


def _named(files: list[tuple[dict[str, Any], Path]], section: str) -> dict[str, _Entry]:
    # KUBECONFIG lists several files: the first to define a name wins, as in kubectl.
    out: dict[str, _Entry] = {}
    key = section.rstrip("s")
    for doc, base in files:
        for item in doc.get(section) or []:
            if isinstance(item, dict) and item.get("name") not in out:
                out[str(item.get("name"))] = _Entry(item.get(key) or {}, base)
    return out


def _kubeconfig_paths(explicit: str | None) -> list[Path]:
    if explicit:
        return [Path(explicit).expanduser()]
    env = os.environ.get("KUBECONFIG", "")
    paths = [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    if paths:
        return [p for p in paths if p.exists()] or paths[:1]
    default = Path.home() / ".kube" / "config"
    return [default] if default.exists() else []


def load(kubeconfig: str | None = None, context: str | None = None) -> Credentials:
    """Credentials as kubectl would find them: ``kubeconfig`` or $KUBECONFIG or
    ~/.kube/config, else the pod's service account."""
    paths = _kubeconfig_paths(kubeconfig)
    if not paths:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and SERVICE_ACCOUNT.exists():
            return _in_cluster()
        raise KubeConfigError("no kubeconfig: set KUBECONFIG or pass --kubeconfig")
    files: list[tuple[dict[str, Any], Path]] = []
    for path in paths:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise KubeConfigError(f"cannot read kubeconfig {path}: {exc}") from exc
        if not isinstance(doc, dict):
            raise KubeConfigError(f"kubeconfig {path} is not a mapping")
        files.append((doc, path.resolve().parent))
    name = context or next((d["current-context"] for d, _ in files if d.get("current-context")), "")
    if not name:
        raise KubeConfigError("the kubeconfig has no current-context: pass --context")
    contexts = _named(files, "contexts")
    if name not in contexts:
        raise KubeConfigError(f"context {name!r} is not in the kubeconfig")
    ctx = contexts[name].value
    clusters, users = _named(files, "clusters"), _named(files, "users")
    cluster = clusters.get(str(ctx.get("cluster")))
    if cluster is None or not cluster.value.get("server"):
        raise KubeConfigError(f"context {name!r}: cluster {ctx.get('cluster')!r} has no server")
    user = users.get(str(ctx.get("user")), _Entry({}, cluster.base))
    creds = Credentials(
        server=str(cluster.value["server"]).rstrip("/"),
        verify=_tls(cluster),
        namespace=ctx.get("namespace") or None,
        tls_server_name=cluster.value.get("tls-server-name") or None,
        proxy=cluster.value.get("proxy-url") or None,
    )
    _authenticate(creds, user, cluster)
    return creds


def _in_cluster() -> Credentials:
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT")
    if ":" in host:
        host = f"[{host}]"
    token = (SERVICE_ACCOUNT / "token").read_text().strip()
    namespace_file = SERVICE_ACCOUNT / "namespace"
    return Credentials(
        server=f"https://{host}:{port or 443}",
        verify=ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt")),
        headers={"Authorization": f"Bearer {token}"},
        namespace=namespace_file.read_text().strip() if namespace_file.exists() else None,
    )


def _path(entry: _Entry, key: str) -> str:
    return str(entry.base / Path(str(entry.value[key])).expanduser())


def _tls(cluster: _Entry) -> ssl.SSLContext:
    c = cluster.value
    if c.get("insecure-skip-tls-verify"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        if c.get("certificate-authority-data"):
            pem = base64.b64decode(c["certificate-authority-data"]).decode()
            return ssl.create_default_context(cadata=pem)
        if c.get("certificate-authority"):
            return ssl.create_default_context(cafile=_path(cluster, "certificate-authority"))
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise KubeConfigError(f"the cluster's certificate authority is unusable: {exc}") from exc
    return ssl.create_default_context()


def _load_client_cert(ctx: ssl.SSLContext, cert: str | bytes, key: str | bytes) -> None:
    """``cert``/``key``: a file path, or PEM bytes (which ssl can only load from files:
    they are written to a private temporary directory and removed at once)."""
    try:
        if isinstance(cert, str) and isinstance(key, str):
            ctx.load_cert_chain(cert, key)
            return
        with tempfile.TemporaryDirectory(prefix="shoal-") as tmp:
            files = []
            for name, value in (("tls.crt", cert), ("tls.key", key)):
                path = Path(tmp) / name
                if isinstance(value, str):
                    path = Path(value)
                else:
                    path.touch(0o600)
                    path.write_bytes(value)
                files.append(str(path))
            ctx.load_cert_chain(files[0], files[1])
    except (OSError, ssl.SSLError) as exc:
        raise KubeConfigError(f"the client certificate is unusable: {exc}") from exc


def _pem(entry: _Entry, what: str) -> str | bytes | None:
    if entry.value.get(f"{what}-data"):
        return base64.b64decode(entry.value[f"{what}-data"])
    if entry.value.get(what):
        return _path(entry, what)
    return None


def _authenticate(creds: Credentials, user: _Entry, cluster: _Entry) -> None:
    u = user.value
    cert, key = _pem(user, "client-certificate"), _pem(user, "client-key")
    if cert is not None and key is not None:
        _load_client_cert(creds.verify, cert, key)
    token = u.get("token")
    if not token and u.get("tokenFile"):
        try:
            token = Path(_path(user, "tokenFile")).read_text().strip()
        except OSError as exc:
            raise KubeConfigError(f"cannot read tokenFile: {exc}") from exc
    if u.get("exec"):
        status = _exec_credential(user, cluster)
        token = status.get("token") or token
        if status.get("clientCertificateData") and status.get("clientKeyData"):
            _load_client_cert(
                creds.verify,
                str(status["clientCertificateData"]).encode(),
                str(status["clientKeyData"]).encode(),
            )
    elif u.get("auth-provider"):
        provider = (u["auth-provider"] or {}).get("name", "?")
        raise KubeConfigError(
            f"the kubeconfig's auth-provider {provider!r} is not supported; use an exec "
            "credential plugin (kubectl's replacement for auth providers)"
        )
    if token:
        creds.headers["Authorization"] = f"Bearer {token}"
    elif u.get("username") and u.get("password"):
        basic = base64.b64encode(f"{u['username']}:{u['password']}".encode()).decode()
        creds.headers["Authorization"] = f"Basic {basic}"


def _exec_credential(user: _Entry, cluster: _Entry) -> Mapping[str, Any]:
    """Runs an exec credential plugin as kubectl does; its stderr (and, when interactive,
    its prompts) go to the terminal."""
    spec = user.value["exec"]
    command = str(spec.get("command") or "")
    if not command:
        raise KubeConfigError("the kubeconfig's exec plugin has no command")
    if os.sep in command and not os.path.isabs(command):
        command = str(user.base / command)
    interactive = sys.stdin.isatty() and spec.get("interactiveMode", "IfAvailable") != "Never"
    info: dict[str, Any] = {
        "apiVersion": spec.get("apiVersion") or EXEC_API_VERSION,
        "kind": "ExecCredential",
        "spec": {"interactive": interactive},
    }
    if spec.get("provideClusterInfo"):
        info["spec"]["cluster"] = {
            k: v
            for k, v in cluster.value.items()
            if k in ("server", "tls-server-name", "insecure-skip-tls-verify", "proxy-url")
            or k == "certificate-authority-data"
        }
    env = {**os.environ, "KUBERNETES_EXEC_INFO": json.dumps(info)}
    env.update({str(e["name"]): str(e["value"]) for e in spec.get("env") or []})
    try:
        proc = subprocess.run(
            [command, *map(str, spec.get("args") or [])],
            env=env,
            stdout=subprocess.PIPE,
            stdin=None if interactive else subprocess.DEVNULL,
            check=False,
        )
    except OSError as exc:
        hint = f" ({spec['installHint'].strip()})" if spec.get("installHint") else ""
        raise KubeConfigError(f"exec plugin {command}: {exc}{hint}") from exc
    if proc.returncode != 0:
        raise KubeConfigError(f"exec plugin {command} failed with exit code {proc.returncode}")
    try:
        status = json.loads(proc.stdout)["status"]
    except (ValueError, KeyError, TypeError) as exc:
        raise KubeConfigError(f"exec plugin {command} printed no ExecCredential") from exc
    if not isinstance(status, dict):
        raise KubeConfigError(f"exec plugin {command} printed no ExecCredential status")
    return status


class KubeApi:
    """JSON requests to the API server; use as ``async with KubeApi(load()) as api``."""

    def __init__(self, creds: Credentials, timeout: float = 30.0) -> None:
        self.creds = creds
        self._extensions = (
            {"sni_hostname": creds.tls_server_name} if creds.tls_server_name else None
        )
        self._client = httpx.AsyncClient(
            base_url=creds.server,
            verify=creds.verify,
            headers={"Accept": "application/json", **creds.headers},
            timeout=timeout,
            proxy=creds.proxy,
        )

    async def __aenter__(self) -> KubeApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        try:
            resp = await self._client.request(method, path, json=body, extensions=self._extensions)
        except httpx.HTTPError as exc:
            raise KubeUnreachableError(
                f"cannot reach the Kubernetes API at {self.creds.server}: {exc}"
            ) from exc
        if resp.status_code >= 400:
            raise _api_error(resp)
        data = resp.json()
        return data if isinstance(data, dict) else {}

    async def whoami(self) -> str:
        """The authenticated user's name, as the API server sees it (a SelfSubjectReview:
        every authenticated user may create one)."""
        review = await self.request(
            "POST",
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        )
        name = ((review.get("status") or {}).get("userInfo") or {}).get("username")
        if not name:
            raise KubeApiError(401, "Unauthorized", "the API server knows no user name for you")
        return str(name)


def _api_error(resp: httpx.Response) -> KubeApiError:
    try:
        status = resp.json()
    except ValueError:
        status = {}
    if not isinstance(status, dict):
        status = {}
    message = str(status.get("message") or resp.text.strip() or resp.reason_phrase)
    reason = str(status.get("reason") or resp.reason_phrase)
    kind = str((status.get("details") or {}).get("kind") or "")
    return KubeApiError(resp.status_code, reason, message, kind)
