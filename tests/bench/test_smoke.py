"""Every benchmark in bench/ runs end to end at a small size (a smoke run, in `make test`).

No timing is asserted: a smoke run fails when the benchmark no longer runs (an import, a
flag, a phase that raises, a limit such as "328 of 1,000 Agents Ready" that makes it exit
non-zero) or writes no stamped results. Each writes into a temporary ``--out``, never
into bench/results/.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bench.procs import PY, REPO


@dataclass(frozen=True)
class Smoke:
    args: tuple[str, ...]
    """Small sizes; ``--out`` is added."""
    writes: str
    """The stem of what it writes into ``--out``: STEM.json and STEM.md."""
    timeout: float


# One entry per benchmark script in bench/ (test_every_benchmark_has_a_smoke_run checks it).
SMOKES: dict[str, Smoke] = {
    # Two fresh test beds (baseline, then the operator).
    "operator_scale.py": Smoke(("--agents", "5", "--samples", "3"), "operator", 900),
    # Celery's baseline is left out (--only): it needs redis-server, which `make bench`
    # installs (hack/install-redis.sh) and `make test` does not.
    "runtime_throughput.py": Smoke(("--quick", "--only", "bare,shoal"), "runtime", 300),
    "workflow_dispatch.py": Smoke(("--quick",), "workflow", 300),
    # One trial per operator: up to ~15 s of random phase + the HPA's 15 s sync each.
    "autoscale_reaction.py": Smoke(("--trials", "1"), "autoscale", 900),
    "simulator.py": Smoke(("--rounds", "1"), "simulator", 300),
    # The JetStream layout alone, on one nats-server.
    "jetstream_scale.py": Smoke(("--agents", "20"), "jetstream", 300),
}
NOT_BENCHMARKS = {"celery_noop.py", "noop_handler.py", "results_meta.py"}
"""Modules the benchmarks import, not benchmarks themselves."""


def test_every_benchmark_has_a_smoke_run() -> None:
    scripts = {p.name for p in (REPO / "bench").glob("*.py")} - NOT_BENCHMARKS
    missing = sorted(scripts - set(SMOKES))
    assert not missing, f"bench/ scripts without a smoke run: add them to SMOKES: {missing}"
    gone = sorted(set(SMOKES) - scripts)
    assert not gone, f"SMOKES names scripts that are not in bench/: {gone}"


def is_commit(sha: str) -> bool:
    """A commit of this repository (HEAD when the run started: not compared with HEAD
    now, which a commit made during the run would move)."""
    check = ["git", "-C", str(REPO), "cat-file", "-e", f"{sha}^{{commit}}"]
    return subprocess.run(check, capture_output=True).returncode == 0


@pytest.mark.parametrize(
    "script",
    [pytest.param(k, marks=pytest.mark.timeout(s.timeout + 60), id=k) for k, s in SMOKES.items()],
)
def test_benchmark_smoke_run(script: str, tmp_path: Path) -> None:
    smoke = SMOKES[script]
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    argv = [PY, str(REPO / "bench" / script), *smoke.args, "--out", str(out)]
    with log.open("wb") as f:
        done = subprocess.run(
            argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=smoke.timeout
        )
    text = log.read_text(errors="replace")
    assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n{text[-4000:]}"

    doc = json.loads((out / f"{smoke.writes}.json").read_text())
    stamp = doc["measured_on"]
    assert re.fullmatch(r"[0-9a-f]{4,40}(-dirty)?", stamp["commit"]), stamp
    assert is_commit(stamp["commit"].removesuffix("-dirty")), stamp
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp["date"]), stamp
    md = (out / f"{smoke.writes}.md").read_text()
    assert f"Measured on commit `{stamp['commit']}`, {stamp['date']}." in md, md
