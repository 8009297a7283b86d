#!/usr/bin/env bash
# Benchmark: snapshots (docs/snapshots.md).
#
# One busybox test guest with 512 MB of memory on lume's host-only network
# (192.0.2.0/24), in a namespace of its own. Each round measures, in
# milliseconds:
#   cold_boot       `lume run --detach` until the guest answers HTTP
#                   (polled every 20 ms with curl from the namespace)
#   snap_memory     `lume snapshot create VM --memory` of the running guest
#   restore_memory  `lume snapshot restore VM SNAP` of the stopped VM until
#                   the guest answers HTTP again (no boot: it resumes)
#   snap_disk       `lume snapshot create VM` of the stopped VM
#   clone           `lume clone` of a stopped VM with a 2 GiB disk holding
#                   512 MiB of data (a sparse copy on ext4, a reflink on XFS)
#   clone_snapshot  `lume clone VM NEW --snapshot SNAP` of the same VM
# with the VMs on the filesystem under /tmp (ext4 here) and, when mkfs.xfs
# exists, on a loop-mounted XFS image (every case). Round 0 is a warm-up.
# Results: target/bench/snapshot.jsonl, one JSON object per measurement.
BENCH_NAME=snapshot
source "$(dirname "$0")/lib.sh"
need_root
GUEST_DIR=$("$REPO/tests/guest/build.sh" | tail -n1)
GUEST_CMDLINE=$(cat "$GUEST_DIR/cmdline")
GUEST_MEMORY=512MB
OUT=$(results_file snapshot)
: >"$OUT"

ns_new NS sn
lume_home H
L() { lume_in "$NS" "$H" "$@"; }
now_ms() { date +%s%3N; }
rec() { # ROUND CASE FS MS
    [ "$1" -gt 0 ] || return 0
    printf '{"case":"%s","fs":"%s","ms":%s}\n' "$2" "$3" "$4" >>"$OUT"
    log "round $1 $2 ($3): $4 ms"
}
wait_http() { # IP
    local i
    for ((i = 0; i < 3000; i++)); do
        in_ns "$NS" curl -s -m 1 -o /dev/null "http://$1/" && return 0
        sleep 0.02
    done
    die "no HTTP answer from $1"
}
ip_of() { L get "$@" -f json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["ipAddress"] or "")'; }

snapshot_cases() { # FS STORAGE_DIR
    local fs=$1 S=(--storage "$2") r t0 ip
    lume_create "$NS" "$H" sv host "" "${S[@]}"
    for ((r = 0; r <= BENCH_RUNS; r++)); do
        t0=$(now_ms)
        L run sv "${S[@]}" --detach >/dev/null
        ip=""
        while [ -z "$ip" ]; do ip=$(ip_of sv "${S[@]}"); sleep 0.02; done
        wait_http "$ip"
        rec "$r" cold_boot "$fs" $(($(now_ms) - t0))
        sleep 1
        t0=$(now_ms)
        L snapshot create sv "m$r" --memory "${S[@]}" >/dev/null
        rec "$r" snap_memory "$fs" $(($(now_ms) - t0))
        L stop sv "${S[@]}" >/dev/null
        t0=$(now_ms)
        L snapshot restore sv "m$r" "${S[@]}" >/dev/null
        wait_http "$ip"
        rec "$r" restore_memory "$fs" $(($(now_ms) - t0))
        L stop sv "${S[@]}" >/dev/null
        t0=$(now_ms)
        L snapshot create sv "d$r" "${S[@]}" >/dev/null
        rec "$r" snap_disk "$fs" $(($(now_ms) - t0))
        L snapshot delete sv "m$r" "${S[@]}" >/dev/null
        L snapshot delete sv "d$r" "${S[@]}" >/dev/null
    done
    L delete sv "${S[@]}" --force >/dev/null
}

clone_cases() { # FS STORAGE_DIR
    local fs=$1 dir=$2
    L create big --storage "$dir" --cpu 1 --memory 192MB --disk-size 2GB --network none \
        --kernel "$GUEST_DIR/vmlinuz" --initrd "$GUEST_DIR/initrd.img" --cmdline "$GUEST_CMDLINE" >/dev/null
    python3 - "$dir/big/disk.img" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
size = os.fstat(fd).st_size
block = os.urandom(1 << 20)
for c in range(8):
    for i in range(64):
        os.pwrite(fd, block, (size // 8) * c + i * (1 << 20))
os.fsync(fd)
os.close(fd)
PY
    for ((r = 0; r <= BENCH_RUNS; r++)); do
        t0=$(now_ms)
        L clone big "c$r" --storage "$dir" >/dev/null
        rec "$r" clone "$fs" $(($(now_ms) - t0))
        L delete "c$r" --storage "$dir" --force >/dev/null
    done
    L snapshot create big golden --storage "$dir" >/dev/null
    for ((r = 0; r <= BENCH_RUNS; r++)); do
        t0=$(now_ms)
        L clone big "s$r" --snapshot golden --storage "$dir" >/dev/null
        rec "$r" clone_snapshot "$fs" $(($(now_ms) - t0))
        L delete "s$r" --storage "$dir" --force >/dev/null
    done
    L delete big --storage "$dir" --force >/dev/null
}
tmpdir W
mkdir -m 0700 "$W/ext4"
chmod 0700 "$W"
snapshot_cases ext4 "$W/ext4"
clone_cases ext4 "$W/ext4"
if command -v mkfs.xfs >/dev/null; then
    truncate -s 4G "$W/xfs.img"
    mkfs.xfs -q -m reflink=1 "$W/xfs.img"
    mkdir -m 0700 "$W/xfs"
    mount -o loop "$W/xfs.img" "$W/xfs"
    on_exit "umount '$W/xfs'"
    chmod 0700 "$W/xfs"
    snapshot_cases xfs "$W/xfs"
    clone_cases xfs "$W/xfs"
fi
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = sorted({(r["case"], r["fs"]) for r in rows})
for case, fs in keys:
    v = sorted(r["ms"] for r in rows if r["case"] == case and r["fs"] == fs)
    print(f"{case:16} {fs:5} median {statistics.median(v):7.0f} ms  min {v[0]:6} max {v[-1]:6}  n={len(v)}")
PY
