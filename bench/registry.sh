#!/usr/bin/env bash
# Benchmark 9: `lume push` and `lume pull` of a VM with a sparse 8 GiB disk
# holding 1 GiB of data, against `skopeo copy` of the same image between
# the same local registry and a directory, in the same rounds.
#
# The registry: Debian's docker-registry (the CNCF distribution server) on
# 127.0.0.1 inside a network namespace, plain HTTP (loopback), storage in
# a temporary directory that is emptied before every push so that no push
# finds its blobs already there.
#   lume push:    lume push src bench/vm:rN (chunks, compresses, uploads)
#   skopeo push:  skopeo copy dir:<lume's image as skopeo pulled it> docker://…
#   lume pull:    lume pull bench/vm:rN dst (fetches, verifies, writes sparse)
#   skopeo pull:  skopeo copy docker://…bench/vm:rN dir:… (fetches, verifies)
# skopeo moves the same blobs (lume's compressed chunks) and writes them as
# files; lume also decompresses into the sparse disk and fsyncs it. Caching
# is off (cachingEnabled: false), so lume's pull downloads every round.
# REGISTRY_RUNS rounds (default BENCH_RUNS, else 3) after a warm-up;
# medians are reported. The skopeo push goes into an empty registry too
# (restarted on an empty storage directory), so both pushes upload every blob.
BENCH_NAME=registry
source "$(dirname "$0")/lib.sh"
need_root
OUT=$(results_file registry)
: >"$OUT"
RUNS=${REGISTRY_RUNS:-${BENCH_RUNS:-3}}
command -v skopeo >/dev/null || die "skopeo is missing: scripts/install-deps.sh installs it"
REGISTRY_BIN=$(command -v docker-registry || echo /usr/bin/docker-registry)
[ -x "$REGISTRY_BIN" ] || die "docker-registry is missing: scripts/install-deps.sh installs it"

lume_home H
echo "cachingEnabled: false" >>"$H/.config/lume/config.yaml"
tmpdir W
ns_new NS lreg
log "making the 8 GiB disk with 1 GiB of data"
python3 - "$W/disk.raw" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
chunk = 64 << 20
# 16 pieces of 64 MiB = 1 GiB of data, spread over 8 GiB: half random (does
# not compress), half text-like (compresses, as file systems' content does).
# Every piece differs, so no two chunks share a blob (no dedup).
for i in range(16):
    if i % 2 == 0:
        piece = os.urandom(chunk)
    else:
        line = b"lume registry benchmark, piece %d, line of text with some repetition\n" % i
        piece = (line * (chunk // len(line) + 1))[:chunk]
    os.pwrite(fd, piece, i * (512 << 20))
os.ftruncate(fd, 8 << 30)
os.fsync(fd)
PY
lume_in "$NS" "$H" create src --network none --no-cloud-init --disk-size 8GB --image "$W/disk.raw" >/dev/null
rm -f "$W/disk.raw"

REG_DIR=$W/registry
cat >"$W/registry.yml" <<YML
version: 0.1
log: {level: error}
storage:
  filesystem: {rootdirectory: $REG_DIR}
  delete: {enabled: true}
http: {addr: "127.0.0.1:5000"}
YML
REG_PID=
start_registry() { # an empty registry
    [ -z "$REG_PID" ] || { kill "$REG_PID" 2>/dev/null || true; wait "$REG_PID" 2>/dev/null || true; }
    rm -rf "$REG_DIR"; mkdir -p "$REG_DIR"
    in_ns "$NS" "$REGISTRY_BIN" serve "$W/registry.yml" >>"$W/registry.log" 2>&1 &
    REG_PID=$!
    for _ in $(seq 100); do in_ns "$NS" curl -sf -o /dev/null http://127.0.0.1:5000/v2/ && return; sleep 0.1; done
    die "the registry did not start: $(tail -3 "$W/registry.log")"
}
on_exit '[ -z "$REG_PID" ] || kill $REG_PID 2>/dev/null || true'

secs() { python3 -c 'import time; print(time.monotonic())'; }
record() { # CASE RUN SECONDS [BYTES]
    printf '{"case":"%s","run":%s,"metrics":{"seconds":%s%s}}\n' "$1" "$2" "$3" "${4:+,\"bytes\":$4}" >>"$OUT"
    log "$1 round $2: $3 s"
}
REG=(--registry 127.0.0.1:5000 --organization bench)
SK=(in_ns "$NS" skopeo --insecure-policy)
for ((run = 0; run <= RUNS; run++)); do
    log "round $run of $RUNS$([ "$run" = 0 ] && echo ' (warm-up, not recorded)')"
    # lume push into an empty registry.
    start_registry
    t0=$(secs)
    lume_in "$NS" "$H" push src "vm:r$run" "${REG[@]}" >/dev/null
    t1=$(secs)
    pushed=$(du -sb "$REG_DIR" | cut -f1)
    # skopeo pull of the same image into a directory (its copy of lume's blobs).
    rm -rf "$W/dir"
    t2=$(secs)
    "${SK[@]}" copy -q --src-tls-verify=false "docker://127.0.0.1:5000/bench/vm:r$run" "dir:$W/dir"
    sync -f "$W/dir/manifest.json"
    t3=$(secs)
    # lume pull of the same image.
    t4=$(secs)
    lume_in "$NS" "$H" pull "vm:r$run" "dst$run" "${REG[@]}" >/dev/null
    t5=$(secs)
    cmp -s "$H/.lume/src/disk.img" "$H/.lume/dst$run/disk.img" || die "the pulled disk differs from the pushed one"
    alloc=$(($(stat -c %b "$H/.lume/dst$run/disk.img") * 512))
    [ "$alloc" -lt $((2 << 30)) ] || die "the pulled disk is not sparse: $alloc bytes allocated"
    # skopeo push of the same blobs into an empty registry.
    start_registry
    t6=$(secs)
    "${SK[@]}" copy -q --dest-tls-verify=false "dir:$W/dir" "docker://127.0.0.1:5000/bench/vm:r$run"
    t7=$(secs)
    lume_in "$NS" "$H" delete "dst$run" --force >/dev/null
    if [ "$run" -gt 0 ]; then
        r() { python3 -c "print(round($1 - $2, 3))"; }
        record lume-push "$run" "$(r "$t1" "$t0")" "$pushed"
        record skopeo-push "$run" "$(r "$t7" "$t6")"
        record lume-pull "$run" "$(r "$t5" "$t4")" "$alloc"
        record skopeo-pull "$run" "$(r "$t3" "$t2")"
    fi
done
log "done: results in $OUT"
