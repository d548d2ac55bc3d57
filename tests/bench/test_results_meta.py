"""bench/results_meta.py: the commit (with -dirty) and UTC date stamped on results."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType

from tests.bench.procs import REPO


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "results_meta_under_test", REPO / "bench" / "results_meta.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_commit_is_short_head_and_dirty_only_for_tracked_changes(tmp_path: Path) -> None:
    meta = load()
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git(tmp_path, "add", "a.txt")
    git(
        tmp_path,
        *("-c", "user.name=t", "-c", "user.email=t@example.invalid"),
        *("commit", "-q", "-m", "one"),
    )
    short = git(tmp_path, "rev-parse", "--short", "HEAD")
    assert meta.git_commit(tmp_path) == short
    (tmp_path / "results.json").write_text("{}\n")  # untracked: still clean
    assert meta.git_commit(tmp_path) == short
    (tmp_path / "a.txt").write_text("two\n")
    assert meta.git_commit(tmp_path) == short + "-dirty"


def test_outside_a_repository_the_commit_is_unknown(tmp_path: Path) -> None:
    assert load().git_commit(tmp_path) == "unknown"


def test_stamps() -> None:
    meta = load()
    stamp = meta.measured_on()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp["date"]), stamp
    doc = meta.stamp_json({"x": 1})
    assert list(doc) == ["measured_on", "x"]
    md = meta.stamp_markdown("| a |\n")
    assert re.fullmatch(
        r"\| a \|\n\nMeasured on commit `[0-9a-f]+(-dirty)?`, [0-9T:-]+Z\.\n", md
    ), md
