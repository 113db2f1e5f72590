# shellcheck shell=bash disable=SC2034 # variables for the scripts that source this file
# Shared settings for the Xen-under-QEMU stage; sourced by run.sh, fetch.sh, build-initramfs.sh, boot.sh.

# Work directory: downloaded debs, extracted packages, built images, serial logs. Kept outside
# the repository so nothing here is ever committed.
WORK=${REMOCA_XENQEMU_WORK:-/var/tmp/remoca-xenqemu}
DEBS=$WORK/debs        # apt-get download cache (kept between runs)
ROOT=$WORK/root        # the debs extracted with dpkg -x (rebuilt when the deb set changes)
OUT=$WORK/out          # xen, vmlinuz, dom0.cpio.gz, domU.cpio.gz
XENQEMU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$XENQEMU_DIR/../.." && pwd)

log() { printf '[xen-qemu] %s\n' "$*" >&2; }
die() { printf '[xen-qemu] ERROR: %s\n' "$*" >&2; exit 1; }
# need CMD PACKAGE: fail early with the apt package that provides a missing tool.
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found: apt-get install $2"; }
