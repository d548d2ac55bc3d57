"""The operator's Kubernetes client without a cluster: credentials from kubeconfigs and
from a pod's service account (the token read again when it rotates), and the transport's
requests and errors against a local HTTP server. The cluster tests prove it against a
real API server (client certificates, CA)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from shoal_operator.clients.kube import (
    ApiError,
    Credentials,
    Kube,
    KubeConfigError,
    TokenFile,
    from_kubeconfig,
    in_cluster,
    kubeconfig_paths,
    load_credentials,
    tls_context,
)
from shoal_testbed import pki


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[pki.KeyPair, pki.KeyPair]:
    d = tmp_path_factory.mktemp("pki")
    ca = pki.create_ca(d, "ca")
    return ca, pki.issue_client_cert(ca, d, "alice", ("devs",))


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_config(path: Path, user: dict[str, Any], cluster: dict[str, Any], **ctx: Any) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "here",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "here", "context": {"cluster": "c", "user": "u", **ctx}}],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def ca_subjects(ctx: ssl.SSLContext) -> list[Any]:
    return [c["subject"] for c in ctx.get_ca_certs()]


def test_token_and_ca_file_relative_to_the_kubeconfig(
    tmp_path: Path, certs: tuple[pki.KeyPair, pki.KeyPair]
) -> None:
    ca, _ = certs
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "ca.crt").write_bytes(ca.cert.read_bytes())
    path = write_config(
        tmp_path / "conf" / "kubeconfig",
        {"token": "secret-token"},
        {"server": "https://api.example:6443/", "certificate-authority": "ca.crt"},
        namespace="team-a",
    )
    creds = from_kubeconfig([path])
    assert creds.server == "https://api.example:6443"
    assert creds.auth_headers() == {"Authorization": "Bearer secret-token"}
    assert creds.namespace == "team-a"
    assert creds.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert creds.ssl_context.check_hostname
    assert ca_subjects(creds.ssl_context) == [((("commonName", "ca"),),)]


def test_client_certificate_and_ca_as_data(
    tmp_path: Path, certs: tuple[pki.KeyPair, pki.KeyPair]
) -> None:
    ca, alice = certs
    user = {"client-certificate-data": b64(alice.cert), "client-key-data": b64(alice.key)}
    path = write_config(
        tmp_path / "kubeconfig",
        user,
        {"server": "https://127.0.0.1:6443", "certificate-authority-data": b64(ca.cert)},
    )
    creds = from_kubeconfig([path])
    assert creds.auth_headers() == {}
    assert ca_subjects(creds.ssl_context) == [((("commonName", "ca"),),)]
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("shoal-kube-*"))
    # The key is really loaded: a key that does not match the certificate is refused.
    other = pki.issue_client_cert(ca, tmp_path, "bob")
    user["client-key-data"] = b64(other.key)
    write_config(path, user, {"server": "https://127.0.0.1:6443"})
    with pytest.raises(ssl.SSLError):
        from_kubeconfig([path])


def test_client_certificate_files_token_file_and_merged_kubeconfigs(
    tmp_path: Path, certs: tuple[pki.KeyPair, pki.KeyPair], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, alice = certs
    (tmp_path / "token").write_text("from-a-file\n")
    first = write_config(
        tmp_path / "first",
        {
            "client-certificate": str(alice.cert),
            "client-key": str(alice.key),
            "tokenFile": "token",
        },
        {
            "server": "https://first:6443",
            "certificate-authority": str(ca.cert),
            "tls-server-name": "kubernetes",
            "proxy-url": "http://proxy:3128",
        },
    )
    second = write_config(tmp_path / "second", {"token": "t2"}, {"server": "https://second"})
    doc = yaml.safe_load(second.read_text())
    doc["current-context"] = "elsewhere"
    doc["contexts"].append({"name": "elsewhere", "context": {"cluster": "c", "user": "u"}})
    second.write_text(yaml.safe_dump(doc))

    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([str(first), "", str(second)]))
    assert kubeconfig_paths() == [first, second]
    creds = from_kubeconfig(kubeconfig_paths())  # the first file wins, entry by entry
    assert creds.server == "https://first:6443"
    assert creds.tls_server_name == "kubernetes"
    assert creds.proxy == "http://proxy:3128"
    assert creds.auth_headers() == {"Authorization": "Bearer from-a-file"}
    (tmp_path / "token").write_text("rotated")
    assert creds.auth_headers() == {"Authorization": "Bearer rotated"}
    # The second file's current-context applies only when the first names none.
    assert from_kubeconfig([second, first]).server == "https://second"
    assert from_kubeconfig([first], context="here").server == "https://first:6443"


def test_unusable_kubeconfigs_are_reported(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="no service account and no kubeconfig"):
        from_kubeconfig([])
    with pytest.raises(KubeConfigError, match="cannot read"):
        from_kubeconfig([tmp_path / "absent"])
    path = write_config(
        tmp_path / "exec",
        {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "aws"}},
        {"server": "https://eks"},
    )
    with pytest.raises(KubeConfigError, match="exec plugin"):
        from_kubeconfig([path])
    with pytest.raises(KubeConfigError, match="'nowhere' is not in the kubeconfig"):
        from_kubeconfig([path], context="nowhere")
    basic = write_config(
        tmp_path / "basic", {"username": "admin", "password": "pw"}, {"server": "http://x"}
    )
    auth = base64.b64encode(b"admin:pw").decode()
    assert from_kubeconfig([basic]).auth_headers() == {"Authorization": f"Basic {auth}"}
    insecure = write_config(
        tmp_path / "insecure", {}, {"server": "https://x", "insecure-skip-tls-verify": True}
    )
    assert from_kubeconfig([insecure]).ssl_context.verify_mode == ssl.CERT_NONE


def test_in_cluster_service_account_and_token_rotation(
    tmp_path: Path, certs: tuple[pki.KeyPair, pki.KeyPair]
) -> None:
    ca, _ = certs
    sa = tmp_path / "serviceaccount"
    assert in_cluster({}, sa) is None  # not in a pod
    # A projected volume: files are symlinks into a directory swapped at each rotation.
    data = tmp_path / "serviceaccount" / "..2026_01_05"
    data.mkdir(parents=True)
    (data / "token").write_text("token-1")
    (data / "ca.crt").write_bytes(ca.cert.read_bytes())
    (data / "namespace").write_text("shoal-system\n")
    (sa / "..data").symlink_to(data.name)
    for name in ("token", "ca.crt", "namespace"):
        (sa / name).symlink_to(f"..data/{name}")

    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    creds = in_cluster(env, sa)
    assert creds is not None
    assert creds.server == "https://10.96.0.1:443"
    assert creds.namespace == "shoal-system"
    assert ca_subjects(creds.ssl_context) == [((("commonName", "ca"),),)]
    assert creds.auth_headers() == {"Authorization": "Bearer token-1"}

    fresh = tmp_path / "serviceaccount" / "..2026_01_05_later"
    fresh.mkdir()
    for name in ("ca.crt", "namespace"):
        (fresh / name).write_bytes((data / name).read_bytes())
    (fresh / "token").write_text("token-2")
    (sa / "..data_tmp").symlink_to(fresh.name)
    (sa / "..data_tmp").replace(sa / "..data")  # the kubelet's atomic swap
    assert creds.auth_headers() == {"Authorization": "Bearer token-2"}

    v6 = in_cluster({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}, sa)
    assert v6 is not None
    assert v6.server == "https://[fd00::1]:443"
    nameless = in_cluster({}, sa)
    assert nameless is not None
    assert nameless.server == "https://kubernetes.default.svc"


def test_load_credentials_prefers_nothing_it_cannot_find(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "kubeconfig", {"token": "t"}, {"server": "http://x"})
    monkeypatch.setenv("KUBECONFIG", str(path))
    assert load_credentials().server == "http://x"


def test_requests_and_errors(tmp_path: Path) -> None:
    """Raw JSON in and out: methods, content types, query, auth header, ApiError."""
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.text()
        seen.append(
            {
                "method": request.method,
                "path": request.path,
                "query": list(request.query.items()),
                "type": request.headers.get("Content-Type"),
                "auth": request.headers.get("Authorization"),
                "body": json.loads(body) if body else None,
            }
        )
        if request.path.endswith("/missing"):
            return web.json_response({"kind": "Status", "message": "not there"}, status=404)
        if "/conflict" in request.path:
            status = {"kind": "Status", "message": "the object has been modified"}
            return web.json_response(status, status=409, reason="Conflict")
        if request.method == "DELETE":
            return web.Response(status=200)
        return web.json_response({"kind": "Thing", "echo": body})

    async def scenario() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        token = tmp_path / "token"
        token.write_text("t1")
        creds = Credentials(server=f"http://127.0.0.1:{port}", ssl_context=tls_context())
        creds.token_file = TokenFile(token)
        kube = Kube(aiohttp.ClientSession(), creds, instance="test")
        try:
            assert await kube.get("Agent", "ns", "missing") is None
            with pytest.raises(ApiError) as caught:
                await kube.merge_patch("Agent", "ns", "conflict", {"spec": {}}, sub="status")
            err = caught.value
            assert (err.status, err.reason) == (409, "Conflict")
            assert json.loads(err.body)["message"] == "the object has been modified"
            assert err.message == "the object has been modified"
            assert "409" in str(err)
            await kube.delete("Pod", "ns", "missing")  # a 404 is fine
            await kube.delete("Pod", "ns", "gone")  # an empty body is fine
            token.write_text("t2-rotated")
            obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"}}
            out = await kube.apply(obj)
            assert out["kind"] == "Thing"
            assert json.loads(out["echo"]) == obj
            await kube.list_items("Deployment", "ns", "a=b,c in (d)")
            await kube.json_patch("Agent", "ns", "x", [{"op": "remove", "path": "/a"}])
        finally:
            await kube.close()
            await runner.cleanup()

    asyncio.run(scenario())
    by_path = {(s["method"], s["path"]): s for s in seen}
    assert seen[0]["auth"] == "Bearer t1"
    applied = by_path[("PATCH", "/api/v1/namespaces/n/pods/p")]
    assert applied["auth"] == "Bearer t2-rotated"
    assert applied["type"] == "application/apply-patch+yaml"
    assert applied["query"] == [("fieldManager", "shoal-operator"), ("force", "true")]
    status = by_path[("PATCH", "/apis/shoal.dev/v1alpha1/namespaces/ns/agents/conflict/status")]
    assert status["type"] == "application/merge-patch+json"
    listed = by_path[("GET", "/apis/apps/v1/namespaces/ns/deployments")]
    assert listed["query"] == [("labelSelector", "a=b,c in (d)")]
    patched = by_path[("PATCH", "/apis/shoal.dev/v1alpha1/namespaces/ns/agents/x")]
    assert patched["type"] == "application/json-patch+json"
    assert patched["body"] == [{"op": "remove", "path": "/a"}]
