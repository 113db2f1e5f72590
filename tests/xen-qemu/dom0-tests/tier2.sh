#!/bin/bash
# shellcheck disable=SC2317 # functions called through wait_for and the EXIT trap
# Failover tier 2 on the real hypervisor (issue 7, docs/failover.md "Tier 2"): the driver domain
# serving a PV guest's disk dies and a standby driver domain takes the disk over. Two PV driver
# domains (remoca-storage-a, remoca-storage-b; driver_domain=1) boot the driver image
# (driver-init.sh) and each runs `remoca up` with backend_domain = "self", serving vbd3 disks
# from their own backend directories; their storage is one dom0 loop device attached to both
# (block-shared). The guest's xvde is served by storage-a; the guest's /init runs tier2_aio on it
# (rounds of 32 x 64 KiB AIO writes, a flush, reads back and compare). dom0 destroys storage-a
# in round 3; `remoca blkback standby`, started before, sees it die and moves the guest's disk
# to storage-b: it suspends the guest (`xl save`), restores it paused (`xl restore -p`), writes
# the disk's frontend and backend directories for the new domain with storage-b as backend, and
# unpauses it; blkfront's resume reconnects to storage-b and re-issues the requests that were
# unanswered when storage-a died.
# Checks: tier2-drivers-start, tier2-connected, tier2-standby-moves (the command moved 1 disk
# and exited 0), tier2-reconnected (backend and frontend Connected under storage-b),
# tier2-requests-in-flight (the guest's task was frozen by the suspend with requests of its
# round unanswered), tier2-guest-verifies (every round read back equal, no I/O error, no
# kernel I/O error line), tier2-image-holds-last-round, tier2-detach, tier2-guest-keeps-running.
# Needs: `remoca`, `xl`, `xenstore-*`, `losetup` on PATH, a running PV guest named by $GUEST
# whose initramfs has tier2_aio; the driver image and block-shared (build-initramfs.sh).
# Leaves the guest running (as a new domain, restored) with no disk attached.
G=${GUEST:?set GUEST to the name of a running PV guest}
SHARE=/usr/share/remoca-xenqemu
T=${TMPDIR:-/tmp}/remoca-tier2.$$
IMG=$T/shared.img
CONLOG=/var/log/xen/console/guest-$G.log
DEVID=51776 # xvde: (202 << 8) | (4 << 4); blkif.sh uses xvdb, swap.sh xvdc, tier1.sh xvdd
A=remoca-storage-a
B=remoca-storage-b
mkdir -p "$T"

TAG=tier2 GTAG=GUEST-TIER2 DEV=xvde
CONSOLE_GREP='GUEST-TIER2|blkfront|GUEST-ERROR|I/O error|xen:|PM:|Freezing' CONSOLE_LINES=60
# shellcheck source=lib/vbd.sh
. "$(dirname "$0")/lib/vbd.sh"

dlog() { echo "/var/log/xen/console/guest-$1.log"; }
driver_ready() { tr -d '\r' < "$(dlog "$1")" 2>/dev/null | grep -q '^DRIVER-READY'; }
show_driver() {
  note "console of $1:"
  tr -d '\r' < "$(dlog "$1")" 2>/dev/null | grep -v '^$' | grep -v 'DRIVER-UP \[ *[0-9]*s\]' | tail -n 40 | sed 's/^/    | /'
}
LOOP=
STANDBY=
cleanup() {
  [ -z "$STANDBY" ] || { kill "$STANDBY" 2>/dev/null; wait "$STANDBY" 2>/dev/null; }
  DOMID=$(xl domid "$G" 2>/dev/null)
  if [ -n "$DOMID" ] && [ -n "$(xenstore-read "/local/domain/$DOMID/device/vbd/$DEVID/backend" 2>/dev/null)" ]; then
    BE=$(xenstore-read "/local/domain/$DOMID/device/vbd/$DEVID/backend")
    FE=/local/domain/$DOMID/device/vbd/$DEVID
    BDOM=$(xenstore-read "$FE/backend-id")
    note "cleanup: detaching the leftover device"
    detach "" || true
  fi
  for d in $A $B; do xl list "$d" > /dev/null 2>&1 && xl destroy "$d"; done
  [ -z "$LOOP" ] || losetup -d "$LOOP"
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 143' TERM INT # dom0-init's timeout: still clean up

# ---------------------------------------------------------------- the driver domains
truncate -s 16M "$IMG"
LOOP=$(losetup -f) && losetup "$LOOP" "$IMG" || { note "no loop device"; LOOP=; result drivers-start 1; exit 1; }
for d in $A $B; do
  cat > "$T/$d.cfg" <<CFG
name = "$d"
type = "pv"
memory = 256
vcpus = 1
kernel = "$SHARE/guest/vmlinuz"
ramdisk = "$SHARE/driver/driver.cpio.gz"
extra = "console=hvc0 rdinit=/init loglevel=4 REMOCA_ROLE=driver"
driver_domain = 1
disk = [ "format=raw,vdev=xvda,access=rw,script=block-shared,target=$LOOP" ]
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
  xl create "$T/$d.cfg" || { note "xl create $d failed"; result drivers-start 1; exit 1; }
done
ok=0
for d in $A $B; do
  if wait_for 240 driver_ready "$d"; then note "$d ready (domid $(xl domid "$d"))"; else ok=1; show_driver "$d"; fi
done
result drivers-start $ok
[ $ok -eq 0 ] || exit 1
AID=$(xl domid $A) BID=$(xl domid $B)

# ---------------------------------------------------------------- the disk, served by storage-a
DOMID=$(xl domid "$G" 2>/dev/null)
[ -n "$DOMID" ] || { note "no domain $G"; result guest-present 1; exit 1; }
BDOM=$AID
BE=/local/domain/$AID/backend/vbd3/$DOMID/$DEVID
FE=/local/domain/$DOMID/device/vbd/$DEVID
note "guest $G is $DOMID; $A is $AID, $B is $BID; storage $LOOP"

# The standby watcher, before the disk exists: it learns the disks storage-a serves as they come.
note "starting remoca blkback standby"
remoca --backend real blkback standby --primary $A --standby $B --save-dir "$T" > "$T/standby.log" 2>&1 &
STANDBY=$!
wait_for 30 grep -q watching "$T/standby.log"
note "standby: $(cat "$T/standby.log")"

N=$(next_attach)
note "attaching (guest disk $N)"
attach "raw:/dev/xvda"
note "attach returned $?"
wait_for 60 both_connected
rc=$?
if [ $rc -eq 0 ]; then note "backend ($A) and frontend Connected (4)"; else
  note "not connected: backend state $(state "$BE"), frontend state $(state "$FE")"
  show_device; show_driver $A; show_console
fi
result connected $rc
[ $rc -eq 0 ] || exit 1

# ---------------------------------------------------------------- storage-a dies
round_seen() { has_console_line GUEST-TIER2-ROUND "$N $1"; }
if ! wait_for 120 round_seen 3; then
  note "the guest never began round 3"
  show_console; show_driver $A
  result standby-moves 1
  exit 1
fi
t0=$(up)
xl destroy $A
note "destroyed $A in round 3 ($(awk -v a="$t0" -v b="$(up)" 'BEGIN {printf "%.1f", b - a}') s)"
wait_for 180 sh -c "! kill -0 $STANDBY 2>/dev/null"
wait "$STANDBY"
rc=$?
STANDBY=
sed 's/^/    standby| /' "$T/standby.log"
grep -q 'moved 1 disk' "$T/standby.log" || rc=1
result standby-moves $rc
note "the guest is back $(awk -v a="$t0" -v b="$(up)" 'BEGIN {printf "%.1f", b - a}') s after the destroy"

DOMID=$(xl domid "$G" 2>/dev/null)
BDOM=$BID
BE=/local/domain/$BID/backend/vbd3/$DOMID/$DEVID
FE=/local/domain/$DOMID/device/vbd/$DEVID
wait_for 60 both_connected
rc=$?
[ $rc -eq 0 ] || { show_device; xenstore-ls -fp "/local/domain/$BID/backend" | sed 's/^/    /'; show_driver $B; }
result reconnected $rc

# ---------------------------------------------------------------- the guest's verdict
wait_for 240 has_console_line GUEST-TIER2-DONE "$N"
verdict=$(console_line GUEST-TIER2-VERDICT "$N")
done_line=$(console_line GUEST-TIER2-DONE "$N")
note "guest: $verdict; $done_line"
eintr=$(console | grep "^GUEST-TIER2-EINTR $N " | head -n 3)
note "suspend seen by the guest's task: ${eintr:-none}"
echo "$eintr" | grep -q 'pending=[1-9]'
result requests-in-flight $?
echo "$verdict" | grep -q "rounds=40 mismatches=0 ioerrors=0 " && echo "$done_line" | grep -q 'kernel_errors=0 '
rc=$?
[ $rc -eq 0 ] || { show_console; show_driver $B; }
result guest-verifies $rc
want=$(echo "$done_line" | sed -n 's/.*last=\([0-9a-f]\{64\}\).*/\1/p')
have=$(head -c 2097152 "$IMG" | sha256sum | cut -d' ' -f1)
[ -n "$want" ] && [ "$want" = "$have" ]
result image-holds-last-round $?

detach "$N"
result detach $?
ticks0=$(console | grep -c GUEST-TICK)
wait_for 30 sh -c "[ \$(tr -d '\r' < '$CONLOG' | grep -c GUEST-TICK) -gt $ticks0 ]"
result guest-keeps-running $?
exit $failed
