#!/usr/bin/env bash
# Boot the test guest once under QEMU TCG with user networking and check the
# contract lume's tests rely on: DHCP lease marker, HTTP page, TCP echo, and
# a clean ACPI power-off via QMP system_powerdown.
#
# Usage: tests/guest/smoke.sh [OUTDIR]   (builds/refreshes OUTDIR first)
# Env:   SMOKE_QEMU_ARGS="-machine q35 -smp 2"  extra QEMU arguments
#        SMOKE_HTTP_PORT (18080), SMOKE_ECHO_PORT (18007)  host loopback ports
# Needs qemu-system-x86_64 and python3. Only uses 127.0.0.1; no host changes.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$("$HERE/build.sh" "$@" | tail -n1)
http_port=${SMOKE_HTTP_PORT:-18080}
echo_port=${SMOKE_ECHO_PORT:-18007}
work=$(mktemp -d "${TMPDIR:-/tmp}/lume-smoke.XXXXXX")
qpid=
cleanup() {
    if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then kill "$qpid"; fi
    rm -rf "$work"
}
trap cleanup EXIT
log=$work/console.log

start=$(date +%s.%N)
# shellcheck disable=SC2086
timeout 120 qemu-system-x86_64 -accel tcg -m 256 -nodefaults -display none \
    -serial "file:$log" -no-reboot \
    -kernel "$OUT/vmlinuz" -initrd "$OUT/initrd.img" -append "$(cat "$OUT/cmdline")" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$http_port-:80,hostfwd=tcp:127.0.0.1:$echo_port-:7" \
    -device virtio-net-pci,netdev=n0 \
    -qmp "unix:$work/qmp.sock,server,nowait" ${SMOKE_QEMU_ARGS:-} &
qpid=$!

python3 - "$log" "$work/qmp.sock" "$http_port" "$echo_port" "$start" "$qpid" <<'EOF'
import json, os, re, socket, sys, time, urllib.request

log, qmp, http_port, echo_port, start, qpid = sys.argv[1:]
start = float(start)

def console():
    try:
        with open(log, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""

def fail(msg):
    print("FAIL:", msg, "\n--- console ---\n" + console(), file=sys.stderr)
    sys.exit(1)

def wait_for(pattern, timeout):
    end = time.time() + timeout
    while time.time() < end:
        m = re.search(pattern, console())
        if m:
            return m
        time.sleep(0.05)
    fail(f"no {pattern!r} within {timeout}s")

m = wait_for(r"LUME-GUEST: lease eth0 (\S+) router (\S+)", 90)
print(f"lease {m.group(1)} router {m.group(2)} after {time.time() - start:.2f}s (wall, from qemu start)")

page = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10).read().decode()
mac = re.search(r"LUME-GUEST: nic eth0 (\S+)", console()).group(1)
if "lume-test-guest" not in page or mac not in page:
    fail(f"unexpected page: {page!r}")
print(f"http ok (mac {mac})")

s = socket.create_connection(("127.0.0.1", int(echo_port)), timeout=10)
s.sendall(b"lume-echo\n")
got = b""
while not got.endswith(b"\n"):
    chunk = s.recv(100)
    if not chunk:
        break
    got += chunk
s.close()
if got != b"lume-echo\n":
    fail(f"echo returned {got!r}")
print("echo ok")

q = socket.socket(socket.AF_UNIX)
q.connect(qmp)
f = q.makefile("rw")
f.readline()
for cmd in ("qmp_capabilities", "system_powerdown"):
    f.write(json.dumps({"execute": cmd}) + "\n")
    f.flush()
    while "return" not in json.loads(f.readline()):
        pass
t0 = time.time()
while time.time() - t0 < 20:
    try:
        os.kill(int(qpid), 0)
    except ProcessLookupError:
        break
    if os.path.exists(f"/proc/{qpid}") and open(f"/proc/{qpid}/stat").read().split()[2] == "Z":
        break
    time.sleep(0.05)
else:
    fail("QEMU did not exit within 20s of system_powerdown")
if "LUME-GUEST: powering off" not in console():
    fail("no 'powering off' marker")
print(f"powered off {time.time() - t0:.2f}s after system_powerdown")
EOF
rc=0
wait "$qpid" || rc=$?
qpid=
[ "$rc" -eq 0 ] || { echo "FAIL: qemu exit status $rc" >&2; exit 1; }
echo "smoke test passed"
