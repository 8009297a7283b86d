#!/usr/bin/env bash
# Benchmark: lume's own work before QEMU starts, nat (issue 16).
#
# From `lume run VM --detach` to the supervisor's "Starting <qemu>" log line
# (written just before QEMU's spawn), for the FIRST NAT VM of a namespace
# (lume brings the bridge, dnsmasq and its firewall table up) and a SECOND
# one (the network is up: a reservation, a tap and its own firewall
# elements added in place).
# With BENCH_OLD_LUME=<another build> both builds run in the same rounds,
# alternating (the order flips every round), as cases old-first/old-second
# and new-first/new-second; otherwise only this build (new-*). Round 0 is a
# warm-up and is not recorded. QEMU is stopped again at once: only the start
# is measured.
BENCH_NAME=prestart
source "$(dirname "$0")/lib.sh"
need_root
guest_files
OUT=$(results_file prestart)
: >"$OUT"

ns_new NS ps
lume_home H
lume_create "$NS" "$H" p1 nat ""
lume_create "$NS" "$H" p2 nat ""

BUILDS=(new)
[ -n "${BENCH_OLD_LUME:-}" ] && BUILDS=(new old)

rec() { [ "$1" -gt 0 ] && echo "--record=$OUT" || echo "--record="; }

one() { # RUN BUILD
    local bin=$LUME
    [ "$2" = old ] && bin=$BENCH_OLD_LUME
    local vm
    for vm in p1 p2; do
        # shellcheck disable=SC2046
        in_ns "$NS" env -u LUME_API_TOKEN $(lume_env "$H") "${BT[@]}" lume-start "$(rec "$1")" \
            --case "$2-$([ $vm = p1 ] && echo first || echo second)" --run "$1" \
            --lume "$bin" --vm "$vm" --vm-dir "$H/.lume/$vm" >/dev/null
    done
    lume_in "$NS" "$H" stop p2 >/dev/null
    lume_in "$NS" "$H" stop p1 >/dev/null
}

for ((run = 0; run <= BENCH_RUNS; run++)); do
    log "round $run of $BENCH_RUNS$([ "$run" = 0 ] && echo ' (warm-up, not recorded)')"
    for ((k = 0; k < ${#BUILDS[@]}; k++)); do
        one "$run" "${BUILDS[$(((k + run) % ${#BUILDS[@]}))]}"
    done
done
log "done: $OUT"
