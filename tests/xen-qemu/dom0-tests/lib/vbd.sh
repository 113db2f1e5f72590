# shellcheck shell=bash
# shellcheck disable=SC2034,SC2317 # functions called through wait_for and traps
# Shared by the dom0 tests that attach a vbd3 disk served by `remoca up` to the running PV guest
# (blkif.sh, swap.sh): results and notes, polling, the guest's console, `remoca up` start/stop,
# and attach/detach written as libxl 4.19 writes them (Debian's 4.17 libxl refuses
# `backendtype=tap`; docs/blkback.md). Sourced, never run. The caller sets first:
#   TAG            result and note prefix (`@@RESULT <TAG>-<check>`)
#   GTAG           the guest's console tag for this disk (`<GTAG>-DISK N`, `<GTAG>-GONE N`)
#   DEV, DEVID     the disk's name and xenstore device id
#   CONSOLE_GREP, CONSOLE_LINES   what show_console prints of the guest console
#   T, CONLOG      scratch directory (holds up.log) and the guest's console log
# and, once the guest's domid is known, DOMID, BE and FE (and BDOM, the backend's domain, when
# it is not dom0).
failed=0
result() { # NAME STATUS(0 = pass)
  if [ "$2" -eq 0 ]; then echo "@@RESULT $TAG-$1 PASS"; else echo "@@RESULT $TAG-$1 FAIL"; failed=1; fi
}
up() { cut -d' ' -f1 /proc/uptime; }
note() { echo "  $TAG [$(up)] $*"; }
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
# The number the guest will give the next such disk it sees (it counts them from 1).
next_attach() { echo $(($(console | grep -c "^$GTAG-DISK ") + 1)); }
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
  note "guest console ($TAG lines and tail):"
  console | grep -E "$CONSOLE_GREP" | tail -n "$CONSOLE_LINES" | sed 's/^/    | /'
  console | grep -v '^$' | tail -n 4 | sed 's/^/    | /'
}
# The up log without its once-a-second status lines, but for the last three.
show_up_log() {
  grep -Ev '^\[ *[0-9]+s\] ' "$T/up.log" | sed 's/^/    up| /'
  grep -E '^\[ *[0-9]+s\] ' "$T/up.log" | tail -n 3 | sed 's/^/    up| /'
}

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
# sees a half-written device, remoca never sees a backend without its frontend). The parents may
# exist already when another test left a device behind; then they are shared and left alone on
# detach while not empty.
attach() { # PARAMS (the backend runs in domain ${BDOM:-0}: dom0, or a driver domain)
  local b=${BDOM:-0}
  local bvbd=/local/domain/$b/backend/vbd3/$DOMID fvbd=/local/domain/$DOMID/device/vbd
  xenstore-exists "$bvbd" || xenstore-write "$bvbd" "" || return 1
  xenstore-chmod "$bvbd" "n$b" "r$DOMID" || return 1
  xenstore-exists "$fvbd" || xenstore-write "$fvbd" "" || return 1
  xenstore-chmod "$fvbd" "n$DOMID" "r$b" || return 1
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
    "$BE/dev" "$DEV" \
    "$BE/type" vbd3 \
    "$BE/mode" w \
    "$BE/device-type" disk \
    "$BE/discard-enable" 1 \
    "$BE/specification" xen \
    "$FE/backend" "$BE" \
    "$FE/backend-id" "$b" \
    "$FE/state" 1 \
    "$FE/virtual-device" "$DEVID" \
    "$FE/device-type" disk \
    "$FE/trusted" 1 \
    "$FE/protocol" x86_64-abi || return 1
  xenstore-chmod "$BE" "n$b" "r$DOMID" && xenstore-chmod "$FE" "n$DOMID" "r$b"
}
# detach N: as libxl's device removal: online=0 + backend state 5, wait for the backend's
# Closed (and the guest dropping the disk), then remove both directories and their empty parents.
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
  for p in "/local/domain/$DOMID/device/vbd" "/local/domain/${BDOM:-0}/backend/vbd3/$DOMID"; do
    [ -n "$(xenstore-list "$p" 2>/dev/null)" ] || xenstore-rm "$p" 2>/dev/null
  done
  { gone "$BE" && gone "$FE"; } || { note "device directories still there"; ok=1; }
  if [ -n "$n" ] && has_console_line "$GTAG-DISK" "$n"; then
    wait_for 30 has_console_line "$GTAG-GONE" "$n" || { note "the guest did not report $DEV gone"; ok=1; }
  fi
  return $ok
}
