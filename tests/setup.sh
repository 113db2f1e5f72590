#!/bin/bash
# Install what remoca's test suite needs on a fresh Debian 12 machine, idempotently:
# Debian packages (QEMU, NBD tools, Xen headers, NFS server, memcached, ...) and the guest
# kernel the blkback guest test boots. Run as root (CI machines are); safe to re-run.
set -euo pipefail

PACKAGES=(
  qemu-utils qemu-system-x86        # qemu-img/qemu-io/qemu-nbd baselines; guest boots; Xen under QEMU
  libnbd-bin                        # nbdinfo, nbdcopy: independent NBD clients
  libxen-dev                        # headers for the ABI layout test (never linked)
  nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils   # real NFS server for save/restore to nfs://
  memcached                         # baseline of the memory-server benchmark smoke test
  iproute2                          # network namespaces and veth for the NFS test bed
  busybox-static cpio e2fsprogs zstd xz-utils util-linux perl binutils   # guest and dom0 initramfs builders
  gcc libc6-dev                     # the ABI probe and the static swap workload the guest test runs
  python3-venv                      # the venv moto's S3-compatible server is installed in (below)
)

missing=()
for p in "${PACKAGES[@]}"; do
  case "$p" in \#*) continue ;; esac
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "tests/setup.sh: missing packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Check the QEMU tools themselves, not only the package list: on a machine whose qemu-utils is
# a newer backport installed from a local .deb, installing the archive's qemu-system-x86
# above removes that qemu-utils (seen 2026-12-01 with qemu-utils 10.0.2~bpo12 against
# qemu-system-x86 7.2+dfsg-7+deb12u18), leaving no qemu-img, qemu-io or qemu-nbd. The
# archive's qemu-utils matches the qemu-system-x86 just installed.
for tool in qemu-img qemu-io qemu-nbd; do
  if ! command -v "$tool" >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "tests/setup.sh: $tool is missing; run as root or: sudo apt-get install qemu-utils" >&2
      exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends qemu-utils >/dev/null
    command -v "$tool" >/dev/null || { echo "tests/setup.sh: $tool still missing after installing qemu-utils" >&2; exit 1; }
  fi
done
# The packaged ganesha and rpcbind services must not hold the ports the tests' own
# instances use (tests start their own inside network namespaces).
for svc in nfs-ganesha rpcbind rpcbind.socket; do
  systemctl stop "$svc" >/dev/null 2>&1 || true
done

# moto's S3-compatible server for tests/image_store_s3.rs (PyPI moto[server], in a venv).
if [ ! -x /opt/remoca-venv/bin/moto_server ]; then
  python3 -m venv /opt/remoca-venv
  /opt/remoca-venv/bin/pip install -q 'moto[server]'
fi

KERNEL_DIR=${REMOCA_GUEST_KERNEL:-/var/tmp/remoca-guest-kernel}
if [ ! -e "$KERNEL_DIR/vmlinuz" ]; then
  "$(dirname "$0")/../blkback/tests/guest/fetch-kernel.sh" "$KERNEL_DIR"
fi
echo "tests/setup.sh: test dependencies present"
