#!/bin/sh
# dom0's /init (busybox sh) for the Xen-under-QEMU stage: bring up the Xen toolstack, run the
# remoca checks against the real hypervisor and print one `@@RESULT <name> PASS|FAIL` line per
# check on hvc0 (Xen forwards it to com1, QEMU to the host). `@@DONE` ends the run, then
# `poweroff -f` (Xen powers the machine off and QEMU exits).
# The driver domains of dom0-tests/tier2.sh boot a copy of this image with REMOCA_ROLE=driver
# on their kernel command line (the kernel hands NAME=value to init's environment).
[ "${REMOCA_ROLE:-}" = driver ] && exec /bin/sh /etc/remoca-xenqemu/driver-init.sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/usr/lib/xen-4.17/lib/x86_64-linux-gnu
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
# Overridable from the dom0 kernel command line (the kernel hands NAME=value to init's env).
GUEST=${REMOCA_XENQEMU_GUEST:-remoca-guest}
export GUEST
SHARE=/usr/share/remoca-xenqemu
CONLOG=/var/log/xen/console/guest-$GUEST.log

up() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "@@MARK $(up) $*"; }
result() { echo "@@RESULT $1 $2"; }
# run SECONDS CMD...: run CMD under a time limit, output on the console between @@CMD and @@RC.
run() {
  t=$1
  shift
  echo "@@CMD $*"
  timeout "$t" "$@" 2>&1
  rc=$?
  echo "@@RC $rc ($*)"
  return $rc
}
# wait_for SECONDS CONDITION...: poll CONDITION once a second.
wait_for() {
  n=$1
  shift
  while [ "$n" -gt 0 ]; do
    "$@" && return 0
    sleep 1
    n=$((n - 1))
  done
  return 1
}
# The guest exists and is not paused, shut down, crashed or dying. Not "running or blocked":
# a runnable vCPU waiting for a physical CPU shows "------", common under TCG on a loaded host.
guest_running() {
  st=$(xl list "$GUEST" 2>/dev/null | awk 'NR == 2 {print $5}')
  case $st in '' | *p* | *s* | *c* | *d*) false ;; *) true ;; esac
}
marker_written() { grep -q 'marker written' "$CONLOG" 2>/dev/null; }
ticks() { tr -d '\r' < "$CONLOG" 2>/dev/null | grep -c GUEST-TICK; }
ticking() { [ "$(ticks)" -gt "$ticks0" ]; }
guest_console() { # print the tail of the guest's console log
  echo "--- console of $GUEST (tail):"
  tr -d '\r' < "$CONLOG" 2>/dev/null | grep -v '^$' | tail -n "${1:-15}" | sed 's/^/  | /'
}

# ---------------------------------------------------------------- system
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# devtmpfs has no /dev/fd or /dev/std*; Xen's hotplug locking.sh stats /dev/stdin and spins
# forever without it.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/xen /run/xenstored /var/lib/xen /var/lib/xenstored /var/log/xen/console
mark "dom0 init started: kernel $(uname -r), $(grep MemTotal /proc/meminfo | tr -s ' ')"
echo "hypervisor: $(cat /sys/hypervisor/type 2>/dev/null) $(cat /sys/hypervisor/version/major 2>/dev/null).$(cat /sys/hypervisor/version/minor 2>/dev/null)$(cat /sys/hypervisor/version/extra 2>/dev/null)"

kver=$(uname -r)
while read -r m; do
  insmod "/lib/modules/$kver/$m.ko" 2>&1 || echo "insmod $m failed"
done < /etc/remoca-xenqemu/modules
mount -t xenfs xenfs /proc/xen
echo "/dev/xen:" /dev/xen/*
mark "modules loaded"

xenstored --pid-file /run/xenstore.pid
echo "xenstored rc=$?"
run 60 xen-init-dom0
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
echo "xenconsoled rc=$?"
mark "toolstack up"
if run 60 xl list; then result dom0-toolstack PASS; else result dom0-toolstack FAIL; fi
echo "remoca: $(remoca --version 2>&1)"

# ---------------------------------------------------------------- remoca xen info / list
if run 60 remoca --backend real xen info; then result remoca-xen-info PASS; else result remoca-xen-info FAIL; fi
out=$(run 60 remoca --backend real xen list)
rc=$?
echo "$out"
if [ $rc -eq 0 ] && echo "$out" | grep -q 'Domain-0'; then result remoca-xen-list PASS; else result remoca-xen-list FAIL; fi

# ---------------------------------------------------------------- the seam's contract checks
# The selftest prints its own `@@RESULT xen-<check> PASS|FAIL` lines; its exit status is
# recorded too, so a crash before any line is printed still fails the stage.
mark "selftest begin"
if run 300 remoca --backend real xen selftest; then result remoca-xen-selftest PASS; else result remoca-xen-selftest FAIL; fi
mark "selftest end"

# ---------------------------------------------------------------- PV guest + foreign mapping
token=$(tr -d '-' < /proc/sys/kernel/random/uuid | cut -c1-16)
MARKER=REMOCA-MARKER-$token
mark "xl create $GUEST begin"
if run 180 xl create "$SHARE/guest/guest-pv.cfg" "name=\"$GUEST\"" \
  "extra=\"console=hvc0 rdinit=/init loglevel=4 remoca_marker=$token\"" && wait_for 60 guest_running; then
  result guest-create PASS
else
  result guest-create FAIL
fi
mark "xl create $GUEST returned"
run 10 xl list
if wait_for 180 marker_written; then
  mark "guest printed 'marker written'"
  result guest-marker-written PASS
else
  mark "no 'marker written' on the guest console"
  result guest-marker-written FAIL
fi
guest_console 10
sleep 2 # let the guest settle
mark "find-marker begin"
if run 300 remoca --backend real xen find-marker "$GUEST" "$MARKER"; then
  found=yes
  result xen-foreign-map-marker PASS
else
  found=no
  result xen-foreign-map-marker FAIL
fi
# The converse: a marker no guest frame holds must not be reported as found (it is, however,
# in dom0's memory: in remoca's argv). Only meaningful when the real marker was found, since a
# find-marker that cannot scan at all also "does not find" it.
absent=REMOCA-MARKER-$(tr -d '-' < /proc/sys/kernel/random/uuid | cut -c1-16)
if [ $found = yes ]; then
  out=$(run 300 remoca --backend real xen find-marker "$GUEST" "$absent")
  rc=$?
  echo "$out"
  if [ $rc -ne 0 ] && ! echo "$out" | grep -q 'marker found'; then
    result xen-foreign-map-absent-marker PASS
  else
    result xen-foreign-map-absent-marker FAIL
  fi
else
  result xen-foreign-map-absent-marker SKIP
fi
mark "find-marker end"

# ---------------------------------------------------------------- tests/xen-qemu/dom0-tests/*.sh
# Each runs with the guest running and GUEST exported, prints its own @@RESULT lines, and gets a
# dom0-test-<name> line for its exit status (and for having printed at least one result).
# REMOCA_XENQEMU_TESTS (from boot.sh, on the kernel command line): a ':'-separated list of
# dom0-tests to run instead of all of them, for working on one.
for t in "$SHARE"/dom0-tests/*.sh; do
  [ -f "$t" ] || continue
  n=$(basename "$t" .sh)
  case ":${REMOCA_XENQEMU_TESTS:-$n}:" in *":$n:"*) ;; *) continue ;; esac
  mark "dom0-test $n begin"
  (
    timeout 420 bash "$t" 2>&1
    echo $? > "/tmp/dom0-test-$n.rc"
  ) | tee "/tmp/dom0-test-$n.log"
  rc=$(cat "/tmp/dom0-test-$n.rc" 2>/dev/null || echo 255)
  nres=$(grep -c '^@@RESULT' "/tmp/dom0-test-$n.log")
  echo "@@RC $rc (dom0-test $n, $nres results)"
  if [ "$rc" = 0 ] && [ "$nres" -gt 0 ]; then result "dom0-test-$n" PASS; else result "dom0-test-$n" FAIL; fi
  mark "dom0-test $n end"
done

# The guest must have come through the dom0-tests alive: its console keeps ticking.
# The guest ticks every 5 s; on a loaded TCG host right after the heavy swap test a tick can
# take much longer, so allow 90 s, and show what the guest was doing when it did not tick.
# Both are read again each second: one `xl list` or console read is a snapshot.
alive() { guest_running && ticking; }
ticks0=$(ticks)
if wait_for 90 alive; then
  result guest-alive-at-end PASS
else
  echo "guest state: $(xl list "$GUEST" 2>&1 | tail -n 1)"
  guest_console 30
  result guest-alive-at-end FAIL
fi
run 10 xl list
guest_console 5
mark "all tests done"
echo "@@DONE"
sync
poweroff -f
