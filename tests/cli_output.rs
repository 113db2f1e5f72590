//! Command output into a pipe whose reader goes away, as in `remoca image log NAME | head -1`
//! or `remoca image export NAME - | head -c 10`: the command must end quietly with status 0
//! (like `cat | head`), not panic with "failed printing to stdout: Broken pipe".

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use remoca_blkback::images::chunk::ChunkSize;
use remoca_blkback::images::store::{Store, StoreOptions};

const BIN: &str = env!("CARGO_BIN_EXE_remoca");

/// Versions of the image, and the length of each one's import note: `image log` prints well
/// over a pipe's 64 KiB buffer, so the writer is still writing when its reader goes away.
const VERSIONS: usize = 120;
const NOTE_LEN: usize = 2000;

/// A store holding `demo@1..=VERSIONS`, each a one-chunk image with a long note.
fn store_with_many_versions(dir: &Path) {
    let opts = StoreOptions {
        write: true,
        ..StoreOptions::default()
    };
    let mut st = Store::open(dir, opts).unwrap();
    let cs = ChunkSize::new(64 * 1024).unwrap();
    for v in 0..VERSIONS {
        let data = vec![v as u8 + 1; 64 * 1024];
        let note = format!("import {v} ") + &"n".repeat(NOTE_LEN);
        st.import("demo", &mut &data[..], cs, &note, &mut |_| {})
            .unwrap();
    }
}

fn image_log(store: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(["image", "log", "demo", "--store"])
        .arg(store)
        .env_remove("REMOCA_STORE");
    c
}

#[test]
fn a_listing_into_a_pipe_closed_after_one_line_ends_quietly_with_status_0() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    store_with_many_versions(&store);

    // The whole listing: every version, and more than a pipe holds.
    let full = image_log(&store).output().unwrap();
    assert!(full.status.success(), "{full:?}");
    let text = String::from_utf8(full.stdout).unwrap();
    assert_eq!(text.matches("version demo@").count(), VERSIONS);
    assert!(text.len() > 128 * 1024, "{} bytes", text.len());

    // The same into a reader that takes the first line and closes its end.
    let mut child = image_log(&store)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        first.push(b[0]);
    }
    drop(out);
    assert_eq!(
        String::from_utf8(first).unwrap(),
        format!("version demo@{VERSIONS}"),
        "the newest version comes first"
    );
    let (status, err) = finish(child);
    assert!(!err.contains("panicked"), "stderr: {err}");
    assert!(err.is_empty(), "not quiet: {err}");
    assert!(status.success(), "{status}, stderr: {err}");
}

/// Wait (at most 60 s) for `child`, whose reader has gone; its status and stderr.
fn finish(mut child: Child) -> (ExitStatus, String) {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("remoca still running 60 s after its reader went away");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

#[test]
fn an_export_to_stdout_whose_reader_goes_away_ends_quietly_with_status_0() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    // 1 MiB of a 64 KiB chunk's bytes, more than a pipe holds.
    let big = vec![9u8; 1 << 20];
    {
        let opts = StoreOptions {
            write: true,
            ..StoreOptions::default()
        };
        let mut st = Store::open(&store, opts).unwrap();
        let cs = ChunkSize::new(64 * 1024).unwrap();
        st.import("big", &mut &big[..], cs, "", &mut |_| {})
            .unwrap();
    }
    let mut child = Command::new(BIN)
        .args(["image", "export", "big", "-", "--store"])
        .arg(&store)
        .env_remove("REMOCA_STORE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut head = [0u8; 10];
    out.read_exact(&mut head).unwrap();
    drop(out);
    assert_eq!(head, [9u8; 10]);
    let (status, err) = finish(child);
    assert!(err.is_empty(), "not quiet: {err}");
    assert!(status.success(), "{status}, stderr: {err}");
}
