//! `remoca image-node`: one node of the cooperative chunk cache (issue 8) — a thin wrapper
//! over `remoca_blkback::images::peer::node`. It serves its cache to peers, fetches what it
//! lacks from peers and the origin, and can deploy an image (read every chunk in boot order
//! through the template layer) into a file. With `--store DIR --image NAME[@N]` it is the
//! origin: it serves the store's chunks and writes the version's chunk list for the nodes
//! (`--seed-raw` plays the origin from a raw file instead, for the bench). It runs until SIGINT/SIGTERM (or right after the deployment with
//! `--exit-after-deploy`).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use parking_lot::Mutex;
use remoca_blkback::images::chunk::ChunkSize;
use remoca_blkback::images::fetch::FetchConfig;
use remoca_blkback::images::peer::node::{self, Node, NodeConfig};
use remoca_blkback::images::peer::server::ServerStats;
use remoca_blkback::images::store::{Store, StoreOptions};
use remoca_blkback::images::template::AccessProfile;

use super::blkback::parse_size;
use super::{announce, Global};

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Address to serve peers on (the address the other nodes list in --peers).
    #[arg(long)]
    listen: SocketAddr,
    /// Cache directory (the fast device). Not used with --store.
    #[arg(long, required_unless_present = "store")]
    cache: Option<PathBuf>,
    /// Cache bound in bytes (K, M, G suffixes).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    cache_bytes: u64,
    /// The origin's address.
    #[arg(long)]
    origin: Option<SocketAddr>,
    /// Every node's address, comma-separated (this node's own may be listed; all nodes must
    /// list the same set).
    #[arg(long, value_delimiter = ',')]
    peers: Vec<SocketAddr>,
    /// Timeout of each peer call, milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Be the origin: serve the chunks of this image store (opened read-only) to the nodes.
    #[arg(long, requires_all = ["image", "chunk_list"], conflicts_with_all = ["origin", "seed_raw", "deploy"])]
    store: Option<PathBuf>,
    /// With --store: the image whose chunk list goes to --chunk-list, `NAME` (newest version)
    /// or `NAME@N`.
    #[arg(long, requires = "store")]
    image: Option<String>,
    /// Seed the cache from this raw image and write its chunk list to --chunk-list.
    #[arg(long, requires = "chunk_list")]
    seed_raw: Option<PathBuf>,
    /// Chunk size for --seed-raw.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    chunk_size: u64,
    /// The image's chunk list (read for --deploy, written by --seed-raw and --store).
    #[arg(long)]
    chunk_list: Option<PathBuf>,
    /// Deploy the image of --chunk-list into this file.
    #[arg(long, requires = "chunk_list")]
    deploy: Option<PathBuf>,
    /// Read (and prefetch) in the order of this access profile.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Chunks per prefetch request and prefetch requests in flight.
    #[arg(long, default_value_t = 16)]
    prefetch_batch: usize,
    #[arg(long, default_value_t = 8)]
    prefetch_parallel: usize,
    /// Before deploying, wait up to this long (milliseconds) until every peer accepts
    /// connections, so that a peer still starting is not taken for a dead one (which would
    /// send its chunks to the origin a second time). Deploys anyway when the time is up.
    #[arg(long, default_value_t = 0)]
    wait_peers_ms: u64,
    /// Exit once the deployment is done instead of serving on.
    #[arg(long)]
    exit_after_deploy: bool,
    /// Keep counters in this file (key=value lines, rewritten atomically every 200 ms).
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Count the chunks this server sends more than once (repeat_chunks, repeat_bytes in
    /// --stats): for the origin of a deployment test. Off by default, since it keeps every
    /// chunk id served in memory and takes a lock per chunk.
    #[arg(long)]
    count_repeats: bool,
    /// Test hook: serve corrupted chunks (to play a bad peer).
    #[arg(long, hide = true)]
    corrupt_served_chunks: bool,
}

#[derive(Debug, Default)]
struct Deploy {
    total: AtomicU64,
    progress: AtomicU64,
    done: AtomicBool,
    ms: AtomicU64,
    /// When the deployment started (ms since the Unix epoch), to line nodes up in a trace.
    start_unix_ms: AtomicU64,
    /// When this node's home stream was done, from the start of the deployment.
    home_ms: AtomicU64,
    /// When every chunk had been read, before the disk was synced.
    read_ms: AtomicU64,
    /// When the prefetcher was done.
    pf_ms: AtomicU64,
    error: Mutex<Option<String>>,
}

fn write_stats(path: &Path, n: &Node, d: &Deploy) -> std::io::Result<()> {
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let s = n.server.stats();
    let f = &n.fetcher.stats;
    let mut text = String::new();
    for (k, v) in [
        ("served_bytes", g(&s.bytes_served)),
        ("served_chunks", g(&s.chunks_served)),
        ("pulled", g(&s.pulled)),
        ("from_cache", g(&f.from_cache)),
        ("from_peers", g(&f.from_peers)),
        ("bytes_from_peers", g(&f.bytes_from_peers)),
        ("from_origin", g(&f.from_origin)),
        ("bytes_from_origin", g(&f.bytes_from_origin)),
        ("corrupt_rejected", g(&f.corrupt_rejected)),
        ("peer_failures", g(&f.peer_failures)),
        ("peers_demoted", g(&f.peers_demoted)),
        ("chunks_total", g(&d.total)),
        ("progress", g(&d.progress)),
        ("deployed", d.done.load(Ordering::Relaxed) as u64),
        ("deploy_ms", g(&d.ms)),
        ("deploy_start_unix_ms", g(&d.start_unix_ms)),
        ("home_stream_ms", g(&d.home_ms)),
        ("read_done_ms", g(&d.read_ms)),
        ("prefetched_ms", g(&d.pf_ms)),
    ] {
        text.push_str(&format!("{k}={v}\n"));
    }
    if n.server.counts_repeats() {
        text.push_str(&repeat_lines(s));
    }
    if let Some(e) = d.error.lock().as_ref() {
        text.push_str(&format!("deploy_error={}\n", e.replace('\n', " ")));
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The repeat counters' --stats lines, for a server counting them (`--count-repeats`).
fn repeat_lines(s: &ServerStats) -> String {
    format!(
        "repeat_chunks={}\nrepeat_bytes={}\n",
        s.repeat_chunks.load(Ordering::Relaxed),
        s.repeat_bytes.load(Ordering::Relaxed)
    )
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn write_chunk_list(
    list: &remoca_blkback::images::chunk::ChunkList,
    out: &Path,
) -> anyhow::Result<()> {
    let tmp = out.with_extension("tmp");
    node::save_chunk_list(list, &tmp).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// Wait until every peer but `me` accepts a connection, at most `limit`.
fn wait_for_peers(peers: &[SocketAddr], me: SocketAddr, limit: Duration) {
    let start = std::time::Instant::now();
    let mut waiting: Vec<SocketAddr> = peers.iter().copied().filter(|p| *p != me).collect();
    while !waiting.is_empty() && start.elapsed() < limit {
        waiting.retain(|p| {
            std::net::TcpStream::connect_timeout(p, Duration::from_millis(200)).is_err()
        });
        if !waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if !waiting.is_empty() && !limit.is_zero() {
        tracing::warn!("peers not up after {limit:?}, deploying anyway: {waiting:?}");
    }
}

/// Wait for SIGINT or SIGTERM.
fn wait_for_signal() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })
}

/// The origin over the store: serve its chunks until a signal, keeping the server's counters
/// in --stats.
fn store_origin(a: &NodeArgs, dir: &Path, listener: TcpListener) -> anyhow::Result<()> {
    let store = Store::open_location(dir, StoreOptions::default())
        .with_context(|| format!("cannot open image store {}", dir.display()))?;
    let spec = a.image.as_deref().context("--store needs --image")?;
    let (v, list) = node::store_chunk_list(&store, spec)?;
    let out = a
        .chunk_list
        .as_ref()
        .context("--store needs --chunk-list")?;
    write_chunk_list(&list, out)?;
    let server = node::serve_store(listener, store, a.count_repeats).context("serve the store")?;
    announce(format_args!(
        "origin listening on {} serving {v} ({} chunks) from {}",
        server.addr(),
        list.chunks.iter().flatten().count(),
        dir.display()
    ));
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        if let Some(path) = &a.stats {
            let (server, stop) = (&server, &stop);
            s.spawn(move || loop {
                let st = server.stats();
                let mut text = format!(
                    "served_bytes={}\nserved_chunks={}\nmissing={}\n",
                    st.bytes_served.load(Ordering::Relaxed),
                    st.chunks_served.load(Ordering::Relaxed),
                    st.missing.load(Ordering::Relaxed),
                );
                if server.counts_repeats() {
                    text.push_str(&repeat_lines(st));
                }
                let tmp = path.with_extension("tmp");
                let _ = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path));
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            });
        }
        let r = wait_for_signal();
        stop.store(true, Ordering::Relaxed);
        r
    })
}

pub fn image_node(a: NodeArgs, g: &Global) -> anyhow::Result<()> {
    super::init_tracing(g.verbose);
    let listener = TcpListener::bind(a.listen).with_context(|| format!("bind {}", a.listen))?;
    if let Some(dir) = &a.store {
        return store_origin(&a, dir, listener);
    }
    let me = listener.local_addr()?;
    let cfg = NodeConfig {
        cache_dir: a
            .cache
            .clone()
            .context("--cache is needed without --store")?,
        cache_bytes: a.cache_bytes,
        fetch: FetchConfig {
            me: Some(me),
            peers: a.peers.clone(),
            origin: a.origin,
            timeout: Duration::from_millis(a.timeout_ms),
            ..FetchConfig::default()
        },
        corrupt_served_chunks: a.corrupt_served_chunks,
        count_repeats: a.count_repeats,
    };
    let n = Node::start(listener, cfg).context("start the node")?;
    if let Some(raw) = &a.seed_raw {
        let cs = ChunkSize::new(a.chunk_size)?;
        let list = node::seed_from_raw(n.fetcher.cache(), raw, cs)
            .with_context(|| format!("seed from {}", raw.display()))?;
        let out = a
            .chunk_list
            .as_ref()
            .context("--seed-raw needs --chunk-list")?;
        write_chunk_list(&list, out)?;
    }
    announce(format_args!("node listening on {me}"));
    let d = Arc::new(Deploy::default());
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| -> anyhow::Result<()> {
        if let Some(path) = &a.stats {
            let (n, d, stop) = (&n, &d, &stop);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = write_stats(path, n, d);
                    std::thread::sleep(Duration::from_millis(200));
                }
                let _ = write_stats(path, n, d);
            });
        }
        if let Some(out) = &a.deploy {
            let list_path = a
                .chunk_list
                .as_ref()
                .context("--deploy needs --chunk-list")?;
            let list = node::load_chunk_list(list_path)?;
            let profile = a.profile.as_deref().map(AccessProfile::load).transpose()?;
            d.total.store(list.chunks.len() as u64, Ordering::Relaxed);
            wait_for_peers(&a.peers, me, Duration::from_millis(a.wait_peers_ms));
            d.start_unix_ms.store(unix_ms(), Ordering::Relaxed);
            let f = std::fs::File::create(out)?;
            match node::deploy(
                &n.fetcher,
                &list,
                profile.as_ref(),
                Some(&f),
                a.prefetch_batch,
                a.prefetch_parallel,
                &d.progress,
            ) {
                Ok(r) => {
                    d.ms.store(r.elapsed.as_millis() as u64, Ordering::Relaxed);
                    d.pf_ms
                        .store(r.prefetched.as_millis() as u64, Ordering::Relaxed);
                    d.read_ms
                        .store(r.read_done.as_millis() as u64, Ordering::Relaxed);
                    d.home_ms
                        .store(r.home_stream.as_millis() as u64, Ordering::Relaxed);
                    d.done.store(true, Ordering::Relaxed);
                    // The node serves on: a closed stdout must not stop it.
                    announce(format_args!(
                        "deployed {} bytes in {:.3} s: {}",
                        r.bytes,
                        r.elapsed.as_secs_f64(),
                        n.fetcher.stats.summary()
                    ));
                }
                Err(e) => {
                    *d.error.lock() = Some(e.to_string());
                    stop.store(true, Ordering::Relaxed);
                    return Err(e).context("deploy");
                }
            }
        }
        if !(a.exit_after_deploy && a.deploy.is_some()) {
            wait_for_signal()?;
        }
        stop.store(true, Ordering::Relaxed);
        Ok(())
    })
}

/// `remoca bench images`: the deployment test bed, or with `--dedup` the store's dedup and
/// ingest against casync's (see `remoca_blkback::images::bench`).
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Compare dedup and ingest with casync instead: three related ext4 images built with
    /// `mkfs.ext4 -d`, at 64 KiB and 4 KiB chunks (needs mkfs.ext4 and casync).
    #[arg(long)]
    dedup: bool,
    /// --dedup: the tree of the first image.
    #[arg(long, default_value = "/usr/share/doc")]
    dedup_base: PathBuf,
    /// --dedup: the tree the second image adds.
    #[arg(long, default_value = "/usr/lib/python3")]
    dedup_added: PathBuf,
    /// --dedup: chunk sizes (the store's fixed size, casync's average), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64K,4K", value_parser = parse_size)]
    dedup_chunk_sizes: Vec<u64>,
    /// Nodes deploying the image at once.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// The origin link's tbf rate.
    #[arg(long, default_value = "200mbit")]
    rate: String,
    /// Image size in MiB.
    #[arg(long, default_value_t = 128)]
    image_mib: u64,
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    chunk_size: u64,
    /// Scratch directory.
    #[arg(long, default_value = "/var/tmp/remoca-bench-images")]
    dir: PathBuf,
}

pub fn bench(a: BenchArgs, g: &Global) -> anyhow::Result<()> {
    super::init_tracing(g.verbose);
    if a.dedup {
        return bench_dedup(a);
    }
    ChunkSize::new(a.chunk_size)?;
    let cfg = remoca_blkback::images::bench::DeployBenchConfig {
        exe: std::env::current_exe()?,
        work: a.dir,
        nodes: a.nodes,
        rate: a.rate,
        image_mib: a.image_mib,
        chunk_size: a.chunk_size,
    };
    let load = load_average();
    let r = remoca_blkback::images::bench::deployment(&cfg)?;
    out!("{}", r.table(&cfg))?;
    outln!("load average before: {load}")?;
    Ok(())
}

fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn bench_dedup(a: BenchArgs) -> anyhow::Result<()> {
    for &cs in &a.dedup_chunk_sizes {
        ChunkSize::new(cs)?;
    }
    let cfg = remoca_blkback::images::bench::DedupBenchConfig {
        work: a.dir.join("dedup"),
        base: a.dedup_base,
        added: a.dedup_added,
        chunk_sizes: a.dedup_chunk_sizes,
        casync: "casync".into(),
    };
    let load = load_average();
    let r = remoca_blkback::images::bench::dedup(&cfg)?;
    out!("{}", r.table())?;
    outln!("load average before: {load}, after: {}", load_average())?;
    Ok(())
}
