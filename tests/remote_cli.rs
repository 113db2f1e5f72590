//! `remoca blkback --swap ... --memserver ...` and `remote-cache` exports from the command
//! line: a swap device served over NBD keeps what a client wrote, and bad specs are refused
//! with the reason.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn remoca() -> Command {
    Command::new(env!("CARGO_BIN_EXE_remoca"))
}

/// Start a remoca daemon and return it with the address it printed after `prefix`.
fn spawn(args: &[&str], prefix: &str) -> (Proc, String) {
    let mut child = remoca()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("daemon exited before printing its address")
            .unwrap();
        if let Some(rest) = line.strip_prefix(prefix) {
            break rest.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (Proc(child), addr)
}

fn err(args: &[&str]) -> String {
    let o = remoca().args(args).output().unwrap();
    assert!(!o.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn swap_export_keeps_writes_on_the_memory_server() {
    if Command::new("qemu-io").arg("--version").output().is_err() {
        panic!("qemu-io is not installed: apt-get install qemu-utils");
    }
    let dir = tempfile::tempdir().unwrap();
    let (_ms, ms) = spawn(
        &["memserver", "--listen", "127.0.0.1:0", "--capacity", "64M"],
        "memserver listening on ",
    );
    let spill = dir.path().join("sw.spill");
    let spec = format!("name=sw,size=16M,spill={}", spill.display());
    let (_bb, nbd) = spawn(
        &[
            "blkback",
            "--listen",
            "127.0.0.1:0",
            "--memserver",
            &ms,
            "--swap",
            &spec,
        ],
        "listening on ",
    );
    let uri = format!("nbd://{nbd}/sw");
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x33 4k 1M",
            "-c",
            "read -P 0x33 4k 1M",
            "-c",
            "read -P 0 2M 64k",
            &uri,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !text.contains("failed"), "{text}");
    // The blocks went to the memory server, not the spill file.
    let spilled = std::fs::metadata(&spill).map(|m| m.len()).unwrap_or(0);
    assert!(spilled < 1 << 20, "{spilled} bytes in the spill file");
}

#[test]
fn bad_remote_specs_are_refused() {
    let e = err(&[
        "blkback",
        "--listen",
        "127.0.0.1:0",
        "--swap",
        "name=a,size=1M,spill=/tmp/x",
    ]);
    assert!(e.contains("need at least one --memserver"), "{e}");
    let e = err(&[
        "blkback",
        "--listen",
        "127.0.0.1:0",
        "--memserver",
        "127.0.0.1:9",
        "--swap",
        "name=a,spill=/tmp/x",
    ]);
    assert!(e.contains("missing size="), "{e}");
    let e = err(&[
        "blkback",
        "--listen",
        "127.0.0.1:0",
        "--memserver",
        "127.0.0.1:9",
        "--swap",
        "name=a,size=lots,spill=/tmp/x",
    ]);
    assert!(e.contains("lots"), "{e}");
    let e = err(&[
        "blkback",
        "--listen",
        "127.0.0.1:0",
        "--swap",
        "name=a,size=1M,spill=/tmp/x,colour=red",
    ]);
    assert!(e.contains("colour=red"), "{e}");
}
