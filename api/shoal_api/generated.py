"""Writes generated files, or checks that the checked-in copies are current."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path


def write_or_check(files: Mapping[Path, str], check: bool, how: str) -> int:
    """Exit status: 1 when ``check`` finds a file missing or different."""
    stale = []
    for path, text in files.items():
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date (run `{how}`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0
