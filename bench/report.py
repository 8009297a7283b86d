#!/usr/bin/env python3
"""Turns the results of bench/*.sh (JSON lines in the results directory)
into the generated part of BENCHMARKS.md: the text between
`<!-- BEGIN GENERATED RESULTS -->` and `<!-- END GENERATED RESULTS -->` is
replaced; everything else in the file (the analysis) is kept.

Usage: report.py RESULTS_DIR BENCHMARKS.md
       report.py --section NAME RESULTS_DIR BENCHMARKS.md   (prints that section)

Pictures (SVG, written by hand: no plotting library needed) go to
bench/figures/ next to BENCHMARKS.md.
"""

import json
import os
import statistics
import sys
from collections import defaultdict

BEGIN = "<!-- BEGIN GENERATED RESULTS -->"
END = "<!-- END GENERATED RESULTS -->"


def load(results, name):
    path = os.path.join(results, f"{name}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def q(values):
    """median, min, max, q1, q3 of a list."""
    s = sorted(values)
    med = statistics.median(s)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return med, s[0], s[-1], q1, q3


def fmt_s(v):
    return f"{v:.2f} s"


def fmt_ms(v):
    return f"{v * 1000:.0f} ms" if v >= 0.1 else f"{v * 1000:.1f} ms"


def cell(values, f=fmt_s):
    """`median (min–max)` of values with formatter f."""
    if not values:
        return "–"
    med, lo, hi, _, _ = q(values)
    if len(values) == 1:
        return f(med)
    return f"{f(med)} ({f(lo)}–{f(hi)})"


def cell_iqr(values, f=fmt_s):
    if not values:
        return "–"
    med, lo, hi, q1, q3 = q(values)
    return f"{f(med)} (IQR {f(q1)}–{f(q3)}; {f(lo)}–{f(hi)})"


def metric(rows, case, name):
    return [r["metrics"][name] for r in rows if r["case"] == case and name in r.get("metrics", {})]


def by_run(rows, case, name):
    return {r["run"]: r["metrics"][name] for r in rows
            if r["case"] == case and name in r.get("metrics", {})}


def ratio_cell(num, den):
    """Paired ratios num[run]/den[run] of the same round: median (min–max)."""
    runs = sorted(set(num) & set(den))
    if not runs:
        return "–", None
    rs = [num[r] / den[r] for r in runs]
    med, lo, hi, _, _ = q(rs)
    return f"{med:.2f}x ({lo:.2f}–{hi:.2f}), n={len(rs)}", med


def verdict(ok):
    return "**meets**" if ok else "**misses**"


# ---- sections ----------------------------------------------------------------------------

def machine(meta):
    out = ["### Machine and command", ""]
    rows = [
        ("date (UTC)", meta.get("date")),
        ("command", f"`{meta.get('command')}`"),
        ("runs per case (BENCH_RUNS)", meta.get("runs")),
        ("lume commit", meta.get("commit")),
        ("CPUs (nproc)", meta.get("nproc")),
        ("CPU model", meta.get("cpu_model")),
        ("memory", meta.get("memory")),
        ("kernel", meta.get("kernel")),
        ("QEMU", meta.get("qemu")),
        ("accelerator", meta.get("accelerator")),
        ("filesystem of /tmp", meta.get("tmp_fs")),
        ("load average at start", meta.get("loadavg_start")),
        ("load average at end", meta.get("loadavg_end")),
        ("other QEMU processes at start", meta.get("other_qemu_start")),
        ("suite wall time", meta.get("wall_time")),
        ("benchmarks that failed", ", ".join(meta["failed"]) if meta.get("failed") else None),
    ]
    out += ["| | |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in rows if v is not None]
    return out


def boot(rows):
    if not rows:
        return []
    out = ["### 1. Time to a usable address", ""]
    out += ["Median (min–max) over the recorded rounds, seconds from the first command "
            "(`lume run --detach`, or the first `ip` command of the bare setup).", ""]
    out += ["| case | to `ipAddress` in `lume get` | to lease in console | guest init started (console) | "
            "QEMU started | `run --detach` returned | n |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for case in ["lume-nat", "bare-nat", "bare-nat-full", "lume-nat-noget", "lume-bridged",
                 "bare-bridged", "bare-bridged-full"]:
        n = len(metric(rows, case, "console_lease"))
        if not n:
            continue
        started = metric(rows, case, "qemu_spawned") or metric(rows, case, "setup")
        out.append(f"| {case} | {cell(metric(rows, case, 'address'))} | "
                   f"{cell(metric(rows, case, 'console_lease'))} | "
                   f"{cell(metric(rows, case, 'console_booted'))} | "
                   f"{cell(started, fmt_ms)} | "
                   f"{cell(metric(rows, case, 'detach'), fmt_ms)} | {n} |")
    out += ["", "Ratios lume / bare QEMU, paired within each round (median (min–max)); target ≤ 1.10:", ""]
    out += ["| mode | `lume get` address / bare lease | lume console lease / bare console lease | "
            "ratio of medians (address) | target |", "| --- | --- | --- | --- | --- |"]
    for mode in ["nat", "bridged"]:
        addr = by_run(rows, f"lume-{mode}", "address")
        lease = by_run(rows, f"lume-{mode}", "console_lease")
        bare = by_run(rows, f"bare-{mode}", "console_lease")
        c1, _ = ratio_cell(addr, bare)
        c2, _ = ratio_cell(lease, bare)
        if addr and bare:
            rm = statistics.median(addr.values()) / statistics.median(bare.values())
            out.append(f"| {mode} | {c1} | {c2} | {rm:.2f}x | {verdict(rm <= 1.10)} |")
    full = [m for m in ["nat", "bridged"] if by_run(rows, f"bare-{m}-full", "console_lease")]
    if full:
        out += ["", "The same against bare QEMU with every device and option of lume's command line "
                "(`bare-*-full`: display behind VNC, QMP, the guest agent's port, balloon, sandbox), "
                "which leaves lume's networking and supervision; and what those devices cost bare QEMU "
                "(`bare-*-full` / `bare-*`). Issue 16's target: ≤ 1.03:", ""]
        out += ["| mode | `lume get` address / bare-full lease | lume console lease / bare-full console lease | "
                "ratio of medians (address) | bare-full / bare lease | target |",
                "| --- | --- | --- | --- | --- | --- |"]
        for mode in full:
            addr = by_run(rows, f"lume-{mode}", "address")
            lease = by_run(rows, f"lume-{mode}", "console_lease")
            bfull = by_run(rows, f"bare-{mode}-full", "console_lease")
            bare = by_run(rows, f"bare-{mode}", "console_lease")
            c1, _ = ratio_cell(addr, bfull)
            c2, _ = ratio_cell(lease, bfull)
            c3, _ = ratio_cell(bfull, bare)
            if addr and bfull:
                rm = statistics.median(addr.values()) / statistics.median(bfull.values())
                out.append(f"| {mode} | {c1} | {c2} | {rm:.2f}x | {c3} | {verdict(rm <= 1.03)} |")
    gets = metric(rows, "lume-nat", "get_mean") + metric(rows, "lume-bridged", "get_mean")
    after = {m: metric(rows, f"lume-{m}", "address_after_lease") for m in ["nat", "bridged"]}
    if gets:
        shown = "; ".join(f"{m} {cell(v, fmt_ms)}" for m, v in after.items() if v)
        out += ["", f"One `lume get -f json` took {cell(gets, fmt_ms)} (mean per run). `ipAddress` "
                f"appeared, relative to the guest's lease line in its console: {shown} "
                "(negative: before it, because the DHCP server's lease precedes the guest's own message)."]
    return out


def heal(rows):
    if not rows:
        return []
    out = ["### 2. Heal time (NAT guest, probe every ~0.2 s)", ""]
    gaps = [g for r in rows if r["case"] == "steady" for g in r.get("probe_gaps", [])]
    if gaps:
        out += [f"Probe interval in steady state (resolution of the guest-side number): "
                f"{cell(gaps, fmt_ms)}, n={len(gaps)}.", ""]
    idle = next((r for r in rows if r["case"] == "idle-cpu"), None)
    if idle:
        out += [f"CPU while nothing is wrong (10 s): the NAT VM's supervisor, which runs the watcher, "
                f"{idle['supervisor_cpu_per_s'] * 1000:.0f} ms/s including its nftables listings; "
                f"its QEMU {idle['qemu_cpu_per_s'] * 1000:.0f} ms/s (guest probing 5 times a second).", ""]
    out += ["Seconds from the start of the disruption; median (min–max). Target: guest traffic back "
            "in < 1 s (judged on the median; samples over 1 s are counted).", ""]
    out += ["| disruption | guest connection accepted again | samples > 1 s | IPv4 forwarding back on | "
            "first repair logged by lume | disruption command took | n | target (median) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case in ["flush", "nft-only", "forwarding-off", "vpn-connect", "vpn-disconnect"]:
        g = metric(rows, case, "guest_back")
        if not g:
            continue
        slow = sum(1 for x in g if x >= 1.0)
        out.append(f"| {case} | {cell(g, fmt_ms)} | {slow} of {len(g)} | "
                   f"{cell(metric(rows, case, 'forwarding_back'), fmt_ms)} | "
                   f"{cell(metric(rows, case, 'first_repair_logged'), fmt_ms)} | "
                   f"{cell(metric(rows, case, 'disrupt_cmd'), fmt_ms)} | {len(g)} | "
                   f"{verdict(statistics.median(g) < 1.0)} |")
    cases = ["flush", "nft-only", "forwarding-off", "vpn-connect", "vpn-disconnect"]
    pooled = [x for c in cases for x in metric(rows, c, "guest_back")]
    repaired = [x for c in cases for x in metric(rows, c, "first_repair_logged")]
    if len(pooled) >= 2:
        p99 = p_99(pooled)
        slow = sorted(x for x in pooled if x > 0.5)
        out += ["", f"All disruptions together: guest traffic back p50 {fmt_ms(statistics.median(pooled))}, "
                f"p99 {fmt_ms(p99)} over {len(pooled)} samples (target: p99 ≤ 500 ms over at least 100: "
                f"{verdict(p99 <= 0.5 and len(pooled) >= 100)}); "
                f"{len(slow)} sample(s) above 500 ms"
                + (f" ({', '.join(fmt_ms(x) for x in slow)})" if slow else "") + "."]
        if repaired:
            out[-1] += (f" lume's first repair logged: p50 {fmt_ms(statistics.median(repaired))}, "
                        f"p99 {fmt_ms(p_99(repaired))} over {len(repaired)} samples.")
    return out


def p_99(values):
    """The 99th percentile (inclusive method; the largest value below 2 samples)."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(sorted(values), n=100, method="inclusive")[98]


def heal_figure(rows, md_dir):
    """The heal distributions per disruption, as a picture."""
    cases = ["flush", "nft-only", "forwarding-off", "vpn-connect", "vpn-disconnect"]
    back = {c: metric(rows, c, "guest_back") for c in cases if metric(rows, c, "guest_back")}
    if not back:
        return []
    fixed = {c: metric(rows, c, "first_repair_logged") for c in cases if metric(rows, c, "first_repair_logged")}
    svg = f"{FIGURES}/heal.svg"
    svg_boxes(os.path.join(md_dir, svg), "Heal after each disruption (boxes: quartiles, whiskers: min–max)", [
        ("guest traffic back", 0.5, {"guest connection accepted": back}),
        ("lume's first repair logged", None, {"repair": fixed}),
    ], xlabel="disruption")
    return ["", f"![Heal times per disruption]({svg})"]


def boot_figure(rows, md_dir):
    """Time to a usable address per mode, lume against bare QEMU, as a picture."""
    series = {"lume (ipAddress in lume get)": {}, "bare QEMU (lease in console)": {}}
    for mode in ["nat", "bridged"]:
        lume = metric(rows, f"lume-{mode}", "address")
        bare = metric(rows, f"bare-{mode}", "console_lease")
        if lume and bare:
            series["lume (ipAddress in lume get)"][mode] = lume
            series["bare QEMU (lease in console)"][mode] = bare
    if not series["lume (ipAddress in lume get)"]:
        return []
    svg = f"{FIGURES}/boot.svg"
    svg_boxes(os.path.join(md_dir, svg), "Time to a usable address (boxes: quartiles, whiskers: min–max)", [
        ("seconds from the first command, in ms", None, series),
    ], xlabel="network mode")
    return ["", f"![Time to a usable address, lume against bare QEMU]({svg})"]


def prestart(rows):
    """bench/prestart.sh: lume's own work before QEMU starts, first and
    second NAT VM, this build (`new-*`) and with BENCH_OLD_LUME (`old-*`)
    the other build in the same rounds."""
    if not rows:
        return []
    out = ["### Prestart: lume's own work before QEMU starts (`bench/prestart.sh`)", "",
           "From `lume run VM --detach` to the supervisor's \"Starting <qemu>\" log line, median "
           "(min–max) over the rounds; guest running: to its \"VM '…' is running\" line (the guest's "
           "CPU runs; a build that starts QEMU paused resumes it a few ms before); `run --detach` "
           "returned: its whole wall time.", "",
           "| case | QEMU started | guest running | `run --detach` returned | n |",
           "| --- | --- | --- | --- | --- |"]
    for case in ["new-first", "old-first", "new-second", "old-second"]:
        spawned = metric(rows, case, "qemu_spawned")
        if spawned:
            running = metric(rows, case, "guest_running")
            out.append(f"| {case} | {cell(spawned, fmt_ms)} | "
                       f"{cell(running, fmt_ms) if running else '–'} | "
                       f"{cell(metric(rows, case, 'detach'), fmt_ms)} | {len(spawned)} |")
    pairs = []
    for vm in ["first", "second"]:
        for key, label in [("qemu_spawned", "QEMU started"), ("guest_running", "guest running"),
                           ("detach", "`run --detach` returned")]:
            new, old = by_run(rows, f"new-{vm}", key), by_run(rows, f"old-{vm}", key)
            text, med = ratio_cell(new, old)
            if med is not None:
                lower = sum(new[r] < old[r] for r in set(new) & set(old))
                pairs.append(f"| {vm} VM | {label} | {text} | {lower} of {len(set(new) & set(old))} |")
    if pairs:
        out += ["", "This build against BENCH_OLD_LUME, paired within each round (new / old):", "",
                "| VM | measure | new / old | rounds where new is lower |",
                "| --- | --- | --- | --- |"] + pairs
    return out


def concurrent(rows):
    if not rows:
        return []
    by = defaultdict(list)
    for r in rows:
        by[r["case"]].append(r)
    groups = [c for c in ["together", "halt-together", "old-together", "old-halt-together"] if by[c]]
    if not groups:
        return []
    n = by[groups[0]][0]["metrics"]["vms"]
    out = [f"### 1b. {n} NAT VMs started at the same instant", "",
           f"`lume run VM --detach` for {n} VMs at once against one of them alone, in the same rounds; "
           "median (min–max) over the rounds. `halt-*`: guests that only halt (no CPU, no address), "
           "which leaves lume's own share; `old-*`: the build before, in the same rounds.", "",
           "| case | slowest `run --detach` | median `run --detach` | slowest \"Starting <qemu>\" (lume's share) "
           "| last address in `lume ls` | distinct addresses | n |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for case in ["together", "alone", "halt-together", "halt-alone",
                 "old-together", "old-alone", "old-halt-together", "old-halt-alone"]:
        rs = by[case]
        if not rs:
            continue
        g = lambda k: [r["metrics"][k] for r in rs if k in r["metrics"]]  # noqa: E731
        distinct = [f"{r['metrics']['distinct_addresses']} of {r['metrics']['vms']}"
                    for r in rs if "distinct_addresses" in r["metrics"]]
        out.append(f"| {case} ({rs[0]['metrics']['vms']} VM{'s' if rs[0]['metrics']['vms'] > 1 else ''}) | "
                   f"{cell(g('detach_max'), fmt_ms)} | {cell(g('detach_median'), fmt_ms)} | "
                   f"{cell(g('qemu_spawned_max'), fmt_ms)} | {cell(g('address_max'))} | "
                   f"{', '.join(sorted(set(distinct))) or '–'} | {len(rs)} |")
    out.append("")
    for group in groups:
        alone = group.replace("together", "alone")
        pairs = {r["run"]: r["metrics"]["detach_max"] for r in by[group]}
        single = {r["run"]: r["metrics"]["detach_max"] for r in by[alone]}
        vals = [pairs[r] / single[r] for r in sorted(set(pairs) & set(single))]
        if not vals:
            continue
        ratio, _ = ratio_cell(pairs, single)
        line = (f"- {group}: slowest of the group / one alone, paired by round: {ratio}; target: every "
                f"`run --detach` within 2× one alone: {verdict(max(vals) <= 2.0)} (judged on the worst round)")
        addressed = [r for r in by[group] if "distinct_addresses" in r["metrics"]]
        if addressed:
            ok = all(r["metrics"]["distinct_addresses"] == r["metrics"]["vms"] for r in addressed)
            line += f"; distinct addresses for all: {verdict(ok)}"
        out.append(line + ".")
    return out


def scale(rows):
    if not rows:
        return []
    out = ["### 3. Manager overhead at scale", ""]
    times = defaultdict(list)
    for r in rows:
        key = (r["case"], r.get("vms"))
        times[key] += r.get("times", [])
    floor = times.get(("spawn-true", None), [])
    ver = times.get(("lume-version", None), [])
    out += [f"Wall time per command, median (min–max). Floor of the method: `/bin/true` "
            f"{cell(floor, fmt_ms)}; `lume --version` {cell(ver, fmt_ms)}.", ""]
    sizes = sorted({r.get("vms") for r in rows if r.get("vms")})
    out += ["| VMs (3 running) | `ls -f json` | `ls` (table) | `get` stopped VM | `get` running VM |",
            "| --- | --- | --- | --- | --- |"]
    for n in sizes:
        out.append(f"| {n} | {cell(times[('ls-json', n)], fmt_ms)} | {cell(times[('ls-table', n)], fmt_ms)} | "
                   f"{cell(times[('get-stopped', n)], fmt_ms)} | {cell(times[('get-running', n)], fmt_ms)} |")
    # Linear fit of the ls medians.
    pts = [(n, statistics.median(times[("ls-json", n)])) for n in sizes if times[("ls-json", n)]]
    if len(pts) >= 2:
        xs, ys = zip(*pts)
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs)
        icpt = my - slope * mx
        ss_tot = sum((y - my) ** 2 for y in ys)
        ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in pts)
        r2 = 1 - ss_res / ss_tot if ss_tot else 1.0
        big = max(pts)
        out += ["", f"`ls -f json` ≈ {icpt * 1000:.1f} ms + {slope * 1e6:.1f} µs per VM "
                f"(least squares over the medians, R² = {r2:.3f}); with {big[0]} VMs: "
                f"{big[1] * 1000:.1f} ms, target < 100 ms: {verdict(big[1] < 0.1)}."]
    creates = [t for r in rows if r["case"] == "create" for t in r.get("times", [])]
    stages = [(r.get("upto"), r.get("times", [])) for r in rows if r["case"] == "create"]
    deletes = times.get(("delete", None), [])
    if creates:
        per_stage = "; ".join(f"up to {u}: {cell(t, fmt_ms)}" for u, t in stages)
        out += ["", f"`lume create vmNNNN --disk-size 1MB --network none`: {cell(creates, fmt_ms)} "
                f"over {len(creates)} creates ({per_stage})."]
    if deletes:
        out += [f"`lume delete vmNNNN --force`: {cell(deletes, fmt_ms)} over {len(deletes)} deletes."]
    return out


def svg_boxes(path, title, panels, xlabel="running NAT VMs"):
    """Writes an SVG of box plots: `panels` is a list of (heading, target
    in seconds or None, {series name: {category: [seconds]}}); x: the
    categories (numbers of VMs, disruptions, ...) under `xlabel`, y:
    milliseconds from 0. Box: quartiles; whiskers: min and max; bar:
    median."""
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c"]
    # Wide enough for every category's label under its slot.
    labels = [str(n) for _, _, series in panels for d in series.values() for n in d]
    slots = max((len({n for d in series.values() for n in d}) for _, _, series in panels), default=1)
    pw = max(300, slots * (max((len(x) for x in labels), default=1) * 7 + 12))
    ph, top, left, bottom = 220, 40, 50, 40
    width = max(left + len(panels) * (pw + 30) + 10, len(title) * 7 + 20)
    height = top + ph + bottom + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{title}</text>']
    for pi, (heading, target, series) in enumerate(panels):
        x0 = left + pi * (pw + 30)
        ns = sorted(dict.fromkeys(n for d in series.values() for n in d), key=_order)
        vals = [v for d in series.values() for vs in d.values() for v in vs]
        if target is not None:
            vals.append(target)
        if not ns or not vals:
            continue
        ymax = max(vals) * 1.1
        ys = lambda v: top + ph - v / ymax * ph  # noqa: E731
        out.append(f'<text x="{x0 + pw / 2}" y="{top - 8}" text-anchor="middle">{heading}</text>')
        out.append(f'<rect x="{x0}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        for k in range(5):
            v = ymax * k / 4
            y = ys(v)
            out.append(f'<line x1="{x0 - 4}" x2="{x0}" y1="{y:.1f}" y2="{y:.1f}" stroke="#888"/>')
            out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{v * 1000:.0f}</text>')
        if target is not None:
            y = ys(target)
            out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#d62728" '
                       f'stroke-dasharray="4 3"/>')
            out.append(f'<text x="{x0 + pw - 2}" y="{y - 3:.1f}" text-anchor="end" fill="#d62728">'
                       f'target {target * 1000:.0f} ms</text>')
        slot = pw / len(ns)
        names = list(series)
        bw = slot * 0.7 / len(names)
        for i, n in enumerate(ns):
            cx = x0 + slot * (i + 0.5)
            out.append(f'<text x="{cx:.1f}" y="{top + ph + 14}" text-anchor="middle">{n}</text>')
            for si, name in enumerate(names):
                vs = series[name].get(n)
                if not vs:
                    continue
                med, lo, hi, q1, q3 = q(vs)
                bx = cx - slot * 0.35 + si * bw
                mid = bx + bw / 2
                c = colours[si % len(colours)]
                out.append(f'<line x1="{mid:.1f}" x2="{mid:.1f}" y1="{ys(hi):.1f}" y2="{ys(lo):.1f}" stroke="{c}"/>')
                out.append(f'<rect x="{bx + 1:.1f}" y="{ys(q3):.1f}" width="{bw - 2:.1f}" '
                           f'height="{max(ys(q1) - ys(q3), 0.5):.1f}" fill="{c}" fill-opacity="0.35" stroke="{c}"/>')
                out.append(f'<line x1="{bx + 1:.1f}" x2="{bx + bw - 1:.1f}" y1="{ys(med):.1f}" '
                           f'y2="{ys(med):.1f}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{x0 + pw / 2}" y="{top + ph + 30}" text-anchor="middle">{xlabel}</text>')
        out.append(f'<text x="{x0 - 38}" y="{top + ph / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 {x0 - 38} {top + ph / 2})">ms</text>')
        for si, name in enumerate(names):
            ly = top + 14 + si * 14
            c = colours[si % len(colours)]
            out.append(f'<rect x="{x0 + 8}" y="{ly - 9}" width="10" height="10" fill="{c}" fill-opacity="0.35" stroke="{c}"/>')
            out.append(f'<text x="{x0 + 22}" y="{ly}">{name}</text>')
    out.append("</svg>")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def _order(category):
    """Numbers in numeric order; other categories keep their given order."""
    return (0, category) if isinstance(category, (int, float)) else (1, 0)


# Where report.py writes its pictures, relative to BENCHMARKS.md.
FIGURES = "bench/figures"


def many(rows, md_dir):
    if not rows:
        return []
    times = defaultdict(list)
    for r in rows:
        if r["case"] == "heal":
            times[("heal", r["vms"])].append(r["metrics"]["table_back"])
        elif r["case"] == "idle-cpu":
            times[("idle-cpu", r["vms"])].append(r["cpu_per_s"])
        else:
            times[(r["case"], r.get("vms"))] += r.get("times", [])
    sizes = sorted({r["vms"] for r in rows if r.get("vms")})
    pick = lambda case: {n: times[(case, n)] for n in sizes if times[(case, n)]}  # noqa: E731
    svg = f"{FIGURES}/many.svg"
    svg_boxes(os.path.join(md_dir, svg), "lume with many running NAT VMs (boxes: quartiles, whiskers: min–max)", [
        ("lume ls -f json", 0.1, {"running": pick("ls-running"), "stopped (baseline)": pick("ls-stopped")}),
        ("lume network doctor", 2.0, {"doctor": pick("doctor")}),
        ("table back after nft flush ruleset", 0.1, {"heal": pick("heal")}),
    ])
    out = ["### 3b. Many running VMs: `ls`, doctor, heal", "",
           f"![ls, doctor and heal with 1 to {sizes[-1]} running NAT VMs]({svg})", "",
           "Wall time per command (heal: from the start of `nft flush ruleset` to lume's table "
           "back), median (min–max). Guests halt at once (no OS, no address).", "",
           "| running NAT VMs | `ls -f json` | `ls -f json`, as many stopped | `network doctor` "
           "| table back after a flush | CPU of all VMs and lume, idle |",
           "| --- | --- | --- | --- | --- | --- |"]
    for n in sizes:
        cpu = times[("idle-cpu", n)]
        out.append(f"| {n} | {cell(times[('ls-running', n)], fmt_ms)} | {cell(times[('ls-stopped', n)], fmt_ms)} | "
                   f"{cell(times[('doctor', n)], fmt_ms)} | {cell(times[('heal', n)], fmt_ms)} | "
                   f"{f'{cpu[0] * 100:.1f} % of a core' if cpu else '–'} |")
    big = sizes[-1]
    ls_big = times[("ls-running", big)]
    doc = [t for n in sizes for t in times[("doctor", n)]]
    heal_big = times[("heal", big)]
    out.append("")
    if ls_big:
        out.append(f"Targets: `ls` of {big} running VMs ≤ 100 ms (median {fmt_ms(statistics.median(ls_big))}): "
                   f"{verdict(statistics.median(ls_big) <= 0.1)}; ")
    if doc:
        out[-1] += (f"doctor ≤ 2 s at every size (slowest run {fmt_ms(max(doc))}): {verdict(max(doc) <= 2)}; ")
    if heal_big:
        out[-1] += (f"table back ≤ 100 ms with {big} VMs (median {fmt_ms(statistics.median(heal_big))}): "
                    f"{verdict(statistics.median(heal_big) <= 0.1)}.")
    return out


def clone(rows):
    if not rows:
        return []
    out = ["### 4. Clone of a 20 GB sparse disk", ""]
    if any(r["case"] == "xfs-skipped" for r in rows):
        out += ["XFS part skipped: mkfs.xfs unavailable.", ""]
    out += ["Median (min–max) wall time; the baseline is coreutils `cp` of the same disk, in the same round.", ""]
    out += ["| filesystem | data | `lume clone` | lume says | copy allocates | filesystem space used by the copy | "
            "baseline `cp` | lume / cp | n |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fss = []
    for r in rows:
        if r.get("fs") and r["fs"] not in fss:
            fss.append(r["fs"])
    for fs in fss:
        for mib in sorted({r["mib"] for r in rows if r.get("fs") == fs}):
            lume = [r for r in rows if r["case"] == f"lume-{fs}-{mib}"]
            said = sorted({("reflink" if "reflink" in r.get("stdout", "") else
                            "sparse copy" if "sparsely" in r.get("stdout", "") else r.get("stdout", ""))
                           for r in lume})
            alloc = [r["allocated"] for r in rows if r["case"] == f"alloc-{fs}-{mib}"]
            delta = [r["fs_used_delta"] for r in rows if r["case"] == f"alloc-{fs}-{mib}" and "fs_used_delta" in r]
            t = metric(rows, f"lume-{fs}-{mib}", "seconds")
            cp = metric(rows, f"cp-{fs}-{mib}", "seconds")
            rc, _ = ratio_cell(by_run(rows, f"lume-{fs}-{mib}", "seconds"), by_run(rows, f"cp-{fs}-{mib}", "seconds"))
            mibs = lambda v: f"{v / (1 << 20):.0f} MiB"  # noqa: E731
            used = cell(delta, mibs) if fs != "ext4" else "(shared filesystem: not isolated)"
            out.append(f"| {fs} | {mib} MiB | {cell(t, fmt_ms)} | {', '.join(said)} | {cell(alloc, mibs)} | "
                       f"{used} | {cell(cp, fmt_ms)} | {rc} | {len(t)} |")
        t64 = metric(rows, f"lume-{fs}-64", "seconds")
        t512 = metric(rows, f"lume-{fs}-512", "seconds")
        if t64 and t512:
            out += [f"| {fs} | 512 vs 64 MiB | time ratio {statistics.median(t512) / statistics.median(t64):.1f}x "
                    "(data ratio 8x) | | | | | | |"]
    return out


def throughput(rows):
    if not rows:
        return []
    out = ["### 5. Guest network throughput (TCP echo round trip)", ""]
    mib = next((r.get("mib") for r in rows if r.get("mib")), None)
    out += [f"{mib:g} MiB sent to the echo service and read back at once; MiB/s of payload, "
            "median (min–max).", ""] if mib else []
    out += ["| path | MiB/s | fraction of the veth baseline (paired) | QEMU CPU (all threads) | "
            "QEMU vCPU thread | n |", "| --- | --- | --- | --- | --- | --- |"]
    pct = lambda x: f"{x * 100:.0f}%"  # noqa: E731
    veth = by_run(rows, "veth", "mib_per_s")
    for case, label in [("veth", "veth baseline (Python echo, no VM)"), ("bridged", "bridged (tap + macvlan, tc redirects)"),
                        ("bridged-macvtap", "bridged (macvtap: the path before, BENCH_OLD_LUME)"),
                        ("nat", "nat (tap on lume's bridge)"), ("user", "user (passt + relay, published port)")]:
        v = metric(rows, case, "mib_per_s")
        if not v:
            continue
        rc, _ = ratio_cell(by_run(rows, case, "mib_per_s"), veth) if case != "veth" else ("1", None)
        out.append(f"| {label} | {cell(v, lambda x: f'{x:.1f}')} | {rc} | "
                   f"{cell(metric(rows, case, 'qemu_cpu_share'), pct)} | "
                   f"{cell(metric(rows, case, 'vcpu_cpu_share'), pct)} | {len(v)} |")
    new, old = by_run(rows, "bridged", "mib_per_s"), by_run(rows, "bridged-macvtap", "mib_per_s")
    if new and old:
        rc, _ = ratio_cell(new, old)
        out += ["", f"bridged, tap + macvlan against macvtap (paired by round): {rc}."]
    failed = [r for r in rows if r["case"].endswith("-failed")]
    if failed:
        out += ["", "Transfers that did not come back whole (not in the medians): " + "; ".join(
            f"{c[:-len('-failed')]} {sum(1 for r in failed if r['case'] == c)} "
            f"(e.g. {next(r['detail'] for r in failed if r['case'] == c)})"
            for c in sorted({r["case"] for r in failed}))]
    vh = next((r for r in rows if r["case"] == "vhost"), None)
    if vh:
        out += ["", f"vhost-net: lume requests it: {'yes' if vh.get('lume_requests_vhost') else 'no'}; "
                f"/dev/vhost-net on this host: {'yes' if vh.get('dev_vhost_net') else 'no'}."]
    return out


def reattach(rows):
    if not rows:
        return []
    out = ["### 6. Bridged VM back after its parent interface returns", "",
           "Seconds from the start of re-creating up0 (a veth, as a USB NIC plugged back); "
           "median (min–max).", "",
           "| step | time | n |", "| --- | --- | --- |"]
    for name, label in [("plugged", "up0 exists again"), ("lan_ready", "its LAN side is in the LAN bridge"),
                        ("back", "the guest answers a TCP echo from the LAN"),
                        ("connect", "lume's re-attachment itself (macvlan + tc filters, from lume.log)")]:
        v = metric(rows, "reattach", name)
        if v:
            out.append(f"| {label} | {cell(v, fmt_ms)} | {len(v)} |")
    return out


def image_import(rows):
    if not rows:
        return []
    out = ["### 7. Import of a 2 GiB image from a local HTTP server", "",
           "`lume create --image http://…` against `curl -o` + `qemu-img convert -O raw` of the same file, "
           "in the same round; median (min–max) wall time; target ≤ 1.1x.", "",
           "| image | `lume create --image URL` | curl + qemu-img convert | lume / baseline (paired) | verdict | n |",
           "| --- | --- | --- | --- | --- | --- |"]
    for fmt, label in [("raw", "raw, 2 GiB (1.5 GiB data)"), ("qcow2", "qcow2 of the same disk")]:
        t = metric(rows, f"lume-{fmt}", "seconds")
        b = metric(rows, f"curl-{fmt}", "seconds")
        if not t:
            continue
        rc, med = ratio_cell(by_run(rows, f"lume-{fmt}", "seconds"), by_run(rows, f"curl-{fmt}", "seconds"))
        out.append(f"| {label} | {cell(t)} | {cell(b)} | {rc} | {verdict(med is not None and med <= 1.1)} | {len(t)} |")
def ssh(rows):
    if not rows:
        return []
    out = ["### 8. Debian cloud VM: start to a working `ssh`", ""]
    out += ["Seconds from `lume run --detach` (bare: the first setup command) to the first "
            "successful `ssh … true`, first boot with cloud-init; median (min–max).", ""]
    out += ["| case | to ssh | n |", "| --- | --- | --- |"]
    for case in ["lume-nat", "bare-nat"]:
        v = metric(rows, case, "seconds")
        if v:
            out.append(f"| {case} | {cell(v)} | {len(v)} |")
    lume = by_run(rows, "lume-nat", "seconds")
    bare = by_run(rows, "bare-nat", "seconds")
    if lume and bare:
        c, _ = ratio_cell(lume, bare)
        rm = statistics.median(lume.values()) / statistics.median(bare.values())
        out += ["", "| lume / bare, paired per round | ratio of medians | target |",
                "| --- | --- | --- |", f"| {c} | {rm:.2f}x | {verdict(rm <= 1.05)} |"]
    return out


def registry(rows):
    if not rows:
        return []
    out = ["### 9. Push and pull of a sparse 8 GiB disk (1 GiB of data) through a local registry", "",
           "`lume push` / `lume pull` against `skopeo copy` of the same image between the same "
           "local registry (docker-registry on 127.0.0.1, emptied before each push) and a directory, "
           "in the same round; median (min–max) wall time; target ≤ 1.0x, the pulled disk sparse.", "",
           "| operation | lume | skopeo copy | lume / skopeo (paired) | verdict | n |",
           "| --- | --- | --- | --- | --- | --- |"]
    for op in ["push", "pull"]:
        t = metric(rows, f"lume-{op}", "seconds")
        b = metric(rows, f"skopeo-{op}", "seconds")
        if not t:
            continue
        rc, med = ratio_cell(by_run(rows, f"lume-{op}", "seconds"), by_run(rows, f"skopeo-{op}", "seconds"))
        out.append(f"| {op} | {cell(t)} | {cell(b)} | {rc} | {verdict(med is not None and med <= 1.0)} | {len(t)} |")
    pushed = metric(rows, "lume-push", "bytes")
    alloc = metric(rows, "lume-pull", "bytes")
    mib = lambda v: f"{v / (1 << 20):.0f} MiB"
    if pushed or alloc:
        out += ["", "| bytes | median (min–max) |", "| --- | --- |"]
        if pushed:
            out.append(f"| registry storage after `lume push` (compressed chunks + manifest) | {cell(pushed, mib)} |")
        if alloc:
            out.append(f"| allocated on disk by the pulled 8 GiB disk | {cell(alloc, mib)} |")
    return out


def main():
    if sys.argv[1] == "--section":
        # One section only, printed (e.g. after running one benchmark alone):
        # report.py --section many|registry|boot|heal|scale|concurrent|prestart RESULTS_DIR BENCHMARKS.md
        name, results, md = sys.argv[2], sys.argv[3], sys.argv[4]
        rows = load(results, name)
        md_dir = os.path.dirname(os.path.abspath(md))
        one = {"many": lambda r: many(r, md_dir),
               "registry": registry, "boot": lambda r: boot(r) + boot_figure(r, md_dir),
               "heal": lambda r: heal(r) + heal_figure(r, md_dir), "scale": scale,
               "concurrent": concurrent, "prestart": prestart}
        section = one[name](rows) if name in one else []
        print("\n".join(section))
        return
    results, md = sys.argv[1], sys.argv[2]
    meta = {}
    mp = os.path.join(results, "meta.json")
    if os.path.exists(mp):
        with open(mp) as f:
            meta = json.load(f)
    parts = [BEGIN, "", f"_Generated by `bench/report.py` from {meta.get('date', 'the last run')}; "
             "do not edit by hand (the analysis above and below is kept)._", ""]
    md_dir = os.path.dirname(os.path.abspath(md))
    boots, heals = load(results, "boot"), load(results, "heal")
    for section in [machine(meta), boot(boots) + (boot_figure(boots, md_dir) if boots else []),
                    concurrent(load(results, "concurrent")),
                    heal(heals) + (heal_figure(heals, md_dir) if heals else []),
                    scale(load(results, "scale")),
                    many(load(results, "many"), os.path.dirname(os.path.abspath(md))),
                    clone(load(results, "clone")),
                    throughput(load(results, "throughput")), reattach(load(results, "reattach")),
                    image_import(load(results, "import")), ssh(load(results, "ssh")),
                    registry(load(results, "registry"))]:
        if section:
            parts += section + [""]
    parts.append(END)
    generated = "\n".join(parts)
    text = open(md).read() if os.path.exists(md) else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + generated + tail
    else:
        text = text.rstrip("\n") + "\n\n" + generated + "\n"
    with open(md, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
