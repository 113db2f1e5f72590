//! A Linux guest under `qemu-system-x86_64` (TCG, no network) boots with its disk served by
//! `remoca blkback` over NBD as an overlay on a template: it reads a marker from the
//! template, writes a file and powers off; a second boot (new server process) sees the
//! file; the template's checksum never changes.
//!
//! Needs a Debian kernel unpacked by `blkback/tests/guest/fetch-kernel.sh` (directory from
//! `REMOCA_GUEST_KERNEL`, default `/var/tmp/remoca-guest-kernel`), `busybox-static`,
//! `e2fsprogs`, `cpio` and `qemu-system-x86`.

mod blkback_harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use blkback_harness::*;

/// Modules the guest needs for a virtio disk with ext4, in load order (no modules.dep).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "lib/crc16.ko",
    "fs/mbcache.ko",
    "fs/jbd2/jbd2.ko",
    "crypto/crc32c_generic.ko",
    "fs/ext4/ext4.ko",
];

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

fn kernel_dir() -> PathBuf {
    let dir = std::env::var_os("REMOCA_GUEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/remoca-guest-kernel"));
    assert!(
        dir.join("vmlinuz").exists() && dir.join("modules").exists(),
        "no guest kernel in {}: run blkback/tests/guest/fetch-kernel.sh {}",
        dir.display(),
        dir.display()
    );
    dir
}

fn build_initramfs(work: &Path, kernel: &Path) -> PathBuf {
    let root = work.join("initramfs");
    for d in ["bin", "proc", "sys", "dev", "modules", "mnt"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let busybox = busybox.expect("busybox is not installed: apt-get install busybox-static");
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    let applets = run_ok(Command::new(busybox).arg("--list"));
    for a in applets.lines().filter(|a| *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(a));
    }
    let mut order = String::new();
    for m in MODULES {
        let name = Path::new(m).file_name().unwrap();
        std::fs::copy(
            kernel.join("modules/kernel").join(m),
            root.join("modules").join(name),
        )
        .unwrap_or_else(|e| panic!("module {m}: {e}"));
        order.push_str(&format!("{}\n", name.to_string_lossy()));
    }
    std::fs::write(root.join("modules/order"), order).unwrap();
    std::fs::write(root.join("init"), INIT).unwrap();
    run_ok(Command::new("chmod").arg("+x").arg(root.join("init")));
    let out = work.join("initrd.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -H newc -o --quiet > {}",
            root.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "cpio failed (apt-get install cpio)");
    out
}

fn boot(kernel: &Path, initrd: &Path, uri: &str) -> String {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35,accel=tcg",
            "-m",
            "512",
            "-smp",
            "1",
            "-nographic",
        ])
        .args([
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-nic",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel.join("vmlinuz"))
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 rdinit=/init panic=-1 loglevel=3"])
        .arg("-drive")
        .arg(format!("file={uri},format=raw,if=virtio,cache=writeback"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 is not installed: apt-get install qemu-system-x86");
    // A watchdog: TCG boots take tens of seconds; give up after 5 minutes.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(300)).is_err() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    });
    let mut out = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = child.wait();
    let _ = tx.send(());
    watchdog.join().unwrap();
    assert!(out.contains("REMOCA-DONE"), "guest did not finish:\n{out}");
    out
}

#[test]
fn linux_guest_boots_from_an_overlay_writes_and_sees_its_file_after_reboot() {
    require("qemu-system-x86_64");
    require("mke2fs");
    require("cpio");
    let kernel = kernel_dir();
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
    let initrd = build_initramfs(d, &kernel);

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
