#!/usr/bin/env bash
# A Python venv with lume's own published Python client, pylume (from PyPI),
# for tests/client_pylume.rs. Built once and cached.
#
# Usage: tests/clients/build.sh [OUTDIR]
#   OUTDIR defaults to ${LUME_CLIENTS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lume/test-clients}
# The only stdout line is the absolute OUTDIR path; OUTDIR/venv/bin/python
# imports pylume.
set -euo pipefail

PYLUME_VERSION=0.2.1
OUT=${1:-${LUME_CLIENTS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lume/test-clients}}

log() { echo "clients/build.sh: $*" >&2; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Serialise concurrent builds into the same OUTDIR (parallel tests).
exec 9>"$OUT/.lock"
flock 9

stamp="pylume==$PYLUME_VERSION"
if [ "$(cat "$OUT/stamp" 2>/dev/null)" != "$stamp" ]; then
    log "building a venv with $stamp in $OUT/venv"
    rm -rf "$OUT/venv"
    python3 -m venv "$OUT/venv" >&2 || {
        log "error: python3 -m venv failed: install python3-venv (scripts/install-deps.sh)"
        exit 1
    }
    "$OUT/venv/bin/pip" install --quiet --disable-pip-version-check "$stamp" >&2 || {
        log "error: pip could not install $stamp from PyPI: is PyPI reachable?"
        exit 1
    }
    "$OUT/venv/bin/python" -c 'import pylume' >&2
    echo "$stamp" > "$OUT/stamp"
fi
echo "$OUT"
