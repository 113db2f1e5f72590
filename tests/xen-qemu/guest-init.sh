#!/bin/sh
# /init of the busybox PV guest. It writes REMOCA-MARKER-<token> (token from the kernel command
# line, remoca_marker=<token>) at the start of a file on its RAM root: file data lives in
# page-cache pages, which are page aligned, so one guest frame starts with the marker. dom0's
# `remoca xen find-marker` then looks for it through foreign mappings of the guest's frames.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# `xl shutdown` makes the kernel's orderly_poweroff() exec /sbin/poweroff.
printf '#!/bin/sh\necho GUEST-POWEROFF\nexec /bin/busybox poweroff -f\n' > /sbin/poweroff
chmod +x /sbin/poweroff
echo "GUEST-HELLO kernel $(uname -r) uptime $(cut -d' ' -f1 /proc/uptime)s $(grep MemTotal /proc/meminfo)"

token=
# shellcheck disable=SC2013 # the command line is one line of words
for arg in $(cat /proc/cmdline); do
  case $arg in remoca_marker=*) token=${arg#remoca_marker=} ;; esac
done
if [ -n "$token" ]; then
  # Keep the file open (and so its page resident) for the guest's lifetime.
  printf 'REMOCA-MARKER-%s\n' "$token" > /marker
  exec 3< /marker
  # Do not echo the whole marker: the console line need not be another copy of it.
  echo "marker written (token $token, $(wc -c < /marker) bytes at offset 0 of /marker)"
else
  echo "GUEST-ERROR no remoca_marker= on the kernel command line"
fi

# A disk attached later by dom0 (dom0-tests/blkif.sh, served by remoca's blkif backend as xvdb):
# each time /dev/xvdb appears, read the line dom0 put at 1 MiB, report what 4 MiB..5 MiB held,
# write that line repeated over 4 MiB..5 MiB (O_DIRECT, then fsync: a flush request), report
# the SHA-256 of what was written, and wait for the disk to go away. dom0 checks the image.
if insmod /lib/modules/xen-blkfront.ko; then
  echo "blkfront loaded"
else
  echo "GUEST-ERROR insmod xen-blkfront failed"
fi
blkif_disk() {
  n=0
  while true; do
    while [ ! -b /dev/xvdb ]; do sleep 1; done
    n=$((n + 1))
    echo "GUEST-BLKIF-DISK $n $(cat /sys/block/xvdb/size 2>/dev/null) sectors"
    text=$(dd if=/dev/xvdb bs=4096 skip=256 count=1 iflag=direct 2>/dev/null | tr -d '\000' | head -n 1)
    echo "GUEST-BLKIF-READ $n $text"
    had=$(dd if=/dev/xvdb bs=65536 skip=64 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    echo "GUEST-BLKIF-HAD $n $had"
    yes "$text" | head -c 1048576 > /tmp/blkif-pattern
    sum=$(sha256sum < /tmp/blkif-pattern | cut -d' ' -f1)
    if err=$(dd if=/tmp/blkif-pattern of=/dev/xvdb bs=65536 seek=64 count=16 oflag=direct conv=notrunc,fsync 2>&1); then
      echo "GUEST-BLKIF-WROTE $n $sum"
    else
      echo "GUEST-BLKIF-WRITE-FAILED $n $(echo "$err" | tail -n 1)"
    fi
    rm -f /tmp/blkif-pattern
    while [ -b /dev/xvdb ]; do sleep 1; done
    echo "GUEST-BLKIF-GONE $n"
  done
}
blkif_disk &

i=0
while true; do
  i=$((i + 1))
  echo "GUEST-TICK $i"
  sleep 5
done
