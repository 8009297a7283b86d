#!/usr/bin/env bash
# Build a bootable Debian 12 (bookworm) cloud disk from Debian packages, like
# Debian's "genericcloud" image: systemd, cloud-init, openssh-server, the cloud
# kernel, ifupdown + isc-dhcp-client (what bookworm's cloud images use), and
# syslinux on an MBR disk. Nothing lume-specific is inside: no user, no key, no
# lume configuration. Everything lume needs reaches the guest through cloud-init
# (a NoCloud seed), as with an image downloaded from cloud.debian.org.
#
# Usage: tests/debian/build.sh [OUTDIR]
#   OUTDIR defaults to ${LUME_DEBIAN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lume/debian-12}
#   Env: LUME_DEBIAN_MIRROR (default http://deb.debian.org/debian)
#
# Writes OUTDIR/debian-12.qcow2 and OUTDIR/stamp. Progress goes to stderr; the
# only stdout line is the absolute path of the qcow2. The build is skipped
# when the image exists and its stamp (a hash of this script) matches. The
# downloaded .deb files are kept in OUTDIR/apt-cache, so a rebuild downloads
# only the package indexes and what changed.
#
# Layout (no loop device, no mount: the file systems are built from a
# directory with mkfs.ext4 -d and mtools):
#   MBR (syslinux mbr.bin)
#   partition 1: FAT32 "BOOT", 128 MiB, active: syslinux, kernel, initrd
#   partition 2: ext4 root (the last partition, so cloud-init's growpart can
#                grow it when lume grows the disk)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:-${LUME_DEBIAN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lume/debian-12}}
MIRROR=${LUME_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
DISK_MIB=2048
BOOT_MIB=128
PACKAGES=(systemd systemd-sysv udev dbus cloud-init cloud-guest-utils openssh-server sudo
          linux-image-cloud-amd64 initramfs-tools ifupdown isc-dhcp-client iproute2
          netbase e2fsprogs procps less ca-certificates locales zstd)
CMDLINE_EXTRA="console=tty0 console=ttyS0,115200 consoleblank=0"

T0=$(date +%s)
log() { echo "debian/build.sh: [$(($(date +%s) - T0)) s] $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap installs packages into a directory as root)"
[ "$(dpkg --print-architecture)" = amd64 ] || die "only amd64 hosts are supported"
for t in mmdebstrap mkfs.ext4 mkfs.vfat mcopy mmd syslinux sfdisk qemu-img; do
    command -v "$t" >/dev/null || die "missing $t: run scripts/install-deps.sh"
done
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin
SYSLINUX_MODS=/usr/lib/syslinux/modules/bios
[ -f "$MBR_BIN" ] || die "missing $MBR_BIN: apt-get install syslinux-common"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
IMAGE=$OUT/debian-12.qcow2

exec 9>"$OUT/.lock"
flock 9

stamp=$( { sha256sum "$HERE/build.sh" | awk '{ print $1 }'; echo "$MIRROR"; } | sha256sum | awk '{ print $1 }')
if [ -s "$IMAGE" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$stamp" ]; then
    log "up to date ($IMAGE)"
    echo "$IMAGE"
    exit 0
fi

start=$(date +%s)
tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/lume-debian.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
cache=$OUT/apt-cache
mkdir -p "$cache"

# --- root file system ------------------------------------------------------------
log "mmdebstrap $SUITE (${#PACKAGES[@]} packages; cached debs in $cache)"
include=$(IFS=,; echo "${PACKAGES[*]}")
mmdebstrap --mode=root --variant=minbase --include="$include" \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --skip=essential/unlink --hook-dir=/usr/share/mmdebstrap/hooks/eatmydata \
    --setup-hook="mkdir -p \"\$1/var/cache/apt/archives\"; cp -a $cache/. \"\$1/var/cache/apt/archives/\" 2>/dev/null || true" \
    --customize-hook="find \"\$1/var/cache/apt/archives\" -maxdepth 1 -name '*.deb' -exec cp -a -t $cache {} +" \
    --customize-hook="rm -f \"\$1\"/var/cache/apt/archives/*.deb" \
    "$SUITE" "$root" "$MIRROR" >&2

# --- what a cloud image has and does not have ---------------------------------------
root_uuid=$(cat /proc/sys/kernel/random/uuid)
boot_serial=$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
boot_uuid="${boot_serial:0:4}-${boot_serial:4:4}"
boot_uuid=${boot_uuid^^}
cat >"$root/etc/fstab" <<EOF
UUID=$root_uuid / ext4 rw,discard,errors=remount-ro 0 1
UUID=$boot_uuid /boot/efi vfat defaults,nofail 0 2
EOF
mkdir -p "$root/boot/efi"
echo localhost >"$root/etc/hostname"
cat >"$root/etc/hosts" <<EOF
127.0.0.1 localhost
::1 localhost ip6-localhost ip6-loopback
EOF
cat >"$root/etc/network/interfaces" <<EOF
# Interfaces are configured by cloud-init (/etc/network/interfaces.d/50-cloud-init).
source /etc/network/interfaces.d/*
auto lo
iface lo inet loopback
EOF
# cloud-init's locale module sets en_US.UTF-8 unless it is already the system
# locale: generate it here (as Debian's images ship it) instead of at first boot.
echo "en_US.UTF-8 UTF-8" >"$root/etc/locale.gen"
chroot "$root" locale-gen >&2
echo "LANG=en_US.UTF-8" >"$root/etc/default/locale"
# A cloud image boots without a console password and generates its identity on
# first boot: no SSH host keys, no machine id, no random seed.
rm -f "$root"/etc/ssh/ssh_host_*
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root/var/lib/systemd/random-seed"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
# The kernel and initramfs go to the boot partition; cloud-init's growpart grows the root one.
kernel=$(cd "$root/boot" && ls vmlinuz-* | sort -V | tail -n1)
initrd=initrd.img-${kernel#vmlinuz-}
[ -f "$root/boot/$initrd" ] || die "no $initrd: initramfs-tools did not run"

# --- disk ------------------------------------------------------------------------------
disk=$tmp/disk.raw
truncate -s "${DISK_MIB}M" "$disk"
sfdisk --quiet "$disk" <<EOF
label: dos
start=1MiB, size=${BOOT_MIB}MiB, type=c, bootable
start=$((1 + BOOT_MIB))MiB, type=83
EOF
boot_off=$((1024 * 1024))
root_off=$(((1 + BOOT_MIB) * 1024 * 1024))
root_size=$(((DISK_MIB - 1 - BOOT_MIB) * 1024 * 1024))
dd if="$MBR_BIN" of="$disk" bs=440 count=1 conv=notrunc status=none

log "ext4 root from the tree"
truncate -s "$root_size" "$tmp/root.ext4"
mkfs.ext4 -q -F -L debian-root -U "$root_uuid" -d "$root" "$tmp/root.ext4"
dd if="$tmp/root.ext4" of="$disk" bs=1M seek=$((1 + BOOT_MIB)) conv=notrunc,sparse status=none
rm -f "$tmp/root.ext4"

log "boot partition (syslinux)"
truncate -s "$((BOOT_MIB * 1024 * 1024))" "$tmp/boot.vfat"
mkfs.vfat -F 32 -n BOOT -i "$boot_serial" "$tmp/boot.vfat" >/dev/null
cat >"$tmp/syslinux.cfg" <<EOF
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND root=UUID=$root_uuid ro $CMDLINE_EXTRA
EOF
export MTOOLS_SKIP_CHECK=1
mcopy -i "$tmp/boot.vfat" "$root/boot/$kernel" ::/vmlinuz
mcopy -i "$tmp/boot.vfat" "$root/boot/$initrd" ::/initrd.img
mmd -i "$tmp/boot.vfat" ::/syslinux
mcopy -i "$tmp/boot.vfat" "$tmp/syslinux.cfg" ::/syslinux/syslinux.cfg
for m in ldlinux.c32; do mcopy -i "$tmp/boot.vfat" "$SYSLINUX_MODS/$m" ::/syslinux/; done
syslinux --install --directory /syslinux "$tmp/boot.vfat"
dd if="$tmp/boot.vfat" of="$disk" bs=1M seek=1 conv=notrunc status=none
rm -f "$tmp/boot.vfat"
: "$boot_off $root_off"

log "qcow2"
qemu-img convert -q -f raw -O qcow2 "$disk" "$tmp/out.qcow2"
sync -f "$tmp/out.qcow2"
mv -f "$tmp/out.qcow2" "$IMAGE"
cat >"$OUT/info" <<EOF
kernel=$kernel
packages=$(chroot "$root" dpkg-query -W -f='${Package}=${Version} ' "${PACKAGES[@]}" 2>/dev/null)
EOF
echo "$stamp" >"$OUT/stamp.tmp"
sync -f "$OUT/stamp.tmp"
mv -f "$OUT/stamp.tmp" "$OUT/stamp"
log "built $IMAGE ($(du -h --apparent-size "$IMAGE" | cut -f1)) in $(($(date +%s) - start)) s"
echo "$IMAGE"
