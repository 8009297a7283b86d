#!/usr/bin/env bash
# Benchmark 10: the cost of a network policy (docs/networking.md, "Network
# policy"): two NAT guests in the same run, `tnone` without a policy and
# `tpol` with a 50-rule allow list whose only rule that matches the
# benchmark's traffic (the gateway, where the sender is) comes last, so every
# frame the guest sends walks all 50 rules of the eBPF filter.
#
#   throughput  BENCH_MB MiB (default 64) through the guest's TCP echo
#               (port 7), sender in the host namespace, as bench/throughput.sh
#   address     `lume run --detach` to the guest's "lease" console line
#               (DHCP through the filter), both VMs stopped and started
#               again each round
#
# Rounds alternate the order of the two; round 0 is a warm-up.
BENCH_NAME=policy
source "$(dirname "$0")/lib.sh"
need_root
guest_files
OUT=$(results_file policy)
: >"$OUT"
MB=${BENCH_MB:-64}

lan_setup bp
lume_home H
RULES=()
for i in $(seq 1 49); do RULES+=(--allow-out "198.51.100.$((i + 100))/32:$((8000 + i))/tcp"); done
RULES+=(--allow-out "203.0.113.1/32")
lume_create "$HOST_NS" "$H" tnone nat ""
lume_create "$HOST_NS" "$H" tpol nat "" "${RULES[@]}"
n=$(lume_in "$HOST_NS" "$H" get tpol -f json | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(len(d["network"]["policy"]["allowOut"]))')
[ "$n" = 50 ] || die "tpol has $n rules, not 50"

now() { date +%s.%N; }
start_timed() { # VM RUN: starts VM, records the time to its lease line
    local vm=$1 run=$2 t0 t1 log="$H/.lume/$1/console.log"
    lume_in "$HOST_NS" "$H" stop "$vm" >/dev/null 2>&1 || true
    : >"$log" 2>/dev/null || true
    t0=$(now)
    lume_in "$HOST_NS" "$H" run "$vm" --detach >/dev/null
    wait_console "$log" "LUME-GUEST: lease" 240
    t1=$(now)
    [ "$run" -gt 0 ] || return 0
    "${BT[@]}" note --record "$OUT" --json "{\"case\": \"address-$vm\", \"run\": $run, \"seconds\": $(python3 -c "print(round($t1 - $t0, 3))")}"
}
ip_of() {
    lume_in "$HOST_NS" "$H" get "$1" -f json | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(d["ipAddress"] or "")'
}
qemu_pid() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["qemuPid"])' "$H/.lume/$1/run.json"; }
through() { # VM RUN
    local rec=$OUT ip
    [ "$2" -gt 0 ] || rec=
    ip=$(ip_of "$1")
    in_ns "$HOST_NS" "${BT[@]}" echo-client --record="$rec" --case "throughput-$1" --run "$2" \
        --host "$ip" --port 7 --mb "$MB" --cpu-pid "$(qemu_pid "$1")" >/dev/null
}
log "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((run = 0; run <= BENCH_RUNS; run++)); do
    log "round $run of $BENCH_RUNS$([ "$run" = 0 ] && echo ' (warm-up, not recorded)')"
    if ((run % 2)); then order=(tpol tnone); else order=(tnone tpol); fi
    for vm in "${order[@]}"; do start_timed "$vm" "$run"; done
    sleep 2
    for vm in "${order[@]}"; do through "$vm" "$run"; done
done
log "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
for vm in tnone tpol; do lume_in "$HOST_NS" "$H" stop "$vm" >/dev/null; done
log "done: $OUT"
