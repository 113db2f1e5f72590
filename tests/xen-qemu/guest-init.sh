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

# A swap device attached later by dom0 (dom0-tests/swap.sh: remoca's swap export, its blocks on
# a memory server, served by remoca's blkif backend as xvdc): each time /dev/xvdc appears,
#   1. time 256 single-block O_DIRECT writes of random data, read them back (they must match),
#      and time 1 MiB more in 128 KiB requests (GUEST-SWAP-RATE: the request rate of the whole
#      blkfront -> remoca -> memory server path, for the log);
#   2. mkswap, swapon, run swap_workload (tests/blkback_harness/swap_workload.c, built
#      statically by build-initramfs.sh): it fills SWAP_MIB MiB, more than this guest's free
#      RAM, with checksummed pages and verifies every page twice (rewriting half in between);
#   3. print the verdict with the kernel's swap counters for the run (pswpout/pswpin from
#      /proc/vmstat: pages written to and read back from xvdc), swapoff, wait for the disk to go.
# The workload waits for a console line after filling (its memserver-kill pause in
# tests/remote_swap_guest.rs); run in a chroot without /dev/console it goes straight on.
SWAP_MIB=72
vmstat() { awk -v k="$1" '$1 == k {print $2}' /proc/vmstat; }
secs_since() { awk -v t0="$1" '{printf "%.2f", $1 - t0}' /proc/uptime; }
swap_disk() {
  n=0
  while true; do
    while [ ! -b /dev/xvdc ]; do sleep 1; done
    n=$((n + 1))
    echo "GUEST-SWAP-DISK $n $(cat /sys/block/xvdc/size 2>/dev/null) sectors"
    head -c 1048576 /dev/urandom > /tmp/swap-rnd
    t=$(cut -d' ' -f1 /proc/uptime)
    dd if=/tmp/swap-rnd of=/dev/xvdc bs=4096 count=256 oflag=direct conv=notrunc 2>/dev/null
    w4=$(secs_since "$t")
    t=$(cut -d' ' -f1 /proc/uptime)
    dd if=/dev/xvdc of=/tmp/swap-back bs=4096 count=256 iflag=direct 2>/dev/null
    r4=$(secs_since "$t")
    t=$(cut -d' ' -f1 /proc/uptime)
    dd if=/tmp/swap-rnd of=/dev/xvdc bs=131072 count=8 oflag=direct conv=notrunc 2>/dev/null
    w128=$(secs_since "$t")
    echo "GUEST-SWAP-RATE $n 256 x 4 KiB writes ${w4}s, 256 x 4 KiB reads ${r4}s, 8 x 128 KiB writes ${w128}s"
    cmp -s /tmp/swap-rnd /tmp/swap-back || echo "GUEST-SWAP-BAD $n the 1 MiB read back differs from what was written"
    rm -f /tmp/swap-rnd /tmp/swap-back
    # Swap-in readahead up to 64 pages (the workload scans its pages in address order).
    echo 6 > /proc/sys/vm/page-cluster
    if [ ! -x /swaproot/swap_workload ]; then
      echo "GUEST-SWAP-NO-WORKLOAD $n (gcc was missing when the image was built)"
    elif ! err=$(mkswap /dev/xvdc 2>&1) || ! err=$(swapon /dev/xvdc 2>&1); then
      echo "GUEST-SWAP-BAD $n swapon: $(echo "$err" | tail -n 1)"
    else
      free=$(awk '/^MemFree:/ {print $2}' /proc/meminfo)
      mem=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
      out0=$(vmstat pswpout)
      in0=$(vmstat pswpin)
      echo "GUEST-SWAP-ON $n $(cut -d' ' -f1 /proc/uptime)s MemTotal $mem kB, MemFree $free kB, $(awk '/^SwapTotal:/ {print "SwapTotal", $2, "kB"}' /proc/meminfo)"
      rm -f /tmp/swap.rc /tmp/swap.log
      # Each workload line with the guest's uptime, so dom0 can time the phases.
      { chroot /swaproot /swap_workload "$SWAP_MIB" 2>&1; echo $? > /tmp/swap.rc; } | tee /tmp/swap.log |
        while IFS= read -r line; do echo "GUEST-SWAP-LOG $n $(cut -d' ' -f1 /proc/uptime)s $line"; done
      rc=$(cat /tmp/swap.rc 2>/dev/null)
      pages=$((SWAP_MIB * 256))
      swpout=$(($(vmstat pswpout) - out0))
      swpin=$(($(vmstat pswpin) - in0))
      if [ "$rc" = 0 ] && grep -q "^REMOCA-VERDICT ok pages=$pages bad=0\$" /tmp/swap.log; then
        echo "GUEST-SWAP-OK $n pages=$pages memfree_kb=$free memtotal_kb=$mem pswpout=$swpout pswpin=$swpin"
      else
        echo "GUEST-SWAP-BAD $n workload status ${rc:-none}: $(grep REMOCA-VERDICT /tmp/swap.log | tail -n 1) (pswpout=$swpout pswpin=$swpin)"
        dmesg | tail -n 20 | sed "s/^/GUEST-SWAP-DMESG $n /"
      fi
      swapoff /dev/xvdc || echo "GUEST-SWAP-BAD $n swapoff failed"
    fi
    echo "GUEST-SWAP-DONE $n"
    while [ -b /dev/xvdc ]; do sleep 1; done
    echo "GUEST-SWAP-GONE $n"
  done
}
swap_disk &

# A disk for dom0-tests/tier1.sh (xvdd), whose serving `remoca up` dom0 SIGKILLs and restarts
# several times while this runs: each time /dev/xvdd appears, TIER1_ROUNDS rounds of fresh
# random data (TIER1_KIB KiB at offset 0, so a lost write leaves an older round's data behind),
# each half written by its own dd at once (two requests on the ring at a time, which may finish
# out of order) with O_DIRECT and an fsync (a flush request), in 4 KiB requests on odd rounds
# and 64 KiB (indirect) ones on even rounds, then read back the same way and compared. One line
# per round (dom0 times its kills by them), then a verdict with the counts of mismatching
# rounds, failed dd commands and kernel I/O error lines, and the SHA-256 of the last round
# (dom0 checks the image holds it).
TIER1_ROUNDS=20
TIER1_KIB=512
kernel_io_errors() { dmesg | grep -c -E 'I/O error|blk_update_request|blkfront.*(error|disabled)'; }
# tier1_dd N ROUND WHAT dd-ARGS...: run dd, count and report a failure.
tier1_dd() {
  t1n=$1 t1r=$2 t1what=$3
  shift 3
  if ! err=$(dd "$@" 2>&1); then
    echo "GUEST-TIER1-IOERR $t1n $t1r $t1what: $(echo "$err" | tail -n 1)"
    return 1
  fi
}
tier1_disk() {
  n=0
  while true; do
    while [ ! -b /dev/xvdd ]; do sleep 1; done
    n=$((n + 1))
    echo "GUEST-TIER1-DISK $n $(cat /sys/block/xvdd/size 2>/dev/null) sectors"
    k0=$(kernel_io_errors)
    r=0 bad=0 errs=0 sum=
    while [ $r -lt $TIER1_ROUNDS ] && [ -b /dev/xvdd ]; do
      r=$((r + 1))
      bs=4096
      [ $((r % 2)) -eq 0 ] && bs=65536
      half=$((TIER1_KIB * 512 / bs))
      head -c $((TIER1_KIB * 1024)) /dev/urandom > /tmp/tier1-w
      sum=$(sha256sum < /tmp/tier1-w | cut -d' ' -f1)
      echo "GUEST-TIER1-ROUND $n $r bs=$bs $sum"
      ( tier1_dd "$n" "$r" write if=/tmp/tier1-w of=/dev/xvdd bs=$bs count=$half oflag=direct conv=notrunc,fsync ) &
      p=$!
      tier1_dd "$n" "$r" write if=/tmp/tier1-w of=/dev/xvdd bs=$bs skip=$half seek=$half count=$half oflag=direct conv=notrunc,fsync || errs=$((errs + 1))
      wait $p || errs=$((errs + 1))
      ( tier1_dd "$n" "$r" read if=/dev/xvdd of=/tmp/tier1-r1 bs=$bs count=$half iflag=direct ) &
      p=$!
      tier1_dd "$n" "$r" read if=/dev/xvdd of=/tmp/tier1-r2 bs=$bs skip=$half count=$half iflag=direct || errs=$((errs + 1))
      wait $p || errs=$((errs + 1))
      cat /tmp/tier1-r1 /tmp/tier1-r2 > /tmp/tier1-r
      cmp -s /tmp/tier1-w /tmp/tier1-r || { bad=$((bad + 1)); echo "GUEST-TIER1-MISMATCH $n $r"; }
    done
    rm -f /tmp/tier1-w /tmp/tier1-r /tmp/tier1-r1 /tmp/tier1-r2
    kerr=$(($(kernel_io_errors) - k0))
    [ $kerr -eq 0 ] || dmesg | tail -n 20 | sed "s/^/GUEST-TIER1-DMESG $n /"
    echo "GUEST-TIER1-DONE $n rounds=$r mismatches=$bad ioerrors=$errs kernel_errors=$kerr last=$sum"
    while [ -b /dev/xvdd ]; do sleep 1; done
    echo "GUEST-TIER1-GONE $n"
  done
}
tier1_disk &

# A disk for dom0-tests/tier2.sh (xvde), served by remoca in a driver domain that dom0 destroys
# while this runs; dom0 then moves this guest to a standby driver domain through a suspend and
# resume. Each time /dev/xvde appears: tier2_aio (tests/blkback_harness/tier2_aio.c) writes,
# flushes and reads back TIER2_ROUNDS rounds of fresh data with Linux AIO (32 x 64 KiB requests
# in flight at once; its task waits interruptibly, so the suspend can freeze it with requests on
# the ring), each line as GUEST-TIER2-<WORD> N ..., then the kernel's I/O error lines and the
# SHA-256 of the last round (dom0 checks the image holds it).
TIER2_ROUNDS=40
tier2_disk() {
  n=0
  while true; do
    while [ ! -b /dev/xvde ]; do sleep 1; done
    n=$((n + 1))
    echo "GUEST-TIER2-DISK $n $(cat /sys/block/xvde/size 2>/dev/null) sectors"
    k0=$(kernel_io_errors)
    rm -f /tmp/tier2-last
    /bin/tier2_aio /dev/xvde $TIER2_ROUNDS /tmp/tier2-last 2>&1 | while IFS= read -r line; do
      w=${line%% *} rest=${line#* }
      echo "GUEST-TIER2-$w $n $rest"
    done
    kerr=$(($(kernel_io_errors) - k0))
    [ $kerr -eq 0 ] || dmesg | tail -n 20 | sed "s/^/GUEST-TIER2-DMESG $n /"
    sum=$(sha256sum < /tmp/tier2-last 2>/dev/null | cut -d' ' -f1)
    echo "GUEST-TIER2-DONE $n kernel_errors=$kerr last=${sum:-none}"
    while [ -b /dev/xvde ]; do sleep 1; done
    echo "GUEST-TIER2-GONE $n"
  done
}
tier2_disk &

i=0
while true; do
  i=$((i + 1))
  echo "GUEST-TICK $i"
  sleep 5
done
