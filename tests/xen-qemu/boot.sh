#!/bin/bash
# Boot the images build-initramfs.sh made: Xen 4.17 (multiboot1, QEMU's -kernel) with the Debian
# 6.1 dom0 kernel and initramfs as multiboot modules, under QEMU TCG (no KVM needed). The serial
# console is timestamped (seconds since QEMU started), saved to $WORK/serial.log and streamed to
# stdout.
#
# A watchdog stops QEMU (by the PID in its pidfile) when Xen or dom0 crashes (Xen's `noreboot`
# would otherwise hang until the timeout), when the timeout expires, or when dom0 printed @@DONE
# but did not power off, and when dom0's /init did not start (no `@@MARK` line) within
# REMOCA_XENQEMU_INIT_TIMEOUT seconds: dom0's kernel has hung at boot under TCG once in many runs
# (after "Poking KASLR using RDTSC...", nothing more), and run.sh boots once more on that status.
# Exit status: 0 when dom0 printed @@DONE and QEMU exited, 2 on timeout, 3 on a crash, 4 when
# QEMU exited without @@DONE, 5 when dom0's init was never reached.
#
# Env: REMOCA_XENQEMU_TIMEOUT (s, default 900), REMOCA_XENQEMU_INIT_TIMEOUT (s, default 180;
#      dom0's init normally starts 12-17 s after QEMU), REMOCA_XENQEMU_MEM (QEMU MiB, default 2048),
#      REMOCA_XENQEMU_DOM0_MEM (default 1024M), REMOCA_XENQEMU_SMP (default 2),
#      REMOCA_XENQEMU_CPU (default qemu64,+svm,+npt; `-cpu max` crashes the PV dom0),
#      REMOCA_XENQEMU_GUEST (guest name handed to dom0), REMOCA_XENQEMU_DOM0_LOGLEVEL (default 4),
#      REMOCA_XENQEMU_TESTS (dom0-tests to run, ':'-separated, e.g. tier1:tier2; default all).
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need qemu-system-x86_64 qemu-system-x86
need perl perl

TIMEOUT=${REMOCA_XENQEMU_TIMEOUT:-900}
INIT_TIMEOUT=${REMOCA_XENQEMU_INIT_TIMEOUT:-180}
CPU=${REMOCA_XENQEMU_CPU:-qemu64,+svm,+npt}
DOM0_MEM=${REMOCA_XENQEMU_DOM0_MEM:-1024M}
LOG=$WORK/serial.log
for f in xen vmlinuz dom0.cpio.gz; do [ -f "$OUT/$f" ] || die "$OUT/$f missing: run build-initramfs.sh first"; done

XEN_ARGS="console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all console_timestamps=boot noreboot dom0_mem=$DOM0_MEM,max:$DOM0_MEM"
DOM0_ARGS="console=hvc0 earlyprintk=xen rdinit=/init loglevel=${REMOCA_XENQEMU_DOM0_LOGLEVEL:-4}"
[ -z "${REMOCA_XENQEMU_GUEST:-}" ] || DOM0_ARGS+=" REMOCA_XENQEMU_GUEST=$REMOCA_XENQEMU_GUEST"
if [ -n "${REMOCA_XENQEMU_TESTS:-}" ]; then
  case $REMOCA_XENQEMU_TESTS in *,* | *' '*) die "REMOCA_XENQEMU_TESTS separates names with ':' (no commas or spaces)" ;; esac
  DOM0_ARGS+=" REMOCA_XENQEMU_TESTS=$REMOCA_XENQEMU_TESTS"
fi
# QEMU's multiboot loader splits -initrd on commas: each module is "path args".
case "$OUT" in *,* | *' '*) die "the work dir path must not contain commas or spaces: $OUT" ;; esac

PIDF=$WORK/qemu.pid
rm -f "$PIDF"
qemu_pid() { # the PID from the pidfile, if that process is still our QEMU
  local p
  p=$(cat "$PIDF" 2>/dev/null) || return 1
  [ -n "$p" ] && grep -qa qemu-system "/proc/$p/cmdline" 2>/dev/null && echo "$p"
}
stop_qemu() {
  local p
  p=$(qemu_pid) || return 0
  kill "$p" 2>/dev/null || true
  for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$p" 2>/dev/null || true
}
trap stop_qemu EXIT
trap 'exit 130' INT TERM

log "booting: qemu-system-x86_64 -cpu $CPU, timeout ${TIMEOUT}s, serial log $LOG"
start=$(date +%s.%N)
: > "$LOG"
# The perl filter prefixes each line with host seconds since start and writes it both to the log
# and to stdout, flushing every line.
qemu-system-x86_64 -machine q35,accel=tcg -cpu "$CPU" \
  -m "${REMOCA_XENQEMU_MEM:-2048}" -smp "${REMOCA_XENQEMU_SMP:-2}" \
  -nographic -monitor none -serial stdio -nic none -no-reboot -pidfile "$PIDF" \
  -kernel "$OUT/xen" -append "$XEN_ARGS" \
  -initrd "$OUT/vmlinuz $DOM0_ARGS,$OUT/dom0.cpio.gz" \
  < /dev/null 2>&1 |
  perl -MTime::HiRes=time -e '
    $| = 1; my ($s, $log) = @ARGV; @ARGV = ();
    open(my $fh, ">>", $log) or die "$log: $!"; $fh->autoflush(1);
    while (<STDIN>) { s/\r//g; my $l = sprintf("[%7.2f] %s", time() - $s, $_); print $l; print $fh $l; }
  ' "$start" "$LOG" &
pipe=$!

status=4
done_at=
init_seen=
while kill -0 "$pipe" 2>/dev/null; do
  now=$(date +%s)
  elapsed=$((now - ${start%.*}))
  if grep -qE 'Hardware Dom0 crashed|Panic on CPU|Kernel panic' "$LOG"; then
    sleep 2 # let the rest of the panic message reach the log
    echo "# watchdog: crash detected after ${elapsed}s, stopping QEMU" | tee -a "$LOG"
    status=3
    stop_qemu
    break
  fi
  if [ -z "$init_seen" ] && grep -q '@@MARK' "$LOG"; then init_seen=yes; fi
  if [ -z "$init_seen" ] && [ "$elapsed" -ge "$INIT_TIMEOUT" ]; then
    echo "# watchdog: dom0's init not started after ${INIT_TIMEOUT}s (no @@MARK), stopping QEMU" | tee -a "$LOG"
    status=5
    stop_qemu
    break
  fi
  if [ -z "$done_at" ] && grep -q '@@DONE' "$LOG"; then done_at=$now; fi
  if [ -n "$done_at" ] && [ $((now - done_at)) -gt 30 ]; then
    echo "# watchdog: @@DONE but no power-off within 30s, stopping QEMU" | tee -a "$LOG"
    stop_qemu
    break
  fi
  if [ "$elapsed" -ge "$TIMEOUT" ]; then
    echo "# watchdog: timeout after ${TIMEOUT}s, stopping QEMU" | tee -a "$LOG"
    status=2
    stop_qemu
    break
  fi
  sleep 1
done
wait "$pipe" || true
if [ "$status" = 4 ] && grep -q '@@DONE' "$LOG"; then status=0; fi
echo "# qemu finished after $(perl -MTime::HiRes=time -e 'printf "%.1f", time() - $ARGV[0]' "$start")s, status $status" | tee -a "$LOG"
exit "$status"
