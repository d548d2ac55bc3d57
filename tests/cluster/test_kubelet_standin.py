"""The test-bed stand-in for a kubelet (``shoal_testbed.kubelet``, not part of Shoal)
runs each Agent pod on the kwok nodes as a local process.

Most tests start a stand-in of their own (``--namespace``, in a namespace labelled
``shoal.dev/standin=off`` so that the session's stand-in leaves it alone) whose command is
a sleeper rather than ``python -m shoal_runtime``: what is checked is the stand-in, not
the runtime.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shoal_testbed import kubelet
from shoal_testbed.binaries import control_plane_bin
from shoal_testbed.cluster import LocalCluster
from shoal_testbed.fixtures import REPO, Testbed, eventually

T = TypeVar("T")

# Exits 0 on SIGTERM (as the runtime does once drained), unless told to ignore it.
SLEEPER = [
    sys.executable,
    "-c",
    "import os, signal, sys, time\n"
    "ignore = os.environ.get('IGNORE_SIGTERM') == '1'\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore else lambda *a: sys.exit(0))\n"
    "time.sleep(3600)\n",
]


def environ(pid: int) -> dict[str, str]:
    """A process's environment; empty when it is gone (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if item)
    return {kv[0]: kv[1] for kv in pairs if len(kv) == 2}


def runs(pid: int, key: str) -> bool:
    """Whether ``pid`` is alive and is the stand-in's process for pod ``key`` (a recycled
    pid would carry another environment)."""
    return environ(pid).get(kubelet.POD_ENV) == key


class StandIn:
    """``python -m shoal_testbed kubelet --namespace NS`` with the sleeper command."""

    def __init__(
        self, testbed: Testbed, namespace: str, state_dir: Path, max_pods: int | None
    ) -> None:
        self.namespace = namespace
        self.dir = state_dir
        self.log_file = state_dir.parent / "standin.log"
        env = {**os.environ, kubelet.COMMAND_ENV: json.dumps(SLEEPER)}
        if max_pods is not None:
            env[kubelet.MAX_PODS_ENV] = str(max_pods)
        argv = [sys.executable, "-m", "shoal_testbed", "kubelet"]
        argv += [f"--kubeconfig={testbed.kubeconfig}", f"--state-dir={state_dir}"]
        argv += [f"--namespace={namespace}"]
        with self.log_file.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.eventually(
            lambda: self.proc.poll() is None and (state_dir / kubelet.STATUS_FILE).exists(),
            30,
            what="the stand-in to list pods",
        )

    def pods(self) -> dict[str, dict[str, Any]]:
        return kubelet.read_status(self.dir)

    def eventually(self, fn: Callable[[], T | None], timeout: float, what: str) -> T:
        """``eventually``, with the stand-in's log as it is when the deadline passes."""
        try:
            return eventually(fn, timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstand-in log:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        kubelet.kill_children(self.dir)


@pytest.fixture
def spawn_standin(
    testbed: Testbed, namespace: str, tmp_path: Path
) -> Iterator[Callable[..., StandIn]]:
    testbed.kubectl(
        "label", "namespace", namespace, f"{kubelet.OPT_OUT_LABEL}={kubelet.OPT_OUT_VALUE}"
    )
    started: list[StandIn] = []

    def spawn(max_pods: int | None = None) -> StandIn:
        standin = StandIn(testbed, namespace, tmp_path / "standin", max_pods)
        started.append(standin)
        return standin

    yield spawn
    for standin in started:
        standin.cleanup()


@pytest.fixture
def standin(spawn_standin: Callable[..., StandIn]) -> StandIn:
    return spawn_standin()


def agent_deployment(
    name: str, replicas: int, env: list[dict[str, Any]], grace: int = 10, **container: Any
) -> dict[str, Any]:
    labels = {"shoal.dev/agent": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": grace,
                    "containers": [
                        {"name": "runtime", "image": "shoal-runtime", "env": env, **container}
                    ],
                },
            },
        },
    }


def live_pods(testbed: Testbed, namespace: str, agent: str) -> set[str]:
    """``ns/pod`` of the agent's pods that are bound and not terminating."""
    out = testbed.kubectl(
        "get", "pods", "-n", namespace, "-l", f"shoal.dev/agent={agent}", "-o", "json"
    )
    return {
        f"{namespace}/{p['metadata']['name']}"
        for p in json.loads(out.stdout)["items"]
        if p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")
    }


def runs_exactly(
    standin: StandIn, testbed: Testbed, namespace: str, agent: str, count: int
) -> dict[str, dict[str, Any]] | None:
    """The stand-in's processes, once they are one per live pod and ``count`` of them."""
    pods = standin.pods()
    live = live_pods(testbed, namespace, agent)
    if len(live) == count and set(pods) == live and all(runs(p["pid"], k) for k, p in pods.items()):
        return pods
    return None


def test_runs_a_process_per_pod_with_the_env_a_kubelet_would_build(
    testbed: Testbed, namespace: str, standin: StandIn
) -> None:
    testbed.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "creds"},
                "stringData": {"token": "s3cr3t value"},
            },
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "settings"},
                "data": {"mode": "fast", "level": "2"},
            },
        ],
        namespace,
    )
    env: list[dict[str, Any]] = [
        {"name": "LITERAL", "value": "plain"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {
            "name": "AGENT",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['shoal.dev/agent']"}},
        },
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
        {
            "name": "MAYBE",
            "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}},
        },
        {"name": "COMBINED", "value": "$(LITERAL)-$(MODE)-$$(LITERAL)"},
        {"name": "SHOAL_HEALTH_PORT", "value": "8080"},
    ]
    env_from = [{"configMapRef": {"name": "settings"}, "prefix": "CM_"}]
    testbed.apply(agent_deployment("x", 2, env, envFrom=env_from), namespace)

    pods = standin.eventually(
        lambda: runs_exactly(standin, testbed, namespace, "x", 2),
        60,
        what="a process for each of 2 pods",
    )
    ports: list[int] = []
    for key, info in pods.items():
        got = environ(info["pid"])
        pod = key.split("/", 1)[1]
        assert got["LITERAL"] == "plain"
        assert got["POD_NAME"] == pod
        assert got["POD_NS"] == namespace
        assert got["POD_IP"] == "127.0.0.1"
        assert got["AGENT"] == "x"
        assert got["TOKEN"] == "s3cr3t value"
        assert got["MODE"] == "fast"
        assert "MAYBE" not in got
        assert got["COMBINED"] == "plain-fast-$(LITERAL)"
        assert got["CM_mode"] == "fast"
        assert got["CM_level"] == "2"
        assert got["PYTHONPATH"] == os.pathsep.join((str(REPO / "examples"), str(REPO)))
        assert got[kubelet.POD_ENV] == key
        # The stand-in's ports win over the pod's 8080, or every pod would collide.
        assert got["SHOAL_HEALTH_PORT"] == str(info["health_port"])
        assert got["SHOAL_METRICS_PORT"] == str(info["metrics_port"])
        assert "KUBECONFIG" not in got
        ports += [info["health_port"], info["metrics_port"]]
        assert f"starting {SLEEPER!r}" in Path(info["log"]).read_text()
        assert Path(info["log"]) == standin.dir / "logs" / "pods" / f"{namespace}_{pod}.log"
    assert len(set(ports)) == 4, ports

    if testbed.local is not None:
        session_log = testbed.local.logs / "kubelet.log"
        eventually(
            lambda: (
                f"namespace {namespace} is labelled shoal.dev/standin=off"
                in session_log.read_text()
            ),
            30,
            what="the session's stand-in to notice the opted-out namespace",
        )
        assert f"{namespace}/" not in session_log.read_text()
        assert not any(k.startswith(f"{namespace}/") for k in testbed.standin_pods())

    testbed.kubectl("scale", "deployment", "x", "-n", namespace, "--replicas=1")
    after = standin.eventually(
        lambda: runs_exactly(standin, testbed, namespace, "x", 1),
        60,
        what="one process left",
    )
    (gone,) = set(pods) - set(after)
    assert not runs(pods[gone]["pid"], gone)
    # SIGTERM was enough: the sleeper exits 0 on it, as the runtime does once drained.
    assert f"{gone}: pid {pods[gone]['pid']} stopped (exit code 0)" in standin.log()
    (kept,) = after
    assert after[kept]["pid"] == pods[kept]["pid"]

    testbed.kubectl("scale", "deployment", "x", "-n", namespace, "--replicas=0")
    standin.eventually(
        lambda: standin.pods() == {} and not runs(pods[kept]["pid"], kept),
        60,
        what="no processes",
    )


def test_missing_secret_holds_the_process_back_until_it_exists(
    testbed: Testbed, namespace: str, standin: StandIn
) -> None:
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}}]
    testbed.apply(agent_deployment("y", 1, env), namespace)
    (key,) = eventually(lambda: live_pods(testbed, namespace, "y"), 60, what="a bound pod")
    standin.eventually(
        lambda: f"{key}: not started: Secret {namespace}/later not found" in standin.log(),
        30,
        what="the reason in the log",
    )
    assert key not in standin.pods()

    testbed.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "later"},
            "stringData": {"token": "t"},
        },
        namespace,
    )
    pods = standin.eventually(
        lambda: runs_exactly(standin, testbed, namespace, "y", 1),
        30,
        what="the process, once the Secret exists",
    )
    assert environ(pods[key]["pid"])["TOKEN"] == "t"


def test_a_process_that_exits_is_restarted_with_growing_backoff(
    testbed: Testbed, namespace: str, standin: StandIn
) -> None:
    testbed.apply(agent_deployment("z", 1, []), namespace)
    pods = standin.eventually(
        lambda: runs_exactly(standin, testbed, namespace, "z", 1), 60, what="a process"
    )
    (key,) = pods
    port = pods[key]["health_port"]
    for restart, delay in ((1, 1), (2, 2)):
        pid = pods[key]["pid"]
        os.kill(pid, signal.SIGKILL)

        def replaced(pid: int = pid) -> dict[str, dict[str, Any]] | None:
            now = runs_exactly(standin, testbed, namespace, "z", 1)
            return now if now and now[key]["pid"] != pid else None

        pods = standin.eventually(replaced, 30, what=f"restart {restart}")
        assert pods[key]["restarts"] == restart
        assert pods[key]["health_port"] == port
        log = standin.log()
        assert f"{key}: pid {pid} exited with code -9" in log, log
        assert f"restarting in {delay}s (back-off, restart {restart})" in log, log


def test_a_deleted_pod_gets_sigterm_then_sigkill_after_its_grace_period(
    testbed: Testbed, namespace: str, standin: StandIn
) -> None:
    env = [{"name": "IGNORE_SIGTERM", "value": "1"}]
    testbed.apply(agent_deployment("stubborn", 1, env, grace=3), namespace)
    pods = standin.eventually(
        lambda: runs_exactly(standin, testbed, namespace, "stubborn", 1), 60, what="a process"
    )
    ((key, info),) = pods.items()
    deleted = time.monotonic()
    testbed.kubectl("delete", "deployment", "stubborn", "-n", namespace, "--wait=false")
    standin.eventually(lambda: not runs(info["pid"], key), 30, what="pid gone")
    assert time.monotonic() - deleted >= 3, "killed before its grace period ended"
    # Whether the stand-in saw the deletionTimestamp before kwok removed the pod is a race.
    assert re.search(
        rf"{key}: pod (deleted|terminating); SIGTERM to pid {info['pid']} \(grace 3s\)",
        standin.log(),
    ), standin.log()
    assert f"{key}: pid {info['pid']} still running after 3s; SIGKILL" in standin.log()
    standin.eventually(lambda: standin.pods() == {}, 10, what="an empty standin.json")


def test_pods_beyond_the_cap_wait_for_a_free_slot(
    testbed: Testbed, namespace: str, spawn_standin: Callable[..., StandIn]
) -> None:
    standin = spawn_standin(max_pods=1)
    testbed.apply(agent_deployment("capped", 2, []), namespace)
    live = eventually(
        lambda: p if len(p := live_pods(testbed, namespace, "capped")) == 2 else None,
        60,
        what="2 bound pods",
    )

    def one_running_one_waiting() -> tuple[str, str] | None:
        pods = standin.pods()
        waiting = [k for k in live if f"{k}: not run: 1 processes already" in standin.log()]
        if len(pods) == 1 and len(waiting) == 1 and set(pods) | set(waiting) == live:
            return next(iter(pods)), waiting[0]
        return None

    running, _ = standin.eventually(
        one_running_one_waiting, 30, what="one pod running, one waiting"
    )
    pid = standin.pods()[running]["pid"]
    testbed.kubectl("delete", "pod", running.split("/")[1], "-n", namespace, "--wait=false")
    after = standin.eventually(
        lambda: p if len(p := standin.pods()) == 1 and running not in p else None,
        30,
        what="the waiting pod started",
    )
    assert not runs(pid, running)
    assert set(after) <= live_pods(testbed, namespace, "capped")
    assert re.search(rf"{running}: pod (deleted|terminating); SIGTERM to pid {pid} ", standin.log())


def test_stopping_the_standin_stops_its_processes(
    testbed: Testbed, namespace: str, standin: StandIn
) -> None:
    testbed.apply(agent_deployment("w", 2, []), namespace)
    pods = standin.eventually(
        lambda: runs_exactly(standin, testbed, namespace, "w", 2), 60, what="2 processes"
    )
    assert standin.stop() == 0, standin.log()
    for key, info in pods.items():
        assert not runs(info["pid"], key)
    assert standin.pods() == {}
    assert kubelet.find_children(standin.dir) == []
    assert "stand-in stopping; SIGTERM" in standin.log()


def test_session_standin_runs_agent_pods(testbed: Testbed, namespace: str) -> None:
    """The stand-in that ``LocalCluster.up()`` started runs ``python -m shoal_runtime``
    for pods of namespaces not opted out, and stops them with their pods."""
    local = testbed.local
    assert local is not None, "the session's stand-in belongs to the local test bed"
    testbed.apply(agent_deployment("session", 1, [], grace=5), namespace)
    (key,) = eventually(lambda: live_pods(testbed, namespace, "session"), 60, what="a pod")
    session_log = local.logs / "kubelet.log"
    eventually(
        lambda: f"{key}: started pid" in session_log.read_text(),
        30,
        what=f"the session stand-in to start {key}",
    )
    pod_log = local.logs / "pods" / f"{key.replace('/', '_')}.log"
    assert "-m', 'shoal_runtime']" in pod_log.read_text()

    testbed.kubectl("delete", "deployment", "session", "-n", namespace, "--wait=false")
    eventually(
        lambda: (
            key not in testbed.standin_pods()
            and not any(runs(pid, key) for pid in kubelet.find_children(local.dir))
        ),
        30,
        what=f"{key}'s process gone",
    )


def test_down_stops_pod_processes_even_when_the_standin_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crashed stand-in leaves its processes behind: ``up`` restarts the stand-in
    (which sweeps them first) and ``down`` sweeps whatever is left."""
    monkeypatch.setenv(kubelet.COMMAND_ENV, json.dumps(SLEEPER))
    cluster = LocalCluster(tmp_path / "cluster")
    cluster.up()
    try:
        bed = Testbed(
            cluster.kubeconfig, cluster.nats_url, control_plane_bin() / "kubectl", cluster
        )
        bed.kubectl("create", "namespace", "bed")
        bed.apply(agent_deployment("orphans", 2, []), "bed")
        first = eventually(lambda: p if len(p := cluster.standin_pods()) == 2 else None, 60)
        standin_pid = int((cluster.pids / "kubelet.pid").read_text())
        os.kill(standin_pid, signal.SIGKILL)
        eventually(lambda: not cluster.is_up(), 10, what="status down with the stand-in dead")
        assert all(runs(i["pid"], k) for k, i in first.items()), "orphans should outlive it"

        cluster.up()
        assert cluster.is_up()
        second = eventually(lambda: p if len(p := cluster.standin_pods()) == 2 else None, 60)
        assert all(not runs(i["pid"], k) for k, i in first.items())
        assert {i["pid"] for i in second.values()}.isdisjoint(i["pid"] for i in first.values())

        standin_pid = int((cluster.pids / "kubelet.pid").read_text())
        os.kill(standin_pid, signal.SIGKILL)
    finally:
        cluster.down()
    assert all(not runs(i["pid"], k) for k, i in second.items())
    assert kubelet.find_children(tmp_path / "cluster") == []
