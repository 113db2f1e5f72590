#!/bin/sh
# /init of the busybox PV guest. It writes REMOCA-MARKER-<token> (token from the kernel command
# line, remoca_marker=<token>) at the start of a file on its RAM root: file data lives in
# page-cache pages, which are page aligned, so one guest frame starts with the marker. dom0's
# `remoca xen find-marker` then looks for it through foreign mappings of the guest's frames.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# `xl shutdown` makes the kernel's orderly_poweroff() exec /sbin/poweroff.
printf '#!/bin/sh\necho GUEST-POWEROFF\nexec /bin/busybox poweroff -f\n' > /sbin/poweroff
chmod +x /sbin/poweroff
echo "GUEST-HELLO kernel $(uname -r) uptime $(cut -d' ' -f1 /proc/uptime)s $(grep MemTotal /proc/meminfo)"

token=
# shellcheck disable=SC2013 # the command line is one line of words
for arg in $(cat /proc/cmdline); do
  case $arg in remoca_marker=*) token=${arg#remoca_marker=} ;; esac
done
if [ -n "$token" ]; then
  # Keep the file open (and so its page resident) for the guest's lifetime.
  printf 'REMOCA-MARKER-%s\n' "$token" > /marker
  exec 3< /marker
  # Do not echo the whole marker: the console line need not be another copy of it.
  echo "marker written (token $token, $(wc -c < /marker) bytes at offset 0 of /marker)"
else
  echo "GUEST-ERROR no remoca_marker= on the kernel command line"
fi

i=0
while true; do
  i=$((i + 1))
  echo "GUEST-TICK $i"
  sleep 5
done
