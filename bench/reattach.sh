#!/usr/bin/env bash
# Benchmark 6: a bridged VM back on the LAN after its parent interface was
# unplugged and plugged back.
#
# A bridged guest (--network bridged:up0, busybox test guest) runs with its
# DHCP lease from the LAN's dnsmasq. Each round: one echo from the LAN so the
# LAN knows the guest's MAC (as a LAN that talked to it would), then up0 is
# deleted (the veth, like a USB NIC unplugged: the kernel deletes lume's
# macvlan with it) and, 2 s later, re-created with the same name and its
# peer put back into the LAN's bridge. Timed from the start of the re-create,
# in one process in the LAN namespace:
#   plugged    up0 exists again (the `ip link add` returned)
#   lan_ready  its peer is in the LAN bridge and up
#   back       the first TCP echo (port 7) from the LAN answered: one
#              connection attempt every ~10 ms, each given 100 ms
# and, from the VM's lume.log, how long lume's re-attachment itself took
# (macvlan and tc filters, `connect_ms`).
BENCH_NAME=reattach
source "$(dirname "$0")/lib.sh"
need_root
guest_files
OUT=$(results_file reattach)
: >"$OUT"

lan_setup br
lume_home H
lume_create "$HOST_NS" "$H" rbr bridged:up0 ""
lume_in "$HOST_NS" "$H" run rbr --detach >/dev/null
wait_console "$H/.lume/rbr/console.log" "LUME-GUEST: lease" 180
IP=$(lume_in "$HOST_NS" "$H" get rbr -f json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ipAddress"] or "")')
[ -n "$IP" ] || die "no address for the bridged guest"
log "guest $IP"

for ((run = 0; run <= BENCH_RUNS; run++)); do
    log "round $run of $BENCH_RUNS$([ "$run" = 0 ] && echo ' (warm-up, not recorded)')"
    rec=$OUT
    [ "$run" -gt 0 ] || rec=/dev/null
    in_ns "$HOST_NS" ip link del up0
    sleep 2
    in_ns "$LAN_NS" python3 - "$rec" "$run" "$IP" "$HOST_NS" "$LAN_NS" "rport$run" "$H/.lume/rbr/lume.log" <<'PY'
import json, re, socket, subprocess, sys, time

out, run, ip, host_ns, lan_ns, port, lume_log = sys.argv[1:]


def echo(timeout):
    try:
        with socket.create_connection((ip, 7), timeout=timeout) as s:
            s.settimeout(2)
            s.sendall(b"back\n")
            return s.recv(5) == b"back\n"
    except OSError:
        return False


t0 = time.monotonic()
subprocess.run(["ip", "netns", "exec", host_ns, "sh", "-c",
                f"ip link add up0 type veth peer name {port} netns {lan_ns} && "
                "ip addr add 198.51.100.2/24 dev up0 && ip link set up0 up"], check=True)
plugged = time.monotonic() - t0
subprocess.run(["sh", "-c", f"ip link set {port} master br0 && ip link set {port} up"], check=True)
lan_ready = time.monotonic() - t0
attempts = 0
while not echo(0.1):
    attempts += 1
    if time.monotonic() - t0 > 60:
        sys.exit("the guest did not answer within 60 s of up0's return")
    time.sleep(0.01)
back = time.monotonic() - t0
time.sleep(0.5)
found = re.findall(r"re-attached to up0 \((\d+) ms", open(lume_log).read())
metrics = {"plugged": plugged, "lan_ready": lan_ready, "back": back, "attempts": attempts}
if found:
    metrics["connect"] = int(found[-1]) / 1000
with open(out, "a") as f:
    f.write(json.dumps({"case": "reattach", "run": int(run), "metrics": metrics}) + "\n")
# The next round unplugs a LAN that knows the guest, as a real one would.
for _ in range(50):
    if echo(1):
        break
PY
done
grep -c "LUME-GUEST: booted" "$H/.lume/rbr/console.log" | grep -qx 1 || die "the guest rebooted"
lume_in "$HOST_NS" "$H" stop rbr >/dev/null
log "done: $OUT"
