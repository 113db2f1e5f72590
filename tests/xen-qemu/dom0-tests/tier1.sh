#!/bin/bash
# shellcheck disable=SC2317 # functions called through wait_for and the EXIT trap
# Failover tier 1 on the real hypervisor (issue 7, docs/failover.md): the process serving a PV
# guest's disk dies and a new one takes over under the live guest. `remoca up` serves a raw image
# as a vbd3 disk (xvdd) to the running guest, written as libxl 4.19 writes it (lib/vbd.sh). The
# guest's /init (guest-init.sh) reacts to /dev/xvdd by itself: rounds of fresh random data written
# with O_DIRECT + fsync and read back, one console line per round, then a verdict. While that
# runs, dom0 SIGKILLs `remoca up` (by its PID) KILLS times, each a random fraction of a second
# after a round began, and starts a new one each time; the new process finds the device
# Connected on both sides, maps the still-granted ring again, binds the frontend's event channel
# again (Xen left it unbound towards dom0 when the dead process's end was closed) and replays the
# requests between rsp_prod and req_prod. The xenstore states must stay Connected throughout
# (blkfront never hears of it), the guest must verify every round with no I/O error, and the
# image must hold the guest's last round. Checks: tier1-up-starts, tier1-connected,
# tier1-kills-reattach, tier1-guest-verifies, tier1-image-holds-last-round, tier1-detach,
# tier1-up-stops, tier1-guest-keeps-running.
# Needs: `remoca`, `xl`, `xenstore-*` on PATH, a running PV guest named by $GUEST whose initramfs
# loads xen-blkfront. Leaves the guest running with no disk attached.
G=${GUEST:?set GUEST to the name of a running PV guest}
T=${TMPDIR:-/tmp}/remoca-tier1.$$
IMG=$T/disk.img
CONLOG=/var/log/xen/console/guest-$G.log
DEVID=51760 # xvdd: (202 << 8) | (3 << 4); blkif.sh uses xvdb, swap.sh xvdc
KILLS=${TIER1_KILLS:-5}
ROUNDS=20   # guest-init.sh's TIER1_ROUNDS
KIB=512     # guest-init.sh's TIER1_KIB
mkdir -p "$T"

TAG=tier1 GTAG=GUEST-TIER1 DEV=xvdd
CONSOLE_GREP='GUEST-TIER1|blkfront|GUEST-ERROR|I/O error' CONSOLE_LINES=40
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

N=
cleanup() {
  if xenstore-exists "$BE" 2>/dev/null || xenstore-exists "$FE" 2>/dev/null; then
    # A backend must be running for the detach handshake (a killed one may have left none).
    [ -n "$UP" ] || start_up || true
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

truncate -s 16M "$IMG"
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
name = "tier1"
template = "$IMG"
CFG

# ---------------------------------------------------------------- serve and attach
note "domain $G is $DOMID; backend $BE; $KILLS kills"
start_up
rc=$?
show_up_log
result up-starts $rc
[ $rc -eq 0 ] || exit 1

N=$(next_attach)
attach "raw:tier1" && wait_for 60 both_connected
rc=$?
if [ $rc -eq 0 ]; then
  note "backend and frontend Connected (4)"
else
  note "not connected: backend state $(state "$BE"), frontend state $(state "$FE")"
  show_device
  show_up_log
  show_console
fi
result connected $rc
connected=$rc

# ---------------------------------------------------------------- kill and restart under the guest
round_seen() { has_console_line GUEST-TIER1-ROUND "$N $1"; }
done_seen() { has_console_line GUEST-TIER1-DONE "$N"; }
# The backend's own lines (info level; remoca logs warnings only by default), without colours.
export RUST_LOG=warn,remoca_blkback::blkif=info
plain_log() { sed $'s/\e\\[[0-9;]*m//g' "$T/up.log"; }
reattached() { plain_log | grep -q 're-attaching to the ring' && plain_log | grep -q 'connected.* attach=true'; }
# How many requests the new process found between rsp_prod and req_prod (its log says).
replayed() { plain_log | grep 'replaying the unanswered requests' | grep -o 'requests=[0-9]*' | tail -n 1 | cut -d= -f2; }
replays=
kills_ok=1
done_kills=0
if [ $connected -eq 0 ]; then
  kills_ok=0
  for k in $(seq "$KILLS"); do
    # Kill k lands in round 2k: the guest is then writing or reading, with a request on the ring
    # most of the time (it does nothing but O_DIRECT I/O, one request at a time).
    r=$((2 * k))
    if ! wait_for 60 round_seen "$r"; then
      note "kill $k: the guest never began round $r"
      done_seen && note "the guest finished early: $(console_line GUEST-TIER1-DONE "$N")"
      kills_ok=1
      break
    fi
    sleep "0.$((RANDOM % 10))"
    pid=$UP
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null
    UP=
    cp "$T/up.log" "$T/up.log.$k"
    done_kills=$k
    # Nobody tells blkfront: the states must still say Connected with no backend process.
    sb=$(state "$BE") sf=$(state "$FE")
    t0=$(up)
    if ! start_up; then
      note "kill $k: the new remoca up did not start"
      show_up_log
      kills_ok=1
      break
    fi
    if wait_for 30 reattached; then
      n_re=$(replayed)
      replays="$replays ${n_re:-?}"
      note "kill $k (pid $pid) in round $r; states then $sb/$sf; new pid $UP re-attached $(awk -v a="$t0" -v b="$(up)" 'BEGIN {printf "%.1f", b - a}') s after the kill, replaying ${n_re:-?} requests"
    else
      note "kill $k (pid $pid) in round $r: the new remoca up did not re-attach"
      show_up_log
      kills_ok=1
    fi
    [ "$sb/$sf" = "4/4" ] || { note "kill $k: states were $sb/$sf after the kill, not 4/4"; kills_ok=1; }
    both_connected || { note "kill $k: states are $(state "$BE")/$(state "$FE") after the restart"; kills_ok=1; }
  done
fi
[ "$done_kills" -eq "$KILLS" ] || kills_ok=1
note "$done_kills of $KILLS kills done; requests replayed after each:${replays:- none}"
result kills-reattach $kills_ok

# ---------------------------------------------------------------- the guest's verdict
rc=1
if [ $connected -eq 0 ]; then
  wait_for 120 done_seen
  verdict=$(console_line GUEST-TIER1-DONE "$N")
  note "guest: ${verdict:-no verdict}"
  [ -n "$verdict" ] && echo "$verdict" | grep -q "^rounds=$ROUNDS mismatches=0 ioerrors=0 kernel_errors=0 last="
  rc=$?
  [ $rc -eq 0 ] || { show_console; show_up_log; }
fi
result guest-verifies $rc

last=$(console_line GUEST-TIER1-DONE "$N" | sed -n 's/.* last=//p')
sum=$(head -c $((KIB * 1024)) "$IMG" | sha256sum | cut -d' ' -f1)
note "image: first $KIB KiB sha256 $sum; the guest's last round ${last:-unknown}"
[ -n "$last" ] && [ "$sum" = "$last" ]
result image-holds-last-round $?

# ---------------------------------------------------------------- detach, stop
blkif_status() { grep -o 'blkif [0-9]* disks, [0-9]* requests, [0-9]* errors' "$T/up.log" | tail -n 1; }
note "last remoca up's status: $(blkif_status)"
detach "$N"
result detach $?
stop_up
rc=$?
note "remoca up exited with $rc"
result up-stops $rc

ticks() { console | grep -c GUEST-TICK; }
ticked() { [ "$(ticks)" -gt "$t0" ]; }
t0=$(ticks)
st=$(xl list "$G" 2>/dev/null | awk 'NR == 2 {print $5}')
case $st in '' | *p* | *s* | *c* | *d*) rc=1 ;; *) rc=0 ;; esac
[ $rc -eq 0 ] && { wait_for 15 ticked; rc=$?; }
note "guest state '$st', GUEST-TICK lines $t0 -> $(ticks)"
result guest-keeps-running $rc
exit $failed
