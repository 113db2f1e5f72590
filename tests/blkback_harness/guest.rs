//! Booting a Linux guest under `qemu-system-x86_64` (TCG, no network) on an NBD disk: the
//! Debian kernel unpacked by `blkback/tests/guest/fetch-kernel.sh`, a busybox initramfs that
//! loads the virtio and ext4 modules and runs a given `/init`, and a boot that returns the
//! serial console. Used by every guest test: `blkback_guest.rs`, `images_guest.rs`,
//! `failover_guest.rs` and `remote_swap_guest.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::run_ok;

/// Modules the guest needs for a virtio disk with ext4, in load order (no modules.dep).
pub const MODULES: &[&str] = &[
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

/// The guest kernel directory (`REMOCA_GUEST_KERNEL`, default `/var/tmp/remoca-guest-kernel`),
/// or `None` when it holds no kernel.
pub fn kernel_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("REMOCA_GUEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/remoca-guest-kernel"));
    (dir.join("vmlinuz").exists() && dir.join("modules").exists()).then_some(dir)
}

/// The static busybox to put in a guest.
pub fn busybox() -> &'static str {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox is not installed: apt-get install busybox-static")
}

/// Put busybox and a symlink per applet into `root/bin`.
pub fn install_busybox(root: &Path) {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let bb = busybox();
    std::fs::copy(bb, bin.join("busybox")).unwrap();
    let applets = run_ok(Command::new(bb).arg("--list"));
    for a in applets.lines().filter(|a| *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", bin.join(a));
    }
}

/// The guest kernel directory, or a panic that says how to get one.
pub fn require_kernel() -> PathBuf {
    kernel_dir().unwrap_or_else(|| {
        panic!(
            "no guest kernel: run blkback/tests/guest/fetch-kernel.sh (or set REMOCA_GUEST_KERNEL)"
        )
    })
}

/// A newc cpio initramfs in `work` with busybox, [`MODULES`] (load order in
/// `/modules/order`) and `init` as `/init`.
pub fn build_initramfs(work: &Path, kernel: &Path, init: &str) -> PathBuf {
    build_initramfs_with(work, kernel, MODULES, init, &[])
}

/// [`build_initramfs`] with other `modules`, and `programs`: C sources in
/// `tests/blkback_harness/` compiled static (gcc, libc6-dev) into `/bin/<name>`.
pub fn build_initramfs_with(
    work: &Path,
    kernel: &Path,
    modules: &[&str],
    init: &str,
    programs: &[&str],
) -> PathBuf {
    let root = work.join("initramfs");
    for d in ["proc", "sys", "dev", "modules", "mnt", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    install_busybox(&root);
    for c in programs {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/blkback_harness")
            .join(c);
        let name = Path::new(c).file_stem().unwrap();
        run_ok(
            Command::new("gcc")
                .args(["-static", "-O2", "-Wall", "-o"])
                .arg(root.join("bin").join(name))
                .arg(&src),
        );
    }
    let mut order = String::new();
    for m in modules {
        let name = Path::new(m).file_name().unwrap();
        std::fs::copy(
            kernel.join("modules/kernel").join(m),
            root.join("modules").join(name),
        )
        .unwrap_or_else(|e| panic!("module {m}: {e}"));
        order.push_str(&format!("{}\n", name.to_string_lossy()));
    }
    std::fs::write(root.join("modules/order"), order).unwrap();
    std::fs::write(root.join("init"), init).unwrap();
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

/// Boot the guest with its virtio disk at NBD `uri`; returns the serial console once the
/// guest powers off (killed after `limit`). Asserts the console shows `REMOCA-DONE`.
pub fn boot(kernel: &Path, initrd: &Path, uri: &str, limit: Duration) -> String {
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
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(limit).is_err() {
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
