#!/bin/bash
# Build the images QEMU boots, from the debs fetch.sh extracted into $WORK/root:
#   $OUT/xen           the uncompressed hypervisor (a multiboot1 ELF QEMU's -kernel loads)
#   $OUT/vmlinuz       the Debian 6.1 kernel, used for dom0 and for the guest
#   $OUT/domU.cpio.gz  the guest's initramfs: busybox, xen-blkfront.ko, guest-init.sh and the swap
#                      and tier-2 tests' workloads (tests/blkback_harness/{swap_workload,tier2_aio}.c,
#                      built with gcc -static)
#   $OUT/dom0.cpio.gz  dom0's initramfs: busybox, bash, flock, the Xen toolstack and libraries,
#                      kernel modules, remoca, the guest payload and tests/xen-qemu/dom0-tests/*.sh
#   $OUT/driver.cpio.gz  the driver domains' initramfs (dom0-tests/tier2.sh): dom0's tree without
#                      the guest payload and the tests, /init handing over to driver-init.sh
# Env: REMOCA_BIN (default target/xen-stage/remoca under the repo), REMOCA_XENQEMU_WORK,
#      REMOCA_XENQEMU_STRIP=0 to ship remoca with its debug info (default: strip it, keep symbols).
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need cpio cpio
need gzip gzip
need ldd libc-bin
need bash bash
need flock util-linux
need ldconfig libc-bin

REMOCA_BIN=${REMOCA_BIN:-target/xen-stage/remoca}
case $REMOCA_BIN in /*) ;; *) REMOCA_BIN=$REPO_ROOT/$REMOCA_BIN ;; esac
[ -x "$REMOCA_BIN" ] || die "remoca binary not found at $REMOCA_BIN: build it first (cargo build --profile xen-stage -p remoca) or set REMOCA_BIN"
[ -f "$ROOT/.debs" ] || die "no extracted packages in $ROOT: run fetch.sh first"

kvers=("$ROOT"/lib/modules/*)
{ [ ${#kvers[@]} -eq 1 ] && [ -d "${kvers[0]}" ]; } || die "expected exactly one kernel in $ROOT/lib/modules, found: ${kvers[*]}"
KVER=$(basename "${kvers[0]}")
KMOD=$ROOT/lib/modules/$KVER
[ -f "$ROOT/boot/vmlinuz-$KVER" ] || die "no $ROOT/boot/vmlinuz-$KVER"
[ -f "$ROOT/boot/xen-4.17-amd64.gz" ] || die "no $ROOT/boot/xen-4.17-amd64.gz"
BUSYBOX=$ROOT/bin/busybox          # from busybox-static: no shared libraries needed
[ -x "$BUSYBOX" ] || die "no $BUSYBOX (busybox-static deb)"

D=$WORK/dom0root                   # staging trees, rebuilt each time
G=$WORK/domUroot
SHARE=/usr/share/remoca-xenqemu    # where dom0 finds its payload
rm -rf "$D" "$G"
mkdir -p "$OUT"

# mkcpio DIR OUT: a newc archive owned by root, in a stable order, gzip -1 (fast to unpack
# under TCG and fast to build).
mkcpio() { (cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1) > "$2.tmp" && mv "$2.tmp" "$2"; }
# busybox_tree DIR: busybox with its applets as symlinks in DIR/bin. Never link the applet named
# `busybox` itself: that would replace the binary with a link to itself.
busybox_tree() {
  mkdir -p "$1/bin" "$1/sbin"
  cp "$BUSYBOX" "$1/bin/busybox"
  "$BUSYBOX" --list | grep -vx busybox | while read -r a; do ln -s busybox "$1/bin/$a"; done
}

# copy_ko SRC DEST: a kernel module, decompressed (busybox insmod takes plain .ko files).
copy_ko() {
  case $1 in
    *.ko) cp "$1" "$2" ;;
    *.ko.xz) xz -dc "$1" > "$2" ;;
    *.ko.zst) zstd -qdc "$1" > "$2" ;;
    *) die "unknown module file type $1" ;;
  esac
}

# ---------------- guest (domU) ----------------
busybox_tree "$G"
mkdir -p "$G"/{dev,proc,sys,tmp,root,etc,lib/modules}
install -m 0755 "$XENQEMU_DIR/guest-init.sh" "$G/init"
# The guest's block frontend (Debian builds it as a module, with no dependencies): guest-init
# loads it so that dom0-tests/blkif.sh can attach a disk served by remoca's blkif backend.
blkfront=$(find "$KMOD/kernel/drivers/block" -name 'xen-blkfront.ko*' | head -n 1)
[ -n "$blkfront" ] || die "xen-blkfront not found in $KMOD (the guest needs it for dom0-tests/blkif.sh)"
copy_ko "$blkfront" "$G/lib/modules/xen-blkfront.ko"
# The swap test's workload (dom0-tests/swap.sh): the static C program tests/remote_swap_guest.rs
# also runs, alone in /swaproot (guest-init runs it chrooted there). Without gcc the guest has
# none and swap.sh fails its guest checks; with gcc it must build (static glibc: libc6-dev).
WORKLOAD_SRC=$REPO_ROOT/tests/blkback_harness/swap_workload.c
if command -v gcc >/dev/null; then
  mkdir -p "$G/swaproot"
  gcc -static -O2 -Wall -o "$G/swaproot/swap_workload" "$WORKLOAD_SRC" ||
    die "building $WORKLOAD_SRC with gcc -static failed (apt-get install gcc libc6-dev)"
else
  log "gcc not found (apt-get install gcc libc6-dev): the guest gets no swap workload, dom0-tests/swap.sh will fail"
fi
# The tier-2 failover test's workload (dom0-tests/tier2.sh): writes kept in flight with Linux
# AIO, so the guest can be suspended while requests wait on a dead driver domain.
if command -v gcc >/dev/null; then
  gcc -static -O2 -Wall -o "$G/bin/tier2_aio" "$REPO_ROOT/tests/blkback_harness/tier2_aio.c" ||
    die "building tests/blkback_harness/tier2_aio.c with gcc -static failed (apt-get install gcc libc6-dev)"
fi
mkcpio "$G" "$OUT/domU.cpio.gz"

# ---------------- dom0 ----------------
busybox_tree "$D"
mkdir -p "$D"/{dev,proc,sys,tmp,root,run,etc/remoca-xenqemu,usr/bin,usr/sbin,lib64} \
  "$D"/var/{lib/xen,lib/xenstored,log/xen/console} "$D$SHARE"/{guest,dom0-tests}
ln -s ../run "$D/var/run"
# bash runs libxl's hotplug scripts and the dom0-tests; util-linux flock is used by the hotplug
# locking (busybox lacks the applet). Both from the host, which is Debian 12 like the packages.
cp --remove-destination "$(command -v bash)" "$D/bin/bash"
cp --remove-destination "$(command -v flock)" "$D/usr/bin/flock"

# Xen toolstack: xl, xenstored, xenconsoled, xen-init-dom0, libxl-save-helper, ... and their
# libraries. Debian's /usr/sbin/xl etc. go through a version-detecting wrapper; link straight to
# the 4.17 binaries instead.
mkdir -p "$D/usr/lib/xen-4.17"
cp -a "$ROOT/usr/lib/xen-4.17/bin" "$ROOT/usr/lib/xen-4.17/lib" "$D/usr/lib/xen-4.17/"
for b in "$D"/usr/lib/xen-4.17/bin/*; do ln -sf "/usr/lib/xen-4.17/bin/${b##*/}" "$D/usr/sbin/${b##*/}"; done
cp -a "$ROOT"/usr/bin/xenstore* "$ROOT"/usr/bin/xen-detect "$D/usr/bin/"
find "$D/usr/bin" -lname '*xen-utils-wrapper' -delete   # xenstore-control: in /usr/sbin above
mkdir -p "$D/usr/lib/x86_64-linux-gnu"
cp -a "$ROOT/usr/lib/x86_64-linux-gnu/." "$D/usr/lib/x86_64-linux-gnu/"
cp -a "$ROOT/etc/xen" "$D/etc/"

# remoca itself. Debug builds are large; dropping the DWARF info keeps the image (and dom0's RAM)
# small while panics still name functions.
if [ "${REMOCA_XENQEMU_STRIP:-1}" = 1 ] && command -v objcopy >/dev/null; then
  objcopy --strip-debug "$REMOCA_BIN" "$D/usr/bin/remoca"
else
  cp "$REMOCA_BIN" "$D/usr/bin/remoca"
fi
chmod 0755 "$D/usr/bin/remoca"

# Shared-library closure of every dynamic ELF shipped. The Xen libraries come from the extracted
# debs (searched first); the rest (glibc, libgcc, libuuid, ...) from the host, which must be
# Debian 12 like the debs. Each library is copied to the path the host loader resolved it to.
is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; }
export LD_LIBRARY_PATH=$ROOT/usr/lib/x86_64-linux-gnu:$ROOT/usr/lib/xen-4.17/lib/x86_64-linux-gnu
elves=()
while IFS= read -r -d '' f; do is_elf "$f" && elves+=("$f"); done < <(find "$D" -type f -print0)
for f in "${elves[@]}"; do
  ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' || true
done | sort -u | while read -r lib; do
  case $lib in "$ROOT"/*) continue ;; esac
  mkdir -p "$D$(dirname "$lib")"
  [ -e "$D$lib" ] || cp -L "$lib" "$D$lib"
done
unset LD_LIBRARY_PATH
# glibc dlopen()s libgcc_s for pthread_cancel; without it xl create aborts with
# "libgcc_s.so.1 must be installed for pthread_cancel to work".
# (awk reads to the end: an early exit would SIGPIPE ldconfig, fatal under pipefail)
libgcc=$(ldconfig -p | awk '$1 == "libgcc_s.so.1" && /x86-64/ && !n++ {print $NF}')
[ -n "$libgcc" ] || die "libgcc_s.so.1 not found on the host (libgcc-s1)"
mkdir -p "$D$(dirname "$libgcc")"
cp -L "$libgcc" "$D$libgcc"
[ -e "$D/lib64/ld-linux-x86-64.so.2" ] || die "the dynamic loader was not picked up by ldd"
# Check: with dom0's own library directories first, every dynamic ELF resolves inside the image.
dlibs=$D/lib/x86_64-linux-gnu:$D/usr/lib/x86_64-linux-gnu:$D/usr/lib/xen-4.17/lib/x86_64-linux-gnu
bad=
for f in "${elves[@]}"; do
  out=$("$D/lib64/ld-linux-x86-64.so.2" --library-path "$dlibs" --list "$f" 2>&1) || continue # static or not a program
  miss=$(printf '%s\n' "$out" | awk -v d="$D" '$2 == "=>" && ($3 == "not" || index($3, d) != 1) {print $1}')
  [ -z "$miss" ] || bad+="${f#"$D"}: $(echo "$miss" | tr '\n' ' ')"$'\n'
done
[ -z "$bad" ] || die "libraries missing from the dom0 image:
$bad"

# Kernel modules, with the dependencies each one declares, in load order. Debian 6.1 builds
# these as modules; dom0's init insmods them in the order written to etc/remoca-xenqemu/modules.
declare -A modpath=() moddone=()
while IFS= read -r -d '' f; do
  n=${f##*/}; n=${n%%.ko*}; modpath[${n//-/_}]=$f
done < <(find "$KMOD/kernel" -name '*.ko*' -print0)
modorder=()
addmod() { # NAME: dependencies first, then NAME
  local n=${1//-/_} f deps d
  [ -z "${moddone[$n]:-}" ] || return 0
  moddone[$n]=1
  f=${modpath[$n]:-}
  if [ -z "$f" ]; then
    grep -q "/${1}.ko\|/${n}.ko" "$KMOD/modules.builtin" && { log "module $1 is built in"; return 0; }
    die "kernel module $1 not found in $KMOD"
  fi
  # The .modinfo section holds NUL-terminated "depends=a,b" (module names, - or _).
  case $f in
    *.ko) deps=$(tr '\0' '\n' < "$f" | awk '/^depends=/ && !n++ {print substr($0, 9)}') ;;
    *.ko.xz) deps=$(xz -dc "$f" | tr '\0' '\n' | awk '/^depends=/ && !n++ {print substr($0, 9)}') ;;
    *.ko.zst) deps=$(zstd -dc "$f" | tr '\0' '\n' | awk '/^depends=/ && !n++ {print substr($0, 9)}') ;;
    *) die "unknown module file type $f" ;;
  esac
  for d in ${deps//,/ }; do addmod "$d"; done
  modorder+=("$n")
}
for m in xen-privcmd xenfs xen-evtchn xen-gntdev xen-gntalloc xen-blkback loop; do addmod "$m"; done
mkdir -p "$D/lib/modules/$KVER/driver"
for n in "${modorder[@]}"; do
  copy_ko "${modpath[$n]}" "$D/lib/modules/$KVER/$n.ko"
  echo "$n" >> "$D/etc/remoca-xenqemu/modules"
done
# The driver domains (dom0-tests/tier2.sh) boot this tree too and reach their storage through
# the block frontend; dom0 never loads it.
copy_ko "$blkfront" "$D/lib/modules/$KVER/driver/xen-blkfront.ko"
install -m 0755 "$XENQEMU_DIR/driver-init.sh" "$D/etc/remoca-xenqemu/driver-init.sh"
install -m 0755 "$XENQEMU_DIR/block-shared" "$D/etc/xen/scripts/block-shared"

# Guest payload, dom0 init and the dom0 tests.
cp "$ROOT/boot/vmlinuz-$KVER" "$D$SHARE/guest/vmlinuz"
cp "$OUT/domU.cpio.gz" "$D$SHARE/guest/domU.cpio.gz"
cp "$XENQEMU_DIR/guest-pv.cfg" "$D$SHARE/guest/guest-pv.cfg"
shopt -s nullglob
for t in "$XENQEMU_DIR"/dom0-tests/*.sh; do install -m 0755 "$t" "$D$SHARE/dom0-tests/"; done
# Their shared helpers (sourced, not run: dom0-init.sh runs only dom0-tests/*.sh).
install -d "$D$SHARE/dom0-tests/lib"
for t in "$XENQEMU_DIR"/dom0-tests/lib/*.sh; do install -m 0644 "$t" "$D$SHARE/dom0-tests/lib/"; done
shopt -u nullglob
install -m 0755 "$XENQEMU_DIR/dom0-init.sh" "$D/init"
echo "root:x:0:0:root:/root:/bin/sh" > "$D/etc/passwd"
echo "root:x:0:" > "$D/etc/group"
# A loader cache, so programs find their libraries even without LD_LIBRARY_PATH.
ldconfig -r "$D" 2>/dev/null || log "ldconfig -r failed; dom0 relies on LD_LIBRARY_PATH"
# The driver domains' image: this tree without the guest payload and the tests (their /init,
# dom0-init.sh, hands over to driver-init.sh on REMOCA_ROLE=driver). Shipped inside dom0's.
(cd "$D" && find . -path ".$SHARE" -prune -o -print | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1) > "$OUT/driver.cpio.gz.tmp" &&
  mv "$OUT/driver.cpio.gz.tmp" "$OUT/driver.cpio.gz"
install -d "$D$SHARE/driver"
cp "$OUT/driver.cpio.gz" "$D$SHARE/driver/driver.cpio.gz"
mkcpio "$D" "$OUT/dom0.cpio.gz"

# Hypervisor and dom0 kernel.
gzip -dc "$ROOT/boot/xen-4.17-amd64.gz" > "$OUT/xen.tmp" && mv "$OUT/xen.tmp" "$OUT/xen"
cp "$ROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
echo "$KVER" > "$OUT/kver"
log "kernel $KVER; modules: ${modorder[*]}"
log "dom0 image $(du -h "$OUT/dom0.cpio.gz" | cut -f1) ($(du -sh "$D" | cut -f1) unpacked, remoca $(du -h "$D/usr/bin/remoca" | cut -f1)), guest image $(du -h "$OUT/domU.cpio.gz" | cut -f1)"
