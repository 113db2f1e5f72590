//! A Linux guest under `qemu-system-x86_64` (TCG, no network) boots with its disk served by
//! `remoca blkback` over NBD as an overlay on a template: it reads a marker from the
//! template, writes a file and powers off; a second boot (new server process) sees the
//! file; the template's checksum never changes.
//!
//! Needs a Debian kernel unpacked by `blkback/tests/guest/fetch-kernel.sh` (directory from
//! `REMOCA_GUEST_KERNEL`, default `/var/tmp/remoca-guest-kernel`), `busybox-static`,
//! `e2fsprogs`, `cpio` and `qemu-system-x86`.

mod blkback_harness;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blkback_harness::guest;
use blkback_harness::*;

const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /mnt
if mount -t ext4 /dev/vda /mnt; then
  echo "REMOCA-TEMPLATE-MARKER: $(cat /mnt/template-marker)"
  if [ -f /mnt/guest-wrote ]; then
    echo "REMOCA-SEEN: $(cat /mnt/guest-wrote)"
  else
    echo "written by the first boot" > /mnt/guest-wrote
    echo "REMOCA-WROTE"
  fi
  umount /mnt
else
  echo "REMOCA-MOUNT-FAILED"
fi
sync
echo "REMOCA-DONE"
poweroff -f
"#;

fn boot(kernel: &Path, initrd: &Path, uri: &str) -> String {
    guest::boot(kernel, initrd, uri, Duration::from_secs(300))
}

#[test]
fn linux_guest_boots_from_an_overlay_writes_and_sees_its_file_after_reboot() {
    require("qemu-system-x86_64");
    require("mke2fs");
    require("cpio");
    let kernel = guest::require_kernel();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let content = d.join("content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("template-marker"), "remoca-template-v1").unwrap();
    let t = d.join("template.raw");
    run_ok(
        Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-O", "^metadata_csum", "-d"])
            .arg(&content)
            .arg(&t)
            .arg("64M"),
    );
    let before = sha(&t);
    let o = d.join("vm.ovl");
    run_ok(
        remoca()
            .args(["image", "create", "--template"])
            .arg(&t)
            .arg("--overlay")
            .arg(&o),
    );
    let initrd = guest::build_initramfs(d, &kernel, INIT);

    let srv = Server::tcp(&[spec("vm", &t, Some(&o))]);
    let first = boot(&kernel, &initrd, &srv.uri("vm"));
    srv.stop();
    assert!(
        first.contains("REMOCA-TEMPLATE-MARKER: remoca-template-v1"),
        "{first}"
    );
    assert!(first.contains("REMOCA-WROTE"), "{first}");

    let srv = Server::tcp(&[spec("vm", &t, Some(&o))]);
    let second = boot(&kernel, &initrd, &srv.uri("vm"));
    srv.stop();
    assert!(
        second.contains("REMOCA-TEMPLATE-MARKER: remoca-template-v1"),
        "{second}"
    );
    assert!(
        second.contains("REMOCA-SEEN: written by the first boot"),
        "{second}"
    );
    assert_eq!(sha(&t), before, "the template changed");
}
