#!/usr/bin/env bash
# From a fresh Debian 12 machine: install what lume needs, build it, prepare
# the demo guest, create and start a VM called `demo`, and print its address.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --locked
lume=$PWD/target/release/lume
guest=$(tests/guest/build.sh | tail -n 1)
name=${LUME_DEMO_NAME:-demo}
# nat (lume's default) needs root; without root the demo uses user mode with a published port.
network=${LUME_DEMO_NETWORK:-$([ "$(id -u)" = 0 ] && echo nat || echo user)}
publish=()
[ "$network" = user ] && publish=(--publish 127.0.0.1:8080:80)

if ! "$lume" get "$name" >/dev/null 2>&1; then
    "$lume" create "$name" --cpu 1 --memory 512MB --disk-size 1GB --network "$network" "${publish[@]}" \
        --kernel "$guest/vmlinuz" --initrd "$guest/initrd.img" --cmdline "$(cat "$guest/cmdline")"
fi
if [ "$("$lume" get "$name" -f json | grep -c '"status": "running"')" = 0 ]; then
    "$lume" run "$name" --detach
fi
dir=$("$lume" get "$name" -f json | sed -n 's/.*"locationName": "\(.*\)".*/\1/p')
[ "$dir" = default ] && dir=$HOME/.lume
console=$dir/$name/console.log
echo "Waiting for the guest's DHCP lease (up to 3 minutes under TCG)..."
for _ in $(seq 1 360); do
    grep -q "LUME-GUEST: lease" "$console" 2>/dev/null && break
    sleep 0.5
done
grep "LUME-GUEST: lease" "$console" || { echo "The guest did not get a lease; see $console" >&2; exit 1; }
for _ in $(seq 1 100); do
    ip=$("$lume" get "$name" -f json | sed -n 's/^  "ipAddress": "\(.*\)".*/\1/p')
    [ -n "$ip" ] && break
    sleep 0.1
done
"$lume" get "$name"
if [ "$("$lume" get "$name" -f json | sed -n 's/^  "networkMode": "\(.*\)".*/\1/p')" = user ]; then
    reach="curl http://127.0.0.1:8080/   (user mode: port 80 published on 127.0.0.1:8080)"
else
    reach="curl http://$ip/"
fi
cat <<TXT

VM '$name' is running. Its address: $ip
  reach it: $reach
  console:  tail -f $console
  details:  $lume get $name -f json
  stop:     $lume stop $name
  delete:   $lume delete $name --force
TXT
