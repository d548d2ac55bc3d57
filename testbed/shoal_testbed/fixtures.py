"""pytest fixtures on the real test bed: a session cluster + NATS, a namespace per
test, and the operator run in-process (kopf's KopfRunner) or as a subprocess.

By default the session starts its own private test bed (its own ports and state
directory). ``SHOAL_TEST_KUBECONFIG`` points the same tests at an existing cluster
instead (kind on a laptop); NATS is then ``SHOAL_TEST_NATS_URL`` or a local
nats-server started for the session. A missing binary fails the run: these tests
are never skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shoal_testbed.binaries import control_plane_bin, nats_server_bin
from shoal_testbed.cluster import LocalCluster, free_port, wait_for
from shoal_testbed.signals import stop_on_signals

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
T = TypeVar("T")


def eventually(
    fn: Callable[[], T | None],
    timeout: float = 30.0,
    interval: float = 0.2,
    what: str = "condition",
) -> T:
    """Polls ``fn`` until it returns a truthy value (which it returns) or the deadline passes.

    Exceptions inside ``fn`` count as "not yet"; the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = fn()
            if value:
                return value
            last = value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s; last: {last!r}")
        time.sleep(interval)


@dataclass
class Testbed:
    """What a test needs to reach the cluster and NATS."""

    __test__ = False  # not a test class, despite the name

    kubeconfig: Path
    nats_url: str
    kubectl_bin: Path
    local: LocalCluster | None

    def kubectl(
        self,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        cfg = kubeconfig or self.kubeconfig
        proc = subprocess.run(
            [str(self.kubectl_bin), f"--kubeconfig={cfg}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
            )
        return proc

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The object as JSON, or None when it does not exist."""
        ns = ["-n", namespace] if namespace else []
        proc = self.kubectl("get", kind, name, *ns, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        obj: dict[str, Any] = json.loads(proc.stdout)
        return obj

    def apply(
        self,
        manifest: str | dict[str, Any] | list[dict[str, Any]],
        namespace: str,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl apply`` (strict field validation, as a user gets by default).

        Objects travel as JSON: YAML 1.1 readers take a bare ``y`` or ``no`` for a bool.
        """
        if isinstance(manifest, list):
            manifest = {"apiVersion": "v1", "kind": "List", "items": manifest}
        if isinstance(manifest, dict):
            manifest = json.dumps(manifest)
        return self.kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest, check=check)

    def user_kubeconfig(self, user: str, groups: tuple[str, ...] = ()) -> Path:
        if self.local is None:
            raise RuntimeError("user identities need the local test bed (its CA)")
        return self.local.user_kubeconfig(user, groups)

    def standin_pods(self) -> dict[str, dict[str, Any]]:
        """The pods the session's kubelet stand-in runs as processes: ``ns/pod`` -> pid,
        health_port, metrics_port, restarts, log (see ``shoal_testbed.kubelet``)."""
        if self.local is None:
            raise RuntimeError("the kubelet stand-in runs on the local test bed only")
        return self.local.standin_pods()


class NatsServer:
    """A private nats-server with JetStream on file storage that a test can stop and
    restart on the same port and store (to prove nothing is lost across restarts)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [
                str(nats_server_bin()),
                *("-a", "127.0.0.1", "-p", str(self.port)),
                *("-js", "-sd", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for("nats-server", lambda: _port_open(self.port), 30)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                # A server holding thousands of consumers can take minutes to stop
                # cleanly (see bench/jetstream_scale.py); a test's store is thrown away.
                self._proc.kill()
                self._proc.wait(10)
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def _standalone_nats(directory: Path) -> Iterator[str]:
    server = NatsServer(directory)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own (JetStream, file storage), no Kubernetes."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _point_at(bed: Testbed) -> None:
    """The operator run in this process (and its children) talks to the test bed."""
    os.environ["KUBECONFIG"] = str(bed.kubeconfig)
    os.environ["SHOAL_NATS_URL"] = bed.nats_url
    # Short drift checks and heartbeats, so tests of repairs and liveness are quick.
    os.environ["SHOAL_DRIFT_INTERVAL"] = "5"
    os.environ["SHOAL_HEARTBEAT_INTERVAL"] = "2"
    # Operators of several tests (or replicas of one) may run at once: any free port.
    os.environ["SHOAL_METRICS_API_PORT"] = "auto"
    # prometheus_client's server outlives an in-process operator (a thread holding the
    # port): off here; operator processes get a free port each (OperatorProcess).
    os.environ["SHOAL_OPERATOR_METRICS_PORT"] = "0"


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (and SIGHUP) stop a pytest session the way Ctrl-C does, so that its
    teardown runs: the session's test bed and every process a fixture started are
    stopped rather than left running."""
    del config
    stop_on_signals(lambda _signum: KeyboardInterrupt())


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    """A real API server and nats-server for the whole session."""
    external = os.environ.get("SHOAL_TEST_KUBECONFIG")
    with tempfile.TemporaryDirectory(prefix="shoal-test-") as tmp:
        if external:
            kubectl = shutil.which("kubectl")
            kubectl_bin = Path(kubectl) if kubectl else control_plane_bin() / "kubectl"
            url = os.environ.get("SHOAL_TEST_NATS_URL")
            with contextlib.ExitStack() as stack:
                if not url:
                    url = stack.enter_context(_standalone_nats(Path(tmp) / "nats"))
                bed = Testbed(Path(external), url, kubectl_bin, None)
                _point_at(bed)
                yield bed
            return
        local = LocalCluster(Path(tmp) / "cluster")
        local.up()
        try:
            bed = Testbed(local.kubeconfig, local.nats_url, control_plane_bin() / "kubectl", local)
            _point_at(bed)
            yield bed
        finally:
            local.down()


@pytest.fixture(scope="session")
def crds(testbed: Testbed) -> list[str]:
    """The CRDs from crds/ installed (server-side apply) and Established."""
    testbed.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=shoal", "-k", str(CRD_DIR)
    )
    names = sorted(p.name.removesuffix(".yaml") for p in CRD_DIR.glob("*.shoal.dev.yaml"))
    testbed.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names)
    )
    return names


@pytest.fixture
def namespace(testbed: Testbed, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (without waiting)."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:6]
    name = f"t-{base}-{digest}"
    testbed.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        testbed.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def operator(testbed: Testbed, crds: list[str], namespace: str) -> Iterator[Any]:
    """The operator running in this process (KopfRunner), watching the test's namespace.

    It registers the external metrics API (``local``: an ExternalName Service in the
    test's namespace) and removes the APIService when it stops, for the next test's.
    """
    from kopf.testing import KopfRunner

    args = ["run", "--standalone", "--namespace", namespace, "-m", "shoal_operator.kopf_module"]
    os.environ["SHOAL_OPERATOR_NAMESPACE"] = namespace
    os.environ["SHOAL_REGISTER_APISERVICE"] = "local"
    try:
        with KopfRunner(args, timeout=60) as runner:
            yield runner
    finally:
        os.environ.pop("SHOAL_OPERATOR_NAMESPACE", None)
        os.environ.pop("SHOAL_REGISTER_APISERVICE", None)
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output


class OperatorProcess:
    """``python -m shoal_operator`` as a child process: kill it, restart it, read its log."""

    def __init__(self, namespace: str, kubeconfig: Path | None = None) -> None:
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.port = free_port()
        self.metrics_port = free_port()
        self.log = Path(tempfile.mkstemp(prefix="shoal-operator-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def liveness_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> None:
        env = {
            **os.environ,
            "SHOAL_OPERATOR_NAMESPACE": self.namespace,
            "SHOAL_OPERATOR_METRICS_PORT": str(self.metrics_port),
        }
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shoal_operator",
                    "--namespace",
                    self.namespace,
                    "--liveness",
                    self.liveness_url,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def spawn_operator(
    testbed: Testbed, crds: list[str], namespace: str
) -> Iterator[Callable[..., OperatorProcess]]:
    """Starts operator processes watching the test's namespace; all stopped afterwards."""
    started: list[OperatorProcess] = []

    def spawn(kubeconfig: Path | None = None) -> OperatorProcess:
        op = OperatorProcess(namespace, kubeconfig)
        started.append(op)
        return op

    yield spawn
    for op in started:
        op.stop()
        op.log.unlink(missing_ok=True)


@pytest.fixture
def operator_process(spawn_operator: Callable[..., OperatorProcess]) -> OperatorProcess:
    """The operator as a separate process, for kill/restart tests."""
    return spawn_operator()
