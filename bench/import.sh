#!/usr/bin/env bash
# Benchmark 6: `lume create --image http://…` of a 2 GiB image from a local
# HTTP server in a network namespace, against `curl -o` + `qemu-img convert`
# of the same file, in the same rounds.
#
# The image: 2 GiB of which 1.5 GiB are data (random, in 64 MiB pieces with
# 64 MiB holes between some) — a disk-like mix of data and zeros. Served as
# raw (2 GiB) and as qcow2 (the same disk, ~1.5 GiB file) by Python's
# http.server (bind without reverse DNS) on 127.0.0.1 inside the namespace.
#   lume raw:     streams into the sparse disk (one pass, no temporary file)
#   lume qcow2:   downloads to a private temporary file, `qemu-img convert`
#   curl raw:     curl -o image; qemu-img convert -f raw -O raw image disk
#   curl qcow2:   curl -o image; qemu-img convert -f qcow2 -O raw image disk
# Every disk is fsynced before the clock stops (lume fsyncs its own; the
# baseline gets a `sync -f` on its file). IMPORT_RUNS rounds (default 3)
# after a warm-up; the median is reported.
BENCH_NAME=import
source "$(dirname "$0")/lib.sh"
need_root
OUT=$(results_file import)
: >"$OUT"
RUNS=${IMPORT_RUNS:-3}

lume_home H
tmpdir W
ns_new NS limp
log "making the 2 GiB image"
python3 - "$W/disk.raw" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
chunk = 64 << 20
piece = os.urandom(chunk)
for i in range(32):  # 32 x 64 MiB = 2 GiB; every fourth piece is a hole
    if i % 4 != 3:
        os.pwrite(fd, piece, i * chunk)
os.ftruncate(fd, 2 << 30)
os.fsync(fd)
PY
qemu-img convert -f raw -O qcow2 "$W/disk.raw" "$W/disk.qcow2"
log "qcow2 file: $(($(stat -c %s "$W/disk.qcow2") >> 20)) MiB"

in_ns "$NS" python3 - "$W" >"$W/server.log" 2>&1 <<'PY' &
import functools, http.server, socketserver, sys
class H(http.server.ThreadingHTTPServer):
    def server_bind(self):  # no reverse DNS lookup (see STYLE.md)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
H(("127.0.0.1", 8765), handler).serve_forever()
PY
SERVER=$!
on_exit "kill $SERVER"
for _ in $(seq 50); do in_ns "$NS" curl -sfo /dev/null http://127.0.0.1:8765/disk.qcow2 -r 0-0 && break; sleep 0.1; done

secs() { python3 -c 'import time; print(time.monotonic())'; }
record() { # CASE RUN SECONDS
    printf '{"case":"%s","run":%s,"metrics":{"seconds":%s}}\n' "$1" "$2" "$3" >>"$OUT"
    log "$1 round $2: $3 s"
}
for ((run = 0; run <= RUNS; run++)); do
    log "round $run of $RUNS$([ "$run" = 0 ] && echo ' (warm-up, not recorded)')"
    for fmt in raw qcow2; do
        t0=$(secs)
        lume_in "$NS" "$H" create "imp$run$fmt" --network none --disk-size 2GB \
            --image "http://127.0.0.1:8765/disk.$fmt" >/dev/null
        t1=$(secs)
        in_ns "$NS" curl -sf -o "$W/dl.$fmt" "http://127.0.0.1:8765/disk.$fmt"
        qemu-img convert -f "$fmt" -O raw "$W/dl.$fmt" "$W/out.raw"
        sync -f "$W/out.raw"
        t2=$(secs)
        cmp -s "$W/out.raw" "$H/.lume/imp$run$fmt/disk.img" || die "lume's disk differs from qemu-img's"
        rm -f "$W/dl.$fmt" "$W/out.raw"
        lume_in "$NS" "$H" delete "imp$run$fmt" --force >/dev/null
        if [ "$run" -gt 0 ]; then
            record "lume-$fmt" "$run" "$(python3 -c "print(round($t1 - $t0, 3))")"
            record "curl-$fmt" "$run" "$(python3 -c "print(round($t2 - $t1, 3))")"
        fi
    done
done
log "done: results in $OUT"
