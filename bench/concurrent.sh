#!/usr/bin/env bash
# Benchmark: NAT VMs started at the same instant (issue 16).
#
# BENCH_VMS (default 10) NAT VMs booting the test guest are started with
# `lume run VM --detach` at the same instant (one process each, released
# together by bt.py concurrent-start); then `lume ls -f json` is polled until
# every VM has an address. Recorded per round: each `run --detach`'s
# wall time, when each supervisor logged "Starting <qemu>" (lume's own work
# before QEMU), when each address appeared, and whether the addresses are
# distinct. The baseline, in the same round: one of the VMs started alone
# the same way. Between cases every VM is stopped again.
#
# Every guest boots under TCG on 2 CPUs, so the first guests' boots take
# the CPU the later VMs' lume processes need: the cases halt-together and
# halt-alone start the same number of NAT VMs whose guest only halts (a
# 44-byte multiboot kernel, as in many.sh; no CPU, no address), which
# isolates lume's own share of a concurrent start.
# BENCH_CONCURRENT_CASES (default "alone together halt-alone halt-together")
# runs some cases only; a case named old-<case> runs <case> with the lume
# binary BENCH_OLD_LUME (another build, compared in the same rounds).
BENCH_NAME=concurrent
source "$(dirname "$0")/lib.sh"
need_root
guest_files
OUT=$(results_file concurrent)
: >"$OUT"
N=${BENCH_VMS:-10}
# Smaller guests than the other benchmarks: N of them run at once.
GUEST_MEMORY=128MB

ns_new NS cc
lume_home H
tmpdir W
HALT=$W/halt.bin
halt_kernel "$HALT"
names=() halts=()
for ((i = 1; i <= N; i++)); do
    lume_create "$NS" "$H" "c$i" nat ""
    lume_in "$NS" "$H" create "h$i" --cpu 1 --memory 64MB --disk-size 1MB --network nat \
        --kernel "$HALT" >/dev/null
    names+=("c$i")
    halts+=("h$i")
done
all=$(IFS=,; echo "${names[*]}")
all_halts=$(IFS=,; echo "${halts[*]}")

stop_all() {
    local n
    for n in "${names[@]}" "${halts[@]}"; do
        lume_in "$NS" "$H" stop "$n" >/dev/null 2>&1 &
    done
    wait
}

group() { # RUN CASE VMS [--no-address]
    local bin=$LUME
    case $2 in old-*) bin=$BENCH_OLD_LUME ;; esac
    # shellcheck disable=SC2046
    in_ns "$NS" env -u LUME_API_TOKEN $(lume_env "$H") "${BT[@]}" concurrent-start \
        "--record=$([ "$1" -gt 0 ] && echo "$OUT")" --case "$2" --run "$1" \
        --lume "$bin" --vms "$3" --home-vms "$H/.lume" ${4:-} >/dev/null
    stop_all
}

for ((run = 0; run <= BENCH_RUNS; run++)); do
    log "round $run of $BENCH_RUNS$([ "$run" = 0 ] && echo ' (warm-up, not recorded)')"
    # shellcheck disable=SC2206
    cases=(${BENCH_CONCURRENT_CASES:-alone together halt-alone halt-together})
    for ((k = 0; k < ${#cases[@]}; k++)); do
        c=${cases[$(((k + run) % ${#cases[@]}))]}
        case $c in
            alone | old-alone) group "$run" "$c" c1 ;;
            together | old-together) group "$run" "$c" "$all" ;;
            halt-alone | old-halt-alone) group "$run" "$c" h1 --no-address ;;
            halt-together | old-halt-together) group "$run" "$c" "$all_halts" --no-address ;;
            *) die "unknown case $c" ;;
        esac
    done
done
log "done: $OUT"
