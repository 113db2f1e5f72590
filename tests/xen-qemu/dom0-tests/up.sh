#!/bin/bash
# `remoca up` on the real hypervisor, inside dom0 of Xen-under-QEMU: it opens real Xen (not
# the simulator), starts its services, publishes them in the real xenstore, serves a disk
# over NBD, and removes what it published when it stops on SIGTERM.
# Needs: `remoca`, `xenstore-read`, `xl` on PATH. Prints one `@@RESULT <name> PASS|FAIL` per check.
T=${TMPDIR:-/tmp}/remoca-up.$$
mkdir -p "$T"
result() { if [ "$2" -eq 0 ]; then echo "@@RESULT $1 PASS"; else echo "@@RESULT $1 FAIL"; fi; }

# The services listen on loopback; a bare dom0 may not have brought it up.
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up 2>/dev/null || true

cat > "$T/up.toml" <<CFG
[host]
backend = "real"
state_dir = "$T"
status_interval = 1.0
[memserver]
capacity = "32M"
headroom = "64M"
[blkback]
demo_disk = "8M"
CFG

remoca up --config "$T/up.toml" > "$T/up.log" 2>&1 &
UP=$!
ok=1
for _ in $(seq 60); do
  grep -q "running; Ctrl-C stops" "$T/up.log" && { ok=0; break; }
  kill -0 "$UP" 2>/dev/null || break
  sleep 0.5
done
sed 's/^/  up| /' "$T/up.log"
result up-real-starts $ok
grep -q "remoca up: real Xen host" "$T/up.log"; result up-real-backend $?
grep -Eq "domain +0 Domain-0" "$T/up.log"; result up-real-lists-dom0 $?

mem=$(xenstore-read /tool/remoca/up/memserver 2>&1); rc=$?
echo "  /tool/remoca/up/memserver = $mem"
[ $rc -eq 0 ] && case $mem in 127.0.0.1:*) true ;; *) false ;; esac; result up-real-publishes-memserver $?
[ "$(xenstore-read /tool/remoca/up/pid 2>&1)" = "$UP" ]; result up-real-publishes-pid $?

kill -TERM "$UP" 2>/dev/null
wait "$UP"; rc=$?
echo "  remoca up exited with $rc"
tail -3 "$T/up.log" | sed 's/^/  up| /'
result up-real-stops-on-sigterm $rc
! xenstore-read /tool/remoca/up/pid >/dev/null 2>&1; result up-real-unpublishes $?
rm -rf "$T"
