# Shared helpers of lume's benchmark scripts (bench/*.sh). Source it from a
# script; it sets strict mode, a cleanup trap that runs on every exit
# (success, failure, Ctrl-C), and the variables below.
#
# Network rules, as in the end-to-end tests (tests/common/mod.rs): everything
# runs in network namespaces created here under unique names and deleted on
# exit; only 192.0.2.0/24, 198.51.100.0/24 and 203.0.113.0/24 are used; the
# root namespace's interfaces, routes and firewall are never touched.

set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
LUME=${LUME:-$REPO/target/release/lume}
BT=(python3 "$BENCH_DIR/bt.py")
BENCH_RUNS=${BENCH_RUNS:-5}
RESULTS=${BENCH_RESULTS:-$REPO/target/bench}
export LUME_ACCEL=tcg
mkdir -p "$RESULTS"

# The LAN of the network benchmarks (same layout as common::Lan).
LAN_PEER=198.51.100.1
HOST_UPLINK_IP=198.51.100.2
GUEST_MEMORY=192MB

log() { echo "[$(date +%T)] ${BENCH_NAME:-bench}: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "run as root (sudo $0): the benchmarks create network namespaces"
}

# ---- cleanup ------------------------------------------------------------------
_namespaces=()
_cleanups=()
_paths=()

# on_exit CMD: run CMD (a shell string) on exit, last registered first.
on_exit() { _cleanups+=("$1"); }

_cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    # 1. Every process in our namespaces (lume supervisors, QEMU, dnsmasq,
    #    listeners): QEMU dies with its supervisor, taps with QEMU.
    local ns p i
    for ns in "${_namespaces[@]}"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    done
    # 2. Registered commands, newest first (unmounts, loop devices, ...).
    for ((i = ${#_cleanups[@]} - 1; i >= 0; i--)); do eval "${_cleanups[i]}" >/dev/null 2>&1; done
    # 3. The namespaces themselves (with lume's runtime directory of each)
    #    and temporary directories.
    for ns in "${_namespaces[@]}"; do
        if [ -e "/run/netns/$ns" ]; then
            rm -rf "/run/lume/net-$(stat -L -c %i "/run/netns/$ns")"
            ip netns del "$ns"
        fi
    done
    for p in "${_paths[@]}"; do rm -rf "$p"; done
    exit "$rc"
}
trap _cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# tmpdir VAR: a temporary directory removed on exit.
tmpdir() {
    local _td
    _td=$(mktemp -d /tmp/lume-bench.XXXXXX)
    chmod 0755 "$_td"
    _paths+=("$_td")
    printf -v "$1" %s "$_td"
}

# ---- namespaces -----------------------------------------------------------------
_seq=0
# ns_new VAR PREFIX: a new namespace named PREFIX<pid><seq> (at most 15
# characters, so the name also fits an interface), loopback up.
ns_new() {
    local name
    name=$(printf '%s%x%x' "$2" "$$" "$_seq")
    _seq=$((_seq + 1))
    [ ${#name} -le 15 ] || die "namespace name $name too long"
    ip netns add "$name"
    _namespaces+=("$name")
    ip netns exec "$name" ip link set lo up
    printf -v "$1" %s "$name"
}

# in_ns NS CMD...: runs CMD inside namespace NS.
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# ---- lume -----------------------------------------------------------------------------
# lume_home VAR: a temporary HOME for lume with the documentation subnets.
lume_home() {
    local h
    tmpdir h
    mkdir -p "$h/.config/lume"
    printf 'natSubnet: 203.0.113.0/24\nhostSubnet: 192.0.2.0/24\nuserSubnet: 198.51.100.0/24\nnatSubnet6: 2001:db8:64::/64\nhostSubnet6: 2001:db8:65::/64\n' \
        >"$h/.config/lume/config.yaml"
    printf -v "$1" %s "$h"
}

# lume_env HOME: the environment lume runs with (as in tests/common).
lume_env() {
    echo "HOME=$1" "XDG_CONFIG_HOME=$1/.config" "LUME_ACCEL=tcg"
}

# lume_in NS HOME ARGS...: lume inside namespace NS with that HOME.
# shellcheck disable=SC2046
lume_in() {
    local ns=$1 home=$2; shift 2
    ip netns exec "$ns" env -u LUME_API_TOKEN $(lume_env "$home") "$LUME" "$@"
}

# The test guest: GUEST_DIR with vmlinuz, initrd.img, cmdline.
guest_files() {
    GUEST_DIR=$("$REPO/tests/guest/build.sh" | tail -n1)
    GUEST_CMDLINE=$(cat "$GUEST_DIR/cmdline")
}

# lume_create NS HOME NAME NETWORK EXTRA_CMDLINE [ARGS...]: a VM booting the
# test guest directly (1 vCPU, 192 MB, 16 MB disk, as the tests do).
lume_create() {
    local ns=$1 home=$2 name=$3 net=$4 extra=$5; shift 5
    lume_in "$ns" "$home" create "$name" --cpu 1 --memory "$GUEST_MEMORY" --disk-size 16MB \
        --network "$net" --kernel "$GUEST_DIR/vmlinuz" --initrd "$GUEST_DIR/initrd.img" \
        --cmdline "$GUEST_CMDLINE${extra:+ $extra}" "$@" >/dev/null
}

# halt_kernel PATH: writes a guest kernel that only halts: a multiboot (v1)
# header with the address fields (flag 16), so QEMU's -kernel loads the
# file as it is at 1 MiB and jumps to the code after the header: cli; hlt;
# jmp back to the hlt. 44 bytes; its VM costs no CPU under TCG and never
# asks for an address (many.sh, concurrent.sh).
halt_kernel() {
    python3 - "$1" <<'PY'
import struct, sys
MAGIC, FLAGS, BASE = 0x1BADB002, 0x00010000, 0x100000
hdr = struct.pack("<8I", MAGIC, FLAGS, (-(MAGIC + FLAGS)) & 0xFFFFFFFF,
                  BASE, BASE, 0, 0, BASE + 32)
open(sys.argv[1], "wb").write(hdr + bytes([0xFA, 0xF4, 0xEB, 0xFD]))
PY
}

# wait_console FILE NEEDLE SECONDS
wait_console() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    die "timed out waiting for '$2' in $1"
}

# ---- the LAN ----------------------------------------------------------------------
# lan_setup TAG: as common::Lan. Sets LAN_NS (br0 198.51.100.1/24 with its
# own dnsmasq handing out .100-.150) and HOST_NS (up0 198.51.100.2/24,
# default route via .1), where lume runs.
lan_setup() {
    ns_new LAN_NS "${1}l"
    ns_new HOST_NS "${1}h"
    in_ns "$LAN_NS" sh -c 'ip link add br0 type bridge && ip addr add 198.51.100.1/24 dev br0 && ip link set br0 up'
    lan_attach "$HOST_NS" "$HOST_UPLINK_IP"
    local d
    tmpdir d
    in_ns "$LAN_NS" dnsmasq --conf-file=/dev/null --bind-interfaces --interface=br0 --except-interface=lo \
        --dhcp-range=198.51.100.100,198.51.100.150,255.255.255.0,10m --dhcp-option=3,198.51.100.1 \
        --dhcp-leasefile="$d/leases" --pid-file="$d/pid" --port=0 --dhcp-authoritative
}

# lan_attach NS IP: connects namespace NS to the LAN with uplink up0 at IP/24.
_port=0
lan_attach() {
    local port="lanport$_port"
    _port=$((_port + 1))
    in_ns "$1" sh -c "ip link add up0 type veth peer name $port netns $LAN_NS && \
        ip addr add $2/24 dev up0 && ip link set up0 up && ip route add default via $LAN_PEER"
    in_ns "$LAN_NS" sh -c "ip link set $port master br0 && ip link set $port up"
}

# results_file NAME: the JSON-lines file a benchmark appends its results to.
results_file() { echo "$RESULTS/$1.jsonl"; }
