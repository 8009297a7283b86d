#!/usr/bin/env bash
# Benchmark 4: `lume clone` of a VM with a 20 GB sparse disk.
#
# Two source VMs, both with a 20 GB (nominal) sparse disk, one with 64 MiB
# and one with 512 MiB of data written into it (eight chunks spread over the
# disk, fsynced). Each round clones both with `lume clone` and, side by
# side, copies both disks with coreutils (`cp --sparse=always
# --reflink=never` on ext4, `cp --reflink=always` on XFS) as the baseline,
# then deletes the copies. Reported: the time, what lume says it did
# ("shared by reflink" or "copied sparsely") and the blocks allocated by the
# copy. The source disks are in the page cache (written just before), so a
# sparse copy is bound by writing and fsyncing the copy, not by reading.
#
# Filesystems: the one under /tmp (here ext4, no reflink) and, when
# mkfs.xfs is available (installed from xfsprogs if missing), a 4 GiB XFS
# image with reflink=1, loop-mounted under /tmp and unmounted on exit.
BENCH_NAME=clone
source "$(dirname "$0")/lib.sh"
need_root
OUT=$(results_file clone)
: >"$OUT"

lume_home H
# shellcheck disable=SC2206
L=(env -u LUME_API_TOKEN $(lume_env "$H") "$LUME")
SIZES=(64 512)

fill() { # DISK MIB: MIB MiB of data in 8 chunks spread over DISK, fsynced
    python3 - "$1" "$2" <<'EOF'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
size = os.path.getsize(path)
block = os.urandom(1 << 20)
fd = os.open(path, os.O_WRONLY)
for c in range(8):
    base = (size // 8) * c
    for i in range(mib // 8):
        os.pwrite(fd, block, base + i * (1 << 20))
os.fsync(fd)
os.close(fd)
EOF
}

allocated() { stat -c '%b %B' "$1" | awk '{ printf "%.0f\n", $1 * $2 }'; }
fs_used() { stat -f -c '%b %f %S' "$1" | awk '{ printf "%.0f\n", ($1 - $2) * $3 }'; }

bench_fs() { # FSNAME STORE CP_ARGS
    local fs=$1 store=$2 cp_args=$3 mib run disk copy
    mkdir -p "$store"
    for mib in "${SIZES[@]}"; do
        "${L[@]}" create "src$mib" --disk-size 20GB --network none --storage "$store" >/dev/null
        fill "$store/src$mib/disk.img" "$mib"
        log "$fs: src$mib has $(($(allocated "$store/src$mib/disk.img") >> 20)) MiB allocated of $(($(stat -c %s "$store/src$mib/disk.img") >> 30)) GiB"
    done
    for ((run = 0; run <= BENCH_RUNS; run++)); do
        log "$fs: round $run of $BENCH_RUNS$([ "$run" = 0 ] && echo ' (warm-up, not recorded)')"
        local rec=$OUT
        [ "$run" -gt 0 ] || rec=
        for mib in "${SIZES[@]}"; do
            disk=$store/src$mib/disk.img
            copy=$store/copy$mib.img
            sync -f "$store"
            used=$(fs_used "$store")
            "${BT[@]}" time1 --record="$rec" --case "lume-$fs-$mib" --run "$run" \
                --extra "{\"fs\": \"$fs\", \"mib\": $mib}" -- "${L[@]}" clone "src$mib" "dst$mib" --storage "$store" >/dev/null
            sync -f "$store"
            [ -z "$rec" ] || "${BT[@]}" note --record "$rec" --json \
                "{\"case\": \"alloc-$fs-$mib\", \"run\": $run, \"allocated\": $(allocated "$store/dst$mib/disk.img"), \"fs_used_delta\": $(($(fs_used "$store") - used))}"
            "${L[@]}" delete "dst$mib" --force --storage "$store" >/dev/null
            # shellcheck disable=SC2086
            "${BT[@]}" time1 --record="$rec" --case "cp-$fs-$mib" --run "$run" \
                --extra "{\"fs\": \"$fs\", \"mib\": $mib}" -- sh -c "cp $cp_args '$disk' '$copy' && sync -f '$copy'" >/dev/null
            rm -f "$copy"
        done
    done
    for mib in "${SIZES[@]}"; do "${L[@]}" delete "src$mib" --force --storage "$store" >/dev/null; done
}

tmpdir W
bench_fs "$(findmnt -n -o FSTYPE --target /tmp)" "$W/vms" "--sparse=always --reflink=never"

if ! command -v mkfs.xfs >/dev/null; then
    log "installing xfsprogs for the reflink part"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends xfsprogs; } >/dev/null 2>&1 ||
        log "could not install xfsprogs"
fi
if command -v mkfs.xfs >/dev/null; then
    truncate -s 4G "$W/xfs.img"
    mkfs.xfs -q -m reflink=1 "$W/xfs.img"
    mkdir "$W/xfs"
    on_exit "umount '$W/xfs'"
    mount -o loop "$W/xfs.img" "$W/xfs"
    bench_fs xfs "$W/xfs/vms" "--reflink=always"
    umount "$W/xfs"
else
    "${BT[@]}" note --record "$OUT" --json '{"case": "xfs-skipped", "run": 0}'
fi
log "done: $OUT"
