#!/usr/bin/env bash
# Benchmark 5: guest network throughput per network mode.
#
# The test guest is busybox only; what it offers for bulk data is its TCP
# echo service on port 7 (`nc -ll -p 7 -e cat`: one `cat` per connection,
# reading the socket and writing it back). A sender pushes BENCH_MB MiB
# (default 64) and reads the echo at the same time; the time is from
# connect to the last echoed byte, and MiB/s is payload per second (each
# byte crosses the virtual NIC twice, in and out). Under TCG this measures
# mostly the emulated guest CPU (virtio-net interrupts, the guest's TCP
# stack and `cat` copying), not the host's datapath: the CPU time of
# QEMU's vCPU thread ("CPU 0/TCG") during each transfer is recorded to
# show it.
#
#   bridged  --network bridged:up0 (a tap joined to up0 by a macvlan and tc
#            mirred redirects); sender on the LAN (a macvlan guest cannot be
#            reached from its own host)
#   bridged-macvtap
#            only with BENCH_OLD_LUME=<a lume binary from before the tap +
#            macvlan path>: the same, started by that binary, which gives
#            QEMU a macvtap on up0 — the old path against the new, same run
#   nat      --network nat (tap on lume's bridge); sender in the host namespace
#   user     --network user --publish 7007:7 (passt behind lume's filtering
#            relay); sender to
#            127.0.0.1:7007 in the host namespace
#   veth     baseline without a VM: the same sender to a Python echo server
#            across the veth pair between the host and LAN namespaces
#
# All VMs run at once; each round measures the cases one after the other
# (order rotating), round 0 is a warm-up and not recorded.
BENCH_NAME=throughput
source "$(dirname "$0")/lib.sh"
need_root
guest_files
OUT=$(results_file throughput)
: >"$OUT"
MB=${BENCH_MB:-64}

lan_setup bt
lume_home H
lume_create "$HOST_NS" "$H" tbr bridged:up0 ""
lume_create "$HOST_NS" "$H" tnat nat ""
lume_create "$HOST_NS" "$H" tuser user "" --publish 7007:7
VMS=(tbr tnat tuser)
if [ -n "${BENCH_OLD_LUME:-}" ]; then
    [ -x "$BENCH_OLD_LUME" ] || die "BENCH_OLD_LUME=$BENCH_OLD_LUME is not an executable"
    lume_create "$HOST_NS" "$H" tmv bridged:up0 ""
    LUME=$BENCH_OLD_LUME lume_in "$HOST_NS" "$H" run tmv --detach >/dev/null
    VMS+=(tmv)
fi
for vm in tbr tnat tuser; do lume_in "$HOST_NS" "$H" run "$vm" --detach >/dev/null; done
for vm in "${VMS[@]}"; do wait_console "$H/.lume/$vm/console.log" "LUME-GUEST: lease" 180; done
ip_of() {
    lume_in "$HOST_NS" "$H" get "$1" -f json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ipAddress"] or "")'
}
BR_IP=$(ip_of tbr)
MV_IP=
if [ -n "${BENCH_OLD_LUME:-}" ]; then
    MV_IP=$(ip_of tmv)
    [ -n "$MV_IP" ] || die "no address for the macvtap guest"
    grep -q "host device lmv" "$H/.lume/tmv/lume.log" || die "BENCH_OLD_LUME did not give tmv a macvtap"
fi
NAT_IP=$(ip_of tnat)
[ -n "$BR_IP" ] && [ -n "$NAT_IP" ] || die "no guest address (bridged '$BR_IP', nat '$NAT_IP')"
log "guests: bridged $BR_IP, nat $NAT_IP, user 127.0.0.1:7007"
ip netns exec "$LAN_NS" "${BT[@]}" echo-server --addr "$LAN_PEER" --port 7007 &
disown
sleep 1

qemu_pid() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["qemuPid"])' "$H/.lume/$1/run.json"; }
declare -A QPID=([bridged]=$(qemu_pid tbr) [nat]=$(qemu_pid tnat) [user]=$(qemu_pid tuser))
[ -z "$MV_IP" ] || QPID[bridged-macvtap]=$(qemu_pid tmv)

measure() { # RUN CASE
    local ns host port=7 cpu=()
    case $2 in
        bridged) ns=$LAN_NS host=$BR_IP ;;
        bridged-macvtap) ns=$LAN_NS host=$MV_IP ;;
        nat) ns=$HOST_NS host=$NAT_IP ;;
        user) ns=$HOST_NS host=127.0.0.1 port=7007 ;;
        veth) ns=$HOST_NS host=$LAN_PEER port=7007 ;;
    esac
    [ -z "${QPID[$2]:-}" ] || cpu=(--cpu-pid "${QPID[$2]}")
    local rec=$OUT
    [ "$1" -gt 0 ] || rec=
    local err
    # A transfer that does not come back whole is counted (and shown in the
    # report), not fatal: one failure must not hide every other number.
    if ! err=$(in_ns "$ns" "${BT[@]}" echo-client --record="$rec" --case "$2" --run "$1" \
        --host "$host" --port "$port" --mb "$MB" "${cpu[@]}" 2>&1 >/dev/null); then
        log "$2: $err"
        [ "$1" -gt 0 ] || return 0
        "${BT[@]}" note --record "$OUT" --json "$(python3 -c 'import json,sys; print(json.dumps({"case": sys.argv[1] + "-failed", "run": int(sys.argv[2]), "detail": sys.argv[3][-160:]}))' "$2" "$1" "$err")"
    fi
}

CASES=(veth bridged nat user)
[ -z "$MV_IP" ] || CASES+=(bridged-macvtap)
for ((run = 0; run <= BENCH_RUNS; run++)); do
    log "round $run of $BENCH_RUNS$([ "$run" = 0 ] && echo ' (warm-up, not recorded)')"
    for ((k = 0; k < ${#CASES[@]}; k++)); do
        measure "$run" "${CASES[$(((k + run) % ${#CASES[@]}))]}"
    done
done
# vhost-net: lume's tap netdevs do not ask for it.
vhost=$(cat "$H/.lume/tnat/lume.log" "$H/.lume/tbr/lume.log" | awk '/vhost=on/ { n++ } END { print n + 0 }')
"${BT[@]}" note --record "$OUT" --json "{\"case\": \"vhost\", \"run\": 0, \"lume_requests_vhost\": $([ "$vhost" -gt 0 ] && echo true || echo false), \"dev_vhost_net\": $([ -e /dev/vhost-net ] && echo true || echo false)}"
for vm in "${VMS[@]}"; do lume_in "$HOST_NS" "$H" stop "$vm" >/dev/null; done
log "done: $OUT"
