#!/usr/bin/env bash
# lume's benchmark suite. Run as root from anywhere:
#
#   sudo bench/run.sh                      # every benchmark, BENCH_RUNS=8
#   sudo BENCH_RUNS=3 bench/run.sh boot    # fewer rounds, some benchmarks only
#
# Benchmarks (each also runs alone, e.g. `sudo bench/heal.sh`):
#   boot        time to a usable address, lume vs bare QEMU (nat, bridged)
#   concurrent  10 NAT VMs started at the same instant vs one alone (BENCH_VMS)
#   heal        NAT connectivity back after a firewall flush / VPN change
#   scale       ls/get/create/delete with 100, 300 and 1,000 VMs
#   many        ls, network doctor and heal after a flush with 1, 10, 30 and 100
#               running NAT VMs (guests that only halt), with a picture
#   clone       clone of a 20 GB sparse disk (64 and 512 MiB of data), ext4 and XFS
#   throughput  TCP echo through bridged, nat and user mode vs a veth baseline
#               (BENCH_OLD_LUME=<older lume>: also bridged on a macvtap, the path before)
#   reattach    a bridged VM answering from the LAN again after its parent returns
#   import      create --image URL of a 2 GiB image vs curl + qemu-img convert
#   ssh         a Debian 12 cloud VM from start to a working ssh, lume vs bare QEMU
#   registry    push and pull of a sparse 8 GiB disk (1 GiB of data) vs skopeo copy
#   policy      a NAT guest with a 50-rule network policy vs one without (time to
#               address, TCP echo); results written into BENCHMARKS.md section 10 by hand
#
# It installs missing packages (scripts/install-deps.sh; xfsprogs for the
# XFS part), builds target/release/lume with `cargo build --release`, builds
# the test guest, runs the benchmarks with LUME_ACCEL=tcg, writes raw
# results to target/bench/*.jsonl and regenerates the results part of
# BENCHMARKS.md. Environment: BENCH_RUNS (rounds per case, default 8),
# BENCH_MB (MiB per throughput run, default 64).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

if [ "$(id -u)" != 0 ]; then
    echo "Run as root (sudo bench/run.sh): the benchmarks create network namespaces" >&2
    exit 1
fi
ALL=(boot concurrent heal scale many clone throughput reattach import ssh registry policy)
SELECTED=("$@")
[ ${#SELECTED[@]} -gt 0 ] || SELECTED=("${ALL[@]}")
for b in "${SELECTED[@]}"; do
    [ -x "bench/$b.sh" ] || { echo "Unknown benchmark '$b': choose from ${ALL[*]}" >&2; exit 2; }
done
command=$(printf 'sudo %sbench/run.sh%s' "${BENCH_RUNS:+BENCH_RUNS=$BENCH_RUNS }" "${*:+ $*}")
export BENCH_RUNS=${BENCH_RUNS:-8}
export BENCH_RESULTS=$REPO/target/bench
start=$(date +%s)

scripts/install-deps.sh
echo "== build" >&2
if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && ! command -v cargo >/dev/null; then
    sudo -u "$SUDO_USER" -H bash -lc "cd '$REPO' && cargo build --release --locked" >&2
else
    cargo build --release --locked >&2
fi
echo "== test guest" >&2
tests/guest/build.sh >/dev/null

rm -rf "$BENCH_RESULTS"
mkdir -p "$BENCH_RESULTS"
BENCH_COMMAND=$command python3 - "$BENCH_RESULTS/meta.json" <<'EOF'
import json, os, subprocess, sys, time
def sh(c):
    return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((l.split(":", 1)[1].strip() for l in open("/proc/meminfo") if l.startswith("MemTotal")), "?")
meta = {
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "command": os.environ["BENCH_COMMAND"],
    "runs": int(os.environ["BENCH_RUNS"]),
    "commit": sh("git rev-parse --short HEAD") + (" (with uncommitted changes)" if sh("git status --porcelain -- src Cargo.toml Cargo.lock") else ""),
    "nproc": sh("nproc"),
    "cpu_model": model,
    "memory": mem,
    "kernel": sh("uname -r"),
    "qemu": sh("qemu-system-x86_64 --version | head -n1"),
    "accelerator": "TCG (LUME_ACCEL=tcg; this machine's nested KVM does not run a vCPU)",
    "tmp_fs": sh("findmnt -n -o FSTYPE --target /tmp"),
    "loadavg_start": open("/proc/loadavg").read().split()[:3],
    "other_qemu_start": int(sh("pgrep -c qemu-system || true") or 0),
}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
EOF

failed=()
for b in "${SELECTED[@]}"; do
    echo "== $b" >&2
    "bench/$b.sh" || failed+=("$b")
done

python3 - "$BENCH_RESULTS/meta.json" "$(($(date +%s) - start))" "${failed[@]}" <<'EOF'
import json, sys
meta = json.load(open(sys.argv[1]))
meta["failed"] = sys.argv[3:]
meta["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
s = int(sys.argv[2])
meta["wall_time"] = f"{s // 60} min {s % 60} s (including the build)"
json.dump(meta, open(sys.argv[1], "w"), indent=1)
EOF
python3 bench/report.py "$BENCH_RESULTS" BENCHMARKS.md
echo "Results: BENCHMARKS.md (raw: $BENCH_RESULTS)" >&2
if [ ${#failed[@]} -gt 0 ]; then
    echo "Failed: ${failed[*]} (their results are missing or partial)" >&2
    exit 1
fi
