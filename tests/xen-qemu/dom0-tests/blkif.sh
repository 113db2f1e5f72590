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

failed=0
result() { # NAME STATUS(0 = pass)
  if [ "$2" -eq 0 ]; then echo "@@RESULT blkif-$1 PASS"; else echo "@@RESULT blkif-$1 FAIL"; failed=1; fi
}
up() { cut -d' ' -f1 /proc/uptime; }
note() { echo "  blkif [$(up)] $*"; }
# wait_for SECONDS CONDITION...: poll CONDITION every 0.2 s until it holds or SECONDS passed
# (by the clock: each poll runs xenstore or grep processes, slow under TCG).
wait_for() {
  local end=$((SECONDS + $1))
  shift
  while [ $SECONDS -lt $end ]; do
    "$@" && return 0
    sleep 0.2
  done
  "$@"
}
console() { tr -d '\r' < "$CONLOG" 2>/dev/null; }
# console_line WORD N: the last console line "WORD N ...", without "WORD N ".
console_line() { console | grep "^$1 $2 " | tail -n 1 | cut -d' ' -f3-; }
has_console_line() { console | grep -q "^$1 $2\( \|\$\)"; }
# The number the guest will give the next disk it sees (it counts them from 1).
next_attach() { echo $(($(console | grep -c '^GUEST-BLKIF-DISK ') + 1)); }
state() { xenstore-read "$1/state" 2>/dev/null; }
state_is() { [ "$(state "$1")" = "$2" ]; }
both_connected() { state_is "$BE" 4 && state_is "$FE" 4; }
gone() { ! xenstore-exists "$1" 2>/dev/null; }
show_device() {
  note "xenstore of the device:"
  xenstore-ls -fp "$BE" 2>&1 | sed 's/^/    /'
  xenstore-ls -fp "$FE" 2>&1 | sed 's/^/    /'
}
show_console() {
  note "guest console (blkif lines and tail):"
  console | grep -E 'GUEST-BLKIF|blkfront|GUEST-ERROR|xen-blkfront|blkfront:' | tail -n 12 | sed 's/^/    | /'
  console | grep -v '^$' | tail -n 4 | sed 's/^/    | /'
}
# The up log without its once-a-second status lines, but for the last three.
show_up_log() {
  grep -Ev '^\[ *[0-9]+s\] ' "$T/up.log" | sed 's/^/    up| /'
  grep -E '^\[ *[0-9]+s\] ' "$T/up.log" | tail -n 3 | sed 's/^/    up| /'
}

DOMID=$(xl domid "$G" 2>/dev/null)
if [ -z "$DOMID" ]; then
  echo "no domain $G"
  result guest-present 1
  exit 1
fi
BE=/local/domain/0/backend/vbd3/$DOMID/$DEVID
FE=/local/domain/$DOMID/device/vbd/$DEVID

# ---------------------------------------------------------------- remoca up
UP=
start_up() {
  remoca up --config "$T/up.toml" > "$T/up.log" 2>&1 &
  UP=$!
  for _ in $(seq 120); do
    grep -q "running; Ctrl-C stops" "$T/up.log" && return 0
    kill -0 "$UP" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}
# stop_up: SIGTERM, 30 s to exit, then SIGKILL. Status: remoca's exit status.
stop_up() {
  local rc
  [ -n "$UP" ] || return 0
  kill -TERM "$UP" 2>/dev/null
  for _ in $(seq 300); do kill -0 "$UP" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$UP" 2>/dev/null; then
    note "remoca up (pid $UP) did not stop within 30 s of SIGTERM; killing it"
    kill -KILL "$UP" 2>/dev/null
  fi
  wait "$UP"
  rc=$?
  UP=
  return $rc
}

# ---------------------------------------------------------------- the device, as libxl writes it
# libxl 4.19 (device_disk_add + libxl__device_generic_add) writes both directories in one
# transaction, the frontend with perms "n<domid> r<backend>" and the backend with
# "n<backend> r<domid>". xenstore-write also writes all its pairs in one transaction; new nodes
# take their parent's permissions, so the parents are made with the device's permissions first
# and both directories appear at once, complete and with the right permissions (blkfront never
# sees a half-written device, remoca never sees a backend without its frontend).
attach() { # PARAMS
  local bvbd=/local/domain/0/backend/vbd3/$DOMID fvbd=/local/domain/$DOMID/device/vbd
  xenstore-exists "$bvbd" || xenstore-write "$bvbd" "" || return 1
  xenstore-chmod "$bvbd" n0 "r$DOMID" || return 1
  xenstore-exists "$fvbd" || xenstore-write "$fvbd" "" || return 1
  xenstore-chmod "$fvbd" "n$DOMID" r0 || return 1
  # `script` is what libxl writes for script=block-remoca; nobody runs hotplug scripts here.
  xenstore-write \
    "$BE/frontend" "$FE" \
    "$BE/params" "$1" \
    "$BE/script" /etc/xen/scripts/block-remoca \
    "$BE/frontend-id" "$DOMID" \
    "$BE/online" 1 \
    "$BE/removable" 0 \
    "$BE/bootable" 1 \
    "$BE/state" 1 \
    "$BE/dev" xvdb \
    "$BE/type" vbd3 \
    "$BE/mode" w \
    "$BE/device-type" disk \
    "$BE/discard-enable" 1 \
    "$BE/specification" xen \
    "$FE/backend" "$BE" \
    "$FE/backend-id" 0 \
    "$FE/state" 1 \
    "$FE/virtual-device" "$DEVID" \
    "$FE/device-type" disk \
    "$FE/trusted" 1 \
    "$FE/protocol" x86_64-abi || return 1
  xenstore-chmod "$BE" n0 "r$DOMID" && xenstore-chmod "$FE" "n$DOMID" r0
}
# detach N: as libxl's device removal: online=0 + backend state 5, wait for the backend's
# Closed (and the guest dropping xvdb), then remove both directories and their empty parents.
detach() {
  local n=$1 ok=0
  if ! xenstore-exists "$BE" 2>/dev/null && ! xenstore-exists "$FE" 2>/dev/null; then return 0; fi
  xenstore-write "$BE/online" 0 "$BE/state" 5 || ok=1
  local fe_wait=30
  if wait_for 30 state_is "$BE" 6; then
    note "backend Closed (6); frontend state $(state "$FE")"
  else
    note "backend did not reach Closed (6): state $(state "$BE")"
    ok=1
    fe_wait=3 # blkfront only closes after the backend did
  fi
  # blkfront answers the backend's Closed with Closed (the disk is marked dead; it goes away
  # when the frontend directory does).
  wait_for $fe_wait state_is "$FE" 6 || { note "frontend did not reach Closed (6): state $(state "$FE")"; ok=1; }
  [ $ok -eq 0 ] || show_device
  xenstore-rm "$FE" || ok=1
  xenstore-rm "$BE" || ok=1
  local p
  for p in "/local/domain/$DOMID/device/vbd" "/local/domain/0/backend/vbd3/$DOMID"; do
    [ -n "$(xenstore-list "$p" 2>/dev/null)" ] || xenstore-rm "$p" 2>/dev/null
  done
  { gone "$BE" && gone "$FE"; } || { note "device directories still there"; ok=1; }
  if [ -n "$n" ] && has_console_line GUEST-BLKIF-DISK "$n"; then
    wait_for 30 has_console_line GUEST-BLKIF-GONE "$n" || { note "the guest did not report xvdb gone"; ok=1; }
  fi
  return $ok
}

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
