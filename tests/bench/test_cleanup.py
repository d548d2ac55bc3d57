"""SIGTERM to a benchmark or to ``shoal_testbed up`` stops everything it started.

Each case starts the program as a subprocess at a tiny size, polls its process tree
(through /proc) until the processes worth stopping are up (the control plane, nats-server,
runtimes, the operator, the dispatcher), records every descendant seen, sends SIGTERM to
the program alone and asserts that within a deadline neither it nor any of the recorded
processes remains (a pid counts only with the start time it was seen with).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bench.procs import (
    PY,
    REPO,
    Seen,
    abandon,
    kill_left,
    named,
    start,
    stop_and_wait,
    watch_until,
)

STOP_DEADLINE = 90.0
"""Generous: LocalCluster.down() gives each component up to 10 s, the operator 30 s."""


@dataclass(frozen=True)
class Case:
    argv: Callable[[Path], list[str]]
    wanted: tuple[str, ...]
    """Names (``procs.named``) that must all be in the tree before the signal."""
    ready_timeout: float


def bench(script: str, *args: str) -> Callable[[Path], list[str]]:
    return lambda tmp: [PY, str(REPO / "bench" / script), *args, "--out", str(tmp / "out")]


CASES = {
    # The control plane in sessions of their own, nats-server among them.
    "operator_scale": Case(
        bench("operator_scale.py", "--agents", "2", "--samples", "1"),
        ("kube-apiserver", "nats-server", "etcd"),
        240,
    ),
    # The test bed plus an operator subprocess (in the benchmark's own session).
    "autoscale_reaction": Case(
        bench("autoscale_reaction.py", "--trials", "1"),
        ("kube-apiserver", "nats-server", "shoal_operator"),
        300,
    ),
    # nats-servers, the bare worker and the Shoal runtime, all plain children.
    "runtime_throughput": Case(
        bench("runtime_throughput.py", "--quick", "--only", "bare,shoal"),
        ("nats-server", "shoal_runtime", "--bare-worker"),
        120,
    ),
    # nats-server, four runtimes and the dispatcher process.
    "workflow_dispatch": Case(
        bench("workflow_dispatch.py", "--quick"),
        ("nats-server", "shoal_runtime", "--dispatcher"),
        120,
    ),
    # `up` interrupted while starting: what it had started goes with it.
    "testbed_up": Case(
        lambda tmp: [PY, "-m", "shoal_testbed", "up", "--dir", str(tmp / "cluster")],
        ("etcd", "nats-server", "kube-apiserver"),
        240,
    ),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(CASES))
def test_sigterm_stops_everything_it_started(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    log = tmp_path / "run.log"
    proc = start(case.argv(tmp_path), log)

    def ready(now: list[Seen]) -> bool:
        return all(any(named(s, w) for s in now) for w in case.wanted)

    try:
        seen = watch_until(proc, ready, case.ready_timeout, log)
    except BaseException:
        abandon(proc)
        raise
    left = stop_and_wait(proc, seen, STOP_DEADLINE)
    if left or proc.returncode is None:
        kill_left(proc, left)
    assert not left, f"{name} left running after SIGTERM: {[str(s) for s in left]}"
    assert proc.returncode is not None, f"{name} did not exit within {STOP_DEADLINE:.0f}s"
    out = log.read_text(errors="replace")
    assert "SIGTERM: stopping what was started" in out, out[-3000:]
