//! A Linux guest under `qemu-system-x86_64` (TCG, no network, 96 MiB of RAM) swaps onto
//! remoca's remote swap device: two `remoca memserver` processes hold its swapped-out pages
//! (two replicas), served to the guest over NBD by the library in this test. The guest
//! fills 128 MiB, the test kills one memory server with SIGKILL, and the guest then reads
//! every page back (swap-ins from the surviving replica), rewrites half of them (swap-outs
//! now go to the spill file, since only one server is left) and verifies every page again.
//! The guest prints a verdict line that the test reads; the test also checks from the swap
//! device's counters that every path was taken.
//!
//! Needs what `blkback_guest` needs (a Debian kernel unpacked by
//! `blkback/tests/guest/fetch-kernel.sh`, `busybox-static`, `cpio`, `qemu-system-x86`) and
//! `gcc` with static glibc (`libc6-dev`) to build the guest workload.

mod blkback_harness;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use blkback_harness::*;
use remoca_blkback::nbd::server::{run, Listener};
use remoca_blkback::remote::{RemoteClient, SwapConfig, SwapDisk};
use remoca_blkback::{Disk, Exports};
use remoca_memserver::client::{ClientConfig, PageSecret};
use remoca_memserver::protocol::auth::AuthKey;

/// Modules for a virtio disk, in load order (swap needs none in Debian's kernel).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
];

/// MiB the guest workload touches (the guest has 96).
const WORKLOAD_MIB: u32 = 128;

const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
for m in $(cat /modules/order); do insmod /modules/$m; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
if mkswap /dev/vda >/dev/null && swapon /dev/vda; then
  echo "REMOCA-SWAPON $(grep SwapTotal /proc/meminfo)"
  /bin/swap_workload @MIB@ || { echo "REMOCA-WORKLOAD-FAILED"; dmesg | tail -40; }
  echo "REMOCA-SWAP-AFTER $(grep -E 'SwapTotal|SwapFree' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
else
  echo "REMOCA-SWAPON-FAILED"; ls -l /dev/vd* /sys/block; dmesg | tail -40
fi
echo "REMOCA-DONE"
poweroff -f
"#;

struct MemServer {
    child: Child,
    addr: SocketAddr,
}

impl MemServer {
    fn start(key_file: &Path) -> MemServer {
        let mut child = remoca()
            .args(["memserver", "--listen", "127.0.0.1:0", "--capacity", "512M"])
            .args(["--headroom", "0", "--threads", "1", "--key-file"])
            .arg(key_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start remoca memserver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("memserver listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        MemServer { child, addr }
    }

    /// SIGKILL this process (by its PID), and reap it.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for MemServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn guest_swaps_onto_remote_memory_and_survives_a_memserver_kill() {
    require("qemu-system-x86_64");
    require("cpio");
    require("gcc");
    let kernel = guest::require_kernel();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let initrd = guest::build_initramfs_with(
        d,
        &kernel,
        MODULES,
        &INIT.replace("@MIB@", &WORKLOAD_MIB.to_string()),
        &["swap_workload.c"],
    );

    // Two memory servers, a client with two replicas.
    let key_file = d.join("memserver.key");
    std::fs::write(&key_file, "a pre-shared key for the swap guest test\n").unwrap();
    let mut servers = [MemServer::start(&key_file), MemServer::start(&key_file)];
    let mut cfg = ClientConfig::new(
        servers.iter().map(|s| s.addr).collect(),
        Some(AuthKey::from_secret(&std::fs::read(&key_file).unwrap()).unwrap()),
        PageSecret::random(),
    );
    cfg.replicas = 2;
    let client = RemoteClient::connect(cfg, 2).unwrap();

    // The swap device, served over NBD by the library.
    let swap = Arc::new(
        SwapDisk::open(
            client,
            SwapConfig {
                size: 256 << 20,
                namespace: 1,
                spill_path: d.join("swap.spill"),
                spill_max: 256 << 20,
            },
        )
        .unwrap(),
    );
    let disk: Arc<dyn Disk> = swap.clone();
    let exports = Exports::from_disks(vec![("swap".into(), swap.describe(), disk)])
        .unwrap()
        .with_min_block("swap", 4096)
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let nbd_addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(run(Listener::Tcp(listener), exports, stop_rx));

    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35,accel=tcg", "-m", "96M", "-smp", "1"])
        .args(["-nographic", "-monitor", "none", "-serial", "stdio"])
        .args(["-nic", "none", "-no-reboot", "-kernel"])
        .arg(kernel.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 rdinit=/init panic=-1 loglevel=3"])
        .arg("-drive")
        .arg(format!(
            "file=nbd://{nbd_addr}/swap,format=raw,if=none,id=swap,cache=none"
        ))
        // A short virtio queue bounds the guest's swap-outs in flight. With the default
        // (256 requests) a 96 MiB guest had 17 MiB of pages under writeback at once, which
        // reclaim cannot free until the (TCG-slow) I/O completes, and the kernel's OOM killer
        // gave up waiting; a short queue throttles the allocating task instead.
        .args(["-device", "virtio-blk-pci,drive=swap,queue-size=16"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(d.join("qemu.stderr")).unwrap())
        .spawn()
        .expect("qemu-system-x86_64 is not installed: apt-get install qemu-system-x86");
    // Watchdog: give up on a hung guest after 5 minutes (kill by PID).
    let pid = qemu.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(300)).is_err() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    });

    let started = std::time::Instant::now();
    let mut console = String::new();
    let mut at_kill = None;
    let mut guest_in = qemu.stdin.take().unwrap();
    for line in BufReader::new(qemu.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        console.push_str(&line);
        console.push('\n');
        if line.contains("REMOCA-KILL-NOW") {
            at_kill = Some((swap.stats(), started.elapsed()));
            servers[0].kill9();
            // Tell the guest to go on (it waits for a line on its console).
            guest_in.write_all(b"go\n").unwrap();
            guest_in.flush().unwrap();
        }
    }
    let _ = qemu.wait();
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    let total = started.elapsed();
    let _ = stop_tx.send(());
    rt.block_on(server).unwrap().unwrap();

    let after = swap.stats();
    eprintln!(
        "swap device at the kill: {:?}",
        at_kill.as_ref().map(|a| a.0)
    );
    eprintln!("swap device at the end:  {after:?}");
    let qemu_err = std::fs::read_to_string(d.join("qemu.stderr")).unwrap_or_default();
    console.push_str(&format!("--- qemu stderr ---\n{qemu_err}"));
    assert!(console.contains("REMOCA-SWAPON "), "no swap:\n{console}");
    let (before, kill_time) = at_kill.unwrap_or_else(|| panic!("no kill point:\n{console}"));
    assert!(
        console.contains(&format!(
            "REMOCA-VERDICT ok pages={} bad=0",
            WORKLOAD_MIB * 256
        )),
        "the guest did not verify every page:\n{console}"
    );
    assert!(console.contains("REMOCA-DONE"), "{console}");
    eprintln!("guest time: {kill_time:?} to the kill, {total:?} in all");
    // Before the kill the guest's pages went to remote memory (two replicas).
    assert!(before.remote_writes > 1000, "{before:?}");
    assert_eq!(before.spill_writes, 0, "{before:?}");
    // After it: swap-ins of pages written before came from the surviving replica, and
    // swap-outs went to the spill file.
    assert!(after.remote_reads > before.remote_reads, "{after:?}");
    assert!(after.spill_writes > 1000, "{after:?}");
    assert!(after.spill_reads > 0, "{after:?}");
    assert_eq!(after.read_errors + after.write_errors, 0, "{after:?}");
}
