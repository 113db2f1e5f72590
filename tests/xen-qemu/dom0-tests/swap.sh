#!/bin/bash
# shellcheck disable=SC2317 # functions called through wait_for and the EXIT trap
# A PV guest swaps onto remoca's remote swap device through its own blkfront, inside dom0 of
# Xen-under-QEMU: `remoca up` runs a memory server and one `[[blkback.swap]]` device whose 4 KiB
# blocks live on that server (docs/remote-memory.md), served by up's blkif backend as a vbd3
# disk (xvdc) to the running guest. The device nodes are written by hand as libxl 4.19 would
# (see blkif.sh, whose attach and detach this repeats for another devid). The guest's /init
# (guest-init.sh) reacts to /dev/xvdc by itself: a short timed O_DIRECT write/read-back, mkswap,
# swapon, swap_workload (fills more memory than the guest has free with checksummed pages and
# verifies every page twice), a verdict line with the kernel's pswpout/pswpin for the run,
# swapoff. dom0 checks the verdict, that the guest really swapped, and that up's status shows
# at least the guest's overflow as blocks on the memory server (none spilled, no errors), then
# detaches and stops up. Checks: swap-up-starts, swap-connected, swap-guest-verifies,
# swap-pages-on-memserver, swap-detach, swap-up-stops, swap-guest-keeps-running.
# The remoca binary must be optimized (`cargo build --profile xen-stage`): dom0 runs under TCG.
# Needs: `remoca`, `xl`, `xenstore-*` on PATH, a running PV guest named by $GUEST whose
# initramfs loads xen-blkfront and holds /swaproot/swap_workload. Prints one
# `@@RESULT swap-<check> PASS|FAIL` line per check and leaves the guest running with no disk
# attached and no swap.
G=${GUEST:?set GUEST to the name of a running PV guest}
T=${TMPDIR:-/tmp}/remoca-swap.$$
CONLOG=/var/log/xen/console/guest-$G.log
DEVID=51744 # xvdc: (202 << 8) | (2 << 4); blkif.sh uses xvdb
EXPORT=guest-swap
mkdir -p "$T"

TAG=swap GTAG=GUEST-SWAP DEV=xvdc
CONSOLE_GREP='GUEST-SWAP|blkfront|GUEST-ERROR|Out of memory|oom' CONSOLE_LINES=40
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
# Whatever happens, leave no device behind for the later tests and no remoca running. A device
# the guest still swaps on must not be pulled from under it (its processes' pages would be
# lost): give the guest time to finish and swapoff first.
cleanup() {
  if xenstore-exists "$BE" 2>/dev/null || xenstore-exists "$FE" 2>/dev/null; then
    if [ -n "$N" ] && has_console_line GUEST-SWAP-DISK "$N" && ! has_console_line GUEST-SWAP-DONE "$N"; then
      note "cleanup: waiting up to 60 s for the guest's swapoff"
      wait_for 60 has_console_line GUEST-SWAP-DONE "$N" || note "cleanup: the guest still swaps on xvdc"
    fi
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

# CPU seconds so far: remoca up's process, dom0 and the guest (xl list's Time(s) column).
cpu_sample() {
  local r=0
  [ -n "$UP" ] && r=$(awk '{print ($14 + $15) / 100}' "/proc/$UP/stat" 2>/dev/null)
  echo "remoca ${r}s dom0 $(xl list 2>/dev/null | awk '$1 == "Domain-0" {print $6}')s guest $(xl list "$G" 2>/dev/null | awk 'NR == 2 {print $6}')s"
}
cpu_threads() {
  local f
  for f in "/proc/$UP/task/"*/stat; do
    awk '{c = $2; for (i = 3; $i !~ /^[A-Z]$/; i++) c = c " " $i; print ($(i + 11) + $(i + 12)) / 100 "s", c}' "$f" 2>/dev/null
  done | sort -rn | head -n 5
}

# ---------------------------------------------------------------- remoca up with a swap device
# The services listen on loopback; a bare dom0 may not have brought it up.
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up 2>/dev/null || true
note "dom0 memory: $(grep -E '^(MemTotal|MemAvailable):' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
# The memory server keeps the guest's swapped pages in dom0's RAM (1 GiB, of which about
# 850 MiB are available here): 256 MiB lent at most, 64 MiB always left free.
cat > "$T/up.toml" <<CFG
[host]
backend = "real"
state_dir = "$T"
status_interval = 1.0
[memserver]
capacity = "256M"
headroom = "64M"
[blkback]
blkif = true
[[blkback.swap]]
name = "$EXPORT"
size = "192M"
spill = "$T/swap.spill"
[pager]
enabled = false
CFG

note "domain $G is $DOMID; backend $BE"
start_up
rc=$?
show_up_log
result up-starts $rc
[ $rc -eq 0 ] || exit 1

# ---------------------------------------------------------------- attach by export name
N=$(next_attach)
t_attach=$SECONDS
attach "raw:$EXPORT"
rc=$?
[ $rc -eq 0 ] || note "writing the device nodes failed"
if [ $rc -eq 0 ] && wait_for 60 both_connected; then
  note "backend and frontend Connected (4)"
else
  note "not connected: backend state $(state "$BE"), frontend state $(state "$FE")"
  show_device
  show_up_log
  show_console
  rc=1
fi
result connected $rc
connected=$rc

# ---------------------------------------------------------------- the guest swaps
# An idle run takes about 80 s from Connected to GUEST-SWAP-DONE with a remoca built with
# `--profile xen-stage`; 240 s leaves room for a loaded host. A remoca built at opt-level 0 is
# about 14 times slower per byte under TCG and does not finish (docs/xen-qemu.md).
kv() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; } # kv LINE KEY: the value of KEY=value
rc=1
ok=
if [ $connected -eq 0 ]; then
  note "cpu seconds at connect: $(cpu_sample)"
  wait_for 240 has_console_line GUEST-SWAP-DONE "$N"
  note "cpu seconds at the guest's end: $(cpu_sample); remoca's busiest threads:"
  cpu_threads | sed 's/^/    thread| /'
  note "guest finished after $((SECONDS - t_attach)) s:"
  console | grep -E "^GUEST-SWAP-[A-Z]+ $N " | grep -v '^GUEST-SWAP-DMESG' | sed 's/^/    | /'
  ok=$(console_line GUEST-SWAP-OK "$N")
  pages=$(kv "$ok" pages)
  free=$(kv "$ok" memfree_kb)
  swpout=$(kv "$ok" pswpout)
  swpin=$(kv "$ok" pswpin)
  # Every page checked twice (the guest's verdict), more pages than the guest had free at
  # swapon, and its kernel both wrote pages to xvdc and read them back.
  if [ -n "$ok" ] && [ $((pages * 4)) -gt "$free" ] && [ "$swpout" -gt 0 ] && [ "$swpin" -gt 0 ] &&
    has_console_line GUEST-SWAP-DONE "$N" && ! console | grep -q "^GUEST-SWAP-BAD $N "; then
    rc=0
  else
    if ! has_console_line GUEST-SWAP-DONE "$N"; then
      note "the guest did not finish within 240 s (is REMOCA_BIN an opt-level 0 build?)"
    fi
    show_console
    show_up_log
  fi
fi
result guest-verifies $rc

# The pages went to the memory server: up's status line (every second) shows the device's
# blocks there. At its peak the guest had at least (workload - free RAM) pages out on xvdc
# at once, each in its own 4 KiB block, and none are zero pages; so the device must have held
# that many blocks remotely (the count does not drop when the guest frees swap slots: swap
# sends no discards), none spilled to the local file and no errors.
swap_status() { grep -o "swap $EXPORT: [0-9]* blocks remote, [0-9]* spilled, [0-9]* errors" "$T/up.log"; }
max_remote=$(swap_status | awk '{print $3}' | sort -n | tail -n 1)
last=$(swap_status | tail -n 1)
note "remoca up status every 10 s (swap and blkif columns):"
grep -E '^\[ *[0-9]+s\] ' "$T/up.log" | awk 'NR % 10 == 1' |
  sed -E 's/^(\[ *[0-9]+s\]).*(swap [^|]*).*(blkif [^|]*)$/\1 \2 \3/' | sed 's/^/    up| /'
need=1
[ -n "$ok" ] && need=$((pages - free / 4))
note "remoca up status: most blocks remote ${max_remote:-none} (at least $need needed); last: ${last:-none}"
rc=1
[ $connected -eq 0 ] && [ "${max_remote:-0}" -ge "$need" ] && echo "$last" | grep -q ' 0 spilled, 0 errors$' && rc=0
result pages-on-memserver $rc

# ---------------------------------------------------------------- detach, stop
detach "$N"
result detach $?
N=
stop_up
rc=$?
note "remoca up exited with $rc"
tail -n 4 "$T/up.log" | sed 's/^/    up| /'
result up-stops $rc

# ---------------------------------------------------------------- the guest lives on
ticks() { console | grep -c GUEST-TICK; }
ticked() { [ "$(ticks)" -gt "$t0" ]; }
t0=$(ticks)
st=$(xl list "$G" 2>/dev/null | awk 'NR == 2 {print $5}')
case $st in '' | *p* | *s* | *c* | *d*) rc=1 ;; *) rc=0 ;; esac
[ $rc -eq 0 ] && { wait_for 15 ticked; rc=$?; }
note "guest state '$st', GUEST-TICK lines $t0 -> $(ticks)"
result guest-keeps-running $rc
exit $failed
