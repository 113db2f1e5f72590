//! Replay through a real client: QEMU's NBD `reconnect-delay` re-sends in-flight requests
//! after a disconnect, as blkfront does after a backend failover. `remoca blkback` is
//! killed with `kill -9` in the middle of a qemu-io write load and restarted on the same
//! socket; qemu-io must finish, and every region it wrote must read back with its pattern.

mod blkback_harness;

use std::process::{Command, Stdio};
use std::time::Duration;

use blkback_harness::*;

#[test]
fn qemu_reconnect_replays_writes_after_kill_9() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let (t, o) = template_and_overlay(dir.path(), 64 << 20);
    let sock = dir.path().join("nbd.sock");
    let args = |sock: &std::path::Path| {
        vec![
            "--socket".to_string(),
            sock.display().to_string(),
            "--export".to_string(),
            spec("vm", &t, Some(&o)),
        ]
    };
    let srv = Server::start(&args(&sock));
    let opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},\
         file.export=vm,file.reconnect-delay=30",
        sock.display()
    );
    // 64 regions of 1 MiB, each written and flushed: long enough to be cut in the middle.
    let mut load = Command::new("qemu-io");
    load.arg("--image-opts");
    for i in 0..64u32 {
        load.arg("-c")
            .arg(format!("write -P {} {}M 1M", 0x40 + i, i));
        load.arg("-c").arg("flush");
    }
    load.arg(&opts)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut client = load.spawn().unwrap();
    // Kill the backend once the client has completed a few writes, so the load is cut in
    // the middle whatever the machine's speed.
    let stdout = client.stdout.take().unwrap();
    let (progress_tx, progress_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        let mut wrote = 0;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            if line.starts_with("wrote ") {
                wrote += 1;
                if wrote == 4 {
                    let _ = progress_tx.send(());
                }
            }
            all.push_str(&line);
            all.push('\n');
        }
        (all, wrote)
    });
    progress_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("qemu-io made no progress");
    srv.crash();
    std::thread::sleep(Duration::from_millis(500));
    let _ = std::fs::remove_file(&sock);
    let srv = Server::start(&args(&sock));
    let out = client.wait_with_output().unwrap();
    let (stdout, wrote) = reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stdout.contains("failed") && !stderr.contains("failed"),
        "qemu-io did not complete across the restart:\n{stdout}\n{stderr}"
    );
    assert_eq!(wrote, 64, "not every write completed:\n{stdout}\n{stderr}");
    let mut check = Command::new("qemu-io");
    check.arg("--image-opts");
    for i in 0..64u32 {
        check
            .arg("-c")
            .arg(format!("read -P {} {}M 1M", 0x40 + i, i));
    }
    let out = run_ok(check.arg(&opts));
    assert!(!out.contains("verification failed"), "{out}");
    srv.stop();
}
