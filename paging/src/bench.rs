//! `remoca bench paging`: remote paging against its local baselines, measured in one run.
//!
//! 1. **Page-in latency** of one 4 KiB page from an in-process memory server on loopback,
//!    through the pager's store ([`MemserverStore`]: sealed, persistent pool) and through the
//!    swap device's path (the [`RemoteClient`] plus the LZ4 page codec), against `pread` of the
//!    same page from one local page file opened with `O_DIRECT` (xenpaging's design: one file,
//!    page `gfn` at `gfn * 4096`) and from the same file through the page cache.
//! 2. **Swap throughput**: sequential and random 4 KiB writes then reads through
//!    [`SwapDisk`] (two in-process servers, two replicas) against a local file, buffered and
//!    `O_DIRECT`.
//! 3. **Cache hit rate** of [`RemoteCache`] over a file disk on a trace that reads a working set
//!    several times, and the latency of hits against reads of the lower disk.
//! 4. **MRC error**: SHARDS (rate 0.1, fixed size 8192) against exact LRU on
//!    `synthetic::zipf_scan_mix`, with the time each takes.
//!
//! Page order is shuffled, warm-up requests are not counted, every figure is from this run.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use remoca_blkback::disk::{Disk, WriteFlags};
use remoca_blkback::raw::RawFile;
use remoca_blkback::remote::{page_codec, CacheConfig, RemoteCache, RemoteClient};
use remoca_blkback::remote::{SwapConfig, SwapDisk};
use remoca_memserver::client::{ClientConfig, PageSecret};
use remoca_memserver::protocol::Pool;
use remoca_memserver::server::{serve, ServerConfig};
use remoca_memserver::store::{Store, StoreConfig};

use crate::mrc::{self, synthetic::SplitMix, Shards};
use crate::store::{MemserverStore, PageStore};

const PAGE: usize = 4096;

/// Sizes of one run.
#[derive(Debug, Clone)]
pub struct PagingBenchConfig {
    /// Pages stored remotely and in the local page file (part 1).
    pub pages: u64,
    /// Timed page-ins per system (part 1).
    pub samples: usize,
    /// Untimed page-ins before the timed ones.
    pub warmup: usize,
    /// 4 KiB blocks written then read per swap pass (part 2).
    pub swap_blocks: u64,
    /// Working set of the re-read trace, in blocks (part 3).
    pub cache_blocks: u64,
    /// Passes over the working set (part 3; admission is on the second touch).
    pub cache_passes: usize,
    /// References in the MRC trace (part 4).
    pub mrc_refs: usize,
    /// Distinct Zipf pages of the MRC trace.
    pub mrc_keys: u64,
    /// Directory on a real disk for the local files (tmpfs refuses `O_DIRECT`).
    pub dir: PathBuf,
    pub seed: u64,
}

impl PagingBenchConfig {
    /// The sizes `remoca bench paging` uses by default.
    pub fn standard(dir: PathBuf) -> Self {
        PagingBenchConfig {
            pages: 16_384,
            samples: 5_000,
            warmup: 500,
            swap_blocks: 16_384,
            cache_blocks: 4_096,
            cache_passes: 4,
            mrc_refs: 1_000_000,
            mrc_keys: 60_000,
            dir,
            seed: 42,
        }
    }
}

/// Why the bench stopped.
#[derive(Debug, thiserror::Error)]
pub enum PagingBenchError {
    #[error("I/O on {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PagingBenchError {
    let what = what.into();
    move |source| PagingBenchError::Io { what, source }
}

fn other(e: impl std::fmt::Display) -> PagingBenchError {
    PagingBenchError::Other(e.to_string())
}

/// One printed row: section, name, and the figures as label/value pairs.
#[derive(Debug, Clone)]
pub struct Row {
    pub section: &'static str,
    pub name: String,
    pub figures: Vec<(&'static str, f64)>,
}

/// The rows and the printable report.
#[derive(Debug, Clone, Default)]
pub struct PagingBenchReport {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    pub text: String,
}

impl PagingBenchReport {
    /// The row `name` of `section`, if it was produced.
    pub fn row(&self, section: &str, name: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.section == section && r.name == name)
    }
}

/// Rows every complete run produces, as (section, name).
pub const EXPECTED_ROWS: &[(&str, &str)] = &[
    ("page-in", "memserver, pager store (sealed)"),
    ("page-in", "memserver, swap path (sealed + lz4)"),
    ("page-in", "local file O_DIRECT"),
    ("page-in", "local file, page cache"),
    ("swap", "SwapDisk seq write"),
    ("swap", "SwapDisk seq read"),
    ("swap", "SwapDisk rand write"),
    ("swap", "SwapDisk rand read"),
    ("swap", "file buffered seq write"),
    ("swap", "file buffered seq read"),
    ("swap", "file buffered rand write"),
    ("swap", "file buffered rand read"),
    ("swap", "file O_DIRECT seq write"),
    ("swap", "file O_DIRECT seq read"),
    ("swap", "file O_DIRECT rand write"),
    ("swap", "file O_DIRECT rand read"),
    ("cache", "RemoteCache re-read trace"),
    ("cache", "RemoteCache hit"),
    ("cache", "RemoteCache miss"),
    ("cache", "lower disk read"),
    ("cache", "lower file O_DIRECT read"),
    ("mrc", "exact LRU"),
    ("mrc", "SHARDS rate 0.1"),
    ("mrc", "SHARDS fixed size 8192"),
];

/// A memory server in its own runtime on 127.0.0.1:0; stopped on drop.
struct LocalServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl LocalServer {
    fn start(capacity: u64) -> Result<Self, PagingBenchError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-memserver")
            .enable_all()
            .build()
            .map_err(io("memserver runtime"))?;
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("bind 127.0.0.1:0"))?;
        l.set_nonblocking(true).map_err(io("listener"))?;
        let addr = l.local_addr().map_err(io("listener"))?;
        let cfg = StoreConfig {
            capacity,
            headroom: 0,
        };
        let store = Arc::new(Store::with_proc_meminfo(cfg));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let listener = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(l).map_err(io("listener"))?
        };
        rt.spawn(async move {
            let _ = serve(listener, store, ServerConfig::new(cfg), rx).await;
        });
        Ok(LocalServer {
            addr,
            stop: Some(tx),
            rt: Some(rt),
        })
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A 4096-aligned 4096-byte window of an over-allocated buffer (no `unsafe`).
struct Aligned {
    buf: Vec<u8>,
    off: usize,
}

impl Aligned {
    fn new() -> Self {
        let buf = vec![0u8; 2 * PAGE];
        let off = (PAGE - buf.as_ptr() as usize % PAGE) % PAGE;
        Aligned { buf, off }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + PAGE]
    }
}

/// A page that LZ4 halves: a random half and a repeated half, tagged with its number.
fn page_content(n: u64, rng: &mut SplitMix) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    for c in p[..PAGE / 2].chunks_mut(8) {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    for (i, b) in p[PAGE / 2..].iter_mut().enumerate() {
        *b = (i % 61) as u8;
    }
    p[..8].copy_from_slice(&n.to_le_bytes());
    p
}

fn shuffled(n: u64, count: usize, rng: &mut SplitMix) -> Vec<u64> {
    (0..count).map(|_| rng.next_u64() % n.max(1)).collect()
}

fn permutation(n: u64, rng: &mut SplitMix) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p / 100.0) as usize).min(sorted.len() - 1);
    sorted[i]
}

fn lat_row(section: &'static str, name: &str, mut us: Vec<f64>) -> Row {
    us.sort_by(f64::total_cmp);
    let mean = us.iter().sum::<f64>() / us.len().max(1) as f64;
    Row {
        section,
        name: name.to_owned(),
        figures: vec![
            ("n", us.len() as f64),
            ("p50 us", pct(&us, 50.0)),
            ("p99 us", pct(&us, 99.0)),
            ("mean us", mean),
        ],
    }
}

/// Time `f` on each key after `warmup` untimed calls; microseconds.
fn time_each(
    keys: &[u64],
    warmup: usize,
    mut f: impl FnMut(u64) -> Result<(), PagingBenchError>,
) -> Result<Vec<f64>, PagingBenchError> {
    for k in keys.iter().take(warmup) {
        f(*k)?;
    }
    let mut out = Vec::with_capacity(keys.len().saturating_sub(warmup));
    for k in keys.iter().skip(warmup) {
        let t = Instant::now();
        f(*k)?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

/// The file-system type of the mount holding `dir`, from `/proc/self/mounts` (longest
/// mount point that is a prefix of the canonical path).
fn fs_type(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            let mnt = mnt.replace("\\040", " ");
            dir.starts_with(&mnt).then(|| (mnt.len(), ty.to_owned()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, ty)| ty)
}

/// Open `path` with `O_DIRECT`, or say why not and open it buffered.
fn open_direct(path: &Path, notes: &mut Vec<String>) -> Result<(File, bool), PagingBenchError> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).custom_flags(libc::O_DIRECT);
    match o.open(path) {
        Ok(f) => {
            // Some file systems accept the flag at open and refuse the I/O.
            let mut a = Aligned::new();
            match f.read_at(a.get(), 0) {
                Ok(_) => Ok((f, true)),
                Err(e) => {
                    notes.push(format!(
                        "O_DIRECT read refused on {} ({e}): the \"O_DIRECT\" rows are buffered",
                        path.display()
                    ));
                    Ok((open_plain(path)?, false))
                }
            }
        }
        Err(e) => {
            notes.push(format!(
                "O_DIRECT refused on {} ({e}; tmpfs does not support it): the \"O_DIRECT\" rows are buffered",
                path.display()
            ));
            Ok((open_plain(path)?, false))
        }
    }
}

fn open_plain(path: &Path) -> Result<File, PagingBenchError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path.display().to_string()))
}

fn client_config(servers: Vec<SocketAddr>, replicas: usize) -> ClientConfig {
    let mut c = ClientConfig::new(servers, None, PageSecret::random());
    c.replicas = replicas;
    c
}

/// A page-in under test: its row name and one fetch of page `g`.
type Fetch<'a> = (
    &'static str,
    Box<dyn FnMut(u64) -> Result<(), PagingBenchError> + 'a>,
);

/// Part 1: page-in latency. The systems take turns page by page (rotating who goes first),
/// so a burst of load on the shared machine hits all of them alike.
fn page_in(
    cfg: &PagingBenchConfig,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<(), PagingBenchError> {
    let mut rng = SplitMix::new(cfg.seed);
    let n = cfg.pages.max(1);
    let capacity = (n * PAGE as u64 * 4).max(64 << 20);
    let server = LocalServer::start(capacity)?;
    let keys = shuffled(n, cfg.warmup + cfg.samples, &mut rng);
    let pages: Vec<Vec<u8>> = (0..n).map(|g| page_content(g, &mut rng)).collect();
    let batches = |vals: &[Vec<u8>], i: usize| -> Vec<(u64, Vec<u8>)> {
        vals.iter()
            .enumerate()
            .skip(i * 256)
            .take(256)
            .map(|(j, p)| (j as u64, p.clone()))
            .collect()
    };

    // The pager's store: sealed pages in the persistent pool of one server.
    let store = MemserverStore::connect(client_config(vec![server.addr], 1)).map_err(other)?;
    let dom = 7;
    // The swap device's path: the remote layers' client and the LZ4 page codec.
    let rc = RemoteClient::connect(client_config(vec![server.addr], 1), 2).map_err(other)?;
    let ns = 11;
    let encoded: Vec<Vec<u8>> = pages.iter().map(|p| page_codec::encode(p)).collect();
    let ratio = encoded.iter().map(Vec::len).sum::<usize>() as f64 / (n as f64 * PAGE as f64);
    for i in 0..pages.len().div_ceil(256) {
        let b = batches(&pages, i);
        let b: Vec<(u64, &[u8])> = b.iter().map(|(k, p)| (*k, &p[..])).collect();
        store.put_batch(dom, &b).map_err(other)?;
        let e = batches(&encoded, i);
        let e: Vec<(u64, &[u8])> = e.iter().map(|(k, p)| (*k, &p[..])).collect();
        rc.put_batch(Pool::Persistent, ns, &e).map_err(other)?;
    }
    notes.push(format!(
        "page-in pages are half random, half repetitive: lz4 stores them at {:.0}% of 4 KiB; \
         the four page-in systems take turns page by page",
        ratio * 100.0
    ));
    let spin = client_config(vec![server.addr], 1).reply_spin;
    notes.push(format!(
        "page-in: a remote read is the calling thread's own round trip, polling the socket up \
         to {} us (reply_spin) before sleeping, so it spends CPU where pread sleeps",
        spin.as_micros()
    ));

    // xenpaging's baseline: one page file, page g at g * 4096.
    let path = cfg
        .dir
        .join(format!("remoca-bench-pagefile-{}", std::process::id()));
    let res = (|| {
        {
            let f = File::create(&path).map_err(io(path.display().to_string()))?;
            for (g, p) in pages.iter().enumerate() {
                f.write_all_at(p, g as u64 * PAGE as u64)
                    .map_err(io("page file"))?;
            }
            f.sync_all().map_err(io("page file"))?;
        }
        let (direct_file, direct) = open_direct(&path, notes)?;
        if !direct {
            notes.push("page-in \"local file O_DIRECT\" fell back to buffered reads".into());
        }
        let plain = open_plain(&path)?;
        let mut a = Aligned::new();
        let mut buf = vec![0u8; PAGE];
        let mut out = vec![0u8; PAGE];
        let check = |g: u64, p: &[u8]| {
            if p.len() != PAGE || p[..8] != g.to_le_bytes() {
                Err(other(format!("page {g} came back wrong")))
            } else {
                Ok(())
            }
        };
        let mut systems: Vec<Fetch<'_>> = vec![
            (
                "memserver, pager store (sealed)",
                Box::new(|g| check(g, &store.get(dom, g).map_err(other)?)),
            ),
            (
                "memserver, swap path (sealed + lz4)",
                Box::new(|g| {
                    let v = rc.get_batch(Pool::Persistent, ns, &[g]).map_err(other)?;
                    let v = v
                        .into_iter()
                        .next()
                        .flatten()
                        .ok_or_else(|| other(format!("page {g} missing")))?;
                    page_codec::decode(&v, &mut out).map_err(other)?;
                    check(g, &out)
                }),
            ),
            (
                "local file O_DIRECT",
                Box::new(|g| {
                    let b = a.get();
                    direct_file
                        .read_exact_at(b, g * PAGE as u64)
                        .map_err(io("page file"))?;
                    check(g, b)
                }),
            ),
            (
                "local file, page cache",
                Box::new(|g| {
                    plain
                        .read_exact_at(&mut buf, g * PAGE as u64)
                        .map_err(io("page file"))?;
                    check(g, &buf)
                }),
            ),
        ];
        let mut us: Vec<Vec<f64>> = vec![Vec::with_capacity(cfg.samples); systems.len()];
        let ns_len = systems.len();
        for (i, g) in keys.iter().enumerate() {
            for j in 0..ns_len {
                let s = (i + j) % ns_len;
                let t = Instant::now();
                (systems[s].1)(*g)?;
                let e = t.elapsed().as_secs_f64() * 1e6;
                if i >= cfg.warmup {
                    us[s].push(e);
                }
            }
        }
        for ((name, _), us) in systems.iter().zip(us) {
            rows.push(lat_row("page-in", name, us));
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    drop(rc);
    drop(store);
    drop(server);
    res
}

fn tput_row(name: &str, blocks: usize, elapsed: Duration) -> Row {
    let s = elapsed.as_secs_f64().max(1e-9);
    Row {
        section: "swap",
        name: name.to_owned(),
        figures: vec![
            ("MB/s", blocks as f64 * PAGE as f64 / s / 1e6),
            ("IOPS", blocks as f64 / s),
        ],
    }
}

/// Sequential then random writes and reads of 4 KiB through `write`/`read`.
fn io_passes(
    label: &str,
    n: u64,
    rng: &mut SplitMix,
    rows: &mut Vec<Row>,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), PagingBenchError>,
    mut read: impl FnMut(u64) -> Result<(), PagingBenchError>,
) -> Result<(), PagingBenchError> {
    let seq: Vec<u64> = (0..n).collect();
    let rand = permutation(n, rng);
    let data: Vec<Vec<u8>> = (0..64).map(|i| page_content(i, rng)).collect();
    for (order, kind) in [(&seq, "seq"), (&rand, "rand")] {
        let t = Instant::now();
        for (i, b) in order.iter().enumerate() {
            write(*b, &data[i % data.len()])?;
        }
        rows.push(tput_row(
            &format!("{label} {kind} write"),
            order.len(),
            t.elapsed(),
        ));
        let t = Instant::now();
        for b in order.iter() {
            read(*b)?;
        }
        rows.push(tput_row(
            &format!("{label} {kind} read"),
            order.len(),
            t.elapsed(),
        ));
    }
    Ok(())
}

/// Part 2: swap throughput.
fn swap(
    cfg: &PagingBenchConfig,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<(), PagingBenchError> {
    let mut rng = SplitMix::new(cfg.seed ^ 0x5a5a);
    let n = cfg.swap_blocks.max(1);
    let size = n * PAGE as u64;
    let cap = (size * 3).max(64 << 20);
    let (a, b) = (LocalServer::start(cap)?, LocalServer::start(cap)?);
    let rc = RemoteClient::connect(client_config(vec![a.addr, b.addr], 2), 2).map_err(other)?;
    let spill = cfg
        .dir
        .join(format!("remoca-bench-spill-{}", std::process::id()));
    let res = (|| {
        let disk = SwapDisk::open(
            Arc::clone(&rc),
            SwapConfig {
                size,
                namespace: 21,
                spill_path: spill.clone(),
                spill_max: size,
            },
        )
        .map_err(other)?;
        let mut buf = vec![0u8; PAGE];
        io_passes(
            "SwapDisk",
            n,
            &mut rng,
            rows,
            |b, d| {
                disk.write_at(d, b * PAGE as u64, WriteFlags::default())
                    .map_err(other)
            },
            |b| disk.read_at(&mut buf, b * PAGE as u64).map_err(other),
        )?;
        let s = disk.stats();
        notes.push(format!(
            "swap: {} blocks on the servers (replicas {}), {} spilled, {} fallbacks",
            s.remote_blocks,
            rc.replicas(),
            s.spilled_blocks,
            s.fallbacks
        ));
        Ok(())
    })();
    let _ = std::fs::remove_file(&spill);
    drop(rc);
    drop((a, b));
    res?;

    let path = cfg
        .dir
        .join(format!("remoca-bench-swapfile-{}", std::process::id()));
    let res = (|| {
        let f = File::create(&path).map_err(io(path.display().to_string()))?;
        f.set_len(size).map_err(io("swap file"))?;
        drop(f);
        let f = open_plain(&path)?;
        let mut buf = vec![0u8; PAGE];
        io_passes(
            "file buffered",
            n,
            &mut rng,
            rows,
            |b, d| f.write_all_at(d, b * PAGE as u64).map_err(io("swap file")),
            |b| {
                f.read_exact_at(&mut buf, b * PAGE as u64)
                    .map_err(io("swap file"))
            },
        )?;
        let (f, _direct) = open_direct(&path, notes)?;
        let mut w = Aligned::new();
        let mut r = Aligned::new();
        io_passes(
            "file O_DIRECT",
            n,
            &mut rng,
            rows,
            |b, d| {
                let wb = w.get();
                wb.copy_from_slice(d);
                f.write_all_at(wb, b * PAGE as u64).map_err(io("swap file"))
            },
            |b| {
                f.read_exact_at(r.get(), b * PAGE as u64)
                    .map_err(io("swap file"))
            },
        )?;
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    notes.push(
        "swap: SwapDisk writes are acknowledged when both replicas hold them; \
         the local file writes are not fsynced (buffered ones only reach the page cache)"
            .into(),
    );
    res
}

/// Part 3: the remote read cache on a re-read trace.
fn cache(
    cfg: &PagingBenchConfig,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<(), PagingBenchError> {
    let mut rng = SplitMix::new(cfg.seed ^ 0xcace);
    let n = cfg.cache_blocks.max(1);
    let size = n * PAGE as u64;
    let server = LocalServer::start((size * 3).max(64 << 20))?;
    let rc = RemoteClient::connect(client_config(vec![server.addr], 1), 2).map_err(other)?;
    let path = cfg
        .dir
        .join(format!("remoca-bench-cachedisk-{}", std::process::id()));
    let res = (|| {
        {
            let f = File::create(&path).map_err(io(path.display().to_string()))?;
            for b in 0..n {
                f.write_all_at(&page_content(b, &mut rng), b * PAGE as u64)
                    .map_err(io("cache disk"))?;
            }
            f.sync_all().map_err(io("cache disk"))?;
        }
        let lower: Arc<dyn Disk> = Arc::new(RawFile::open_read_write(&path).map_err(other)?);
        let cache = RemoteCache::new(Arc::clone(&lower), Arc::clone(&rc), CacheConfig::new(31));
        let mut buf = vec![0u8; PAGE];
        let (mut hit_us, mut miss_us) = (Vec::new(), Vec::new());
        let mut reads = 0usize;
        for _ in 0..cfg.cache_passes.max(1) {
            for b in permutation(n, &mut rng) {
                let before = cache.stats().hits;
                let t = Instant::now();
                cache.read_at(&mut buf, b * PAGE as u64).map_err(other)?;
                let us = t.elapsed().as_secs_f64() * 1e6;
                if buf[..8] != b.to_le_bytes() {
                    return Err(other(format!("cache returned the wrong block for {b}")));
                }
                reads += 1;
                if cache.stats().hits > before {
                    hit_us.push(us);
                } else {
                    miss_us.push(us);
                }
            }
        }
        let s = cache.stats();
        rows.push(Row {
            section: "cache",
            name: "RemoteCache re-read trace".into(),
            figures: vec![
                ("reads", reads as f64),
                ("hit rate %", 100.0 * s.hits as f64 / reads.max(1) as f64),
                ("admitted", s.admitted as f64),
            ],
        });
        rows.push(lat_row("cache", "RemoteCache hit", hit_us));
        rows.push(lat_row("cache", "RemoteCache miss", miss_us));
        let keys = shuffled(n, n as usize, &mut rng);
        let us = time_each(&keys, 0, |b| {
            lower.read_at(&mut buf, b * PAGE as u64).map_err(other)
        })?;
        rows.push(lat_row("cache", "lower disk read", us));
        // The same lower file when it is not in the page cache (a cold disk).
        let (direct, _) = open_direct(&path, notes)?;
        let mut a = Aligned::new();
        let us = time_each(&keys, 0, |b| {
            direct
                .read_exact_at(a.get(), b * PAGE as u64)
                .map_err(io("cache disk"))
        })?;
        rows.push(lat_row("cache", "lower file O_DIRECT read", us));
        notes.push(format!(
            "cache: {} passes over {} blocks in shuffled order, admission on the second touch \
             (best possible hit rate {:.0}%); the lower disk is a buffered file (page cache warm); misses include the admitting writes",
            cfg.cache_passes.max(1),
            n,
            100.0 * (cfg.cache_passes.max(1) as f64 - 2.0).max(0.0)
                / cfg.cache_passes.max(1) as f64
        ));
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    res
}

/// Part 4: SHARDS against exact LRU.
fn mrc_error(cfg: &PagingBenchConfig, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    let bucket = 256;
    let trace: Vec<u64> =
        mrc::synthetic::zipf_scan_mix(cfg.mrc_refs, cfg.mrc_keys, 0.15, cfg.seed).collect();
    let t = Instant::now();
    let exact = mrc::exact_lru(trace.iter().copied(), bucket);
    let exact_s = t.elapsed().as_secs_f64();
    rows.push(Row {
        section: "mrc",
        name: "exact LRU".into(),
        figures: vec![("MAE", 0.0), ("ms", exact_s * 1e3)],
    });
    for (name, mut s) in [
        ("SHARDS rate 0.1", Shards::fixed_rate(0.1, bucket)),
        (
            "SHARDS fixed size 8192",
            Shards::fixed_size(8192, 0.1, bucket),
        ),
    ] {
        let t = Instant::now();
        for k in &trace {
            s.access(*k);
        }
        let curve = s.curve();
        let secs = t.elapsed().as_secs_f64();
        rows.push(Row {
            section: "mrc",
            name: name.into(),
            figures: vec![
                ("MAE", mrc::mean_absolute_error(&exact, &curve)),
                ("ms", secs * 1e3),
                ("x faster", exact_s / secs.max(1e-9)),
            ],
        });
    }
    notes.push(format!(
        "mrc: zipf_scan_mix({}, {}, 0.15, seed {}), {bucket}-page buckets",
        cfg.mrc_refs, cfg.mrc_keys, cfg.seed
    ));
}

fn fmt_fig(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v != 0.0 && v.abs() < 0.1 {
        format!("{v:.4}")
    } else if v.abs() < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn render(rows: &[Row], notes: &[String], cfg: &PagingBenchConfig) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "remoca bench paging: {} pages, {} samples (+{} warm-up), {} swap blocks, cache working set {} blocks x {} passes, {} MRC refs; local files in {}",
        cfg.pages, cfg.samples, cfg.warmup, cfg.swap_blocks, cfg.cache_blocks, cfg.cache_passes, cfg.mrc_refs, cfg.dir.display()
    );
    let mut section = "";
    for r in rows {
        if r.section != section {
            section = r.section;
            let _ = writeln!(s, "\n[{section}]");
        }
        let figs: Vec<String> = r
            .figures
            .iter()
            .map(|(k, v)| format!("{k} {:>9}", fmt_fig(*v)))
            .collect();
        let _ = writeln!(s, "  {:<38} {}", r.name, figs.join("  "));
    }
    let fig = |sec: &str, name: &str, k: &str| {
        rows.iter()
            .find(|r| r.section == sec && r.name == name)
            .and_then(|r| r.figures.iter().find(|f| f.0 == k).map(|f| f.1))
            .unwrap_or(f64::NAN)
    };
    let _ = writeln!(
        s,
        "\n[goal: remote page-in p99 < 200 us, faster than O_DIRECT file at p50 and p99]"
    );
    let (dp50, dp99) = (
        fig("page-in", "local file O_DIRECT", "p50 us"),
        fig("page-in", "local file O_DIRECT", "p99 us"),
    );
    for name in [
        "memserver, pager store (sealed)",
        "memserver, swap path (sealed + lz4)",
    ] {
        let (p50, p99) = (
            fig("page-in", name, "p50 us"),
            fig("page-in", name, "p99 us"),
        );
        let _ = writeln!(
            s,
            "  {name}: p99 {:.1} us ({}), p50 x {:.2} / p99 x {:.2} of O_DIRECT (< 1 is faster: {})",
            p99,
            if p99 < 200.0 { "met" } else { "NOT met" },
            p50 / dp50,
            p99 / dp99,
            if p50 < dp50 && p99 < dp99 { "met" } else { "NOT met" },
        );
    }
    let _ = writeln!(s);
    for n in notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

/// Run all four parts and render the report.
///
/// # Errors
/// Servers that do not start, I/O on the local files, client failures.
pub fn run(cfg: &PagingBenchConfig) -> Result<PagingBenchReport, PagingBenchError> {
    std::fs::create_dir_all(&cfg.dir).map_err(io(cfg.dir.display().to_string()))?;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    match fs_type(&cfg.dir) {
        Some(ty) if ty == "tmpfs" || ty == "ramfs" => notes.push(format!(
            "{} is on {ty}: the local-file rows measure memory, not a disk (kernels from 6.6 \
             accept O_DIRECT on tmpfs); use --dir on a real disk",
            cfg.dir.display()
        )),
        Some(ty) => notes.push(format!("local files on {ty}")),
        None => notes.push("file system of the local files unknown".into()),
    }
    page_in(cfg, &mut rows, &mut notes)?;
    swap(cfg, &mut rows, &mut notes)?;
    cache(cfg, &mut rows, &mut notes)?;
    mrc_error(cfg, &mut rows, &mut notes);
    let text = render(&rows, &notes, cfg);
    Ok(PagingBenchReport { rows, notes, text })
}
