#!/usr/bin/env bash
# Benchmark 1: time to a usable address.
#
# lume: from `lume run VM --detach` to the first `lume get VM -f json` that
# reports ipAddress (polled every 20 ms), and, like for like, to the guest's
# "LUME-GUEST: lease eth0" line in its console (polled every 20 ms).
# Bare QEMU: the same guest, kernel, initrd, accelerator (TCG) and network
# device, started by hand, from the first setup command to the lease line in
# the console:
#   nat     lume: `--network nat` (lume's bridge, dnsmasq, nftables)
#           bare: a tap on a bridge with a dnsmasq configured like lume's
#   bridged lume: `--network bridged:up0` (a tap + macvlan on the uplink)
#           bare: a macvtap on the uplink, opened by hand and passed as fd 3
# Each bare case twice: `bare-*` with the fewest devices (no display, no
# monitor), and `bare-*-full` with every device and option lume's own
# command line has (src/hypervisor/qemu.rs: a VGA display behind VNC on a
# Unix socket, two QMP sockets, the guest agent's virtio-serial port, the
# balloon, the sandbox): lume against `bare-*-full` is what lume's
# networking and supervision cost, `bare-*-full` against `bare-*` what the
# devices cost (SeaBIOS runs the VGA BIOS under TCG, for one).
# A third lume case, lume-nat-noget, watches only the console (no `lume get`
# polling), to show what the polling itself costs the guest on a busy host.
# The cases alternate within each round (the order rotates every round);
# round 0 is a warm-up (first DHCP grants, page cache) and is not recorded.
#
# Layout: one LAN namespace (br0 198.51.100.1/24 with its own dnsmasq); lume
# runs in one host namespace (up0 198.51.100.2), bare QEMU in another
# (up0 198.51.100.3), both plugged into the same LAN.
BENCH_NAME=boot
source "$(dirname "$0")/lib.sh"
need_root
guest_files
OUT=$(results_file boot)
: >"$OUT"

lan_setup bb
ns_new BARE_NS bx
lan_attach "$BARE_NS" 198.51.100.3
lume_home H
tmpdir W
lume_create "$HOST_NS" "$H" bnat nat ""
lume_create "$HOST_NS" "$H" bbr bridged:up0 ""

# ---- bare QEMU's networks -----------------------------------------------------------
MAC_NAT=02:00:00:b0:00:01
MAC_BR=02:00:00:b0:00:02
# The NAT baseline: bridge + dnsmasq with lume's settings (see
# src/network/dnsmasq.rs), the guest's address reserved as lume does.
in_ns "$BARE_NS" sh -c 'ip link add bbr0 type bridge && ip addr add 203.0.113.1/24 dev bbr0 && ip link set bbr0 up'
mkdir -p "$W/dnsmasq"
cat >"$W/dnsmasq/dnsmasq.conf" <<EOF
interface=bbr0
bind-interfaces
except-interface=lo
listen-address=203.0.113.1
dhcp-range=203.0.113.2,203.0.113.254,255.255.255.0,3600
dhcp-host=$MAC_NAT,203.0.113.2
dhcp-leasefile=$W/dnsmasq/leases
pid-file=$W/dnsmasq/pid
dhcp-authoritative
dhcp-rapid-commit
no-hosts
EOF
in_ns "$BARE_NS" dnsmasq --conf-file="$W/dnsmasq/dnsmasq.conf"

truncate -s 16M "$W/disk.img"
# lume's QEMU command line (src/hypervisor/qemu.rs) minus its display, QMP,
# guest agent port, balloon and sandbox; with FULL=1, with them (sockets in
# $W/q, which each run empties).
qemu_args() { # CONSOLE NETDEV MAC
    local extra=""
    if [ "${FULL:-}" = 1 ]; then
        extra="-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
            -vnc unix:$W/q/vnc.sock,password=on -device VGA,xres=1024,yres=768 \
            -qmp unix:$W/q/qmp.sock,server=on,wait=off -qmp unix:$W/q/events.sock,server=on,wait=off \
            -chardev socket,id=qga0,path=$W/q/qga.sock,server=on,wait=off \
            -device virtio-serial-pci,id=vser0 \
            -device virtserialport,bus=vser0.0,chardev=qga0,id=qga-port,name=org.qemu.guest_agent.0 \
            -device virtio-balloon-pci,id=balloon0,free-page-reporting=on"
    fi
    # shellcheck disable=SC2086
    echo qemu-system-x86_64 -name guest=bare -machine q35 -accel tcg -cpu max -smp 1 -m 192M \
        -nodefaults -no-user-config -display none $extra \
        -chardev "file,id=serial0,path=$1" -serial chardev:serial0 \
        -device virtio-rng-pci -drive "file=$W/disk.img,format=raw,if=virtio,discard=unmap" \
        -kernel "$GUEST_DIR/vmlinuz" -initrd "$GUEST_DIR/initrd.img" \
        -netdev "$2" -device "virtio-net-pci,netdev=net0,mac=$3"
}

stop_bare() {
    local pid
    pid=$(cat "$W/qemu.pid")
    kill "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
}

# ---- one run of each case --------------------------------------------------------------
rec() { [ "$1" -gt 0 ] && echo "--record=$OUT" || echo "--record="; }

lume_case() { # RUN CASE VM [--no-get]
    # shellcheck disable=SC2046
    in_ns "$HOST_NS" env $(lume_env "$H") "${BT[@]}" lume-boot "$(rec "$1")" --case "$2" --run "$1" \
        --lume "$LUME" --vm "$3" --console "$H/.lume/$3/console.log" ${4:-} >/dev/null
    lume_in "$HOST_NS" "$H" stop "$3" >/dev/null
}

fresh_sockets() { rm -rf "$W/q" && mkdir -m 700 "$W/q"; }

bare_nat() { # RUN [CASE]
    fresh_sockets
    # shellcheck disable=SC2046
    in_ns "$BARE_NS" "${BT[@]}" bare-boot "$(rec "$1")" --case "${2:-bare-nat}" --run "$1" \
        --console "$W/console-nat.log" --pidfile "$W/qemu.pid" --qemu-log "$W/qemu.log" \
        --setup 'ip tuntap add dev btap0 mode tap vnet_hdr && ip link set btap0 master bbr0 && ip link set btap0 up' \
        -- $(qemu_args "$W/console-nat.log" tap,id=net0,ifname=btap0,script=no,downscript=no "$MAC_NAT") \
        -append "$GUEST_CMDLINE" >/dev/null
    stop_bare
    in_ns "$BARE_NS" ip link del btap0
}

bare_bridged() { # RUN [CASE]
    local node=/dev/lume-bench-bmv-$$
    fresh_sockets
    # shellcheck disable=SC2046
    in_ns "$BARE_NS" "${BT[@]}" bare-boot "$(rec "$1")" --case "${2:-bare-bridged}" --run "$1" \
        --console "$W/console-br.log" --pidfile "$W/qemu.pid" --qemu-log "$W/qemu.log" \
        --setup "ip link add link up0 name bmv0 address $MAC_BR type macvtap mode bridge && \
                 ip link set bmv0 up && \
                 mknod $node c \$(cat /sys/class/net/bmv0/macvtap/tap*/dev | tr : ' ')" \
        --fd3 "$node" \
        -- $(qemu_args "$W/console-br.log" tap,id=net0,fd=3 "$MAC_BR") \
        -append "$GUEST_CMDLINE" >/dev/null
    rm -f "$node"
    stop_bare
    in_ns "$BARE_NS" ip link del bmv0
}
on_exit "rm -f /dev/lume-bench-bmv-$$"

one() { # RUN CASE
    case $2 in
        lume-nat) lume_case "$1" lume-nat bnat ;;
        lume-nat-noget) lume_case "$1" lume-nat-noget bnat --no-get ;;
        bare-nat) bare_nat "$1" ;;
        lume-bridged) lume_case "$1" lume-bridged bbr ;;
        bare-bridged) bare_bridged "$1" ;;
        bare-nat-full) FULL=1 bare_nat "$1" bare-nat-full ;;
        bare-bridged-full) FULL=1 bare_bridged "$1" bare-bridged-full ;;
    esac
}

CASES=(lume-nat bare-nat lume-nat-noget lume-bridged bare-bridged bare-nat-full bare-bridged-full)
for ((run = 0; run <= BENCH_RUNS; run++)); do
    log "round $run of $BENCH_RUNS$([ "$run" = 0 ] && echo ' (warm-up, not recorded)')"
    # Rotate the order so no case always follows the same one.
    for ((k = 0; k < ${#CASES[@]}; k++)); do
        one "$run" "${CASES[$(((k + run) % ${#CASES[@]}))]}"
    done
done
log "done: $OUT"
