//! The cooperative chunk cache across hosts: an origin and four nodes, each a `remoca
//! image-node` process in its own network namespace, on one bridge; the origin's link is
//! shaped with `tc tbf`. Every node deploys the same image at once (reads every chunk in
//! order through its cache). One node serves corrupted chunks; another is SIGKILLed in the
//! middle of its deployment while the others fetch from it. Every surviving node's disk must
//! equal the original image byte for byte, and the origin's egress is printed.
//!
//! Needs root and `ip`/`tc` (CI has both); skips with a message otherwise. Namespaces are
//! named `rcimg<pid>-*` and removed (with every process in them) even when the test fails.
//! Addresses 10.77.0.0/24 exist only inside those namespaces.

use std::path::Path;
use std::process::{Command, Stdio};

use remoca_blkback::images::testbed::{num, stats, Bed};
use std::time::{Duration, Instant};

const RATE: &str = "100mbit";
const NODES: usize = 4;
const CORRUPT: usize = 3;
const KILLED: usize = 2;

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A 48 MiB image: pseudo-random 64 KiB chunks, every fifth chunk zero, some repeated.
fn write_image(path: &Path) -> Vec<u8> {
    let cs = 64 * 1024;
    let mut img = vec![0u8; 48 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for (i, c) in img.chunks_mut(cs).enumerate() {
        if i % 5 == 2 {
            continue;
        }
        if i % 13 == 7 {
            c.fill(0x17);
            continue;
        }
        for w in c.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(path, &img).unwrap();
    img
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn four_nodes_deploy_one_image_despite_a_killed_and_a_corrupting_peer() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root || !have("ip") || !have("tc") {
        assert!(
            std::env::var_os("REMOCA_NO_SKIP").is_none(),
            "images_peers_netns needs root and ip/tc, and REMOCA_NO_SKIP is set"
        );
        eprintln!("SKIP images_peers_netns: needs root and ip/tc (iproute2)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let mut bed = Bed::new("rcimg", Path::new(env!("CARGO_BIN_EXE_remoca"))).unwrap();
    bed.add_host("o", "10.77.0.1", Some(RATE)).unwrap();
    for i in 0..NODES {
        bed.add_host(&format!("n{i}"), &format!("10.77.0.{}", 11 + i), None)
            .unwrap();
    }

    let img = write_image(&w.join("image.raw"));
    let list = w.join("image.list");
    let origin = "10.77.0.1:7000".to_string();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    bed.spawn(
        "o",
        &[
            "--listen".into(),
            origin.clone(),
            "--cache".into(),
            s(&w.join("origin-cache")),
            "--cache-bytes".into(),
            "256M".into(),
            "--seed-raw".into(),
            s(&w.join("image.raw")),
            "--chunk-list".into(),
            s(&list),
            "--stats".into(),
            s(&w.join("origin.stats")),
        ],
        &w.join("origin.log"),
    )
    .unwrap();
    wait_for(
        "the origin to seed its cache",
        Duration::from_secs(60),
        || list.exists(),
    );

    let peers: Vec<String> = (0..NODES)
        .map(|i| format!("10.77.0.{}:7000", 11 + i))
        .collect();
    let mut procs = Vec::new();
    for (i, me) in peers.iter().enumerate() {
        let mut args = vec![
            "--listen".into(),
            me.clone(),
            "--cache".into(),
            s(&w.join(format!("cache{i}"))),
            "--cache-bytes".into(),
            "256M".into(),
            "--origin".into(),
            origin.clone(),
            "--peers".into(),
            peers.join(","),
            "--timeout-ms".into(),
            "1000".into(),
            // Start together: a peer still starting must not be taken for a dead one.
            "--wait-peers-ms".into(),
            "10000".into(),
            "--chunk-list".into(),
            s(&list),
            "--deploy".into(),
            s(&w.join(format!("disk{i}"))),
            "--stats".into(),
            s(&w.join(format!("n{i}.stats"))),
        ];
        if i == CORRUPT {
            args.push("--corrupt-served-chunks".into());
        }
        procs.push(
            bed.spawn(&format!("n{i}"), &args, &w.join(format!("n{i}.log")))
                .unwrap(),
        );
    }

    // Kill one node once it has read a quarter of the image: mid-deployment, while the
    // others are fetching the chunks it is home of.
    let killed_stats = w.join(format!("n{KILLED}.stats"));
    wait_for(
        "node to get a quarter through",
        Duration::from_secs(120),
        || {
            let st = stats(&killed_stats);
            num(&st, "chunks_total") > 0 && num(&st, "progress") * 4 >= num(&st, "chunks_total")
        },
    );
    let at_kill = stats(&killed_stats);
    bed.child(procs[KILLED]).kill().unwrap();
    let _ = bed.child(procs[KILLED]).wait();
    assert_eq!(
        num(&at_kill, "deployed"),
        0,
        "the node finished before it was killed"
    );

    let survivors: Vec<usize> = (0..NODES).filter(|&i| i != KILLED).collect();
    wait_for(
        "the other nodes to deploy",
        Duration::from_secs(300),
        || {
            survivors.iter().all(|i| {
                let st = stats(&w.join(format!("n{i}.stats")));
                assert!(
                    !st.contains_key("deploy_error"),
                    "node {i}: {:?}; log: {}",
                    st.get("deploy_error"),
                    std::fs::read_to_string(w.join(format!("n{i}.log"))).unwrap_or_default()
                );
                num(&st, "deployed") == 1
            })
        },
    );
    let distinct: u64 = {
        let mut seen = std::collections::HashSet::new();
        img.chunks(64 * 1024)
            .filter(|c| c.iter().any(|&b| b != 0) && seen.insert(c.to_vec()))
            .map(|c| c.len() as u64)
            .sum()
    };
    std::thread::sleep(Duration::from_millis(300)); // one more stats rewrite
    let origin_stats = stats(&w.join("origin.stats"));
    let egress = num(&origin_stats, "served_bytes");
    eprintln!(
        "origin egress {egress} B for {distinct} B of distinct image data ({:.2}x), node {KILLED} killed at {}/{} chunks",
        egress as f64 / distinct as f64,
        num(&at_kill, "progress"),
        num(&at_kill, "chunks_total")
    );
    let mut rejected = 0;
    for &i in &survivors {
        let st = stats(&w.join(format!("n{i}.stats")));
        eprintln!("node {i}: {st:?}");
        let disk = std::fs::read(w.join(format!("disk{i}"))).unwrap();
        assert!(disk == img, "node {i}'s disk differs from the image");
        if i == CORRUPT {
            assert_eq!(num(&st, "corrupt_rejected"), 0);
        } else {
            rejected += num(&st, "corrupt_rejected");
            assert!(
                num(&st, "peers_demoted") <= 1,
                "only the bad peer is demoted"
            );
        }
    }
    // The killed node counts too: it may be the one that met the bad peer before it died
    // (its stats file is rewritten every 200 ms, the last one stays).
    rejected += num(
        &stats(&w.join(format!("n{KILLED}.stats"))),
        "corrupt_rejected",
    );
    // The bad peer was met and its bytes thrown away (counted over all honest nodes: one
    // that timed out on the bad peer first never saw its bytes).
    assert!(rejected >= 1, "no node ever received a corrupted chunk");
    // Every chunk left the origin at least once, and the peers shared: less than one full
    // copy per node.
    assert!(
        egress >= distinct,
        "origin served {egress} B < {distinct} B"
    );
    assert!(egress < NODES as u64 * distinct, "origin served {egress} B");
    drop(bed);
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&format!("rcimg{}", std::process::id()))
    );
}
