//! `remoca bench images` (deployment part): N nodes in their own network namespaces deploy
//! one image at once from an origin behind a `tc tbf`-shaped link, first origin-only (each
//! node fetches everything from the origin), then with the peer cache (fresh caches). Per
//! run: deployment time of each node (p50, max) and the origin's egress bytes, against the
//! image's working set (its distinct non-zero chunk bytes; a deployment reads every chunk).
//!
//! Each run also gets a trace (see [`RunResult::trace`]): per node, when it started and when
//! its home stream, prefetcher and reader were done, and its sources and failures; the
//! origin's repeated chunks, its link's throughput over time and its TCP retransmits.
//!
//! Nodes are `remoca image-node` processes (`exe`), started with `ip netns exec`. Needs
//! root, `ip` and `tc`. Namespaces are named `rcbench<pid>-*`, addresses 10.78.0.0/24 exist
//! only inside them, and everything is killed and deleted when the run ends or fails.

use super::testbed::{num, run, stats, Bed};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// What to run.
#[derive(Debug, Clone)]
pub struct DeployBenchConfig {
    /// The `remoca` binary.
    pub exe: PathBuf,
    /// Scratch directory (image, caches, deployed disks: about (2 N + 2) x the image).
    pub work: PathBuf,
    pub nodes: usize,
    /// tbf rate of the origin's link, e.g. `200mbit`.
    pub rate: String,
    pub image_mib: u64,
    pub chunk_size: u64,
}

/// One run (origin-only or with peers).
#[derive(Debug, Clone)]
pub struct RunResult {
    pub deploy_ms: Vec<u64>,
    pub origin_egress: u64,
    /// Where the time went: per node start, time, sources and failures; the origin link's
    /// throughput over time (from the tbf qdisc's counters, sampled every 100 ms).
    pub trace: String,
}

impl RunResult {
    pub fn p50_ms(&self) -> u64 {
        let mut v = self.deploy_ms.clone();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    }

    pub fn max_ms(&self) -> u64 {
        self.deploy_ms.iter().copied().max().unwrap_or(0)
    }
}

/// Both runs.
#[derive(Debug, Clone)]
pub struct DeployBench {
    pub working_set: u64,
    pub origin_only: RunResult,
    pub peers: RunResult,
}

impl DeployBench {
    /// The table `remoca bench images` prints.
    pub fn table(&self, cfg: &DeployBenchConfig) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let ws = self.working_set;
        let row = |name: &str, r: &RunResult| {
            format!(
                "{name:<12} {:>9} {:>9} {:>12.1} {:>9.2}x\n",
                r.p50_ms(),
                r.max_ms(),
                mib(r.origin_egress),
                r.origin_egress as f64 / ws as f64
            )
        };
        let mut s = format!(
            "deployment: {} nodes, {} MiB image ({:.1} MiB working set, {} KiB chunks), origin link tbf {}\n",
            cfg.nodes,
            cfg.image_mib,
            mib(ws),
            cfg.chunk_size / 1024,
            cfg.rate
        );
        s.push_str("run          p50 (ms)  max (ms)  origin (MiB)  egress/ws\n");
        s.push_str(&row("origin-only", &self.origin_only));
        s.push_str(&row("peers", &self.peers));
        let sp50 = self.origin_only.p50_ms() as f64 / self.peers.p50_ms().max(1) as f64;
        let smax = self.origin_only.max_ms() as f64 / self.peers.max_ms().max(1) as f64;
        for (name, r) in [("origin-only", &self.origin_only), ("peers", &self.peers)] {
            s.push_str(&format!("trace of the {name} run:\n{}", r.trace));
        }
        s.push_str(&format!(
            "peers vs origin-only: {sp50:.2}x faster at p50, {smax:.2}x at max (goal >= 3x); origin egress {:.2}x the working set (goal <= 1.25x)\n",
            self.peers.origin_egress as f64 / ws as f64
        ));
        s
    }
}

/// The deployment bed: the origin at 10.78.0.1 behind a link shaped to `rate`, `nodes`
/// nodes at 10.78.0.11 and up.
fn deploy_bed(exe: &Path, rate: &str, nodes: usize) -> io::Result<Bed> {
    let mut bed = Bed::new("rcbench", exe)?;
    bed.add_host("o", "10.78.0.1", Some(rate))?;
    for i in 0..nodes {
        bed.add_host(&format!("n{i}"), &format!("10.78.0.{}", 11 + i), None)?;
    }
    Ok(bed)
}

fn wait_for(
    what: &str,
    limit: Duration,
    mut ok: impl FnMut() -> io::Result<bool>,
) -> io::Result<()> {
    let start = Instant::now();
    while !ok()? {
        if start.elapsed() > limit {
            return Err(io::Error::other(format!("timed out waiting for {what}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Write the bench image: pseudo-random chunks, every fifth chunk zero, every 13th the same
/// repeated chunk. Returns the working set (distinct non-zero chunk bytes).
fn write_image(path: &Path, mib: u64, cs: usize) -> io::Result<u64> {
    use std::io::Write;
    let mut f = io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut chunk = vec![0u8; cs];
    let mut ws = 0u64;
    let mut repeated = false;
    for i in 0..(mib << 20) / cs as u64 {
        if i % 5 == 2 {
            chunk.fill(0);
        } else if i % 13 == 7 {
            chunk.fill(0x17);
            if !repeated {
                ws += cs as u64;
                repeated = true;
            }
        } else {
            for w in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            ws += cs as u64;
        }
        f.write_all(&chunk)?;
    }
    f.flush()?;
    Ok(ws)
}

fn one_run(cfg: &DeployBenchConfig, with_peers: bool) -> io::Result<RunResult> {
    let tag = if with_peers { "peers" } else { "origin" };
    let w = cfg.work.join(tag);
    if w.exists() {
        std::fs::remove_dir_all(&w)?;
    }
    std::fs::create_dir_all(&w)?;
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let mut bed = deploy_bed(&cfg.exe, &cfg.rate, cfg.nodes)?;
    let list = w.join("image.list");
    let cache_bytes = format!("{}M", cfg.image_mib * 2 + 64);
    bed.spawn(
        "o",
        &[
            "--listen".into(),
            "10.78.0.1:7000".into(),
            "--cache".into(),
            s(&w.join("origin-cache")),
            "--cache-bytes".into(),
            cache_bytes.clone(),
            "--seed-raw".into(),
            s(&cfg.work.join("image.raw")),
            "--chunk-size".into(),
            cfg.chunk_size.to_string(),
            "--chunk-list".into(),
            s(&list),
            "--stats".into(),
            s(&w.join("origin.stats")),
            // The trace reports the chunks that left the origin twice.
            "--count-repeats".into(),
        ],
        &w.join("origin.log"),
    )?;
    wait_for("the origin to seed", Duration::from_secs(600), || {
        Ok(list.exists())
    })?;
    let addrs: Vec<String> = (0..cfg.nodes)
        .map(|i| format!("10.78.0.{}:7000", 11 + i))
        .collect();
    let t0 = SystemTime::now();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (ns, sampling) = (bed.ns("o"), sampling.clone());
        std::thread::spawn(move || {
            let mut v = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                let t = t0.elapsed().unwrap_or_default().as_millis() as u64;
                if let Some(b) = tbf_sent(&ns) {
                    v.push((t, b));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            v
        })
    };
    let _stop_sampler = ClearOnDrop(sampling.clone());
    for (i, me) in addrs.iter().enumerate() {
        let mut args = vec![
            "--listen".into(),
            me.clone(),
            "--cache".into(),
            s(&w.join(format!("cache{i}"))),
            "--cache-bytes".into(),
            cache_bytes.clone(),
            "--origin".into(),
            "10.78.0.1:7000".into(),
            "--chunk-list".into(),
            s(&list),
            "--deploy".into(),
            s(&w.join(format!("disk{i}"))),
            "--stats".into(),
            s(&w.join(format!("n{i}.stats"))),
        ];
        if with_peers {
            args.push("--peers".into());
            args.push(addrs.join(","));
            // Deploy once every peer is up, as nodes that are already running would.
            args.push("--wait-peers-ms".into());
            args.push("10000".into());
        }
        bed.spawn(&format!("n{i}"), &args, &w.join(format!("n{i}.log")))?;
    }
    let limit = Duration::from_secs(60 + cfg.image_mib * cfg.nodes as u64);
    wait_for("every node to deploy", limit, || {
        let mut all = true;
        for i in 0..cfg.nodes {
            let st = stats(&w.join(format!("n{i}.stats")));
            if let Some(e) = st.get("deploy_error") {
                return Err(io::Error::other(format!("node {i}: {e}")));
            }
            all &= num(&st, "deployed") == 1;
        }
        Ok(all)
    })?;
    std::thread::sleep(Duration::from_millis(400)); // a last stats rewrite
    sampling.store(false, Ordering::Relaxed);
    let samples = sampler.join().unwrap_or_default();
    let node_stats: Vec<HashMap<String, String>> = (0..cfg.nodes)
        .map(|i| stats(&w.join(format!("n{i}.stats"))))
        .collect();
    let deploy_ms = node_stats.iter().map(|st| num(st, "deploy_ms")).collect();
    let ost = stats(&w.join("origin.stats"));
    let origin_egress = num(&ost, "served_bytes");
    let mut trace = trace(t0, &node_stats, &ost, &samples);
    if let Ok(o) = Command::new("ip")
        .args(["netns", "exec", &bed.ns("o"), "nstat", "-az"])
        .args([
            "TcpRetransSegs",
            "TcpExtTCPTimeouts",
            "TcpExtTCPLossProbes",
            "TcpOutSegs",
        ])
        .output()
    {
        let text = String::from_utf8_lossy(&o.stdout);
        let kv: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some(format!("{} {}", w.next()?, w.next()?))
            })
            .collect();
        trace.push_str(&format!("  origin TCP: {}\n", kv.join(", ")));
    }
    for i in 0..cfg.nodes {
        let _ = std::fs::copy(
            w.join(format!("n{i}.log")),
            cfg.work.join(format!("last-{tag}-n{i}.log")),
        );
    }
    // Check every node's disk against the image before the figures count.
    let image = std::fs::read(cfg.work.join("image.raw"))?;
    for i in 0..cfg.nodes {
        if std::fs::read(w.join(format!("disk{i}")))? != image {
            return Err(io::Error::other(format!(
                "{tag} run: node {i}'s disk differs"
            )));
        }
    }
    drop(image);
    bed.stop_all();
    drop(bed);
    std::fs::remove_dir_all(&w)?;
    Ok(RunResult {
        deploy_ms,
        origin_egress,
        trace,
    })
}

/// Clears its flag when dropped (stops the link sampler however `one_run` returns).
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Bytes the tbf qdisc on the origin's link has sent (`tc -s qdisc`), or `None`.
fn tbf_sent(ns: &str) -> Option<u64> {
    let out = Command::new("tc")
        .args(["-n", ns, "-s", "qdisc", "show", "dev", "eth0"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rest = text.split("Sent ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The trace lines of one run: each node's start (relative to when the first node was
/// spawned), deployment time, end and counters; the origin's repeats; the link's timeline.
fn trace(
    t0: SystemTime,
    nodes: &[HashMap<String, String>],
    origin: &HashMap<String, String>,
    samples: &[(u64, u64)],
) -> String {
    let t0_ms = t0
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut s = String::new();
    let mut last_end = 0;
    for (i, st) in nodes.iter().enumerate() {
        let start = num(st, "deploy_start_unix_ms").saturating_sub(t0_ms);
        let end = start + num(st, "deploy_ms");
        last_end = last_end.max(end);
        let home = start + num(st, "home_stream_ms");
        s.push_str(&format!(
            "  n{i}: start {start} ms, home stream done {} ms, prefetched {} ms, all read {} ms, end {end} ms | origin {} chunks, peers {} chunks, cache {} | served {} chunks, pulled {} | peer failures {}, corrupt {}\n",
            home,
            start + num(st, "prefetched_ms"),
            start + num(st, "read_done_ms"),
            num(st, "from_origin"),
            num(st, "from_peers"),
            num(st, "from_cache"),
            num(st, "served_chunks"),
            num(st, "pulled"),
            num(st, "peer_failures"),
            num(st, "corrupt_rejected"),
        ));
    }
    s.push_str(&format!(
        "  origin: served {} chunks, {} of them again ({} bytes)\n",
        num(origin, "served_chunks"),
        num(origin, "repeat_chunks"),
        num(origin, "repeat_bytes")
    ));
    let (Some(&(_, b0)), Some(&(_, b1))) = (samples.first(), samples.last()) else {
        return s;
    };
    let total = b1 - b0;
    let at = |frac: f64| {
        samples
            .iter()
            .find(|(_, b)| (b - b0) as f64 >= frac * total as f64)
            .map_or(0, |(t, _)| *t)
    };
    let (first, p99, all) = (at(1e-4), at(0.99), at(1.0));
    s.push_str(&format!(
        "  link: {:.1} MiB on the wire; first bytes by {first} ms, 99% by {p99} ms, all by {all} ms; last node done at {last_end} ms\n",
        total as f64 / (1 << 20) as f64
    ));
    // Throughput per 500 ms between the first and the last bytes, in Mbit/s.
    let mut line = String::from("  link Mbit/s per 500 ms:");
    let mut k = 0;
    let mut t = first.saturating_sub(100);
    while t < all {
        let mut b = |t: u64| {
            while k + 1 < samples.len() && samples[k + 1].0 <= t {
                k += 1;
            }
            samples[k].1
        };
        let x = b(t);
        let y = b(t + 500);
        line.push_str(&format!(" {:.0}", (y - x) as f64 * 8.0 / 0.5 / 1e6));
        t += 500;
    }
    s.push_str(&line);
    s.push_str("\n  link Mbit/s per 100 ms, last second:");
    let tail: Vec<&(u64, u64)> = samples.iter().filter(|(t, _)| *t + 1100 >= all).collect();
    for w in tail.windows(2) {
        let dt = (w[1].0 - w[0].0).max(1) as f64 / 1e3;
        s.push_str(&format!(
            " {:.0}",
            (w[1].1 - w[0].1) as f64 * 8.0 / dt / 1e6
        ));
    }
    s.push('\n');
    s
}

/// Run both deployments.
///
/// # Errors
/// Missing root/`ip`/`tc`, a node failing, a deployed disk that differs from the image.
pub fn deployment(cfg: &DeployBenchConfig) -> io::Result<DeployBench> {
    std::fs::create_dir_all(&cfg.work)?;
    let working_set = write_image(
        &cfg.work.join("image.raw"),
        cfg.image_mib,
        cfg.chunk_size as usize,
    )?;
    let origin_only = one_run(cfg, false)?;
    let peers = one_run(cfg, true)?;
    let _ = std::fs::remove_file(cfg.work.join("image.raw"));
    Ok(DeployBench {
        working_set,
        origin_only,
        peers,
    })
}

// ---------------------------------------------------------------------------------------
// `remoca bench images --dedup`: the store's dedup and ingest against casync's.

/// What to run for the dedup comparison.
#[derive(Debug, Clone)]
pub struct DedupBenchConfig {
    /// Scratch directory (the images, a copy of the trees, one store per run).
    pub work: PathBuf,
    /// The tree of the first image (e.g. /usr/share/doc).
    pub base: PathBuf,
    /// A tree added in the second image (e.g. /usr/lib/python3).
    pub added: PathBuf,
    /// Chunk sizes to run, for both tools (the store's fixed size, casync's average).
    pub chunk_sizes: Vec<u64>,
    /// The `casync` binary; its rows are left out (with a note) when it cannot be run.
    pub casync: PathBuf,
}

/// One tool at one chunk size over all the images.
#[derive(Debug, Clone)]
pub struct DedupRow {
    pub tool: String,
    pub chunking: String,
    /// Sum of the images' sizes.
    pub logical: u64,
    /// Distinct chunks stored (the store: non-zero ones; casync: all, a zero run is a chunk).
    pub unique_chunks: u64,
    /// Their bytes before compression.
    pub unique_raw: u64,
    /// Chunk payload on disk after compression (the store: lz4 records' payloads; casync:
    /// the `.cacnk` files, zstd).
    pub chunk_payload: u64,
    /// Everything the tool keeps on disk: the store directory (arenas with record headers,
    /// index, manifests); casync: `.cacnk` files plus the `.caibx` indexes.
    pub on_disk: u64,
    /// Wall time of ingesting every image, seconds.
    pub secs: f64,
}

/// The images and every row.
#[derive(Debug, Clone)]
pub struct DedupBench {
    /// Each image's name and size.
    pub images: Vec<(String, u64)>,
    pub rows: Vec<DedupRow>,
    /// Why casync's rows are missing, when they are.
    pub casync_note: Option<String>,
}

impl DedupBench {
    /// The table `remoca bench images --dedup` prints.
    pub fn table(&self) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut s = String::from("images:");
        for (n, b) in &self.images {
            s.push_str(&format!(" {n} {:.1} MiB;", mib(*b)));
        }
        s.push('\n');
        s.push_str(&format!(
            "{:<8} {:<21} {:>10} {:>9} {:>11} {:>9} {:>12} {:>11} {:>10} {:>8}\n",
            "tool",
            "chunking",
            "logical",
            "chunks",
            "unique raw",
            "logical/",
            "chunk bytes",
            "on disk",
            "logical/",
            "ingest"
        ));
        s.push_str(&format!(
            "{:<8} {:<21} {:>10} {:>9} {:>11} {:>9} {:>12} {:>11} {:>10} {:>8}\n",
            "", "", "(MiB)", "", "(MiB)", "unique", "compr. (MiB)", "(MiB)", "on disk", "(MB/s)"
        ));
        for r in &self.rows {
            s.push_str(&format!(
                "{:<8} {:<21} {:>10.1} {:>9} {:>11.1} {:>8.2}x {:>12.1} {:>11.1} {:>9.2}x {:>8.1}\n",
                r.tool,
                r.chunking,
                mib(r.logical),
                r.unique_chunks,
                mib(r.unique_raw),
                r.logical as f64 / r.unique_raw.max(1) as f64,
                mib(r.chunk_payload),
                mib(r.on_disk),
                r.logical as f64 / r.on_disk.max(1) as f64,
                r.logical as f64 / 1e6 / r.secs.max(1e-9)
            ));
        }
        if let Some(n) = &self.casync_note {
            s.push_str(&format!("casync rows missing: {n}\n"));
        }
        s
    }
}

/// Regular files under `dir`, sorted, and the bytes they take in 4 KiB blocks.
fn walk(dir: &Path, files: &mut Vec<PathBuf>, blocks: &mut u64) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()?;
    entries.sort();
    for p in entries {
        let m = std::fs::symlink_metadata(&p)?;
        *blocks += 4096;
        if m.is_dir() {
            walk(&p, files, blocks)?;
        } else if m.is_file() {
            *blocks += m.len().div_ceil(4096) * 4096;
            files.push(p);
        }
    }
    Ok(())
}

/// `mkfs.ext4 -d tree` into a new `size`-byte raw image, with a fixed UUID, hash seed and
/// time so that only the tree's changes make two images differ.
fn mkfs(tree: &Path, img: &Path, size: u64) -> io::Result<()> {
    let _ = std::fs::remove_file(img);
    const UUID: &str = "6d2b3c55-1e0f-4d7a-9a57-0c2f1b7a3e11";
    let out = Command::new("mkfs.ext4")
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .args(["-q", "-F", "-b", "4096", "-m", "0", "-U", UUID])
        .arg("-E")
        .arg(format!("hash_seed={UUID},lazy_itable_init=0"))
        .arg("-d")
        .arg(tree)
        .arg(img)
        .arg(format!("{}k", size / 1024))
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "mkfs.ext4 -d {}: {}",
            tree.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Bytes of every file under `dir` whose name ends with `suffix` ("" for all).
fn bytes_under(dir: &Path, suffix: &str) -> io::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        if m.is_dir() {
            total += bytes_under(&e.path(), suffix)?;
        } else if e.file_name().to_string_lossy().ends_with(suffix) {
            total += m.len();
        }
    }
    Ok(total)
}

/// The chunks of a casync blob index (`.caibx`): (end offset, id) per chunk. The format:
/// a 48-byte index header, a 16-byte table header, 40-byte items (little-endian u64 end
/// offset, 32-byte digest), a 40-byte tail.
fn caibx_chunks(path: &Path) -> io::Result<Vec<(u64, [u8; 32])>> {
    let b = std::fs::read(path)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("{}", path.display()));
    if b.len() < 104 || (b.len() - 104) % 40 != 0 || b[48..56] != [0xff; 8] {
        return Err(bad());
    }
    let mut out = Vec::with_capacity((b.len() - 104) / 40);
    let mut prev = 0;
    for it in b[64..b.len() - 40].chunks_exact(40) {
        let end = u64::from_le_bytes(it[..8].try_into().map_err(|_| bad())?);
        if end <= prev {
            return Err(bad());
        }
        prev = end;
        out.push((end, it[8..].try_into().map_err(|_| bad())?));
    }
    Ok(out)
}

/// The store's compression settings the dedup bench runs, one fresh store each.
pub const DEDUP_CODECS: [crate::images::store::arena::Compression; 4] = {
    use crate::images::store::arena::Compression;
    [
        Compression::Lz4,
        Compression::Zstd(1),
        Compression::Zstd(3),
        Compression::Zstd(9),
    ]
};

fn ours(
    cfg: &DedupBenchConfig,
    imgs: &[PathBuf],
    cs: u64,
    compression: crate::images::store::arena::Compression,
) -> io::Result<DedupRow> {
    use crate::images::chunk::ChunkSize;
    use crate::images::store::{Store, StoreOptions};
    let dir = cfg.work.join(format!("store-{}k", cs / 1024));
    let _ = std::fs::remove_dir_all(&dir);
    let chunk_size = ChunkSize::new(cs).map_err(|e| io::Error::other(e.to_string()))?;
    let err = |e: crate::images::store::StoreError| io::Error::other(e.to_string());
    let start = Instant::now();
    let mut logical = 0;
    let (unique_chunks, unique_raw, chunk_payload) = {
        let opts = StoreOptions {
            write: true,
            compression,
            ..StoreOptions::default()
        };
        let mut st = Store::open(&dir, opts).map_err(err)?;
        for img in imgs {
            let mut f = std::fs::File::open(img)?;
            let r = st
                .import("bench", &mut f, chunk_size, "", &mut |_| {})
                .map_err(err)?;
            logical += r.size;
        }
        st.sync().map_err(err)?;
        let idx = st.index();
        (
            idx.len() as u64,
            idx.values().map(|l| l.raw_len as u64).sum(),
            idx.values().map(|l| l.stored_len as u64).sum(),
        )
    };
    let secs = start.elapsed().as_secs_f64();
    let on_disk = bytes_under(&dir, "")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(DedupRow {
        tool: "remoca".into(),
        chunking: format!("fixed {} KiB {compression}", cs / 1024),
        logical,
        unique_chunks,
        unique_raw,
        chunk_payload,
        on_disk,
        secs,
    })
}

fn casync(cfg: &DedupBenchConfig, imgs: &[PathBuf], cs: u64) -> io::Result<DedupRow> {
    let dir = cfg.work.join(format!("casync-{}k", cs / 1024));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let store = dir.join("store");
    let start = Instant::now();
    let mut indexes = Vec::new();
    for (i, img) in imgs.iter().enumerate() {
        let idx = dir.join(format!("v{}.caibx", i + 1));
        let out = Command::new(&cfg.casync)
            .arg(format!("--store={}", store.display()))
            .arg(format!("--chunk-size={cs}"))
            .arg("make")
            .arg(&idx)
            .arg(img)
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "casync make: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        indexes.push(idx);
    }
    let secs = start.elapsed().as_secs_f64();
    let mut logical = 0;
    let mut unique: HashMap<[u8; 32], u64> = HashMap::new();
    for idx in &indexes {
        let mut prev = 0;
        for (end, id) in caibx_chunks(idx)? {
            unique.insert(id, end - prev);
            prev = end;
        }
        logical += prev;
    }
    let chunk_payload = bytes_under(&store, ".cacnk")?;
    Ok(DedupRow {
        tool: "casync".into(),
        chunking: format!("CDC avg {} KiB", cs / 1024),
        logical,
        unique_chunks: unique.len() as u64,
        unique_raw: unique.values().sum(),
        chunk_payload,
        on_disk: chunk_payload + bytes_under(&dir, ".caibx")?,
        secs,
    })
}

/// Build three related ext4 images (v1: `base`; v2: every 20th file of it appended to and
/// `added` copied in; v3: every 13th file changed in place, every 50th removed), ingest
/// them into a fresh store and into one casync store per chunk size, and compare.
///
/// # Errors
/// Missing `mkfs.ext4`, I/O errors, a store error. A casync that cannot run only leaves
/// its rows out (see [`DedupBench::casync_note`]).
pub fn dedup(cfg: &DedupBenchConfig) -> io::Result<DedupBench> {
    use std::io::Write;
    std::fs::create_dir_all(&cfg.work)?;
    let tree = cfg.work.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree)?;
    run(&[
        "cp",
        "-a",
        &cfg.base.to_string_lossy(),
        &tree.join("base").to_string_lossy(),
    ])?;
    let (mut files, mut blocks) = (Vec::new(), 0);
    walk(&cfg.base, &mut files, &mut blocks)?;
    walk(&cfg.added, &mut Vec::new(), &mut blocks)?;
    // Room for both trees, their inodes and the journal.
    let size = (blocks + blocks / 4 + (96 << 20)).div_ceil(1 << 20) << 20;
    let imgs: Vec<PathBuf> = (1..=3)
        .map(|i| cfg.work.join(format!("v{i}.raw")))
        .collect();
    mkfs(&tree, &imgs[0], size)?;
    let (mut files, mut blocks) = (Vec::new(), 0);
    walk(&tree, &mut files, &mut blocks)?;
    for f in files.iter().step_by(20) {
        let mut h = std::fs::OpenOptions::new().append(true).open(f)?;
        writeln!(h, "remoca bench: changed in v2")?;
    }
    run(&[
        "cp",
        "-a",
        &cfg.added.to_string_lossy(),
        &tree.join("added").to_string_lossy(),
    ])?;
    mkfs(&tree, &imgs[1], size)?;
    let (mut files, mut blocks) = (Vec::new(), 0);
    walk(&tree, &mut files, &mut blocks)?;
    for (i, f) in files.iter().enumerate() {
        if i % 50 == 7 {
            std::fs::remove_file(f)?;
        } else if i % 13 == 5 {
            use std::os::unix::fs::FileExt;
            let h = std::fs::OpenOptions::new().write(true).open(f)?;
            let len = h.metadata()?.len();
            h.write_all_at(b"remoca v3", len / 2)?;
        }
    }
    mkfs(&tree, &imgs[2], size)?;
    let _ = std::fs::remove_dir_all(&tree);
    let mut images = Vec::new();
    for p in &imgs {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        images.push((name.unwrap_or_default(), std::fs::metadata(p)?.len()));
    }
    // Write the fresh images back and read them once, so the first row does not pay for
    // the writeback of mkfs's output (seen as lz4 rows slower than zstd ones).
    run(&["sync"])?;
    for p in &imgs {
        io::copy(&mut std::fs::File::open(p)?, &mut io::sink())?;
    }
    let mut rows = Vec::new();
    let mut casync_note = None;
    for &cs in &cfg.chunk_sizes {
        for how in DEDUP_CODECS {
            rows.push(ours(cfg, &imgs, cs, how)?);
        }
        if casync_note.is_none() {
            match casync(cfg, &imgs, cs) {
                Ok(r) => rows.push(r),
                Err(e) => casync_note = Some(e.to_string()),
            }
        }
        let _ = std::fs::remove_dir_all(cfg.work.join(format!("store-{}k", cs / 1024)));
        let _ = std::fs::remove_dir_all(cfg.work.join(format!("casync-{}k", cs / 1024)));
    }
    for p in &imgs {
        let _ = std::fs::remove_file(p);
    }
    Ok(DedupBench {
        images,
        rows,
        casync_note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caibx(ends: &[u64]) -> Vec<u8> {
        let mut b = vec![0u8; 48];
        b[..8].copy_from_slice(&48u64.to_le_bytes());
        b.extend_from_slice(&[0xff; 8]);
        b.extend_from_slice(&[0x11; 8]);
        for (i, e) in ends.iter().enumerate() {
            b.extend_from_slice(&e.to_le_bytes());
            b.extend_from_slice(&[i as u8; 32]);
        }
        b.extend_from_slice(&[0u8; 40]);
        b
    }

    #[test]
    fn casync_indexes_are_parsed_and_bad_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.caibx");
        std::fs::write(&p, caibx(&[100, 4196, 5000])).unwrap();
        let c = caibx_chunks(&p).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[1], (4196, [1u8; 32]));
        let mut short = caibx(&[100]);
        short.pop();
        for bad in [caibx(&[100, 50]), short, vec![0u8; 104]] {
            std::fs::write(&p, bad).unwrap();
            assert!(caibx_chunks(&p).is_err());
        }
    }
}
