#!/usr/bin/env bash
# Benchmark 3b: lume's own cost with many running NAT VMs.
#
# At 1, 10, 30 and 100 running NAT VMs (BENCH_MANY_SIZES), each with a
# published port (20000+i -> 80/tcp), in a namespace of their own:
#   ls-running   `lume ls -f json`, timed as in scale.sh
#   ls-stopped   the same with as many stopped NAT VMs (another HOME): the
#                baseline of the same run
#   doctor       `lume network doctor -f json` (its exit status is 1 here:
#                the guests never get an address, see below)
#   heal         `nft flush ruleset`, then the time until lume's table is
#                back: the first `add table inet lume` `nft monitor` reports
#                (lume writes the table in one transaction)
#
# The guests run no operating system: each boots a 44-byte multiboot kernel
# written below that disables interrupts and halts (1 vCPU, 64 MB), so 100
# of them cost no CPU under TCG and what is timed is lume's own work. They
# never ask for a DHCP lease, so they have no address: `ls` has no SSH port
# to probe and the doctor no guest to probe either (its probes of guests
# with an address all run at once under one 1 s deadline; not timed here).
BENCH_NAME=many
source "$(dirname "$0")/lib.sh"
need_root
OUT=$(results_file many)
: >"$OUT"
# shellcheck disable=SC2206
SIZES=(${BENCH_MANY_SIZES:-1 10 30 100})
R=$((BENCH_RUNS * 4 > 20 ? BENCH_RUNS * 4 : 20))
D=$((BENCH_RUNS * 2 > 10 ? BENCH_RUNS * 2 : 10))

tmpdir W
KERNEL=$W/halt.bin
halt_kernel "$KERNEL"

lan_setup bm
lume_home H
lume_home S
# shellcheck disable=SC2206
LR=(ip netns exec "$HOST_NS" env -u LUME_API_TOKEN $(lume_env "$H") "$LUME")
# shellcheck disable=SC2206
LS=(ip netns exec "$HOST_NS" env -u LUME_API_TOKEN $(lume_env "$S") "$LUME")

timeit() { # CASE EXTRA_JSON RUNS OK_RC -- CMD...
    local case=$1 extra=$2 runs=$3 ok=$4; shift 5
    "${BT[@]}" timeit --record "$OUT" --case "$case" --extra "$extra" --runs "$runs" \
        --warmup 1 --ok-rc "$ok" -- "$@"
}

running() { "${LR[@]}" ls -f json | python3 -c 'import json,sys; print(sum(v["status"] == "running" for v in json.load(sys.stdin)))'; }

have=0
for n in "${SIZES[@]}"; do
    log "starting VMs $have..$((n - 1))"
    for ((i = have; i < n; i++)); do
        name=$(printf 'r%04d' "$i")
        "${LR[@]}" create "$name" --cpu 1 --memory 64MB --disk-size 1MB --network nat \
            --publish "$((20000 + i)):80" --kernel "$KERNEL" >/dev/null
        "${LR[@]}" run "$name" --detach >/dev/null
        "${LS[@]}" create "$(printf 's%04d' "$i")" --cpu 1 --memory 64MB --disk-size 1MB \
            --network nat --publish "$((20000 + i)):80" >/dev/null
    done
    have=$n
    [ "$(running)" = "$n" ] || die "not all $n VMs run"
    log "timing with $n running NAT VMs"
    timeit ls-running "{\"vms\": $n}" "$R" 0 -- "${LR[@]}" ls -f json
    timeit ls-stopped "{\"vms\": $n}" "$R" 0 -- "${LS[@]}" ls -f json
    timeit doctor "{\"vms\": $n}" "$D" 0,1 -- "${LR[@]}" network doctor -f json
    for ((run = 1; run <= D; run++)); do
        in_ns "$HOST_NS" "${BT[@]}" table-back --record "$OUT" --case heal --run "$run" \
            --extra "{\"vms\": $n}" --disrupt "nft flush ruleset" \
            --lume-log "$H/.lume/r0000/lume.log" >/dev/null
        sleep 1
    done
    # What the idle VMs cost meanwhile: CPU time of all QEMUs and lume
    # supervisors in the namespace over 5 s.
    python3 - "$OUT" "$n" $(ip netns pids "$HOST_NS") <<'EOF'
import json, os, sys, time
tick = os.sysconf("SC_CLK_TCK")
def cpu(pids):
    total = 0
    for p in pids:
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in f[11:13])
        except OSError:
            pass
    return total / tick
pids = sys.argv[3:]
a, t0 = cpu(pids), time.monotonic()
time.sleep(5)
b, t = cpu(pids), time.monotonic() - t0
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"case": "idle-cpu", "vms": int(sys.argv[2]), "run": 0, "metrics": {},
                        "cpu_per_s": (b - a) / t}) + "\n")
EOF
done
log "done: $OUT"
