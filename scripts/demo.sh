#!/usr/bin/env bash
# From a fresh Debian 12 machine: install what lume needs, build it, build a
# Debian 12 cloud image (tests/debian/build.sh, cached), create and start a VM
# called `demo` from it, wait until `lume ssh demo` answers, and say how to
# reach it.
#
# Env: LUME_DEMO_IMAGE=PATH uses that qcow2/raw cloud image (for example
#      Debian's debian-12-genericcloud-amd64.qcow2) instead of building one
#      (building needs root); LUME_DEMO_NAME, LUME_DEMO_NETWORK.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --locked
lume=$PWD/target/release/lume
image=${LUME_DEMO_IMAGE:-}
if [ -z "$image" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "Building the Debian image needs root: run as root, or set LUME_DEMO_IMAGE to a downloaded cloud image" >&2
        exit 1
    fi
    image=$(tests/debian/build.sh | tail -n 1)
fi
name=${LUME_DEMO_NAME:-demo}
# nat (lume's default) needs root; without root the demo uses user mode.
network=${LUME_DEMO_NETWORK:-$([ "$(id -u)" = 0 ] && echo nat || echo user)}

if ! "$lume" get "$name" >/dev/null 2>&1; then
    "$lume" create "$name" --cpu 2 --memory 1GB --disk-size 8GB --network "$network" --image "$image"
fi
if [ "$("$lume" get "$name" -f json | grep -c '"status": "running"')" = 0 ]; then
    "$lume" run "$name" --detach
fi
echo "Waiting for the guest to boot and answer SSH (about a minute under TCG, up to 5)..."
start=$(date +%s)
until "$lume" ssh "$name" -t 30 true 2>/dev/null; do
    if [ $(($(date +%s) - start)) -gt 300 ]; then
        echo "VM '$name' did not answer SSH within 5 minutes; see its console: $("$lume" get "$name" -f json | sed -n 's/.*"locationName": "\(.*\)".*/\1/p')/$name/console.log" >&2
        exit 1
    fi
    sleep 2
done
"$lume" get "$name"
cat <<TXT

VM '$name' is running Debian 12 (up to SSH in $(($(date +%s) - start)) s).
  shell:    lume ssh $name          (user lume, passwordless sudo; lume is $lume)
  command:  lume ssh $name -- uname -a
  details:  lume get $name -f json
  stop:     lume stop $name
  delete:   lume delete $name --force
TXT
