#!/bin/sh
# Fetch the Debian 12 kernel used by tests/blkback_guest.rs (a Linux guest booted under
# qemu-system-x86_64 with its disk served by remoca over NBD) and unpack it, without
# installing it. Usage: fetch-kernel.sh [DIR]   (default /var/tmp/remoca-guest-kernel)
set -eu
DIR=${1:-/var/tmp/remoca-guest-kernel}
PKG=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | sort -V | tail -1 | cut -d' ' -f1)
[ -n "$PKG" ] || { echo "no linux-image-6.1.0-*-amd64 package found (apt-get update?)" >&2; exit 1; }
mkdir -p "$DIR"
cd "$DIR"
apt-get download "$PKG"
dpkg -x "$PKG"_*.deb root
rm -f "$PKG"_*.deb
ln -sf "$(ls root/boot/vmlinuz-* | head -1)" vmlinuz
ln -sf "$(ls -d root/lib/modules/* | head -1)" modules
echo "kernel ready in $DIR"
