#!/usr/bin/env bash
# Benchmark 6: a real Debian 12 cloud VM from start to a working `ssh`.
#
# lume: from `lume run VM --detach` to the first successful `lume ssh VM true`
#       (a fresh VM each round: first boot, cloud-init provisioning).
# Bare QEMU: the same image (converted to raw the way lume imports it), the
#       same seed (a copy of that round's lume VM's cidata.img, so the same
#       MAC, key, instance id and network-config), the same devices as lume (guest agent channel, balloon) and
#       accelerator (TCG, 2 vCPUs, 1 GB), a tap on a bridge with a dnsmasq
#       configured like lume's NAT, from the first setup command to the first
#       successful `ssh -i <lume's key> lume@ADDRESS true`.
# Both poll every 0.2 s. The cases alternate (order rotated each round);
# round 0 is a warm-up (page cache) and is not recorded.
BENCH_NAME=ssh
source "$(dirname "$0")/lib.sh"
need_root
IMAGE=$("$REPO/tests/debian/build.sh" | tail -n1)
OUT=$(results_file ssh)
: >"$OUT"

lan_setup sh
ns_new BARE_NS sx
lan_attach "$BARE_NS" 198.51.100.3
lume_home H
tmpdir W

in_ns "$BARE_NS" sh -c 'ip link add sbr0 type bridge && ip addr add 203.0.113.1/24 dev sbr0 && ip link set sbr0 up'

SSH_OPTS=(-F none -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o ConnectTimeout=20
          -o LogLevel=ERROR -o IdentitiesOnly=yes)

lume_case() { # RUN
    lume_in "$HOST_NS" "$H" delete sv --force >/dev/null 2>&1 || true
    lume_in "$HOST_NS" "$H" create sv --cpu 2 --memory 1GB --disk-size 4GB --network nat \
        --image "$IMAGE" >/dev/null
    # shellcheck disable=SC2046
    "${BT[@]}" time1 --record "$([ "$1" -gt 0 ] && echo "$OUT")" --case lume-nat --run "$1" -- \
        ip netns exec "$HOST_NS" env -u LUME_API_TOKEN $(lume_env "$H") sh -c \
        "'$LUME' run sv --detach >/dev/null && until '$LUME' ssh sv -t 20 true 2>/dev/null; do sleep 0.2; done" \
        >/dev/null
    # The seed and MAC of this round, for the bare case.
    cp "$H/.lume/sv/cidata.img" "$W/cidata.img"
    sed -n 's/.*"macAddress": "\(.*\)".*/\1/p' "$H/.lume/sv/config.json" >"$W/mac"
    lume_in "$HOST_NS" "$H" stop sv >/dev/null
}

bare_case() { # RUN
    [ -s "$W/mac" ] || return 0
    local mac
    mac=$(cat "$W/mac")
    qemu-img convert -q -f qcow2 -O raw "$IMAGE" "$W/disk.img"
    qemu-img resize -q -f raw "$W/disk.img" 4G
    rm -f "$W/known_hosts" "$W/qemu.pid"
    cat >"$W/dnsmasq.conf" <<EOF
interface=sbr0
bind-interfaces
except-interface=lo
listen-address=203.0.113.1
dhcp-range=203.0.113.2,203.0.113.254,255.255.255.0,3600
dhcp-host=$mac,203.0.113.2
dhcp-leasefile=$W/leases
pid-file=$W/dnsmasq.pid
dhcp-authoritative
dhcp-rapid-commit
no-hosts
port=0
EOF
    : >"$W/leases"
    "${BT[@]}" time1 --record "$([ "$1" -gt 0 ] && echo "$OUT")" --case bare-nat --run "$1" -- \
        ip netns exec "$BARE_NS" sh -c "
            dnsmasq --conf-file=$W/dnsmasq.conf &&
            ip tuntap add dev stap0 mode tap vnet_hdr && ip link set stap0 master sbr0 && ip link set stap0 up || exit 1
            qemu-system-x86_64 -name guest=bare -machine q35 -accel tcg -cpu max -smp 2 -m 1024M \
              -nodefaults -no-user-config -display none -pidfile $W/qemu.pid \
              -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
              -chardev file,id=serial0,path=$W/console.log -serial chardev:serial0 \
              -device virtio-rng-pci -drive file=$W/disk.img,format=raw,if=virtio,discard=unmap \
              -chardev socket,id=qga0,path=$W/qga.sock,server=on,wait=off \
              -device virtio-serial-pci,id=vser0 \
              -device virtserialport,bus=vser0.0,chardev=qga0,id=qga-port,name=org.qemu.guest_agent.0 \
              -device virtio-balloon-pci,id=balloon0,free-page-reporting=on \
              -drive file=$W/cidata.img,format=raw,if=virtio,readonly=on \
              -netdev tap,id=net0,ifname=stap0,script=no,downscript=no,vhost=off \
              -device virtio-net-pci,netdev=net0,mac=$mac </dev/null >$W/qemu.log 2>&1 &
            until ssh ${SSH_OPTS[*]} -o UserKnownHostsFile=$W/known_hosts -i $H/.lume/.ssh/id_ed25519 \
                lume@203.0.113.2 true 2>/dev/null; do sleep 0.2; done" >/dev/null
    # (QEMU runs in the background of the timed shell, as lume's runs in its supervisor.)
    kill "$(cat "$W/qemu.pid")" 2>/dev/null || true
    while kill -0 "$(cat "$W/qemu.pid" 2>/dev/null)" 2>/dev/null; do sleep 0.05; done
    kill "$(cat "$W/dnsmasq.pid")" 2>/dev/null || true
    in_ns "$BARE_NS" ip link del stap0
}

# The bare case needs a seed from a lume round first: lume always goes first
# in round 0; afterwards the order alternates.
for ((run = 0; run <= BENCH_RUNS; run++)); do
    log "round $run of $BENCH_RUNS$([ "$run" = 0 ] && echo ' (warm-up, not recorded)')"
    if ((run % 2 == 0)); then lume_case "$run"; bare_case "$run"
    else bare_case "$run"; lume_case "$run"; fi
done
log "done: $OUT"
