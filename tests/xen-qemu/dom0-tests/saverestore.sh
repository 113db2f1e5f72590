#!/bin/bash
# remoca save/restore against the real xl toolstack, inside dom0 of Xen-under-QEMU.
# Needs: `remoca` and `xl` on PATH, a running PV guest named by $GUEST.
# Prints one `@@RESULT <name> PASS|FAIL` line per check and leaves the guest running.
G=${GUEST:?set GUEST to the name of a running PV guest}
T=${TMPDIR:-/tmp}/remoca-sr.$$
mkdir -p "$T"

result() { echo "@@RESULT $1 $2"; }
check() { # NAME CMD...
  local name=$1; shift
  echo "@@CMD $*"
  local rc
  if declare -F "$1" >/dev/null; then "$@" 2>&1; rc=$?; else timeout "${STEP_TIMEOUT:-300}" "$@" 2>&1; rc=$?; fi
  echo "@@RC $rc ($*)"
  if [ $rc -eq 0 ]; then result "$name" PASS; else result "$name" FAIL; fi
}
running() { # the guest exists and is neither paused, crashed nor dying
  local st
  st=$(xl list "$G" 2>/dev/null | awk 'NR==2 {print $5}')
  [ -n "$st" ] && case "$st" in *p*|*c*|*d*) false ;; *) true ;; esac
}
wait_running() { for _ in $(seq 30); do running && return 0; sleep 1; done; return 1; }
gone() { for _ in $(seq 30); do xl list "$G" >/dev/null 2>&1 || return 0; sleep 1; done; return 1; }
same_after_restore() { remoca restore --quiet "$T/g.rsv" --to "$T/g2.xl" && cmp "$T/g.xl" "$T/g2.xl"; }

# Whatever happens, bring the guest back from the newest copy we still have.
recover() {
  xl list "$G" >/dev/null 2>&1 && { rm -rf "$T"; return; }
  for img in "$T/g3.rsv" "$T/g.rsv"; do
    [ -f "$img" ] && remoca restore --quiet "$img" --domain && break
  done
  xl list "$G" >/dev/null 2>&1 || { [ -f "$T/g.xl" ] && xl restore "$T/g.xl"; }
  rm -rf "$T"
}
trap recover EXIT

check saverestore-xl-save xl save "$G" "$T/g.xl"
check saverestore-save-file remoca save --quiet --from "$T/g.xl" --to "$T/g.rsv"
check saverestore-inspect sh -c "remoca inspect '$T/g.rsv' | grep -q 'libxc PAGE_DATA'"
check saverestore-restore-identical same_after_restore
rm -f "$T/g2.xl"
check saverestore-extract-page sh -c "remoca extract '$T/g.rsv' --pfn 0x100 --out '$T/p' && [ \$(stat -c %s '$T/p') -eq 4096 ]"
check saverestore-restore-domain remoca restore --quiet "$T/g.rsv" --domain
check saverestore-guest-runs wait_running
# Keep g.rsv: if the next steps fail, recover() restores the guest from it.
rm -f "$T/g.xl"
check saverestore-save-domain remoca save --quiet --domain "$G" --to "$T/g3.rsv"
check saverestore-domain-saved gone
check saverestore-restore-domain-again remoca restore --quiet "$T/g3.rsv" --domain
check saverestore-guest-runs-again wait_running
