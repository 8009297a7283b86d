#!/usr/bin/env python3
"""Timing, traffic and statistics helpers of lume's benchmark suite.

Used by bench/*.sh, usually inside a network namespace (`ip netns exec NS
python3 bt.py ...`). Every time is CLOCK_MONOTONIC (time.monotonic()), which
is one clock for all processes of the machine, so a time taken by one
process (a listener) can be compared with one taken by another (the process
that caused a disruption). Measurements are appended as JSON lines to the
file given with --record; bench/report.py turns them into BENCHMARKS.md.
"""

import argparse
import fcntl
import hashlib
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time

mono = time.monotonic


def record(path, case, run, metrics, **extra):
    """Appends one measurement (a dict of metric -> value) to `path`."""
    line = {"case": case, "run": run, "metrics": metrics}
    line.update(extra)
    text = json.dumps(line, sort_keys=True)
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")
    print(text)


# ---- the guest's console ------------------------------------------------------

MARKERS = {
    "booted": "LUME-GUEST: booted kernel",
    "ready": "LUME-GUEST: ready",
    "lease": "LUME-GUEST: lease eth0",
}


class ConsoleWatch(threading.Thread):
    """Polls a console file every `period` s and notes when each marker
    first appears (seconds after t0)."""

    def __init__(self, path, t0, period=0.02):
        super().__init__(daemon=True)
        self.path, self.t0, self.period = path, t0, period
        self.seen = {}
        self.lease_ip = None
        self.stop = False

    def run(self):
        while not self.stop and len(self.seen) < len(MARKERS):
            try:
                with open(self.path, errors="replace") as f:
                    text = f.read()
            except OSError:
                text = ""
            now = mono() - self.t0
            for key, needle in MARKERS.items():
                if key not in self.seen and needle in text:
                    self.seen[key] = now
            m = re.search(r"LUME-GUEST: lease eth0 ([0-9.]+)/", text)
            if m:
                self.lease_ip = m.group(1)
            time.sleep(self.period)

    def wait(self, timeout):
        deadline = mono() + timeout
        while "lease" not in self.seen and mono() < deadline:
            time.sleep(0.01)
        self.stop = True
        return "lease" in self.seen


def cmd_lume_boot(a):
    """`lume run --detach`, then `lume get -f json` every `--poll` s until
    it reports ipAddress; the console is watched at the same time."""
    try:
        os.unlink(a.console)
    except FileNotFoundError:
        pass
    wall0 = time.time()
    t0 = mono()
    watch = ConsoleWatch(a.console, t0, a.poll)
    watch.start()
    r = subprocess.run([a.lume, "run", a.vm, "--detach"], capture_output=True, text=True)
    t_detach = mono() - t0
    if r.returncode != 0:
        sys.exit(f"lume run failed: {r.stdout}{r.stderr}")
    t_addr, ip, gets, get_time = None, None, 0, 0.0
    deadline = t0 + a.timeout
    while mono() < deadline and not a.no_get:
        g0 = mono()
        r = subprocess.run([a.lume, "get", a.vm, "-f", "json"], capture_output=True, text=True)
        get_time += mono() - g0
        gets += 1
        if r.returncode == 0:
            got = json.loads(r.stdout)
            # lume's `get -f json` prints a list of one VM, as lume 0.5.3 does.
            vm = got[0] if isinstance(got, list) else got
            ip = vm.get("ipAddress")
            if ip:
                t_addr = mono() - t0
                break
        time.sleep(a.poll)
    if t_addr is None and not a.no_get:
        sys.exit(f"no ipAddress from lume get within {a.timeout} s")
    if not watch.wait(max(1.0, deadline - mono())):
        sys.exit("no lease in the console")
    m = {"detach": t_detach}
    # The supervisor's log (truncated by every run) has millisecond
    # timestamps of QEMU's start and of QMP answering.
    for t, text in log_lines_since(os.path.join(os.path.dirname(a.console), "lume.log"), 0):
        if text.startswith("Starting ") and "qemu_spawned" not in m:
            m["qemu_spawned"] = t - wall0
        elif " is running: QEMU pid" in text and "qmp_ready" not in m:
            m["qmp_ready"] = t - wall0
    m.update({f"console_{k}": v for k, v in watch.seen.items()})
    if t_addr is not None:
        m["address"] = t_addr
        m["address_after_lease"] = t_addr - watch.seen["lease"]
        m["get_calls"] = gets
        m["get_mean"] = get_time / gets
    record(a.record, a.case, a.run, m, ip=ip, console_ip=watch.lease_ip)


def cmd_lume_start(a):
    """`lume run VM --detach`, then the time from its start to the
    supervisor's "Starting <qemu>" log line (logged just before QEMU's
    spawn): lume's own work before QEMU starts; and to its "VM '…' is
    running" line (the guest runs: QEMU started paused until then)."""
    log = os.path.join(a.vm_dir, "lume.log")
    wall0 = time.time()
    r = subprocess.run([a.lume, "run", a.vm, "--detach"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"lume run failed: {r.stdout}{r.stderr}")
    m = {"detach": time.time() - wall0}
    for t, text in log_lines_since(log, 0):
        if t < wall0 - 0.002:
            continue
        if text.startswith("Starting ") and "qemu_spawned" not in m:
            m["qemu_spawned"] = t - wall0
        # Logged once the guest runs (QEMU started paused until then).
        if text.startswith("VM ") and " is running" in text and "guest_running" not in m:
            m["guest_running"] = t - wall0
    if "qemu_spawned" not in m:
        sys.exit(f"no 'Starting' line in {log}")
    record(a.record, a.case, a.run, m)


def cmd_bare_boot(a):
    """Runs `--setup` (shell), then QEMU (the arguments after --) with
    `--fd3` opened read-write as its descriptor 3, and waits for the guest's
    lease in the console. QEMU is left running; its pid goes to --pidfile."""
    try:
        os.unlink(a.console)
    except FileNotFoundError:
        pass
    t0 = mono()
    watch = ConsoleWatch(a.console, t0, a.poll)
    watch.start()
    if a.setup:
        subprocess.run(a.setup, shell=True, check=True)
    t_setup = mono() - t0
    fd = None
    if a.fd3:
        low = os.open(a.fd3, os.O_RDWR)
        fd = fcntl.fcntl(low, fcntl.F_DUPFD_CLOEXEC, 64)  # never 3 itself
        os.close(low)

    def child():
        if fd is not None:
            os.dup2(fd, 3)  # dup2 clears FD_CLOEXEC: QEMU inherits it

    with open(a.qemu_log, "w") as qlog:
        p = subprocess.Popen(a.argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                             preexec_fn=child, start_new_session=True,
                             pass_fds=(3,) if fd is not None else ())
    if fd is not None:
        os.close(fd)
    with open(a.pidfile, "w") as f:
        f.write(f"{p.pid}\n")
    deadline = t0 + a.timeout
    while "lease" not in watch.seen and mono() < deadline:
        if p.poll() is not None:
            sys.exit(f"QEMU exited ({p.returncode}): {open(a.qemu_log).read()}")
        time.sleep(0.01)
    if not watch.wait(0.1):
        sys.exit("no lease in the console")
    m = {"setup": t_setup}
    m.update({f"console_{k}": v for k, v in watch.seen.items()})
    record(a.record, a.case, a.run, m, console_ip=watch.lease_ip)


# ---- heal: a listener that logs accepts, and a disruption that waits for them ----

def cmd_listener(a):
    """Accepts TCP connections on ADDR:PORT forever; appends
    `<monotonic time> <peer address>` per accepted connection to --log."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.addr, a.port))
    s.listen(64)
    with open(a.log, "a", buffering=1) as log:
        while True:
            c, peer = s.accept()
            log.write(f"{mono():.6f} {peer[0]}\n")
            c.close()


def accepts_after(path, source, t):
    try:
        with open(path) as f:
            for line in f:
                ts, peer = line.split()
                if peer == source and float(ts) > t:
                    return float(ts)
    except (OSError, ValueError):
        pass
    return None


LOG_TS = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z\] (.*)$")


def log_lines_since(path, offset):
    """(unix time, text) of the timestamped lines of `path` after byte `offset`."""
    import calendar
    out = []
    try:
        with open(path) as f:
            f.seek(offset)
            for line in f:
                m = LOG_TS.match(line.rstrip("\n"))
                if m:
                    whole, frac = m.group(1).split(".")
                    t = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + frac)
                    out.append((t, m.group(2)))
    except OSError:
        pass
    return out


def cmd_heal(a):
    """Runs the disruption `--disrupt` (shell) and measures, from its start:
    when IPv4 forwarding is back on, when lume logged each repair, and when
    the listener accepted the next connection from `--source` (only
    connections accepted after the disruption completed count)."""
    offset = os.path.getsize(a.lume_log) if os.path.exists(a.lume_log) else 0
    wall0 = time.time()
    t0 = mono()
    subprocess.run(a.disrupt, shell=True, check=True)
    t1 = mono()
    # Forwarding is only watched when the disruption switches it off.
    watch_fwd = "ip_forward" in a.disrupt
    t_fwd = None if watch_fwd else 0.0
    t_guest = None
    deadline = t0 + a.timeout
    while mono() < deadline and (t_fwd is None or t_guest is None):
        if t_fwd is None:
            with open("/proc/sys/net/ipv4/ip_forward") as f:
                if f.read().strip() == "1":
                    t_fwd = mono() - t0
        if t_guest is None:
            t = accepts_after(a.accepts, a.source, t1)
            if t is not None:
                t_guest = t - t0
        time.sleep(0.005)
    if t_guest is None:
        sys.exit(f"no connection from {a.source} within {a.timeout} s of: {a.disrupt}")
    repairs = [(t - wall0, text) for t, text in log_lines_since(a.lume_log, offset)
               if text.startswith("repaired:")]
    m = {"disrupt_cmd": t1 - t0, "guest_back": t_guest}
    if watch_fwd and t_fwd is not None:
        m["forwarding_back"] = t_fwd
    if repairs:
        m["first_repair_logged"] = min(t for t, _ in repairs)
        m["last_repair_logged"] = max(t for t, _ in repairs)
    record(a.record, a.case, a.run, m, repairs=[f"{t:.3f} {x}" for t, x in repairs])


def cmd_table_back(a):
    """Runs the disruption `--disrupt` (shell; it flushes the ruleset) and
    measures, from its start, when lume's table is back: the first
    `add table inet lume` that `nft monitor` reports after it (lume writes
    its table in one transaction, so the whole table is there at that
    instant). Also records when lume's log (--lume-log) first says
    `repaired:`, in wall time relative to the start."""
    offset = os.path.getsize(a.lume_log) if a.lume_log and os.path.exists(a.lume_log) else 0
    # Line-buffered, so each event is read when nft prints it.
    mon = subprocess.Popen(["stdbuf", "-oL", "nft", "monitor", "tables"],
                           stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)  # nft subscribes to the events
        wall0 = time.time()
        t0 = mono()
        subprocess.run(a.disrupt, shell=True, check=True)
        t1 = mono()
        t_back = None
        deadline = t0 + a.timeout
        fd = mon.stdout.fileno()
        os.set_blocking(fd, False)
        buf = ""
        while t_back is None and mono() < deadline:
            r, _, _ = select.select([fd], [], [], max(0.0, deadline - mono()))
            if not r:
                break
            chunk = os.read(fd, 65536).decode(errors="replace")
            now = mono()
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split("\n")
            if any(l.startswith("add table inet lume") for l in lines):
                t_back = now - t0
    finally:
        mon.kill()
        mon.wait()
    if t_back is None:
        sys.exit(f"lume's table was not back within {a.timeout} s of: {a.disrupt}")
    m = {"disrupt_cmd": t1 - t0, "table_back": t_back}
    if a.lume_log:
        repairs = [t - wall0 for t, text in log_lines_since(a.lume_log, offset)
                   if text.startswith("repaired:")]
        if repairs:
            m["first_repair_logged"] = min(repairs)
    extra = json.loads(a.extra) if a.extra else {}
    record(a.record, a.case, a.run, m, **extra)


def cmd_concurrent_start(a):
    """Starts every VM of --vms (comma-separated) with `lume run VM --detach`
    at the same instant (one process each, released together), then polls
    `lume ls -f json` until every VM has an `ipAddress`. Records, per VM,
    when its `run --detach` returned and when its supervisor logged
    "Starting <qemu>" (lume's own work before QEMU), and for the whole
    group the addresses and whether they are distinct."""
    names = a.vms.split(",")
    gate = threading.Event()
    results = {}

    def start(name):
        gate.wait()
        t = mono()
        wall = time.time()
        r = subprocess.run([a.lume, "run", name, "--detach"], capture_output=True, text=True)
        results[name] = (mono() - t, wall, r)

    threads = [threading.Thread(target=start, args=(n,)) for n in names]
    for t in threads:
        t.start()
    time.sleep(0.2)  # every thread waits at the gate
    t0 = mono()
    wall0 = time.time()
    gate.set()
    for t in threads:
        t.join()
    failed = [f"{n}: {r.stdout}{r.stderr}" for n, (_, _, r) in results.items() if r.returncode != 0]
    if failed:
        sys.exit("lume run failed: " + "; ".join(failed))
    detach = {n: d for n, (d, _, _) in results.items()}
    spawned = {}
    for n in names:
        for t, text in log_lines_since(os.path.join(a.home_vms, n, "lume.log"), 0):
            if text.startswith("Starting ") and t >= wall0 - 0.002:
                spawned[n] = t - results[n][1]
                break
    addresses, address_at = {}, {}
    deadline = t0 + a.timeout
    while not a.no_address and mono() < deadline and len(addresses) < len(names):
        r = subprocess.run([a.lume, "ls", "-f", "json"], capture_output=True, text=True)
        now = mono() - t0
        if r.returncode == 0:
            for vm in json.loads(r.stdout):
                ip = vm.get("ipAddress")
                if vm.get("name") in names and ip and vm["name"] not in addresses:
                    addresses[vm["name"]] = ip
                    address_at[vm["name"]] = now
        time.sleep(0.2)
    missing = [n for n in names if n not in addresses]
    m = {
        "vms": len(names),
        "detach_max": max(detach.values()),
        "detach_median": sorted(detach.values())[len(names) // 2],
    }
    if not a.no_address:
        m["distinct_addresses"] = len(set(addresses.values()))
        m["with_address"] = len(addresses)
    if spawned:
        m["qemu_spawned_max"] = max(spawned.values())
    if address_at:
        m["address_max"] = max(address_at.values())
    record(a.record, a.case, a.run, m, detach=detach, qemu_spawned=spawned,
           address_at=address_at, addresses=addresses, missing=missing)


# ---- throughput: echo round trips ---------------------------------------------------

def thread_cpu(pid):
    """CPU seconds of process `pid` and of its vCPU thread(s) (named
    "CPU n/TCG" or "CPU n/KVM" by QEMU's debug-threads=on)."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(path):
        f = open(path).read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / tick  # utime + stime

    vcpu = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if open(f"/proc/{pid}/task/{tid}/comm").read().startswith("CPU "):
                vcpu += stat(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            pass
    return stat(f"/proc/{pid}/stat"), vcpu


def cmd_echo_client(a):
    """Sends --mb MiB to an echo service and reads them back at the same
    time; the time is from connect to the last echoed byte. With --cpu-pid,
    the CPU time QEMU (and its vCPU thread) used meanwhile is recorded."""
    total = int(a.mb * (1 << 20))
    cpu0 = thread_cpu(a.cpu_pid) if a.cpu_pid else None
    block = os.urandom(64 * 1024)
    t0 = mono()
    s = socket.create_connection((a.host, a.port), timeout=10)
    s.settimeout(a.timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent_hash = hashlib.sha1()
    err = []

    def send():
        try:
            left = total
            while left > 0:
                chunk = block[:min(left, len(block))]
                s.sendall(chunk)
                sent_hash.update(chunk)
                left -= len(chunk)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            err.append(e)

    th = threading.Thread(target=send, daemon=True)
    th.start()
    got = 0
    recv_hash = hashlib.sha1()
    try:
        while got < total:
            d = s.recv(256 * 1024)
            if not d:
                break
            recv_hash.update(d)
            got += len(d)
    except OSError as e:
        err.append(e)
    t = mono() - t0
    th.join(5)
    s.close()
    if got != total or err or sent_hash.digest() != recv_hash.digest():
        sys.exit(f"echo from {a.host}:{a.port}: {got} of {total} bytes back, errors {err}")
    m = {"seconds": t, "mib_per_s": a.mb / t}
    if cpu0:
        cpu1 = thread_cpu(a.cpu_pid)
        m["qemu_cpu_share"] = (cpu1[0] - cpu0[0]) / t
        m["vcpu_cpu_share"] = (cpu1[1] - cpu0[1]) / t
    record(a.record, a.case, a.run, m, mib=a.mb)


def cmd_echo_server(a):
    """A threaded TCP echo server (the baseline for the guest's `nc -e cat`)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.addr, a.port))
    s.listen(16)

    def serve(c):
        with c:
            while True:
                d = c.recv(256 * 1024)
                if not d:
                    break
                c.sendall(d)

    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


# ---- command timing --------------------------------------------------------------------

def cmd_timeit(a):
    """Runs the command after -- `--runs` times (after `--warmup` unrecorded
    runs); `{i}` in an argument is replaced by the run index formatted with
    --fmt, so each run can name a different VM. Records one line with the
    list of wall times."""
    times = []
    for i in range(a.warmup + a.runs):
        idx = a.start + i - a.warmup
        argv = [x.replace("{i}", format(idx, a.fmt)) for x in a.argv]
        t0 = mono()
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
        t = mono() - t0
        if r.returncode not in a.ok_rc:
            sys.exit(f"{' '.join(argv)} failed: {r.stderr.decode(errors='replace')}")
        if i >= a.warmup:
            times.append(t)
    line = {"case": a.case, "run": a.run, "times": times}
    if a.extra:
        line.update(json.loads(a.extra))
    if a.record:
        with open(a.record, "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
    s = sorted(times)
    print(f"{a.case}: n={len(s)} median={s[len(s) // 2] * 1000:.1f} ms "
          f"min={s[0] * 1000:.1f} max={s[-1] * 1000:.1f}", file=sys.stderr)


def cmd_time1(a):
    """Runs the command after -- once and records its wall time (as
    metric `seconds`) and its stdout."""
    t0 = mono()
    r = subprocess.run(a.argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    t = mono() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(a.argv)} failed: {r.stderr}")
    extra = json.loads(a.extra) if a.extra else {}
    record(a.record, a.case, a.run, {"seconds": t}, stdout=r.stdout.strip(), **extra)


def cmd_note(a):
    """Appends a free-form JSON object (--json) to --record."""
    obj = json.loads(a.json)
    with open(a.record, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--record", help="append results to this JSON-lines file")
        sp.add_argument("--case", default="")
        sp.add_argument("--run", type=int, default=0)

    sp = sub.add_parser("lume-boot")
    common(sp)
    sp.add_argument("--lume", required=True)
    sp.add_argument("--vm", required=True)
    sp.add_argument("--console", required=True)
    sp.add_argument("--poll", type=float, default=0.02)
    sp.add_argument("--timeout", type=float, default=180)
    sp.add_argument("--no-get", action="store_true",
                    help="only watch the console (no lume get polling)")
    sp.set_defaults(fn=cmd_lume_boot)

    sp = sub.add_parser("lume-start")
    common(sp)
    sp.add_argument("--lume", required=True)
    sp.add_argument("--vm", required=True)
    sp.add_argument("--vm-dir", required=True)
    sp.set_defaults(fn=cmd_lume_start)

    sp = sub.add_parser("concurrent-start")
    common(sp)
    sp.add_argument("--lume", required=True)
    sp.add_argument("--vms", required=True, help="comma-separated VM names")
    sp.add_argument("--home-vms", required=True, help="the directory holding the VMs (~/.lume)")
    sp.add_argument("--timeout", type=float, default=600)
    sp.add_argument("--no-address", action="store_true", help="guests that never ask for one")
    sp.set_defaults(fn=cmd_concurrent_start)

    sp = sub.add_parser("bare-boot")
    common(sp)
    sp.add_argument("--console", required=True)
    sp.add_argument("--setup")
    sp.add_argument("--fd3")
    sp.add_argument("--pidfile", required=True)
    sp.add_argument("--qemu-log", required=True)
    sp.add_argument("--poll", type=float, default=0.02)
    sp.add_argument("--timeout", type=float, default=180)
    sp.add_argument("argv", nargs="+")
    sp.set_defaults(fn=cmd_bare_boot)

    sp = sub.add_parser("listener")
    sp.add_argument("--addr", required=True)
    sp.add_argument("--port", type=int, required=True)
    sp.add_argument("--log", required=True)
    sp.set_defaults(fn=cmd_listener)

    sp = sub.add_parser("heal")
    common(sp)
    sp.add_argument("--disrupt", required=True)
    sp.add_argument("--accepts", required=True)
    sp.add_argument("--source", required=True)
    sp.add_argument("--lume-log", required=True)
    sp.add_argument("--timeout", type=float, default=15)
    sp.set_defaults(fn=cmd_heal)

    sp = sub.add_parser("table-back")
    common(sp)
    sp.add_argument("--disrupt", required=True)
    sp.add_argument("--lume-log")
    sp.add_argument("--timeout", type=float, default=15)
    sp.add_argument("--extra", help="JSON object merged into the recorded line")
    sp.set_defaults(fn=cmd_table_back)

    sp = sub.add_parser("echo-client")
    common(sp)
    sp.add_argument("--host", required=True)
    sp.add_argument("--port", type=int, default=7)
    sp.add_argument("--mb", type=float, default=8)
    sp.add_argument("--cpu-pid", type=int, help="QEMU's pid, to record its CPU use")
    sp.add_argument("--timeout", type=float, default=120)
    sp.set_defaults(fn=cmd_echo_client)

    sp = sub.add_parser("echo-server")
    sp.add_argument("--addr", required=True)
    sp.add_argument("--port", type=int, required=True)
    sp.set_defaults(fn=cmd_echo_server)

    sp = sub.add_parser("timeit")
    common(sp)
    sp.add_argument("--runs", type=int, default=10)
    sp.add_argument("--warmup", type=int, default=1)
    sp.add_argument("--start", type=int, default=0)
    sp.add_argument("--fmt", default="04d")
    sp.add_argument("--ok-rc", type=lambda v: [int(x) for x in v.split(",")], default=[0],
                    help="exit statuses that count as success (comma-separated; default 0)")
    sp.add_argument("--extra", help="JSON object merged into the recorded line")
    sp.add_argument("argv", nargs="+")
    sp.set_defaults(fn=cmd_timeit)

    sp = sub.add_parser("time1")
    common(sp)
    sp.add_argument("--extra", help="JSON object merged into the recorded line")
    sp.add_argument("argv", nargs="+")
    sp.set_defaults(fn=cmd_time1)

    sp = sub.add_parser("note")
    sp.add_argument("--record", required=True)
    sp.add_argument("--json", required=True)
    sp.set_defaults(fn=cmd_note)

    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
