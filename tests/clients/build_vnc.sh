#!/usr/bin/env bash
# A Python venv with the VNC client vncdotool (from PyPI), for
# tests/e2e_display.rs (a sibling of build.sh, which makes pylume's venv; a
# venv of its own, so that neither rebuilds the other). Built once and cached.
#
# Usage: tests/clients/build_vnc.sh [OUTDIR]
#   OUTDIR defaults to ${LUME_VNC_CLIENT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lume/test-clients-vnc}
# The only stdout line is the absolute OUTDIR path; OUTDIR/venv/bin/python
# imports vncdotool.
set -euo pipefail

VNCDOTOOL_VERSION=1.4.2
OUT=${1:-${LUME_VNC_CLIENT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lume/test-clients-vnc}}

log() { echo "clients/build_vnc.sh: $*" >&2; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Serialise concurrent builds into the same OUTDIR (parallel tests).
exec 9>"$OUT/.lock"
flock 9

stamp="vncdotool==$VNCDOTOOL_VERSION"
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
    "$OUT/venv/bin/python" -c 'import vncdotool.api' >&2
    echo "$stamp" > "$OUT/stamp"
fi
echo "$OUT"
