#!/bin/bash
# Xen-under-QEMU CI stage: boot Debian's Xen 4.17 with a Debian 6.1 dom0 under QEMU TCG and run
# remoca against the real hypervisor (see docs/xen-qemu.md).
#
#   tests/xen-qemu/run.sh          (from anywhere; does not build remoca, CI builds it first)
#
# Steps: fetch.sh (apt-get download, cached in the work dir) -> build-initramfs.sh -> boot.sh
# (QEMU + watchdog + timeout; dom0 runs dom0-init.sh) -> summary of the @@RESULT lines.
# Exit status: 0 only when every @@RESULT is PASS, at least one was seen and dom0 reached @@DONE.
#
# Host packages (Debian 12) this stage needs:
#   apt-get install -y --no-install-recommends qemu-system-x86 cpio perl binutils
#   (plus the base system's apt, dpkg, coreutils, bash, util-linux, libc-bin, gzip, grep, sed)
# Nothing from the Xen or kernel packages is installed on the host; they are fetched as debs.
#
# Env:
#   REMOCA_BIN               remoca binary to test (default target/xen-stage/remoca under the repo:
#                            `cargo build --profile xen-stage -p remoca`; an opt-level 0 build is
#                            too slow under TCG for dom0-tests/swap.sh)
#   REMOCA_XENQEMU_WORK      work dir: debs, extracted files, images, serial.log
#                            (default /var/tmp/remoca-xenqemu; keep it outside the repo)
#   REMOCA_XENQEMU_TIMEOUT   seconds for the QEMU boot and all tests (default 900)
#   REMOCA_XENQEMU_GUEST     name of the PV test guest (default remoca-guest)
#   REMOCA_XENQEMU_MEM, REMOCA_XENQEMU_DOM0_MEM, REMOCA_XENQEMU_SMP, REMOCA_XENQEMU_CPU,
#   REMOCA_XENQEMU_DOM0_LOGLEVEL, REMOCA_XENQEMU_KERNEL_PKG, REMOCA_XENQEMU_STRIP: see boot.sh,
#                            fetch.sh and build-initramfs.sh
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Fail on missing tools before spending time on downloads.
need qemu-system-x86_64 qemu-system-x86
need cpio cpio
need perl perl
need apt-get apt
need dpkg-deb dpkg
need ldd libc-bin
need flock util-linux
command -v objcopy >/dev/null || log "objcopy not found (apt-get install binutils): remoca goes into dom0 unstripped"
REMOCA_BIN=${REMOCA_BIN:-target/xen-stage/remoca}
case $REMOCA_BIN in /*) ;; *) REMOCA_BIN=$REPO_ROOT/$REMOCA_BIN ;; esac
[ -x "$REMOCA_BIN" ] || die "remoca binary not found at $REMOCA_BIN: build it first (cargo build --profile xen-stage -p remoca) or set REMOCA_BIN"
export REMOCA_BIN
mkdir -p "$WORK"
case $WORK/ in "$REPO_ROOT"/*) die "REMOCA_XENQEMU_WORK ($WORK) is inside the repository; put it elsewhere" ;; esac

now() { date +%s.%N; }
secs() { perl -e 'printf "%.1f", $ARGV[1] - $ARGV[0]' "$1" "$2"; }
t0=$(now)

log "fetch: Debian Xen 4.17, Linux 6.1, busybox-static into $WORK"
"$XENQEMU_DIR/fetch.sh" || die "fetching the Debian packages failed (see above)"
t1=$(now)
log "build: initramfs images (remoca from $REMOCA_BIN)"
"$XENQEMU_DIR/build-initramfs.sh" || die "building the initramfs images failed (see above)"
t2=$(now)

# boot.sh runs in the background so that a TERM/INT to this script is handled at once: the
# trap stops boot.sh, whose own trap stops QEMU (by the PID in QEMU's pidfile).
boot_pid=
# shellcheck disable=SC2317 # called from the EXIT trap
on_exit() {
  if [ -n "$boot_pid" ] && kill -0 "$boot_pid" 2>/dev/null; then
    kill "$boot_pid" 2>/dev/null || true
    wait "$boot_pid" 2>/dev/null || true
  fi
  # Belt and braces: QEMU from this run, if it outlived boot.sh.
  local p
  p=$(cat "$WORK/qemu.pid" 2>/dev/null) || return 0
  if [ -n "$p" ] && grep -qa qemu-system "/proc/$p/cmdline" 2>/dev/null; then kill "$p" 2>/dev/null || true; fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

LOG=$WORK/serial.log
boot() {
  "$XENQEMU_DIR/boot.sh" &
  boot_pid=$!
  boot_rc=0
  wait "$boot_pid" || boot_rc=$?
  boot_pid=
}
rm -f "$WORK/serial-hung.log" # an earlier run's, which would mislead
log "boot: Xen under QEMU (timeout ${REMOCA_XENQEMU_TIMEOUT:-900}s)"
boot
if [ "$boot_rc" = 5 ]; then
  # dom0's kernel hung before its init (boot.sh's status 5): no remoca code ran. Once more.
  mv "$LOG" "$WORK/serial-hung.log"
  log "boot: dom0 never reached its init (log kept as $WORK/serial-hung.log); booting once more"
  boot
fi
t3=$(now)

# ---------------------------------------------------------------- summary
mapfile -t results < <(grep -ao '@@RESULT [^ ]* [^ ]*' "$LOG" | cut -d' ' -f2,3 || true)
pass=0 fail=0 other=0
echo
echo "================ Xen-under-QEMU results ================"
printf '%-6s %s\n' RESULT CHECK
for r in "${results[@]}"; do
  name=${r% *} st=${r##* }
  case $st in
    PASS) pass=$((pass + 1)) ;;
    FAIL) fail=$((fail + 1)) ;;
    SKIP) other=$((other + 1)) ;;
    *) st="FAIL($st)" fail=$((fail + 1)) ;; # a garbled line counts as a failure
  esac
  printf '%-6s %s\n' "$st" "$name"
done
done_seen=no
grep -q '@@DONE' "$LOG" && done_seen=yes
echo "--------------------------------------------------------"
echo "pass $pass, fail $fail, skip $other; dom0 reached @@DONE: $done_seen; boot.sh status $boot_rc"
echo "time: fetch $(secs "$t0" "$t1")s, build $(secs "$t1" "$t2")s, boot+tests $(secs "$t2" "$t3")s, total $(secs "$t0" "$t3")s"
echo "serial log: $LOG"

rc=0
[ ${#results[@]} -gt 0 ] || { echo "FAILED: no @@RESULT lines in the serial log"; rc=1; }
[ "$fail" -eq 0 ] || { echo "FAILED: $fail check(s) failed"; rc=1; }
if [ "$done_seen" = no ]; then
  case $boot_rc in
    2) echo "FAILED: timeout before dom0 printed @@DONE" ;;
    3) echo "FAILED: Xen or dom0 crashed (see the watchdog line in the log)" ;;
    5) echo "FAILED: dom0's kernel hung before its init, twice" ;;
    *) echo "FAILED: QEMU exited before dom0 printed @@DONE" ;;
  esac
  rc=1
fi
[ $rc -ne 0 ] || echo "OK: all $pass checks passed"
exit $rc
