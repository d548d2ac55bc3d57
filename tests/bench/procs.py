"""Watching a process tree through /proc, independently of the code under test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


@dataclass(frozen=True)
class Seen:
    """A process seen in the tree: its pid, its start time (pid reuse) and argv."""

    pid: int
    start: str
    argv: tuple[str, ...]

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[19] == self.start and stat[0] != "Z"

    def __str__(self) -> str:
        return f"{self.pid} {' '.join(self.argv)[:160]}"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/pid/stat after ``(comm)``: state, ppid, ..., starttime at 19."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def tree(root: int) -> list[Seen]:
    """The live descendants of ``root``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(int(stat[1]), []).append(int(entry.name))
    out: list[Seen] = []
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            stat = _stat(pid)
            with contextlib.suppress(OSError):
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                if stat is not None and stat[0] != "Z":
                    argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
                    out.append(Seen(pid, stat[19], argv))
    return out


def named(seen: Seen, name: str) -> bool:
    """``name`` is the program (argv[0]'s basename) or one of its arguments."""
    return bool(seen.argv) and (Path(seen.argv[0]).name == name or name in seen.argv[1:])


def start(argv: list[str], log: Path, cwd: Path = REPO) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd
        )


def watch_until(
    proc: subprocess.Popen[bytes],
    ready: Callable[[list[Seen]], bool],
    timeout: float,
    log: Path,
) -> dict[tuple[int, str], Seen]:
    """Polls ``proc``'s tree until ``ready(tree)``; returns every process seen so far."""
    seen: dict[tuple[int, str], Seen] = {}
    deadline = time.monotonic() + timeout
    while True:
        now = tree(proc.pid)
        for s in now:
            seen.setdefault((s.pid, s.start), s)
        if ready(now):
            return seen
        if proc.poll() is not None:
            raise AssertionError(
                f"exited ({proc.returncode}) before it was ready; log ends:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not ready after {timeout:.0f}s; processes: {[str(s) for s in now]}; "
                "log ends:\n" + log.read_text(errors="replace")[-3000:]
            )
        time.sleep(0.2)


def stop_and_wait(
    proc: subprocess.Popen[bytes], seen: dict[tuple[int, str], Seen], timeout: float
) -> list[Seen]:
    """SIGTERM to ``proc`` alone; polls until it and every process in ``seen`` are gone
    (or ``timeout``); returns what is left."""
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()
        left = [s for s in seen.values() if s.alive()]
        if proc.returncode is not None and not left:
            return []
        if time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def kill_left(proc: subprocess.Popen[bytes], left: list[Seen]) -> None:
    """After a failed assertion: what the code under test left, SIGKILLed by pid."""
    for s in left:
        if s.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(s.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def abandon(proc: subprocess.Popen[bytes]) -> None:
    """A test failed before the signal: stop the program and SIGKILL its tree's rest."""
    seen = {(s.pid, s.start): s for s in tree(proc.pid)}
    kill_left(proc, stop_and_wait(proc, seen, 60))
