//! `remoca image import|export|ls|log|rm|verify|gc|du` and `commit --base` driven as an
//! operator would: through the binary, checking what the operator would check (exports
//! byte-identical, du's stored bytes, verify's verdict), including kill -9 during import.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use remoca_blkback::images::chunk::ChunkId;

const BIN: &str = env!("CARGO_BIN_EXE_remoca");

fn remoca(store: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("image")
        .args(args)
        .arg("--store")
        .arg(store)
        .env_remove("REMOCA_STORE")
        .output()
        .expect("run remoca")
}

fn ok(store: &Path, args: &[&str]) -> String {
    let o = remoca(store, args);
    assert!(
        o.status.success(),
        "remoca image {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The number after `key` in `text` (first match).
fn figure(text: &str, key: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key:?} in:\n{text}"));
    line[key.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Pseudo-random image data: `n` 64 KiB pieces, every 4th one zeroes, each piece half
/// random and half a repeated byte (so lz4 has something to do).
fn image(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; n << 16];
    for (i, p) in v.chunks_mut(1 << 16).enumerate() {
        if i % 4 != 1 {
            rng.fill(&mut p[..1 << 15]);
            p[1 << 15..].fill(i as u8);
        }
    }
    v
}

fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn export(store: &Path, spec: &str) -> Vec<u8> {
    let o = remoca(store, &["export", spec, "-"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

#[test]
fn dedup_snapshots_verify_rm_and_gc() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let a = image(1, 64);
    let mut b = a.clone();
    b[6 << 16..7 << 16].fill(0xee); // b differs from a in one 64 KiB piece
    let pa = write(d.path(), "a.raw", &a);
    let pb = write(d.path(), "b.raw", &b);
    ok(&store, &["import", pa.to_str().unwrap(), "a"]);
    ok(&store, &["import", pb.to_str().unwrap(), "b"]);
    let du = ok(&store, &["du"]);
    let logical = figure(&du, "logical bytes:");
    let stored = figure(&du, "stored bytes:");
    let unique = figure(&du, "unique bytes:");
    let data_pieces = (0..64).filter(|i| i % 4 != 1).count() as u64;
    assert_eq!(logical, (2 * data_pieces) << 16);
    assert_eq!(
        unique,
        (data_pieces + 1) << 16,
        "one piece more than a alone"
    );
    assert!(stored * 2 < logical, "du: {du}");

    // A second version of a: the first still exports byte-identical.
    let a2 = image(2, 80);
    let pa2 = write(d.path(), "a2.raw", &a2);
    let out = ok(
        &store,
        &["import", pa2.to_str().unwrap(), "a", "--chunk-size", "16K"],
    );
    assert!(out.starts_with("a@2:"), "{out}");
    assert_eq!(export(&store, "a@1"), a);
    assert_eq!(export(&store, "a@2"), a2);
    assert_eq!(export(&store, "a"), a2);
    let file = d.path().join("a1.out");
    ok(&store, &["export", "a@1", file.to_str().unwrap()]);
    assert_eq!(std::fs::read(&file).unwrap(), a);
    let log = ok(&store, &["log", "a"]);
    assert!(
        log.contains("version a@2") && log.contains("version a@1"),
        "{log}"
    );
    let ls = ok(&store, &["ls"]);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("a ") && l.split_whitespace().nth(1) == Some("2")),
        "{ls}"
    );
    assert!(ok(&store, &["verify"]).contains("store is consistent"));

    // rm + gc: a@2's chunks are freed, a@1 and b untouched.
    ok(&store, &["rm", "a@2"]);
    assert!(!remoca(&store, &["export", "a@2", "-"]).status.success());
    let dry = ok(&store, &["gc", "--dry-run"]);
    assert!(dry.contains("would free"), "{dry}");
    let gc = ok(&store, &["gc"]);
    let du2 = ok(&store, &["du"]);
    assert_eq!(
        figure(&du2, "stored bytes:"),
        stored,
        "back to what a and b need: {gc}"
    );
    assert_eq!(figure(&du2, "unreferenced:"), 0);
    assert_eq!(export(&store, "a@1"), a);
    assert_eq!(export(&store, "b"), b);
    assert!(ok(&store, &["verify"]).contains("store is consistent"));
}

#[test]
fn a_lost_index_is_rebuilt_and_a_flipped_byte_is_named_by_verify() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let a = image(3, 32);
    let pa = write(d.path(), "a.raw", &a);
    ok(
        &store,
        &["import", pa.to_str().unwrap(), "a", "--no-compress"],
    );
    ok(
        &store,
        &["import", pa.to_str().unwrap(), "copy", "--no-compress"],
    );
    std::fs::remove_file(store.join("index")).unwrap();
    let v = ok(&store, &["verify"]);
    assert!(
        v.contains("index file missing") && v.contains("store is consistent"),
        "{v}"
    );
    assert_eq!(export(&store, "a"), a);

    // Flip one byte of piece 2's record in the arena.
    let piece = &a[2 << 16..3 << 16];
    let id = ChunkId::of(piece);
    let arena = store.join("arenas/00000001.arena");
    let mut bytes = std::fs::read(&arena).unwrap();
    let at = bytes
        .windows(64)
        .position(|w| w == &piece[..64])
        .expect("piece stored raw");
    bytes[at + 100] ^= 1;
    std::fs::write(&arena, bytes).unwrap();
    let o = remoca(&store, &["verify"]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    let bad: Vec<&str> = out.lines().filter(|l| l.starts_with("BAD chunk")).collect();
    assert_eq!(bad.len(), 1, "{out}");
    assert!(bad[0].contains(&id.to_string()), "{out}");
    assert!(bad[0].ends_with("used by: a@1, copy@1"), "{out}");
    assert!(!remoca(&store, &["export", "a", "-"]).status.success());
}

/// After a kill: the store verifies clean, and the versions `log` shows are exactly
/// `expect` (variant numbers, oldest first), each exporting byte-identical.
fn check_versions(store: &Path, expect: &[u64], variant: &dyn Fn(u64) -> Vec<u8>) {
    let v = ok(store, &["verify"]);
    assert!(v.contains("store is consistent"), "{v}");
    let log = match remoca(store, &["log", "big"]) {
        o if o.status.success() => String::from_utf8(o.stdout).unwrap(),
        _ => String::new(), // no version yet
    };
    let mut versions: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("version "))
        .collect();
    versions.reverse(); // log lists the newest first
    assert_eq!(versions.len(), expect.len(), "{log}");
    for (v, n) in versions.iter().zip(expect) {
        assert!(export(store, v) == variant(*n), "{v} is not variant {n}");
    }
}

#[test]
fn kill_9_during_import_leaves_a_consistent_store() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let base = image(4, 384); // 24 MiB
                              // Variant i is `base` with every piece stamped with i: all its chunks are new.
    let variant = |i: u64| -> Vec<u8> {
        let mut v = base.clone();
        for p in v.chunks_mut(1 << 16) {
            p[..8].copy_from_slice(&(i + 1).to_le_bytes());
        }
        v
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut complete = Vec::new();

    // Part 1, from stdin: the child cannot finish before the input ends, so each SIGKILL
    // lands inside the import (after a random share of the image, while it is still
    // hashing and appending, or idle waiting for more). Every third round runs to the end.
    let mut killed = 0;
    for i in 0..15u64 {
        let data = variant(i);
        let mut child = Command::new(BIN)
            .args([
                "image",
                "import",
                "-",
                "big",
                "--chunk-size",
                "16K",
                "--store",
            ])
            .arg(&store)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if i % 3 == 2 {
            stdin.write_all(&data).unwrap();
            drop(stdin);
            assert!(child.wait().unwrap().success());
            complete.push(i);
        } else {
            let k = rng.gen_range(0..data.len());
            stdin.write_all(&data[..k]).unwrap();
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..30)));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            killed += 1;
        }
        check_versions(&store, &complete, &variant);
    }
    assert_eq!(killed, 10);

    // Part 2, from a file, killed at a random moment up to a little past how long one
    // import takes, so some kills land while the manifest is written or the index saved.
    let src = d.path().join("src.raw");
    std::fs::write(&src, variant(100)).unwrap();
    let t0 = std::time::Instant::now();
    ok(
        &store,
        &[
            "import",
            src.to_str().unwrap(),
            "big",
            "--chunk-size",
            "16K",
        ],
    );
    let took = t0.elapsed().as_millis() as u64;
    complete.push(100);
    for i in 101..106u64 {
        std::fs::write(&src, variant(i)).unwrap();
        let mut child = Command::new(BIN)
            .args(["image", "import"])
            .arg(&src)
            .args(["big", "--chunk-size", "16K", "--store"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..took * 6 / 5 + 1)));
        let _ = child.kill();
        if child.wait().unwrap().success() {
            complete.push(i);
        } else {
            // Killed: the version may or may not have become visible (a kill after the
            // manifest's rename); either way it must be whole.
            let log = ok(&store, &["log", "big"]);
            if log.matches("version ").count() > complete.len() {
                complete.push(i);
            }
        }
        check_versions(&store, &complete, &variant);
    }

    // Killed imports left only garbage: gc frees it and nothing a version needs.
    ok(&store, &["gc"]);
    let du = ok(&store, &["du"]);
    assert_eq!(figure(&du, "unreferenced:"), 0);
    check_versions(&store, &complete, &variant);
}

#[test]
fn qcow2_import_and_a_store_layer_from_an_overlay() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let a = image(5, 48);
    let pa = write(d.path(), "a.raw", &a);
    ok(&store, &["import", pa.to_str().unwrap(), "a"]);
    let q = d.path().join("a.qcow2");
    match Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&pa)
        .arg(&q)
        .status()
    {
        Ok(s) if s.success() => {
            let out = ok(&store, &["import", q.to_str().unwrap(), "a"]);
            assert!(
                out.contains("0 new chunks"),
                "same content, nothing new: {out}"
            );
            assert_eq!(export(&store, "a@2"), a);
        }
        _ => eprintln!("qemu-img not available: qcow2 import not tested"),
    }
    // An overlay made over an export of a@1, committed unchanged: an empty layer on a@1.
    let t = d.path().join("t.raw");
    ok(&store, &["export", "a@1", t.to_str().unwrap()]);
    let ov = d.path().join("vm.ovl");
    let o = Command::new(BIN)
        .args(["image", "create", "--template"])
        .arg(&t)
        .arg("--overlay")
        .arg(&ov)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = ok(
        &store,
        &[
            "commit",
            ov.to_str().unwrap(),
            "--base",
            "a@1",
            "--image",
            "vm1",
        ],
    );
    assert!(
        out.starts_with("vm1@1: layer on a@1 with 0 changed pieces"),
        "{out}"
    );
    assert_eq!(export(&store, "vm1"), a);
    // a@1 is now a base: rm refuses.
    assert!(!remoca(&store, &["rm", "a@1"]).status.success());
}

/// Text-like data (words from a small vocabulary), which every codec compresses.
fn text_image(seed: u64, pieces: usize) -> Vec<u8> {
    let words = [
        "remoca ",
        "image ",
        "store ",
        "chunk ",
        "arena ",
        "zstd ",
        "lz4 ",
        "manifest ",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(pieces << 16);
    while v.len() < pieces << 16 {
        v.extend_from_slice(words[rng.gen_range(0..words.len())].as_bytes());
    }
    v.truncate(pieces << 16);
    v
}

#[test]
fn compress_option_picks_the_codec_of_new_chunks_and_every_codec_reads_back() {
    let d = tempfile::tempdir().unwrap();
    let a = text_image(9, 16);
    let b = image(10, 16);
    let pa = write(d.path(), "a.raw", &a);
    let pb = write(d.path(), "b.raw", &b);
    let mut stored = Vec::new();
    for how in ["none", "lz4", "zstd", "zstd:19"] {
        let store = d.path().join(format!("store-{how}"));
        ok(
            &store,
            &["import", pa.to_str().unwrap(), "a", "--compress", how],
        );
        stored.push(figure(&ok(&store, &["du"]), "stored bytes:"));
        assert_eq!(export(&store, "a"), a, "{how}");
    }
    // Text: none keeps every byte; lz4 saves; zstd saves more; zstd:19 at least as much.
    assert_eq!(stored[0], a.len() as u64);
    assert!(stored[1] < stored[0] / 2, "{stored:?}");
    assert!(stored[2] < stored[1], "{stored:?}");
    assert!(stored[3] <= stored[2], "{stored:?}");

    // One store, chunks written with different codecs over time, all read back.
    let store = d.path().join("store-lz4");
    ok(
        &store,
        &["import", pb.to_str().unwrap(), "b", "--compress", "zstd:5"],
    );
    ok(
        &store,
        &["import", pb.to_str().unwrap(), "b2", "--no-compress"],
    );
    assert_eq!(export(&store, "a"), a);
    assert_eq!(export(&store, "b"), b);
    assert_eq!(export(&store, "b2"), b);
    assert!(ok(&store, &["verify"]).contains("store is consistent"));

    let bad = remoca(
        &store,
        &["import", pa.to_str().unwrap(), "c", "--compress", "gzip"],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("zstd"));
    let bad = remoca(
        &store,
        &["import", pa.to_str().unwrap(), "c", "--compress", "zstd:30"],
    );
    assert!(!bad.status.success());
}
