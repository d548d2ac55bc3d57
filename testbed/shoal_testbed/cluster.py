"""A real Kubernetes control plane plus NATS JetStream, on loopback, without containers.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok (playing the
kubelet of fake nodes) and nats-server run as background processes whose state lives
in one directory. So does, unless ``up(kubelet=False)``, a test-bed stand-in for a kubelet
(``shoal_testbed.kubelet``, not part of Shoal) that runs each Agent pod as a local
``python -m shoal_runtime`` process. ``up`` is idempotent; ``down`` stops exactly the
processes recorded there (checked against their command line) and removes the state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shoal_testbed import kubelet as standin
from shoal_testbed import pki
from shoal_testbed.binaries import control_plane_bin, nats_server_bin

NODE_COUNT = 2
SERVICE_CIDR = "10.96.0.0/16"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
# Order matters: each component needs the ones before it.
COMPONENTS = (
    "etcd",
    "nats",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
)
# The kubelet stand-in is managed apart from COMPONENTS: it is optional, and it is
# stopped first, while NATS and the API server are still there for its pods to drain.
KUBELET = "kubelet"
# down() does not wait out a pod's whole grace period (Agents get timeout + 30 s).
KUBELET_STOP_GRACE = 20.0


class TestbedError(RuntimeError):
    """The test bed could not be brought up; the message says what to look at."""


def log(msg: str) -> None:
    print(f"[shoal] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, logs: Path | None = None
) -> None:
    """Polls ``check`` until it is true; fails loudly with the component's log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    tail = ""
    if logs is not None and logs.exists():
        tail = "\n" + "\n".join(logs.read_text(errors="replace").splitlines()[-25:])
    raise TestbedError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


@dataclass(frozen=True)
class Endpoints:
    """Where the running test bed listens; persisted in state.json."""

    api_port: int
    etcd_port: int
    etcd_peer_port: int
    nats_port: int
    nats_monitor_port: int
    kcm_port: int
    scheduler_port: int
    kwok_port: int

    @classmethod
    def allocate(cls) -> Endpoints:
        return cls(**{f: free_port() for f in cls.__dataclass_fields__})


class LocalCluster:
    """The test bed rooted at ``state_dir`` (``.cluster`` for ``make cluster-up``)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir.resolve()
        self.pki = self.dir / "pki"
        self.logs = self.dir / "logs"
        self.pids = self.dir / "pids"
        self.kubeconfig = self.dir / "kubeconfig"
        self.nats_url_file = self.dir / "nats-url"
        self.state_file = self.dir / "state.json"
        self.standin_status = self.dir / standin.STATUS_FILE

    # -- public surface --------------------------------------------------------------

    @property
    def nats_url(self) -> str:
        return self.nats_url_file.read_text().strip()

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(**json.loads(self.state_file.read_text()))

    def is_up(self) -> bool:
        """All recorded processes alive and the API server ready."""
        kubelet_ok = not (self.pids / f"{KUBELET}.pid").exists() or self._pid(KUBELET) is not None
        return kubelet_ok and self._core_up()

    def _core_up(self) -> bool:
        if not self.state_file.exists():
            return False
        if any(self._pid(c) is None for c in COMPONENTS):
            return False
        try:
            return self._readyz()
        except Exception:
            return False

    def up(self, timeout: float = 120.0, kubelet: bool = True) -> None:
        """Starts what is not running. ``kubelet=False`` leaves pods unrun (kwok alone),
        and stops a stand-in an earlier ``up`` started."""
        if self._core_up():
            self._converge_kubelet(kubelet, timeout)
            log(f"test bed already running ({self.kubeconfig})")
            return
        if self.state_file.exists():
            log("a previous test bed is half up; cleaning it away first")
            self.down()
        bins = control_plane_bin()
        started = time.monotonic()
        for d in (self.pki, self.logs, self.pids):
            d.mkdir(parents=True, exist_ok=True)
        ep = Endpoints.allocate()
        self.state_file.write_text(json.dumps(ep.__dict__, indent=2))
        self._make_pki()
        self._write_kubeconfig(
            self.kubeconfig, pki.KeyPair(self.pki / "admin.crt", self.pki / "admin.key"), ep
        )
        try:
            self._start_etcd(bins, ep)
            self._start_nats(ep)
            self._start_apiserver(bins, ep)
            wait_for(
                "kube-apiserver /readyz", self._readyz, timeout, self.logs / "kube-apiserver.log"
            )
            self._start_kcm(bins, ep)
            self._start_scheduler(bins, ep)
            self._start_kwok(bins, ep)
            self._create_nodes(bins)
            wait_for(
                f"{NODE_COUNT} Ready kwok nodes",
                lambda: self._ready_nodes(bins) >= NODE_COUNT,
                timeout,
                self.logs / "kwok.log",
            )
            wait_for(
                "the default ServiceAccount",
                lambda: self._kubectl_ok(bins, "get", "serviceaccount", "default", "-n", "default"),
                timeout,
                self.logs / "kube-controller-manager.log",
            )
            self.nats_url_file.write_text(f"nats://127.0.0.1:{ep.nats_port}\n")
            self._converge_kubelet(kubelet, timeout)
        except BaseException:
            log("test bed failed to start; logs are in " + str(self.logs))
            self.down(keep_logs=True)
            raise
        log(
            f"test bed up in {time.monotonic() - started:.1f}s: "
            f"kubeconfig {self.kubeconfig}, NATS {self.nats_url}"
        )

    def down(self, keep_logs: bool = False) -> None:
        self._stop_kubelet()
        for component in reversed(COMPONENTS):
            pid = self._pid(component)
            if pid is not None:
                _terminate(pid)
            (self.pids / f"{component}.pid").unlink(missing_ok=True)
        if not self.dir.exists():
            return
        for entry in self.dir.iterdir():
            if keep_logs and entry == self.logs:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if not keep_logs:
            with contextlib.suppress(OSError):
                self.dir.rmdir()

    def restart_nats(self, down_seconds: float = 0.0) -> None:
        """Stops nats-server (SIGTERM) and starts it again on the same port and store, as
        a NATS restart in production would: what it stored must survive."""
        pid = self._pid("nats")
        if pid is not None:
            t0 = time.monotonic()
            _terminate(pid)
            log(f"nats-server stopped in {time.monotonic() - t0:.1f}s")
        time.sleep(down_seconds)
        ep = self.endpoints
        self._start_nats(ep)
        wait_for(
            "nats-server listening", lambda: _port_open(ep.nats_port), 30, self.logs / "nats.log"
        )

    def user_kubeconfig(self, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig that authenticates as ``user`` (client certificate) in ``groups``."""
        pair = pki.issue_client_cert(self._ca(), self.pki, user, groups)
        path = self.dir / f"kubeconfig-{pair.cert.stem}"
        self._write_kubeconfig(path, pair, self.endpoints, user=user)
        return path

    def standin_pods(self) -> dict[str, dict[str, Any]]:
        """The pods the kubelet stand-in runs now: ``ns/pod`` -> pid, ports, restarts."""
        return standin.read_status(self.dir)

    # -- processes -------------------------------------------------------------------

    def _converge_kubelet(self, wanted: bool, timeout: float) -> None:
        running = self._pid(KUBELET) is not None
        if not wanted:
            if running:
                self._stop_kubelet()
            return
        if running:
            return
        self._stop_kubelet()  # children of a stand-in that died
        self.standin_status.unlink(missing_ok=True)
        self._spawn(
            KUBELET,
            [
                sys.executable,
                "-m",
                "shoal_testbed",
                "kubelet",
                f"--kubeconfig={self.kubeconfig}",
                f"--state-dir={self.dir}",
            ],
        )
        # It writes its status file once it has listed the pods, i.e. once it is useful.
        wait_for(
            "the kubelet stand-in to list pods",
            lambda: self._pid(KUBELET) is not None and self.standin_status.exists(),
            timeout,
            self.logs / f"{KUBELET}.log",
        )

    def _stop_kubelet(self) -> None:
        """SIGTERM to the stand-in alone, so that it drains its pods' processes in order;
        then SIGKILL to its process group and to any child it left (found by their env)."""
        pid = self._pid(KUBELET)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, KUBELET_STOP_GRACE):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        (self.pids / f"{KUBELET}.pid").unlink(missing_ok=True)
        if self.dir.exists():
            standin.kill_children(self.dir)

    def _spawn(self, name: str, argv: list[str]) -> None:
        logf = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.dir,
        )
        logf.close()
        (self.pids / f"{name}.pid").write_text(str(proc.pid))

    def _pid(self, name: str) -> int | None:
        """The live pid of a component of *this* test bed, else None."""
        try:
            pid = int((self.pids / f"{name}.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            return None
        # A recycled pid belongs to someone else: only ours mention our state dir.
        return pid if str(self.dir) in cmdline else None

    def _start_etcd(self, bins: Path, ep: Endpoints) -> None:
        peer = f"http://127.0.0.1:{ep.etcd_peer_port}"
        client = f"http://127.0.0.1:{ep.etcd_port}"
        self._spawn(
            "etcd",
            [
                str(bins / "etcd"),
                "--name=shoal",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=shoal={peer}",
                "--unsafe-no-fsync=true",
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
        )

    def _start_nats(self, ep: Endpoints) -> None:
        self._spawn(
            "nats",
            [
                str(nats_server_bin()),
                "-a",
                "127.0.0.1",
                "-p",
                str(ep.nats_port),
                "-m",
                str(ep.nats_monitor_port),
                "-js",
                "-sd",
                str(self.dir / "nats"),
                "-n",
                "shoal-testbed",
            ],
        )

    def _start_apiserver(self, bins: Path, ep: Endpoints) -> None:
        p = self.pki
        self._spawn(
            "kube-apiserver",
            [
                str(bins / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{ep.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={ep.api_port}",
                f"--tls-cert-file={p / 'apiserver.crt'}",
                f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--client-ca-file={p / 'ca.crt'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # The aggregation layer (external.metrics.k8s.io served by the operator).
                f"--requestheader-client-ca-file={p / 'front-proxy-ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={p / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={p / 'front-proxy-client.key'}",
                "--max-requests-inflight=1000",
                "--max-mutating-requests-inflight=500",
                "--event-ttl=1h",
                "--v=1",
            ],
        )

    def _component_args(self, ep_port: int) -> list[str]:
        kc = str(self.kubeconfig)
        return [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ep_port}",
            f"--cert-dir={self.dir / 'component-certs'}",
            "--leader-elect=false",
            "--v=1",
        ]

    def _start_kcm(self, bins: Path, ep: Endpoints) -> None:
        p = self.pki
        self._spawn(
            "kube-controller-manager",
            [
                str(bins / "kube-controller-manager"),
                *self._component_args(ep.kcm_port),
                f"--service-account-private-key-file={p / 'sa.key'}",
                f"--root-ca-file={p / 'ca.crt'}",
                f"--cluster-signing-cert-file={p / 'ca.crt'}",
                f"--cluster-signing-key-file={p / 'ca.key'}",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                # Benchmarks create 1,000 Deployments at once; the defaults (5) crawl.
                "--concurrent-deployment-syncs=20",
                "--concurrent-replicaset-syncs=20",
            ],
        )

    def _start_scheduler(self, bins: Path, ep: Endpoints) -> None:
        self._spawn(
            "kube-scheduler",
            [
                str(bins / "kube-scheduler"),
                *self._component_args(ep.scheduler_port),
            ],
        )

    def _start_kwok(self, bins: Path, ep: Endpoints) -> None:
        stages = Path(__file__).with_name("kwok-stages.yaml")
        self._spawn(
            "kwok",
            [
                str(bins / "kwok"),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={stages}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                f"--server-address=127.0.0.1:{ep.kwok_port}",
                "--node-lease-duration-seconds=40",
                "--cidr=10.244.0.0/16",
                "--node-ip=10.250.0.1",
            ],
        )

    # -- cluster objects -------------------------------------------------------------

    def _kubectl(self, bins: Path, *args: str, stdin: str | None = None) -> str:
        out = subprocess.run(
            [str(bins / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout

    def _kubectl_ok(self, bins: Path, *args: str) -> bool:
        try:
            self._kubectl(bins, *args)
        except subprocess.CalledProcessError:
            return False
        return True

    def _create_nodes(self, bins: Path) -> None:
        nodes = []
        for i in range(NODE_COUNT):
            name = f"kwok-node-{i}"
            nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {
                            KWOK_ANNOTATION: "fake",
                            "node.alpha.kubernetes.io/ttl": "0",
                        },
                        "labels": {
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            "type": "kwok",
                        },
                    },
                }
            )
        doc = yaml.safe_dump_all(nodes)
        self._kubectl(
            bins, "apply", "--server-side", "--field-manager=shoal-testbed", "-f", "-", stdin=doc
        )

    def _ready_nodes(self, bins: Path) -> int:
        data = json.loads(self._kubectl(bins, "get", "nodes", "-o", "json"))
        ready = 0
        for node in data["items"]:
            for cond in node.get("status", {}).get("conditions", []):
                if cond["type"] == "Ready" and cond["status"] == "True":
                    ready += 1
        return ready

    # -- certificates and config -----------------------------------------------------

    def _ca(self) -> pki.KeyPair:
        return pki.create_ca(self.pki, "ca")

    def _make_pki(self) -> None:
        ca = self._ca()
        pki.issue_serving_cert(
            ca,
            self.pki,
            "apiserver",
            (
                "localhost",
                "127.0.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "10.96.0.1",
            ),
        )
        admin = pki.issue_client_cert(ca, self.pki, "shoal-admin", ("system:masters",))
        admin.cert.replace(self.pki / "admin.crt")
        admin.key.replace(self.pki / "admin.key")
        front = pki.create_ca(self.pki, "front-proxy-ca")
        client = pki.issue_client_cert(front, self.pki, "front-proxy-client")
        client.cert.replace(self.pki / "front-proxy-client.crt")
        client.key.replace(self.pki / "front-proxy-client.key")
        pki.create_service_account_keys(self.pki)

    def _write_kubeconfig(
        self, path: Path, pair: pki.KeyPair, ep: Endpoints, user: str = "shoal-admin"
    ) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "shoal-local",
                    "cluster": {
                        "server": f"https://127.0.0.1:{ep.api_port}",
                        "certificate-authority": str(self.pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate": str(pair.cert),
                        "client-key": str(pair.key),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "shoal-local",
                    "context": {
                        "cluster": "shoal-local",
                        "user": user,
                        "namespace": "default",
                    },
                }
            ],
            "current-context": "shoal-local",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)

    def _readyz(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        url = f"https://127.0.0.1:{self.endpoints.api_port}/readyz"
        with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
            return bool(resp.status == 200)


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _wait_gone(pid: int, grace: float) -> bool:
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # Reap it if it is our child (the pytest fixture starts it in-process).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    return False


def _terminate(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the component's process group, then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    if not _wait_gone(pid, grace):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def running(state_dir: Path) -> Iterator[LocalCluster]:
    """A test bed for the duration of a block (the pytest session fixture's way)."""
    cluster = LocalCluster(state_dir)
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()


__all__ = ["Endpoints", "LocalCluster", "TestbedError", "free_port", "running", "wait_for"]
