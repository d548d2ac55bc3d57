"""Each distribution, installed alone from uv.lock into an empty virtualenv, holds what its
image runs and nothing else (the same `uv sync --package` that images/Dockerfile runs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from shoal_testbed.binaries import sync_alone

REPO = Path(__file__).resolve().parents[2]

LIST = (
    "import importlib.metadata as m; "
    "print('\\n'.join(sorted({d.metadata['Name'].lower().replace('_', '-') "
    "for d in m.distributions()})))"
)
IMPORT_ALL = (
    "import importlib, pkgutil, sys\n"
    "for top in sys.argv[1:]:\n"
    "    pkg = importlib.import_module(top)\n"
    "    for m in pkgutil.walk_packages(pkg.__path__, top + '.'):\n"
    "        if not m.name.endswith('__main__'):\n"
    "            importlib.import_module(m.name)\n"
)


def install_alone(package: str, venv: Path) -> set[str]:
    """Installs `package` and its locked dependencies into `venv`; returns the names."""
    sync_alone(package, venv)
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", LIST],
        check=True,
        capture_output=True,
        text=True,
        cwd=venv,
    ).stdout
    return set(out.split())


def imports_cleanly(venv: Path, *packages: str) -> None:
    # Run from the venv, not the repository, so that nothing is imported from the tree.
    subprocess.run(
        [str(venv / "bin" / "python"), "-c", IMPORT_ALL, *packages], check=True, cwd=venv
    )


def test_runtime_distribution_has_no_operator_kubernetes_client_or_test_bed(
    tmp_path: Path,
) -> None:
    names = install_alone("shoal-runtime", tmp_path / "venv")
    assert {"shoal-api", "shoal-runtime", "nats-py"} <= names
    forbidden = {
        "kopf",
        "kubernetes-asyncio",
        "kubernetes",
        "shoal-operator",
        "shoal-testbed",
        "shoal-cli",
        "shoal-core",
        "typer",
        "matplotlib",
        "pytest",
    }
    assert names & forbidden == set()
    imports_cleanly(tmp_path / "venv", "shoal_api", "shoal_runtime")


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of a big
# pytest process would report the parent's size; VmHWM belongs to the new image alone.
IMPORT_RSS = (
    "import pathlib, shoal_operator.__main__; "
    "print(next(l.split()[1] for l in pathlib.Path('/proc/self/status').read_text()"
    ".splitlines() if l.startswith('VmHWM:')))"
)
OPERATOR_IMPORT_MAX_MIB = 90
"""The operator's import weighs ~77 MiB alone; kopf importing kubernetes_asyncio made it
~125 MiB (kopf and kubernetes_asyncio alone: ~110 MiB)."""


def test_operator_distribution_has_no_test_bed_or_kubernetes_client(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    names = install_alone("shoal-operator", venv)
    assert {"shoal-api", "shoal-core", "shoal-operator", "kopf", "aiohttp"} <= names
    forbidden = {
        "shoal-testbed",
        "shoal-runtime",
        "shoal-cli",
        "pytest",
        "kubernetes-asyncio",
        "kubernetes",
        "pykube-ng",
    }
    assert names & forbidden == set()
    imports_cleanly(venv, "shoal_api", "shoal_core", "shoal_operator")
    # The entry point's imports (kopf's included) and what they cost in memory: no
    # generated Kubernetes models, which kopf would import whenever they are installed.
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", IMPORT_RSS],
        check=True,
        capture_output=True,
        text=True,
        cwd=venv,
    ).stdout
    rss_mib = int(out.split()[-1]) / 1024  # VmHWM is in KiB
    print(f"operator import: peak RSS {rss_mib:.0f} MiB")
    assert rss_mib < OPERATOR_IMPORT_MAX_MIB


def test_cli_distribution_is_the_one_line_a_user_needs(tmp_path: Path) -> None:
    names = install_alone("shoal-cli", tmp_path / "venv")
    assert {"shoal-cli", "shoal-api", "shoal-core", "typer"} <= names
    assert names & {"kopf", "shoal-operator", "shoal-runtime", "shoal-testbed"} == set()
    assert (tmp_path / "venv" / "bin" / "shoal").exists()
    imports_cleanly(tmp_path / "venv", "shoal_cli")


@pytest.mark.parametrize(
    ("package", "target"), [("shoal-runtime", "runtime"), ("shoal-operator", "operator")]
)
def test_dockerfile_installs_the_same_distribution(package: str, target: str) -> None:
    """The image target copies the venv of a stage that syncs exactly this package."""
    dockerfile = (REPO / "images" / "Dockerfile").read_text()
    stage = dockerfile.split(f"FROM build AS {target}-deps\n", 1)[1].split("\nFROM ", 1)[0]
    assert stage.count(f"--package {package}") == 2
    assert "--package" not in stage.replace(f"--package {package}", "")
    final = dockerfile.split(f"FROM ${{BASE_IMAGE}} AS {target}\n", 1)[1]
    assert f"COPY --from={target}-deps /opt/shoal /opt/shoal" in final
    assert "USER 65532:65532" in final.split("\nFROM ", 1)[0]
