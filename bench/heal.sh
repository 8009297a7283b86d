#!/usr/bin/env bash
# Benchmark 2: heal time of a NAT guest's connectivity.
#
# A NAT guest runs with lume.probe=198.51.100.1:9000: it connects to a LAN
# peer every ~0.2 s (busybox `nc -w 1`, then `sleep 0.2`). The peer is a
# small listener in the LAN namespace that logs the CLOCK_MONOTONIC time of
# every accepted connection. In lume's namespace the benchmark then
# disrupts the host and measures, from the start of the disruption, the
# next connection the peer accepts from the guest (masqueraded as
# 198.51.100.2); only connections accepted after the disruption command
# finished count. It also notes when IPv4 forwarding is back on (polled
# every 5 ms) and when lume logged its repairs.
#
# Disruptions, each BENCH_RUNS times, interleaved:
#   flush           nft flush ruleset; IPv4 forwarding off (a firewall reload)
#   nft-only        nft flush ruleset
#   forwarding-off  IPv4 forwarding off
#   vpn-connect     tun0 with 0/1 and 128/1 routes, ruleset flushed, forwarding off
#   vpn-disconnect  tun0 (and so its routes) deleted, ruleset flushed, forwarding off
#                   (after an untimed vpn-connect that healed)
#
# Resolution: the guest tries every ~0.2 s plus the time busybox needs to
# start nc under TCG, so "guest_back" cannot be much below one probe
# interval (measured below as probe_interval); a SYN dropped while the
# host was broken is retried by the guest's TCP only after 1 s, and nc -w 1
# gives up at about the same time, which is what a slow sample shows.
BENCH_NAME=heal
source "$(dirname "$0")/lib.sh"
need_root
guest_files
OUT=$(results_file heal)
: >"$OUT"

lan_setup bh
lume_home H
tmpdir W
ACCEPTS=$W/accepts
: >"$ACCEPTS"
ip netns exec "$LAN_NS" "${BT[@]}" listener --addr "$LAN_PEER" --port 9000 --log "$ACCEPTS" &
disown

lume_create "$HOST_NS" "$H" hnat nat "lume.probe=$LAN_PEER:9000"
lume_in "$HOST_NS" "$H" run hnat --detach >/dev/null
wait_console "$H/.lume/hnat/console.log" "LUME-GUEST: probe ok" 180
sleep 3

# The probe interval in steady state: gaps between accepted connections.
python3 - "$ACCEPTS" "$OUT" <<'EOF'
import json, sys
ts = [float(l.split()[0]) for l in open(sys.argv[1]) if l.strip()]
gaps = [b - a for a, b in zip(ts, ts[1:])]
with open(sys.argv[2], "a") as f:
    f.write(json.dumps({"case": "steady", "run": 0, "metrics": {}, "probe_gaps": gaps}) + "\n")
EOF

# What the watcher costs while nothing is wrong: CPU time of the NAT VM's
# supervisor (the watcher runs in it) including the nft processes it runs
# and waits for, over 10 s, next to QEMU's own (its guest probing 5x/s).
python3 - "$H/.lume/hnat/run.json" "$OUT" <<'EOF'
import json, os, sys, time
st = json.load(open(sys.argv[1]))
tick = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in f[11:15]) / tick  # utime stime cutime cstime
a, qa, t0 = cpu(st["pid"]), cpu(st["qemuPid"]), time.monotonic()
time.sleep(10)
b, qb, t = cpu(st["pid"]), cpu(st["qemuPid"]), time.monotonic() - t0
with open(sys.argv[2], "a") as f:
    f.write(json.dumps({"case": "idle-cpu", "run": 0, "metrics": {},
                        "supervisor_cpu_per_s": (b - a) / t, "qemu_cpu_per_s": (qb - qa) / t}) + "\n")
EOF

FWD_OFF='echo 0 > /proc/sys/net/ipv4/ip_forward'
TUN_UP='ip tuntap add dev tun0 mode tun && ip addr add 192.0.2.200/32 dev tun0 && ip link set tun0 up && ip route add 0.0.0.0/1 dev tun0 && ip route add 128.0.0.0/1 dev tun0'
declare -A DISRUPT=(
    [flush]="nft flush ruleset && $FWD_OFF"
    [nft-only]="nft flush ruleset"
    [forwarding-off]="$FWD_OFF"
    [vpn-connect]="$TUN_UP && nft flush ruleset && $FWD_OFF"
    [vpn-disconnect]="ip link del tun0 && nft flush ruleset && $FWD_OFF"
)
CASES=(flush nft-only forwarding-off vpn-connect vpn-disconnect)

heal() { # RUN CASE [--record]
    in_ns "$HOST_NS" "${BT[@]}" heal --record="$3" --case "$2" --run "$1" \
        --disrupt "${DISRUPT[$2]}" --accepts "$ACCEPTS" --source "$HOST_UPLINK_IP" \
        --lume-log "$H/.lume/hnat/lume.log" >/dev/null
    sleep 1
}

for ((run = 1; run <= BENCH_RUNS; run++)); do
    log "round $run of $BENCH_RUNS"
    for c in "${CASES[@]}"; do
        if [ "$c" = vpn-disconnect ]; then
            # Connected (untimed, not recorded) before the timed disconnect.
            heal "$run" vpn-connect ""
        fi
        heal "$run" "$c" "$OUT"
        if [ "$c" = vpn-connect ]; then
            in_ns "$HOST_NS" ip link del tun0
            sleep 1
        fi
    done
done
lume_in "$HOST_NS" "$H" stop hnat >/dev/null
log "done: $OUT"
