#!/usr/bin/env bash
# Makes sure a redis-server binary exists (the Celery baseline of `make bench` needs one)
# and prints its path on stdout. Uses a redis-server already on PATH (or $REDIS_SERVER);
# otherwise installs the distribution's package with apt-get. There is no redis-server
# wheel on PyPI, so there is no pip fallback: without either, this fails loudly.
set -euo pipefail

log() { printf '[shoal] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [[ -n ${REDIS_SERVER:-} ]]; then
  [[ -x $REDIS_SERVER ]] || die "REDIS_SERVER=$REDIS_SERVER is not an executable"
  printf '%s\n' "$REDIS_SERVER"
  exit 0
fi

if found=$(command -v redis-server); then
  printf '%s\n' "$found"
  exit 0
fi

command -v apt-get >/dev/null ||
  die "redis-server is not on PATH and apt-get is missing: install Redis >= 6 yourself (or set REDIS_SERVER=/path/to/redis-server)"

sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null ||
    die "redis-server is not on PATH; installing it needs root (run 'apt-get install redis-server' as root, or set REDIS_SERVER)"
  sudo=(sudo -n)
fi

log "redis-server not found: installing it with apt-get (one time, about a minute)..."
logf=$(mktemp)
trap 'rm -f "$logf"' EXIT
if ! { "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends redis-server; } >"$logf" 2>&1; then
  tail -n 20 "$logf" >&2
  die "apt-get could not install redis-server (see above)"
fi

found=$(command -v redis-server) || die "apt-get ran but redis-server is still not on PATH"
log "installed $("$found" --version | head -n 1)"
printf '%s\n' "$found"
