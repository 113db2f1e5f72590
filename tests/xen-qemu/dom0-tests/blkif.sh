#!/bin/bash
# shellcheck disable=SC2317 # functions called through wait_for and the EXIT trap
# remoca's Xen blkif backend on the real hypervisor, inside dom0 of Xen-under-QEMU: `remoca up`
# serves a raw image as a vbd3 disk (xvdb) to the running PV guest, whose own xen-blkfront
# drives the ring. Debian's Xen 4.17 libxl refuses `backendtype=tap`, so the device nodes are
# written by hand exactly as libxl 4.19 writes them (docs/blkback.md), and removed the way
# libxl detaches (backend state 5 + online 0, wait for Closed, remove both directories).
# The guest's /init (guest-init.sh) reacts to /dev/xvdb by itself: it reads the line this
# script put at 1 MiB, writes that line repeated over 4 MiB..5 MiB and says so on its console.
# Second round: `remoca up` restarted, the same disk attached again by its export name; the
# guest must read back what it wrote in the first round.
# Needs: `remoca`, `xl`, `xenstore-*` on PATH, a running PV guest named by $GUEST whose
# initramfs loads xen-blkfront. Prints one `@@RESULT blkif-<check> PASS|FAIL` line per check
# and leaves the guest running with no disk attached.
G=${GUEST:?set GUEST to the name of a running PV guest}
T=${TMPDIR:-/tmp}/remoca-blkif.$$
IMG=$T/disk.img
CONLOG=/var/log/xen/console/guest-$G.log
DEVID=51728 # xvdb: (202 << 8) | (1 << 4)
mkdir -p "$T"

TAG=blkif GTAG=GUEST-BLKIF DEV=xvdb
CONSOLE_GREP='GUEST-BLKIF|blkfront|GUEST-ERROR|xen-blkfront|blkfront:' CONSOLE_LINES=12
# shellcheck source=lib/vbd.sh
. "$(dirname "$0")/lib/vbd.sh"

DOMID=$(xl domid "$G" 2>/dev/null)
if [ -z "$DOMID" ]; then
  echo "no domain $G"
  result guest-present 1
  exit 1
fi
BE=/local/domain/0/backend/vbd3/$DOMID/$DEVID
FE=/local/domain/$DOMID/device/vbd/$DEVID


# Whatever happens, leave no device behind for the later tests (xl save would carry it) and no
# remoca running.
cleanup() {
  if xenstore-exists "$BE" 2>/dev/null || xenstore-exists "$FE" 2>/dev/null; then
    note "cleanup: detaching the leftover device"
    detach "" || true
  fi
  if [ -n "$UP" ]; then
    note "cleanup: stopping remoca up"
    stop_up
  fi
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 143' TERM INT # dom0-init's timeout: still clean up

# ---------------------------------------------------------------- the image
token=$(tr -d '-' < /proc/sys/kernel/random/uuid | cut -c1-16)
MARKER=REMOCA-BLKIF-MARKER-$token
truncate -s 16M "$IMG"
printf '%s\n' "$MARKER" | dd of="$IMG" bs=4096 seek=256 conv=notrunc 2>/dev/null
# What the guest writes: the marker line repeated to 1 MiB (its `yes | head -c 1048576`), built
# here by doubling a file (a pipe from `yes` costs a syscall per line, slow in a PV dom0).
printf '%s\n' "$MARKER" > "$T/pattern"
while [ "$(stat -c %s "$T/pattern")" -lt 1048576 ]; do
  cat "$T/pattern" "$T/pattern" > "$T/pattern2" && mv "$T/pattern2" "$T/pattern"
done
PATTERN_SUM=$(head -c 1048576 "$T/pattern" | sha256sum | cut -d' ' -f1)
rm -f "$T/pattern"
ZERO_SUM=$(head -c 1048576 /dev/zero | sha256sum | cut -d' ' -f1)
image_sum() { dd if="$IMG" bs=65536 skip=64 count=16 2>/dev/null | sha256sum | cut -d' ' -f1; }
note "image $IMG: 16 MiB, $MARKER at 1 MiB; the guest should write sha256 $PATTERN_SUM at 4 MiB"

# The services listen on loopback; a bare dom0 may not have brought it up.
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up 2>/dev/null || true
cat > "$T/up.toml" <<CFG
[host]
backend = "real"
state_dir = "$T"
status_interval = 1.0
[memserver]
enabled = false
[blkback]
blkif = true
[[blkback.export]]
name = "blkif-test"
template = "$IMG"
CFG

# ---------------------------------------------------------------- round 1: raw path
note "domain $G is $DOMID; backend $BE"
start_up
rc=$?
show_up_log
result up-starts $rc
[ $rc -eq 0 ] || exit 1

N1=$(next_attach)
attach "raw:$IMG"
rc=$?
[ $rc -eq 0 ] || note "writing the device nodes failed"
if [ $rc -eq 0 ] && wait_for 60 both_connected; then
  note "backend and frontend Connected (4)"
  rc=0
else
  note "not connected: backend state $(state "$BE"), frontend state $(state "$FE")"
  show_device
  show_up_log
  show_console
  rc=1
fi
result connected $rc
connected1=$rc

# Not connected: no disk in the guest to wait for (the checks below then fail at once).
[ $connected1 -eq 0 ] && wait_for 60 has_console_line GUEST-BLKIF-WROTE "$N1"
read1=$(console_line GUEST-BLKIF-READ "$N1")
had1=$(console_line GUEST-BLKIF-HAD "$N1")
wrote1=$(console_line GUEST-BLKIF-WROTE "$N1")
has_console_line GUEST-BLKIF-WRITE-FAILED "$N1" && note "guest: write failed: $(console_line GUEST-BLKIF-WRITE-FAILED "$N1")"
note "guest: xvdb #$N1 of $(console_line GUEST-BLKIF-DISK "$N1"); read '$read1'; 4 MiB held $had1; wrote $wrote1"
[ "$read1" = "$MARKER" ] && [ "$had1" = "$ZERO_SUM" ]
rc=$?
# (When not connected, the console and the log were shown above.)
[ $rc -eq 0 ] || [ $connected1 -ne 0 ] || show_console
result guest-reads-marker $rc
sum=$(image_sum)
note "image at 4 MiB: sha256 $sum"
[ "$wrote1" = "$PATTERN_SUM" ] && [ "$sum" = "$PATTERN_SUM" ]
rc=$?
[ $rc -eq 0 ] || [ $connected1 -ne 0 ] || show_up_log
result guest-write-reaches-image $rc

# The requests went through remoca's ring (dom0's kernel blkback serves backend/vbd, not vbd3):
# up's status line (every second) counts them for the connected disk, with no errors.
blkif_status() { grep -o 'blkif [0-9]* disks, [0-9]* requests, [0-9]* errors' "$T/up.log" | tail -n 1; }
counted() { blkif_status | grep -Eq '^blkif 1 disks, [1-9][0-9]* requests, 0 errors$'; }
rc=1
[ $connected1 -eq 0 ] && { wait_for 5 counted; rc=$?; }
note "remoca up status: $(blkif_status)"
result served-by-remoca $rc

detach "$N1"
result detach $?

stop_up
rc=$?
note "remoca up exited with $rc"
tail -n 4 "$T/up.log" | sed 's/^/    up| /'
result up-stops $rc

# ---------------------------------------------------------------- round 2: restart, export name
# The guest's page cache for xvdb went with the disk; what it reads now comes from the image
# through a new remoca process.
# Skipped (failed) when the first round never connected: it would only wait out the same failure.
rc=1
if [ $connected1 -ne 0 ]; then
  note "second round skipped: the first never connected"
elif start_up; then
  rc=0
else
  show_up_log
fi
N2=$(next_attach)
if [ $rc -eq 0 ]; then
  attach "raw:blkif-test" && wait_for 60 both_connected
  rc=$?
  [ $rc -eq 0 ] || { note "not connected again: backend $(state "$BE"), frontend $(state "$FE")"; show_device; show_up_log; }
fi
if [ $rc -eq 0 ]; then
  wait_for 60 has_console_line GUEST-BLKIF-HAD "$N2"
  read2=$(console_line GUEST-BLKIF-READ "$N2")
  had2=$(console_line GUEST-BLKIF-HAD "$N2")
  note "guest, second attach: read '$read2'; 4 MiB held $had2"
  [ "$read2" = "$MARKER" ] && [ "$had2" = "$PATTERN_SUM" ]
  rc=$?
  [ $rc -eq 0 ] || show_console
  # Let the guest's rewrite of the same pattern finish before the disk goes.
  wait_for 60 has_console_line GUEST-BLKIF-WROTE "$N2" || note "the guest did not finish its second write"
fi
result reattach-reads-earlier-write $rc
if [ $connected1 -eq 0 ]; then
  detach "$N2" && stop_up
  rc=$?
  [ $rc -eq 0 ] || show_up_log
else
  rc=1
fi
result detach-and-stop-again $rc

# ---------------------------------------------------------------- the guest lives on
ticks() { console | grep -c GUEST-TICK; }
ticked() { [ "$(ticks)" -gt "$t0" ]; }
t0=$(ticks)
st=$(xl list "$G" 2>/dev/null | awk 'NR == 2 {print $5}')
# Runnable: any state but paused, shut down, crashed or dying ("------" is a runnable vCPU
# waiting for a physical CPU, common under TCG on a loaded host).
case $st in '' | *p* | *s* | *c* | *d*) rc=1 ;; *) rc=0 ;; esac
[ $rc -eq 0 ] && { wait_for 15 ticked; rc=$?; }
note "guest state '$st', GUEST-TICK lines $t0 -> $(ticks)"
result guest-keeps-running $rc
exit $failed
