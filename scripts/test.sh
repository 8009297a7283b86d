#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs the packages,
# builds the test guest (cached), checks formatting and lints, runs every test.
# Run as root: the end-to-end tests create network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "Run as root (sudo scripts/test.sh): the end-to-end tests create network namespaces" >&2
    exit 1
fi
scripts/install-deps.sh
echo "== test guest" >&2
tests/guest/build.sh >&2
echo "== lume's Python client (pylume, from PyPI)" >&2
tests/clients/build.sh pylume >&2
echo "== the official MCP Python SDK (mcp, from PyPI)" >&2
tests/clients/build.sh mcp >&2
echo "== a VNC client (vncdotool, from PyPI)" >&2
tests/clients/build.sh vnc >&2
echo "== Debian cloud test image" >&2
tests/debian/build.sh >&2
echo "== format and lints" >&2
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
echo "== tests" >&2
cargo test --all-targets --locked --no-fail-fast 2>&1
