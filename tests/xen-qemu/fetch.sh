#!/bin/bash
# Fetch Debian's Xen 4.17 hypervisor and toolstack, a Debian 6.1 kernel and busybox-static as
# .debs with `apt-get download` (nothing is installed on the host) and extract them with
# `dpkg -x` into $WORK/root. Debs are cached in $WORK/debs and checked against apt's SHA256, so
# a rerun downloads nothing unless apt's candidate versions moved.
# Env: REMOCA_XENQEMU_WORK (work dir), REMOCA_XENQEMU_KERNEL_PKG (override the kernel package).
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need sha256sum coreutils

# The kernel: whatever linux-image-amd64 depends on today (the ABI number in
# linux-image-6.1.0-NN-amd64 moves with every stable update, so it is never written down here).
kpkg=${REMOCA_XENQEMU_KERNEL_PKG:-}
if [ -z "$kpkg" ]; then
  meta=$(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null) ||
    die "apt knows no linux-image-amd64: run apt-get update (Debian 12 sources needed)"
  kpkg=$(printf '%s\n' "$meta" | sed -n 's/^Depends: //p' | tr ',|' '\n' | sed -E 's/^ +//; s/[ (].*//' |
    awk '/^linux-image-6\.1\.[0-9]+-[0-9]+-amd64$/ && !n++' | grep .) ||
    die "linux-image-amd64 does not depend on a linux-image-6.1.*-amd64 package (not Debian 12?): $(printf '%s\n' "$meta" | grep '^Depends:')"
fi

# Xen 4.17 hypervisor + toolstack + the libraries they load. libyajl2, libext2fs2 and
# libncurses6 are fetched too so the dom0 image does not depend on what the host happens to have.
pkgs=(
  xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils
  libxenmisc4.17 libxencall1 libxenevtchn1 libxenforeignmemory1 libxengnttab1 libxenstore4
  libxentoollog1 libxendevicemodel1 libxenhypfs1 libxentoolcore1
  libyajl2 libext2fs2 libncurses6
  busybox-static "$kpkg"
)

mkdir -p "$DEBS"
# Run from an empty directory: apt-get download leaves out files already in the current one.
uris=$(cd "$WORK" && apt-get download --print-uris "${pkgs[@]}" 2>&1) ||
  die "apt-get download --print-uris failed (run apt-get update?):
$uris"
# Lines: 'URI' FILENAME SIZE SHA256:HEX
want=()
missing=()
while read -r _uri fname _size hash; do
  want+=("$fname")
  if [ -f "$DEBS/$fname" ] && [ "$(sha256sum "$DEBS/$fname" | cut -d' ' -f1)" = "${hash#SHA256:}" ]; then
    continue
  fi
  missing+=("${fname%%_*}")
done < <(printf '%s\n' "$uris" | grep "^'")
[ ${#want[@]} -eq ${#pkgs[@]} ] || die "apt resolved ${#want[@]} of ${#pkgs[@]} packages:
$uris"

if [ ${#missing[@]} -gt 0 ]; then
  log "downloading ${#missing[@]} packages: ${missing[*]}"
  tmp=$DEBS/.partial
  rm -rf "$tmp"
  mkdir -p "$tmp"
  # -o APT::Sandbox::User=root: the work dir may not be readable by _apt; avoids a warning.
  (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "${missing[@]}") ||
    die "apt-get download failed for: ${missing[*]}"
  mv "$tmp"/*.deb "$DEBS"/
  rmdir "$tmp"
else
  log "all ${#want[@]} debs cached in $DEBS"
fi
# Drop debs apt no longer points at (older versions), so the cache does not grow without bound.
for f in "$DEBS"/*.deb; do
  case " ${want[*]} " in *" ${f##*/} "*) ;; *) log "removing stale ${f##*/}"; rm -f "$f" ;; esac
done

# Extract once per deb set; the stamp lists the exact files extracted.
stamp=$(printf '%s\n' "${want[@]}" | sort)
if [ -f "$ROOT/.debs" ] && [ "$(cat "$ROOT/.debs")" = "$stamp" ]; then
  log "extracted packages up to date in $ROOT"
else
  log "extracting ${#want[@]} debs into $ROOT"
  rm -rf "$ROOT"
  mkdir -p "$ROOT"
  for f in "${want[@]}"; do
    dpkg-deb -x "$DEBS/$f" "$ROOT"
  done
  printf '%s\n' "$stamp" > "$ROOT/.debs"
fi
log "kernel package: $kpkg"
