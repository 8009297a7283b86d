#!/usr/bin/env bash
# A Python venv with one real client of lume from PyPI, for the tests that
# drive lume with it. Each client has a venv of its own (so that neither
# rebuilds the other), built once and cached.
#
# Usage: tests/clients/build.sh CLIENT [OUTDIR]
#   CLIENT  pylume  lume's own published Python client (tests/client_pylume.rs)
#           mcp     the official MCP Python SDK (tests/e2e_mcp.rs)
#           vnc     the VNC client vncdotool (tests/e2e_display.rs)
#   OUTDIR  defaults to ${LUME_CLIENTS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lume/test-clients}/CLIENT
# The only stdout line is the absolute OUTDIR path; OUTDIR/venv/bin/python
# imports the client.
set -euo pipefail

log() { echo "clients/build.sh: $*" >&2; }

client=${1:-}
case "$client" in
    pylume) pin="pylume==0.2.1"; check="import pylume" ;;
    mcp) pin="mcp==2.3.0"; check="import mcp.client.stdio" ;;
    vnc) pin="vncdotool==1.4.2"; check="import vncdotool.api" ;;
    *)
        log "usage: tests/clients/build.sh pylume|mcp|vnc [OUTDIR]"
        exit 2
        ;;
esac
OUT=${2:-${LUME_CLIENTS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lume/test-clients}/$client}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Serialise concurrent builds into the same OUTDIR (parallel tests).
exec 9>"$OUT/.lock"
flock 9

if [ "$(cat "$OUT/stamp" 2>/dev/null)" != "$pin" ]; then
    log "building a venv with $pin in $OUT/venv"
    rm -rf "$OUT/venv"
    python3 -m venv "$OUT/venv" >&2 || {
        log "error: python3 -m venv failed: install python3-venv (scripts/install-deps.sh)"
        exit 1
    }
    "$OUT/venv/bin/pip" install --quiet --disable-pip-version-check "$pin" >&2 || {
        log "error: pip could not install $pin from PyPI: is PyPI reachable?"
        exit 1
    }
    "$OUT/venv/bin/python" -c "$check" >&2
    echo "$pin" > "$OUT/stamp"
fi
echo "$OUT"
