#!/usr/bin/env bash
# Build the tiny lume test guest (kernel + busybox initramfs) from Debian
# packages only. See tests/guest/README.md.
#
# Usage: tests/guest/build.sh [OUTDIR]
#   OUTDIR defaults to ${LUME_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lume/test-guest}
#   Env: LUME_GUEST_KERNEL_PKG=linux-image-<abi>-cloud-amd64 pins the kernel package.
#
# Writes OUTDIR/{vmlinuz,initrd.img,cmdline,stamp}. Progress goes to stderr;
# the only stdout line is the absolute OUTDIR path.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:-${LUME_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lume/test-guest}}
CMDLINE="console=ttyS0 panic=-1 quiet"
# Load order matters (insmod does no dependency resolution).
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
         failover net_failover virtio_net evdev button virtio_balloon virtio_console
         virtio_blk)
INPUTS=(build.sh init udhcpc.script acpi-power.sh)

log() { echo "build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Serialise concurrent builds into the same OUTDIR (parallel tests).
exec 9>"$OUT/.lock"
flock 9

[ "$(dpkg --print-architecture)" = amd64 ] || die "only amd64 hosts are supported"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    else die "need root to run: $* (or install it yourself)"; fi
}

apt_updated=
apt_update() {
    if [ -z "$apt_updated" ]; then
        log "apt-get update"
        as_root apt-get update -q >&2
        apt_updated=1
    fi
}

# --- resolve the kernel package (never installed on the host) -------------
candidate() { apt-cache show --no-all-versions "$1" 2>/dev/null | awk '/^Version:/ { print $2; exit }'; }
# The metapackage pins its image exactly: "Depends: linux-image-<abi>-cloud-amd64 (= <ver>)".
resolve_kernel() {
    apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*-cloud-amd64\)\( (= \([^)]*\))\)\{0,1\}.*/\1 \3/p' |
        head -n1
}
kpkg=${LUME_GUEST_KERNEL_PKG:-}
kver=
if [ -z "$kpkg" ]; then
    read -r kpkg kver <<<"$(resolve_kernel || true)" || true
    if [ -z "$kpkg" ]; then apt_update; read -r kpkg kver <<<"$(resolve_kernel || true)" || true; fi
    [ -n "$kpkg" ] || die "cannot resolve the dependency of linux-image-cloud-amd64"
fi
[ -n "$kver" ] || kver=$(candidate "$kpkg" || true)
if [ -z "$kver" ]; then apt_update; kver=$(candidate "$kpkg" || true); fi
[ -n "$kver" ] || die "no candidate version for $kpkg"

# --- busybox: the installed busybox-static, else download the package --------
bb_installed=
if [ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" = "install ok installed" ] &&
   [ -x /bin/busybox ]; then
    bb_installed=1
    bbver=$(dpkg-query -W -f='${Version}' busybox-static)
else
    # Not installed on purpose: busybox-static conflicts with the "busybox"
    # package that many Debian systems have.
    bbver=$(candidate busybox-static || true)
    if [ -z "$bbver" ]; then apt_update; bbver=$(candidate busybox-static || true); fi
    [ -n "$bbver" ] || die "no candidate version for busybox-static"
fi

# --- cache check -------------------------------------------------------------
stamp=$( {
    for f in "${INPUTS[@]}"; do sha256sum "$HERE/$f"; done | awk '{ print $1 }'
    echo "kernel $kpkg $kver"
    echo "busybox-static $bbver"
    echo "cmdline $CMDLINE"
} | sha256sum | awk '{ print $1 }')
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] && [ -s "$OUT/cmdline" ] &&
   [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$stamp" ]; then
    log "up to date ($kpkg $kver)"
    echo "$OUT"
    exit 0
fi

# --- tools ---------------------------------------------------------------------
if ! command -v cpio >/dev/null; then
    log "installing cpio"
    if ! apt-cache show --no-all-versions cpio >/dev/null 2>&1; then apt_update; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends cpio >&2
fi
for t in dpkg-deb gzip sha256sum; do command -v "$t" >/dev/null || die "missing $t"; done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/lume-guest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/dl"
# apt drops privileges to _apt for downloads; let it reach and write there.
chmod 0755 "$tmp"
chmod 0777 "$tmp/dl"

fetch() { # fetch PKG VERSION -> extracted into $tmp/x-PKG
    log "downloading $1=$2"
    (cd "$tmp/dl" && apt-get download -q "$1=$2" >&2)
    mkdir "$tmp/x-$1"
    dpkg-deb -x "$tmp/dl/$1_"*.deb "$tmp/x-$1"
}

fetch "$kpkg" "$kver"
kx=$tmp/x-$kpkg
abi=${kpkg#linux-image-}
vmlinuz=$kx/boot/vmlinuz-$abi
[ -f "$vmlinuz" ] || die "no $vmlinuz in $kpkg"
moddir=
for d in "$kx"/lib/modules/*/ "$kx"/usr/lib/modules/*/; do
    if [ -d "$d/kernel" ]; then moddir=${d%/}; break; fi
done
[ -n "$moddir" ] || die "no modules in $kpkg"

if [ -n "$bb_installed" ]; then
    busybox=/bin/busybox
else
    fetch busybox-static "$bbver"
    busybox=$tmp/x-busybox-static/bin/busybox
    [ -x "$busybox" ] || busybox=$tmp/x-busybox-static/usr/bin/busybox
fi
[ -x "$busybox" ] || die "no busybox binary"

# --- initramfs tree ------------------------------------------------------------
root=$tmp/root
mkdir -p "$root"/{bin,dev,proc,sys,run,tmp,etc/acpi/PWRF,lib/modules,www}
chmod 1777 "$root/tmp"
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
ln -s bin "$root/sbin"
mkdir -p "$root/usr"
ln -s ../bin "$root/usr/bin"
ln -s ../bin "$root/usr/sbin"
install -m 0755 "$HERE/init" "$root/init"
install -m 0755 "$HERE/udhcpc.script" "$root/etc/udhcpc.script"
install -m 0755 "$HERE/acpi-power.sh" "$root/etc/acpi/PWRF/00000080"

# Modules: skip built-ins, decompress so busybox insmod can load them.
builtin_names=$(sed -e 's#.*/##' -e 's#\.ko.*$##' -e 's#-#_#g' "$moddir/modules.builtin")
: >"$root/lib/modules/order"
for m in "${MODULES[@]}"; do
    if grep -qx "$m" <<<"$builtin_names"; then
        log "module $m: built-in"
        continue
    fi
    f=$(find "$moddir/kernel" \( -name "$m.ko*" -o -name "${m//_/-}.ko*" \) -print -quit)
    [ -n "$f" ] || die "module $m is neither built-in nor shipped in $kpkg"
    case "$f" in
        *.ko) cp "$f" "$root/lib/modules/$m.ko" ;;
        *.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" 2>/dev/null ||
                     "$busybox" xzcat "$f" >"$root/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$root/lib/modules/$m.ko" ;;
        *.ko.zst) command -v zstd >/dev/null || die "$f needs zstd (apt-get install zstd)"
                  zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
        *) die "unknown module file $f" ;;
    esac
    echo "$m" >>"$root/lib/modules/order"
    log "module $m: ${f#"$moddir"}"
done

# --- pack (deterministic: fixed mtimes, sorted, root-owned) --------------------
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9 -n >"$tmp/initrd.img"

install -m 0644 "$vmlinuz" "$tmp/vmlinuz"
echo "$CMDLINE" >"$tmp/cmdline"
for f in vmlinuz initrd.img cmdline; do mv -f "$tmp/$f" "$OUT/$f"; done
cat >"$OUT/info" <<EOF
kernel_package=$kpkg
kernel_package_version=$kver
kernel_release=${moddir##*/}
busybox_static_version=$bbver
modules=$(tr '\n' ' ' <"$root/lib/modules/order")
EOF
echo "$stamp" >"$OUT/stamp"
log "built $OUT: $kpkg $kver, initrd $(stat -c %s "$OUT/initrd.img") bytes"
echo "$OUT"
