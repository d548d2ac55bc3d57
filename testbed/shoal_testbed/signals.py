"""Stopping on SIGTERM, SIGINT and SIGHUP the way Ctrl-C stops a script: by unwinding.

A Python process killed by SIGTERM runs no ``finally`` block and no ``__exit__``: the test
bed it started (etcd, kube-apiserver, ..., nats-server, in sessions of their own) and the
processes it spawned keep running. :func:`stop_on_signals` makes the first of these
signals raise in the main thread instead (``SystemExit(128 + signum)`` for SIGTERM and
SIGHUP, ``KeyboardInterrupt`` for SIGINT, or the exception given), so the code's own
cleanup runs: ``LocalCluster.down()``, ``Popen.terminate()``, ``asyncio.run`` cancelling
its tasks. Later signals are ignored (with a line on stderr) while that cleanup runs; only
SIGKILL cuts it short.

A backstop for what a cleanup path missed: once a signal was received, the process's
remaining descendants (found through ``/proc``) get SIGTERM at exit, then SIGKILL.
A process that exits normally is left alone with what it started (``shoal_testbed up``
returns with the test bed running, on purpose).

Used by every benchmark in ``bench/``, ``python -m shoal_testbed up`` and the pytest
session (``shoal_testbed.fixtures``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
REAP_GRACE = 10.0

_received: int | None = None
_installed = False


def received() -> int | None:
    """The signal that started the stop, if one did."""
    return _received


def stop_on_signals(
    exception: Callable[[int], BaseException] | None = None, *, reap: bool = True
) -> None:
    """Turns the first SIGTERM/SIGINT/SIGHUP into an exception in the main thread.

    ``exception(signum)`` builds it (default: ``KeyboardInterrupt`` for SIGINT,
    ``SystemExit(128 + signum)`` otherwise). With ``reap``, descendants still alive at
    exit after such a signal are terminated. Call it from the main thread, early.
    """
    global _installed
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("stop_on_signals() must be called from the main thread")
    build = exception or _default_exception

    def handler(signum: int, _frame: FrameType | None) -> None:
        global _received
        name = signal.Signals(signum).name
        if _received is not None:
            print(
                f"[shoal] {name}: already stopping (cleaning up; SIGKILL to abandon it)",
                file=sys.stderr,
                flush=True,
            )
            return
        _received = signum
        print(f"[shoal] {name}: stopping what was started", file=sys.stderr, flush=True)
        raise build(signum)

    for sig in SIGNALS:
        signal.signal(sig, handler)
    if reap and not _installed:
        atexit.register(_reap_after_signal)
    _installed = True


def _default_exception(signum: int) -> BaseException:
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return SystemExit(128 + signum)


def descendants(root: int | None = None) -> list[int]:
    """Live descendants of ``root`` (default: this process), parents before children."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            # pid (comm) state ppid ...: comm may hold spaces and parentheses.
            parent_of[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    out: list[int] = []
    todo = [os.getpid() if root is None else root]
    while todo:
        for child in sorted(children.get(todo.pop(0), [])):
            out.append(child)
            todo.append(child)
    return out


def terminate_all(pids: list[int], grace: float = REAP_GRACE) -> list[int]:
    """SIGTERM to each, SIGKILL to those still there after ``grace``; returns the
    pids that needed SIGKILL."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [pid for pid in left if _alive(pid)]
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        _alive(pid)  # reaps our zombies
    return left


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _reap_after_signal() -> None:
    if _received is None:
        return
    left = descendants()
    if left:
        print(
            f"[shoal] stopping {len(left)} process(es) left running: {left}",
            file=sys.stderr,
            flush=True,
        )
        terminate_all(left)


__all__ = ["SIGNALS", "descendants", "received", "stop_on_signals", "terminate_all"]
