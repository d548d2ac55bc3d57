from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def timeline_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the step handlers (in-process runtimes) note each execution."""
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setenv("SHOAL_TEST_TIMELINE", str(path))
    return path
