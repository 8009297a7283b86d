#!/usr/bin/env bash
# Benchmark 3: manager overhead at scale.
#
# In a temporary HOME: 3 running VMs (the test guest, --network none, in a
# namespace of their own), then stopped VMs created one by one with
# `lume create vmNNNN --disk-size 1MB --network none` up to 100, 300 and
# 1,000. At each size: `lume ls -f json`, `lume ls` (table), `lume get` of a
# stopped and of a running VM, each timed over max(20, 4 x BENCH_RUNS) runs
# after one warm-up. Every create and, at the end, every
# `lume delete --force` is timed. Times are wall times of the whole process
# (fork, exec, run, exit) from a Python loop; `/bin/true` and
# `lume --version` timed the same way show the floor of that method and of
# starting lume at all.
BENCH_NAME=scale
source "$(dirname "$0")/lib.sh"
need_root
guest_files
OUT=$(results_file scale)
: >"$OUT"

lume_home H
ns_new RUN_NS bs
# shellcheck disable=SC2206
L=(env -u LUME_API_TOKEN $(lume_env "$H") "$LUME")
R=$((BENCH_RUNS * 4 > 20 ? BENCH_RUNS * 4 : 20))

log "3 running VMs (network none)"
for i in 1 2 3; do
    lume_create "$RUN_NS" "$H" "run$i" none ""
    lume_in "$RUN_NS" "$H" run "run$i" --detach >/dev/null
done
for i in 1 2 3; do wait_console "$H/.lume/run$i/console.log" "LUME-GUEST: ready" 180; done

timeit() { # CASE EXTRA_JSON RUNS WARMUP START -- CMD...
    local case=$1 extra=$2 runs=$3 warmup=$4 start=$5; shift 6
    "${BT[@]}" timeit --record "$OUT" --case "$case" --extra "$extra" --runs "$runs" \
        --warmup "$warmup" --start "$start" -- "$@"
}

timeit spawn-true '{}' "$R" 1 0 -- /bin/true
timeit lume-version '{}' "$R" 1 0 -- "${L[@]}" --version

have=0
for n in 100 300 1000; do
    log "creating VMs $have..$((n - 1))"
    timeit create "{\"upto\": $n}" $((n - have)) 0 "$have" -- \
        "${L[@]}" create 'vm{i}' --disk-size 1MB --network none
    have=$n
    total=$((n + 3))
    log "timing ls and get with $total VMs"
    [ "$("${L[@]}" ls -f json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = "$total" ] ||
        die "ls does not list $total VMs"
    timeit ls-json "{\"vms\": $total}" "$R" 1 0 -- "${L[@]}" ls -f json
    timeit ls-table "{\"vms\": $total}" "$R" 1 0 -- "${L[@]}" ls
    timeit get-stopped "{\"vms\": $total}" "$R" 1 0 -- "${L[@]}" get vm0050 -f json
    timeit get-running "{\"vms\": $total}" "$R" 1 0 -- "${L[@]}" get run1 -f json
done
log "deleting the $have stopped VMs"
timeit delete '{}' "$have" 0 0 -- "${L[@]}" delete 'vm{i}' --force
for i in 1 2 3; do "${L[@]}" stop "run$i" >/dev/null; done
log "done: $OUT"
