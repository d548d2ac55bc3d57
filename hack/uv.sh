#!/usr/bin/env bash
# Runs the pinned uv (installed once into the cache, outside the work tree):
#   ${SHOAL_CACHE_DIR:-~/.cache/shoal}/tools/uv-<version>/bin/uv
# Every Python set-up goes through it, so a fresh clone installs exactly uv.lock.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${SHOAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal}
tool=$cache/tools/uv-$UV_VERSION
if [[ ! -x $tool/bin/uv ]]; then
  printf '[shoal] installing uv %s into %s (first time only)\n' "$UV_VERSION" "$tool" >&2
  rm -rf "$tool.tmp"
  "${PYTHON:-python3}" -m venv "$tool.tmp"
  "$tool.tmp/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
  rm -rf "$tool"
  mv "$tool.tmp" "$tool"
fi
# Only the machine's Python: uv never downloads an interpreter.
export UV_PYTHON_DOWNLOADS=never
exec "$tool/bin/uv" "$@"
