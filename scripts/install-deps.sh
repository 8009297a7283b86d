#!/usr/bin/env bash
# Installs what lume and its tests need on Debian 12 (as root), only when
# something is missing: QEMU, qemu-img, passt (user mode), dnsmasq, nftables, iproute2, the
# packages the test guest is built from, qemu-guest-agent (its client is tested against the real agent), and iptables (iptables-nft: the tests load Docker's and
# ufw's rule sets with it; lume itself uses only nft), curl and python3 (test clients;
# python3-venv: tests/clients/build.sh installs lume's Python client pylume and the MCP SDK from PyPI),
# openssl (a TLS server with an untrusted certificate in the image import tests),
# openssh-client (`lume ssh` runs ssh; lume's key pair is made with ssh-keygen), and what
# tests/debian/build.sh builds the Debian cloud test image with: mmdebstrap, syslinux
# (+ syslinux-common's MBR), mtools and dosfstools (the boot partition, no loop device),
# e2fsprogs (mkfs.ext4 -d) and fdisk (sfdisk); docker-registry (the CNCF distribution server)
# and skopeo for the registry tests (tests/e2e_registry.rs); systemd (systemd-analyze verify and
# systemd-socket-activate), binutils (objdump, strip), adduser and init-system-helpers (the
# package's dependency and maintainer scripts) for scripts/package.sh and
# tests/e2e_package.rs.
set -euo pipefail

packages=(qemu-system-x86 qemu-utils qemu-guest-agent passt dnsmasq-base nftables libnftables1 iproute2 busybox-static cpio procps kmod ca-certificates curl iptables python3 python3-venv openssl
          openssh-client mmdebstrap syslinux syslinux-common mtools dosfstools e2fsprogs fdisk
          docker-registry skopeo systemd binutils adduser init-system-helpers)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "Missing packages: ${missing[*]}. Run this script as root, or: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "Installing ${missing[*]}" >&2
    apt-get update -qq
    # The whole list in one transaction: installing one package may remove
    # another that conflicts with it (a newer qemu-utils from backports is
    # removed by Debian 12's qemu-system-x86), and apt then brings back the
    # matching version.
    # apt does not downgrade by itself: a qemu-utils newer than the
    # qemu-system-x86 apt can install (e.g. 10.0 from bookworm-backports
    # whose source is no longer listed) "Breaks" it and apt gives up with
    # "held broken packages". Ask for the qemu-utils that matches.
    request=("${packages[@]}")
    downgrade=()
    qemu=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [ -n "$qemu" ] && [ "$qemu" != "(none)" ] && [ -n "$utils" ] && [ "$utils" != "$qemu" ] \
        && ! dpkg-query -W -f='${Status}' qemu-system-x86 2>/dev/null | grep -q "install ok installed"; then
        echo "qemu-utils $utils does not match qemu-system-x86 $qemu: installing qemu-utils $qemu instead" >&2
        request=("${request[@]/#qemu-utils/qemu-utils=$qemu}")
        downgrade=(--allow-downgrades)
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${downgrade[@]}" "${request[@]}" >/dev/null
    for p in "${packages[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            echo "Package $p is still not installed after apt-get install: see apt's messages above" >&2
            exit 1
        fi
    done
fi
if ! command -v cargo >/dev/null; then
    echo "cargo was not found: install a Rust toolchain (rustup, or apt-get install cargo) and run again" >&2
    exit 1
fi
