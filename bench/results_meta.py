"""What every benchmark does before it measures, and what it stamps on its results.

- :func:`start` makes SIGTERM, SIGINT and SIGHUP unwind the benchmark (its ``finally``
  blocks stop the test beds, servers and processes it started; see
  ``shoal_testbed.signals``) and notes the code being measured: the git commit
  (``git rev-parse --short HEAD``, ``-dirty`` when tracked files differ from it) and the
  UTC date, taken at the start, before anything is written.
- :func:`stamp_json` adds them to the JSON document, :func:`stamp_markdown` as a last
  line of the Markdown, so a figure can always be traced to the code it measured.
"""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path
from typing import Any

from shoal_testbed.signals import stop_on_signals

REPO = Path(__file__).resolve().parents[1]


def git_commit(repo: Path = REPO) -> str:
    """``abc1234``, ``abc1234-dirty`` when tracked files changed, ``unknown`` without git."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30
        )

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return head.stdout.strip() + ("-dirty" if dirty else "")


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def measured_on() -> dict[str, str]:
    return {"commit": git_commit(), "date": utc_now()}


_META: dict[str, str] | None = None


def start() -> dict[str, str]:
    """Call first thing in a benchmark's ``main()`` (main thread): signals unwind it,
    and the commit and date it measures are noted."""
    global _META
    stop_on_signals()
    _META = measured_on()
    return _META


def meta() -> dict[str, str]:
    """What :func:`start` noted (or now, if it was not called)."""
    return _META if _META is not None else measured_on()


def stamp_json(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with ``measured_on: {commit, date}`` first."""
    return {"measured_on": meta(), **doc}


def stamp_markdown(text: str) -> str:
    m = meta()
    return text.rstrip("\n") + f"\n\nMeasured on commit `{m['commit']}`, {m['date']}.\n"


__all__ = ["git_commit", "measured_on", "meta", "stamp_json", "stamp_markdown", "start"]
