#!/bin/sh
# /init of a driver domain in the Xen-under-QEMU stage (dom0-tests/tier2.sh): the driver image
# (dom0's tree without the guest payload and the tests) booted as a PV domU with
# REMOCA_ROLE=driver on its kernel command line; dom0-init.sh hands over to this script. It
# loads what a userspace blkif backend needs in a domU (privcmd, event channels, grant
# mapping; xenbus is built in), waits for its storage disk xvda (a dom0 loop device attached
# to both driver domains: storage shared the way a SAN LUN is), and runs `remoca up` serving
# the vbd3 disks under its own backend directory /local/domain/<its domid>/backend/vbd3,
# write-through (its page cache dies with it). Every line goes to hvc0, which dom0's
# xenconsoled logs to /var/log/xen/console/guest-<name>.log:
#   DRIVER-HELLO <domid>, DRIVER-DISK <sectors>, DRIVER-READY, DRIVER-UP <remoca's lines>,
#   DRIVER-ERROR <why>.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/usr/lib/xen-4.17/lib/x86_64-linux-gnu
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
export RUST_LOG=warn,remoca_blkback::blkif=info
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
ln -sf /proc/self/fd /dev/fd
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
fail() { echo "DRIVER-ERROR $*"; while true; do sleep 60; done; }

kver=$(uname -r)
# dom0's module list without the kernel's own block backend and loop (dom0's jobs), then the
# block frontend for the storage disk.
grep -vx -e xen_blkback -e loop /etc/remoca-xenqemu/modules | while read -r m; do
  insmod "/lib/modules/$kver/$m.ko" 2>&1 || echo "DRIVER-ERROR insmod $m failed"
done
insmod "/lib/modules/$kver/driver/xen-blkfront.ko" || echo "DRIVER-ERROR insmod xen-blkfront failed"
mount -t xenfs xenfs /proc/xen
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
domid=$(xenstore-read domid) || fail "cannot read domid from xenstore"
echo "DRIVER-HELLO $domid"

n=0
while [ ! -b /dev/xvda ]; do
  n=$((n + 1))
  [ $n -le 120 ] || fail "no /dev/xvda after 60 s"
  sleep 0.5
done
echo "DRIVER-DISK $(cat /sys/block/xvda/size)"

mkdir -p /tmp/remoca
cat > /tmp/up.toml <<CFG
[host]
backend = "real"
state_dir = "/tmp/remoca"
status_interval = 5.0
[memserver]
enabled = false
[blkback]
blkif = true
backend_domain = "self"
[[blkback.export]]
name = "storage"
template = "/dev/xvda"
CFG
# remoca's lines on the console, each tagged; DRIVER-READY once it serves.
remoca up --config /tmp/up.toml 2>&1 | while IFS= read -r line; do
  echo "DRIVER-UP $line"
  case $line in *"running; Ctrl-C stops"*) echo DRIVER-READY ;; esac
done
fail "remoca up exited"
