//! `remoca blkback` and `remoca bench blkback`: thin wrappers over
//! `remoca_blkback`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use remoca_blkback::blkif::{BlkifConfig, BlkifServer};
use remoca_blkback::failover;
use remoca_blkback::images::export::{
    self as image_export, ImageExportSpec, ImageNode, ImageSource, NodeOptions,
};
use remoca_blkback::nbd::{self, Listener};
use remoca_blkback::raw::RawFile;

use super::announce;
use remoca_blkback::{Disk, ExportConfig, Exports};
use serde::Deserialize;

use super::Global;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BlkbackArgs {
    #[command(subcommand)]
    cmd: Option<Box<BlkbackCmd>>,
    /// TOML config: `listen = "ADDR"` or `socket = "PATH"`, and `[[export]]` tables with
    /// `name`, `template`, optional `overlay` and `readonly`.
    #[arg(long, conflicts_with_all = ["listen", "socket", "export"])]
    config: Option<PathBuf>,
    /// TCP address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, conflicts_with = "socket")]
    listen: Option<SocketAddr>,
    /// Unix socket path to listen on.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// An export: `name=NAME,template=PATH[,overlay=PATH][,readonly][,block-size=N]`, or
    /// one whose template is an image version:
    /// `name=NAME,image=NAME@N,chunk-list=PATH|store=DIR|store=s3://BUCKET/PREFIX[,overlay=PATH][,readonly][,block-size=N]`
    /// (`chunk-list=`: through this node's cache, see --image-cache; `store=`: straight from
    /// an image store; a missing overlay is created). Repeat for more.
    #[arg(long = "export", value_name = "SPEC")]
    export: Vec<String>,
    /// Node cache directory for `image=...,chunk-list=` exports (the fast device): chunks
    /// are read from it, else fetched from the peers, else from the origin.
    #[arg(long, value_name = "DIR")]
    image_cache: Option<PathBuf>,
    /// Node cache bound in bytes (K, M, G suffixes).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    image_cache_bytes: u64,
    /// The origin's address (`remoca image-node --store DIR ...`).
    #[arg(long, value_name = "ADDR", requires = "image_cache")]
    image_origin: Option<SocketAddr>,
    /// Every node's address, comma-separated (the same list on every node).
    #[arg(
        long,
        value_name = "ADDR,...",
        value_delimiter = ',',
        requires = "image_cache"
    )]
    image_peers: Vec<SocketAddr>,
    /// Serve this node's cache to its peers on this address.
    #[arg(long, value_name = "ADDR", requires = "image_cache")]
    image_listen: Option<SocketAddr>,
    /// Timeout of each peer or origin call, milliseconds.
    #[arg(long, default_value_t = 2000)]
    image_timeout_ms: u64,
    /// A swap device whose 4 KiB blocks live on the memory servers (two replicas), with a
    /// local spill file: `name=NAME,size=SIZE,spill=PATH[,spill-max=SIZE]`. Repeat for more.
    #[arg(long = "swap", value_name = "SPEC")]
    swap: Vec<String>,
    /// Memory server for `--swap` and `remote-cache` exports; repeat for more.
    #[arg(long = "memserver", value_name = "ADDR")]
    memservers: Vec<SocketAddr>,
    /// Pre-shared key file of the memory servers.
    #[arg(long)]
    memserver_key_file: Option<PathBuf>,
    /// Serve Xen guests' vbd3 disks through the blkif ring too: `auto` does on a Xen host
    /// (the `--backend` in use is real), `on` also on the simulated host, `off` never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    blkif: String,
}

/// The split backend for failover (docs/failover.md). Without a subcommand, `remoca
/// blkback` serves the exports itself as before.
#[derive(Debug, Subcommand)]
enum BlkbackCmd {
    /// A storage driver: serves the failover channel from the exports' disk stacks.
    Driver(DriverArgs),
    /// The failover endpoint: serves one export over NBD, forwarding to the active driver and
    /// failing over to a backup driver, re-sending every unanswered request.
    Endpoint(EndpointArgs),
    /// Each running endpoint's export, active driver, generation, in-flight requests and last
    /// failover (read from the endpoints' status files).
    Status(StatusArgs),
    /// Failover tier 2, in dom0: watch a driver domain and, when it dies, move every guest disk
    /// it served to a standby driver domain (the guest is saved and restored, so blkfront
    /// reconnects and re-issues what was in flight). Exits once it has moved them.
    Standby(StandbyArgs),
}

#[derive(Debug, Args)]
struct StandbyArgs {
    /// The driver domain serving the disks now (name or domid).
    #[arg(long)]
    primary: String,
    /// The driver domain that takes them over (name or domid); it must run remoca's blkif
    /// backend with `backend_domain = "self"`.
    #[arg(long)]
    standby: String,
    /// Backend directory kind of the disks.
    #[arg(long, default_value = "vbd3")]
    kind: String,
    /// Where `xl save` writes a guest while it moves (it is removed once restored).
    #[arg(long, default_value = "/var/lib/xen")]
    save_dir: PathBuf,
    /// The xl to run.
    #[arg(long, default_value = "xl")]
    xl: PathBuf,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Where the endpoints keep their status files (default: remoca's state directory, `blkback/`).
    #[arg(long)]
    status_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DriverArgs {
    /// Channel address: `unix:PATH` or `tcp:HOST:PORT` (port 0 picks one; it is printed).
    #[arg(long)]
    listen: String,
    /// An export, as for `remoca blkback --export`:
    /// `name=NAME,template=PATH[,overlay=PATH][,readonly][,block-size=N]`. Repeat for more.
    #[arg(long = "export", value_name = "SPEC", required = true)]
    export: Vec<String>,
    /// Pre-shared key file; endpoints must prove they hold it.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    /// Worker threads running disk requests.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Pin each connection's reader to this CPU; give the endpoint the same `--reader-cpu`
    /// (docs/failover.md, "The two readers on one CPU").
    #[arg(long, value_name = "CPU")]
    reader_cpu: Option<usize>,
    /// Do not use the generation fence (`<overlay>.fence`): a superseded driver that wakes
    /// up could then write after a takeover. Only for storage fenced some other way.
    #[arg(long)]
    no_fence: bool,
    /// Exit when standard input reaches its end. A supervisor that keeps a pipe open to it
    /// (`remoca up` does) takes its drivers with it when it goes, even when SIGKILLed.
    #[arg(long)]
    exit_with_stdin: bool,
}

#[derive(Debug, Args)]
struct EndpointArgs {
    /// Where NBD clients connect: `unix:PATH` or `tcp:HOST:PORT`.
    #[arg(long)]
    nbd: String,
    /// The export to ask the drivers for; served over NBD under the same name.
    #[arg(long)]
    export: String,
    /// The active driver's channel address (`unix:PATH` or `tcp:HOST:PORT`).
    #[arg(long)]
    driver: String,
    /// A backup driver's address; repeat for more.
    #[arg(long = "backup", required = true)]
    backup: Vec<String>,
    /// Pre-shared key file (the drivers' key).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// No heartbeat for this long (ms): the driver is faulty.
    #[arg(long, default_value_t = 1000)]
    heartbeat_timeout_ms: u64,
    /// Smallest progress bound (ms).
    #[arg(long, default_value_t = 1000)]
    bound_floor_ms: u64,
    /// Largest progress bound (ms).
    #[arg(long, default_value_t = 60000)]
    bound_ceiling_ms: u64,
    /// The progress bound is this many times the recent p99 latency.
    #[arg(long, default_value_t = 4.0)]
    bound_k: f64,
    /// Do not SIGKILL a local driver declared faulty; it is then stopped only by the drivers'
    /// generation fence (as a driver on another host is). A driver hung inside a write
    /// then delays the takeover until it resumes or dies.
    #[arg(long)]
    no_kill_local: bool,
    /// Bytes of acknowledged, unflushed writes kept for replay before the endpoint flushes.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    unflushed_limit: u64,
    /// Pin the thread reading the drivers' replies to this CPU; give the drivers the same
    /// `--reader-cpu` (docs/failover.md, "The two readers on one CPU").
    #[arg(long, value_name = "CPU")]
    reader_cpu: Option<usize>,
    /// Where to keep this endpoint's status file for `remoca blkback status`
    /// (default: remoca's state directory, `blkback/`).
    #[arg(long)]
    status_dir: Option<PathBuf>,
}

fn status_dir(arg: Option<&std::path::Path>) -> PathBuf {
    arg.map_or_else(
        || remoca_xen::sim::attached::runtime_dir().join("blkback"),
        std::path::Path::to_path_buf,
    )
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Size of the raw template served by both servers.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    size: u64,
    /// Requests per `qemu-img bench` run.
    #[arg(long, default_value_t = 20000)]
    count: u64,
    /// Directory for the images (default: a fresh temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Repetitions per row; the median is printed.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

/// The `--config` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<SocketAddr>,
    socket: Option<PathBuf>,
    #[serde(default)]
    export: Vec<ExportEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportEntry {
    name: String,
    template: PathBuf,
    overlay: Option<PathBuf>,
    #[serde(default)]
    readonly: bool,
    /// Minimum block size requests must be aligned to (default 1: byte-granular).
    #[serde(default = "byte_granular")]
    block_size: u32,
}

fn byte_granular() -> u32 {
    1
}

impl From<ExportEntry> for ExportConfig {
    fn from(e: ExportEntry) -> Self {
        ExportConfig {
            name: e.name,
            template: e.template,
            overlay: e.overlay,
            read_only: e.readonly,
            min_block: e.block_size,
        }
    }
}

/// Parse `name=NAME,template=PATH[,overlay=PATH][,readonly][,block-size=N]`.
fn parse_export_spec(spec: &str) -> anyhow::Result<ExportConfig> {
    let (mut name, mut template, mut overlay, mut read_only) = (None, None, None, false);
    let mut min_block = 1;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("name", v)) => name = Some(v.to_owned()),
            Some(("template", v)) => template = Some(PathBuf::from(v)),
            Some(("overlay", v)) => overlay = Some(PathBuf::from(v)),
            Some(("block-size", v)) => {
                min_block = v
                    .parse()
                    .with_context(|| format!("--export {spec:?}: bad block-size"))?
            }
            None if part == "readonly" => read_only = true,
            _ => bail!(
                "--export {spec:?}: unknown item {part:?} \
                 (expected name=, template=, overlay=, readonly, block-size=, remote-cache; or image= for an image export)"
            ),
        }
    }
    let name = name.with_context(|| format!("--export {spec:?}: missing name="))?;
    let template = template.with_context(|| format!("--export {spec:?}: missing template="))?;
    Ok(ExportConfig {
        name,
        template,
        overlay,
        read_only,
        min_block,
    })
}

/// Whether an `--export` spec is an image export (has an `image=` item).
fn is_image_spec(spec: &str) -> bool {
    spec.split(',').any(|p| p.starts_with("image="))
}

/// Parse `name=NAME,image=NAME@N,chunk-list=PATH|store=DIR|store=s3://BUCKET/PREFIX[,overlay=PATH][,readonly][,block-size=N]`.
fn parse_image_spec(spec: &str) -> anyhow::Result<ImageExportSpec> {
    let (mut name, mut image, mut list, mut store) = (None, None, None, None);
    let (mut overlay, mut read_only, mut min_block) = (None, false, 1);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("name", v)) => name = Some(v.to_owned()),
            Some(("image", v)) => image = Some(v.to_owned()),
            Some(("chunk-list", v)) => list = Some(PathBuf::from(v)),
            Some(("store", v)) => store = Some(PathBuf::from(v)),
            Some(("overlay", v)) => overlay = Some(PathBuf::from(v)),
            Some(("block-size", v)) => {
                min_block = v
                    .parse()
                    .with_context(|| format!("--export {spec:?}: bad block-size"))?
            }
            None if part == "readonly" => read_only = true,
            _ => bail!(
                "--export {spec:?}: unknown item {part:?} (an image export takes name=, \
                 image=, chunk-list= or store=, overlay=, readonly, block-size=)"
            ),
        }
    }
    let source = match (list, store) {
        (Some(chunk_list), None) => ImageSource::Node { chunk_list },
        (None, Some(dir)) => ImageSource::Store { dir },
        _ => bail!("--export {spec:?}: give exactly one of chunk-list=PATH or store=DIR|s3://BUCKET/PREFIX"),
    };
    Ok(ImageExportSpec {
        name: name.with_context(|| format!("--export {spec:?}: missing name="))?,
        image: image.with_context(|| format!("--export {spec:?}: missing image="))?,
        source,
        overlay,
        read_only,
        min_block,
    })
}

/// Parse `name=NAME,size=SIZE,spill=PATH[,spill-max=SIZE]`.
fn parse_swap_spec(spec: &str) -> anyhow::Result<crate::up::blkback::SwapSpec> {
    let (mut name, mut size, mut spill, mut spill_max) = (None, None, None, None);
    for part in spec.split(',') {
        let size_of = |v: &str| parse_size(v).map_err(|e| anyhow::anyhow!("--swap {spec:?}: {e}"));
        match part.split_once('=') {
            Some(("name", v)) => name = Some(v.to_owned()),
            Some(("size", v)) => size = Some(size_of(v)?),
            Some(("spill", v)) => spill = Some(PathBuf::from(v)),
            Some(("spill-max", v)) => spill_max = Some(size_of(v)?),
            _ => bail!("--swap {spec:?}: unknown item {part:?} (expected name=, size=, spill=, spill-max=)"),
        }
    }
    let name = name.with_context(|| format!("--swap {spec:?}: missing name="))?;
    let size = size.with_context(|| format!("--swap {spec:?}: missing size="))?;
    let spill = spill.with_context(|| format!("--swap {spec:?}: missing spill="))?;
    Ok((name, size, spill, spill_max.unwrap_or(size)))
}

fn read_key(
    path: Option<&Path>,
) -> anyhow::Result<Option<remoca_memserver::protocol::auth::AuthKey>> {
    let Some(p) = path else { return Ok(None) };
    let bytes = std::fs::read(p).with_context(|| format!("reading key file {}", p.display()))?;
    Ok(Some(
        remoca_memserver::protocol::auth::AuthKey::from_secret(&bytes)
            .with_context(|| format!("key file {}", p.display()))?,
    ))
}

pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 65536, 64K, 1M)"))
}

enum Bind {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

pub fn run(mut a: BlkbackArgs, g: &Global) -> anyhow::Result<()> {
    super::init_tracing(g.verbose);
    match a.cmd.take().map(|c| *c) {
        Some(BlkbackCmd::Driver(d)) => return run_driver(d),
        Some(BlkbackCmd::Endpoint(e)) => return run_endpoint(e),
        Some(BlkbackCmd::Status(s)) => return run_status(&s),
        Some(BlkbackCmd::Standby(s)) => return run_standby(&s, g),
        None => {}
    }
    let (bind, configs) = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            let cfg: ConfigFile = toml::from_str(&text)
                .with_context(|| format!("invalid config {}", path.display()))?;
            let bind = match (cfg.listen, cfg.socket) {
                (Some(l), None) => Bind::Tcp(l),
                (None, Some(s)) => Bind::Unix(s),
                _ => bail!("{}: set exactly one of listen or socket", path.display()),
            };
            (
                bind,
                cfg.export
                    .into_iter()
                    .map(|e| (ExportConfig::from(e), false))
                    .collect::<Vec<_>>(),
            )
        }
        None => {
            let bind = match (a.listen, a.socket.clone()) {
                (Some(l), None) => Bind::Tcp(l),
                (None, Some(s)) => Bind::Unix(s),
                _ => bail!("give --listen ADDR or --socket PATH (or --config FILE)"),
            };
            let configs = a
                .export
                .iter()
                .filter(|s| !is_image_spec(s))
                .map(|s| {
                    // `remote-cache` is an item of its own; the rest is a plain export spec.
                    let cached = s.split(',').any(|p| p == "remote-cache");
                    let plain: Vec<&str> = s.split(',').filter(|p| *p != "remote-cache").collect();
                    Ok((parse_export_spec(&plain.join(","))?, cached))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            (bind, configs)
        }
    };
    let images = a
        .export
        .iter()
        .filter(|s| is_image_spec(s))
        .map(|s| parse_image_spec(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if configs.is_empty() && a.swap.is_empty() && images.is_empty() {
        bail!("no exports: give --export name=...,template=... or --swap name=...,size=...,spill=... at least once");
    }
    let swaps = a
        .swap
        .iter()
        .map(|s| parse_swap_spec(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let remote = !swaps.is_empty() || configs.iter().any(|(_, cached)| *cached);
    let mut node = None;
    let exports = if !images.is_empty() {
        if remote {
            bail!("image exports cannot be mixed with --swap or remote-cache exports yet");
        }
        let plain: Vec<ExportConfig> = configs.into_iter().map(|(c, _)| c).collect();
        let (exports, n) = open_with_images(&a, &plain, &images)?;
        node = n;
        exports
    } else if remote {
        if a.memservers.is_empty() {
            bail!("--swap and remote-cache exports need at least one --memserver ADDR");
        }
        let key = read_key(a.memserver_key_file.as_deref())?;
        let opened = crate::up::blkback::open_remote(configs, swaps, a.memservers.clone(), key)?;
        opened.exports
    } else {
        // One broken disk must not stop the others: serve what opens, report the rest.
        let plain: Vec<ExportConfig> = configs.into_iter().map(|(c, _)| c).collect();
        let (exports, failed) = Exports::open_available(&plain).context("cannot open exports")?;
        for e in failed {
            eprintln!("warning: not serving: {:#}", anyhow::Error::from(e));
        }
        exports
    };
    let blkif = start_blkif(&a.blkif, g, &exports)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served = rt.block_on(async move {
        let listener = match &bind {
            Bind::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                announce(format_args!("listening on {}", l.local_addr()?));
                Listener::Tcp(l)
            }
            Bind::Unix(path) => {
                let l = tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("cannot listen on {}", path.display()))?;
                announce(format_args!("listening on {}", path.display()));
                Listener::Unix(l)
            }
        };
        for e in exports.iter() {
            announce(format_args!(
                "export {:?}: {} ({} bytes)",
                e.name,
                e.description,
                e.disk.size()
            ));
        }
        // `announce` flushed each line; a flush here would stop the server with EPIPE when
        // its supervisor has closed the pipe after reading the address.
        let shutdown = sigint_or_sigterm();
        nbd::run(listener, exports.clone(), shutdown).await?;
        if let Bind::Unix(path) = &bind {
            let _ = std::fs::remove_file(path);
        }
        for e in exports.iter() {
            let s = e.stats.snapshot();
            eprintln!(
                "export {:?}: {} reads ({} bytes), {} writes ({} bytes), {} flushes, {} errors",
                e.name, s.reads, s.bytes_read, s.writes, s.bytes_written, s.flushes, s.errors
            );
        }
        Ok::<(), anyhow::Error>(())
    });
    if let Some(n) = node {
        for line in n.finish().context("saving the boot profiles")? {
            eprintln!("{line}");
        }
        eprintln!("image node: {}", n.summary());
    }
    if let Some(server) = blkif {
        server.shutdown().context("blkif backend")?;
    }
    served
}

/// Open plain and image exports together (the node started if an image export reads through
/// it). Plain exports that fail to open are reported and left out; an image export that
/// fails stops the start.
fn open_with_images(
    a: &BlkbackArgs,
    plain: &[ExportConfig],
    images: &[ImageExportSpec],
) -> anyhow::Result<(Exports, Option<ImageNode>)> {
    let needs_node = images
        .iter()
        .any(|s| matches!(s.source, ImageSource::Node { .. }));
    let node = match (&a.image_cache, needs_node) {
        (Some(dir), true) => {
            let n = ImageNode::start(&NodeOptions {
                cache_dir: dir.clone(),
                cache_bytes: a.image_cache_bytes,
                listen: a.image_listen,
                origin: a.image_origin,
                peers: a.image_peers.clone(),
                timeout: std::time::Duration::from_millis(a.image_timeout_ms),
            })
            .with_context(|| format!("cannot start the image node on {}", dir.display()))?;
            Some(n)
        }
        (None, true) => bail!("image exports with chunk-list= need --image-cache DIR"),
        (_, false) => None,
    };
    let mut disks = Vec::new();
    let mut blocks = Vec::new();
    for c in plain {
        match Exports::open(std::slice::from_ref(c)) {
            Ok(one) => {
                let e = one.get(&c.name).context("export just opened")?;
                disks.push((c.name.clone(), e.description.clone(), e.disk.clone()));
                blocks.push((c.name.clone(), c.min_block));
            }
            Err(e) => eprintln!("warning: not serving: {:#}", anyhow::Error::from(e)),
        }
    }
    for s in images {
        let o = image_export::open(s, node.as_ref())?;
        disks.push((s.name.clone(), o.description, o.disk));
        blocks.push((s.name.clone(), s.min_block));
    }
    let mut exports = Exports::from_disks(disks)?;
    for (name, b) in blocks {
        exports = exports.with_min_block(&name, b)?;
    }
    Ok((exports, node))
}

fn channel_key(path: Option<&Path>) -> anyhow::Result<Option<failover::wire::ChannelKey>> {
    let Some(p) = path else { return Ok(None) };
    let bytes = std::fs::read(p).with_context(|| format!("reading key file {}", p.display()))?;
    if bytes.len() < 16 {
        bail!("key file {} holds fewer than 16 bytes", p.display());
    }
    Ok(Some(failover::wire::ChannelKey::from_secret(&bytes)))
}

fn channel_addr(s: &str) -> anyhow::Result<failover::Addr> {
    failover::Addr::parse(s).map_err(anyhow::Error::msg)
}

/// Resolves at the first SIGINT or SIGTERM: the NBD servers' shutdown signal.
async fn sigint_or_sigterm() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `remoca blkback driver`.
fn run_driver(a: DriverArgs) -> anyhow::Result<()> {
    let configs = a
        .export
        .iter()
        .map(|s| parse_export_spec(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let key = channel_key(a.key_file.as_deref())?;
    if let Some(cpu) = a.reader_cpu {
        failover::affinity::check_cpu(cpu).context("--reader-cpu")?;
    }
    if a.exit_with_stdin {
        std::thread::Builder::new()
            .name("stdin-watch".into())
            .spawn(|| {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
                eprintln!(
                    "remoca blkback driver: standard input closed (supervisor gone), exiting"
                );
                std::process::exit(0);
            })?;
    }
    // Open every export once now, so a bad spec fails at start rather than at takeover.
    let opened = Exports::open(&configs).context("cannot open exports")?;
    let listener = failover::driver::DriverListener::bind(&channel_addr(&a.listen)?)
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    announce(format_args!(
        "driver listening on {}",
        listener.local_addr()?
    ));
    for e in opened.iter() {
        announce(format_args!(
            "export {:?}: {} ({} bytes)",
            e.name,
            e.description,
            e.disk.size()
        ));
    }
    drop(opened);
    failover::driver::run(
        listener,
        failover::driver::DriverConfig {
            fencer: (!a.no_fence).then(|| failover::driver::fencer_for(configs.clone())),
            opener: failover::driver::opener_for(configs),
            heartbeat_interval: std::time::Duration::from_millis(a.heartbeat_ms.max(1)),
            key,
            workers: a.workers,
            reader_cpu: a.reader_cpu,
        },
    )
    .context("driver stopped")
}

/// `remoca blkback endpoint`.
fn run_endpoint(a: EndpointArgs) -> anyhow::Result<()> {
    use std::time::Duration;
    let mut drivers = vec![channel_addr(&a.driver)?];
    for b in &a.backup {
        drivers.push(channel_addr(b)?);
    }
    let mut cfg = failover::endpoint::EndpointConfig::new(&a.export, drivers);
    cfg.key = channel_key(a.key_file.as_deref())?;
    cfg.monitor.heartbeat_timeout = Duration::from_millis(a.heartbeat_timeout_ms);
    cfg.monitor.floor = Duration::from_millis(a.bound_floor_ms);
    cfg.monitor.ceiling = Duration::from_millis(a.bound_ceiling_ms);
    cfg.monitor.k = a.bound_k;
    cfg.kill_local = !a.no_kill_local;
    cfg.unflushed_limit = a.unflushed_limit;
    cfg.reader_cpu = a.reader_cpu;
    let nbd_addr = channel_addr(&a.nbd)?;
    let endpoint = failover::endpoint::Endpoint::start(cfg).context("starting the endpoint")?;
    let exports = Exports::from_disks(vec![(
        a.export.clone(),
        format!("failover endpoint ({} drivers)", 1 + a.backup.len()),
        Arc::new(endpoint.clone()) as Arc<dyn Disk>,
    )])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let status_file = failover::status::path_for(&status_dir(a.status_dir.as_deref()), &a.export);
    let publisher =
        failover::status::Publisher::start(endpoint.clone(), a.export.clone(), status_file.clone())
            .with_context(|| format!("cannot write the status file {}", status_file.display()))?;
    let served = rt.block_on(async {
        let listener = match &nbd_addr {
            failover::Addr::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr.as_str())
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                announce(format_args!("listening on {}", l.local_addr()?));
                Listener::Tcp(l)
            }
            failover::Addr::Unix(path) => {
                let l = tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("cannot listen on {}", path.display()))?;
                announce(format_args!("listening on {}", path.display()));
                Listener::Unix(l)
            }
        };
        let st = endpoint.status();
        announce(format_args!(
            "export {:?}: {} bytes, active driver {}",
            a.export,
            endpoint.size(),
            st.active.as_deref().unwrap_or("-")
        ));
        let shutdown = sigint_or_sigterm();
        nbd::run(listener, exports, shutdown).await?;
        if let failover::Addr::Unix(path) = &nbd_addr {
            let _ = std::fs::remove_file(path);
        }
        Ok::<(), anyhow::Error>(())
    });
    let st = endpoint.status();
    eprintln!(
        "endpoint: active {}, generation {}, {} failovers{}",
        st.active.as_deref().unwrap_or("-"),
        st.generation,
        st.failovers,
        st.last_failover
            .map(|f| format!(
                ", last {} -> {} ({}; {} re-applied, {} re-sent, {} ms)",
                f.from,
                f.to,
                f.reason,
                f.reapplied,
                f.resent,
                f.took.as_millis()
            ))
            .unwrap_or_default()
    );
    publisher.stop();
    endpoint.close();
    served
}

/// `remoca blkback standby`.
fn run_standby(a: &StandbyArgs, g: &Global) -> anyhow::Result<()> {
    use remoca_blkback::blkif::standby::{self, StandbyConfig, StandbyEvent, XlCycle};
    let host = g.host()?;
    let find = |what: &str, d: &str| {
        host.find_domain(d)
            .with_context(|| format!("{what} driver domain {d:?}"))
    };
    let primary = find("primary", &a.primary)?;
    let standby = find("standby", &a.standby)?;
    if primary.domid == standby.domid {
        bail!(
            "the primary and the standby are the same domain ({})",
            primary.domid
        );
    }
    let cfg = StandbyConfig {
        primary: primary.domid,
        standby: standby.domid,
        kind: a.kind.clone(),
        poll: std::time::Duration::from_secs(1),
    };
    let mut cycle = XlCycle {
        save_dir: a.save_dir.clone(),
        xl: a.xl.clone(),
    };
    let (pname, sname) = (&primary.name, &standby.name);
    let mut failed = 0;
    let moved = standby::run(&host, &cfg, &mut cycle, &mut |e| match e {
        StandbyEvent::Watching(n) => announce(format_args!(
            "watching {pname} (domid {}): {n} disk(s); standby {sname} (domid {})",
            cfg.primary, cfg.standby
        )),
        StandbyEvent::PrimaryDied { disks } => announce(format_args!(
            "{pname} died; moving {disks} disk(s) to {sname}"
        )),
        StandbyEvent::Moved(m) => announce(format_args!(
            "moved {} disk(s) of {} (domid {} -> {}) to {sname}: save {:.1} s, restore {:.1} s, \
                 running again {:.1} s after the death was seen",
            m.disks.len(),
            m.name,
            m.old,
            m.new,
            m.save.as_secs_f64(),
            m.restore.as_secs_f64(),
            m.total.as_secs_f64()
        )),
        StandbyEvent::Failed { guest, error } => {
            failed += 1;
            eprintln!(
                "error: guest {guest} was not moved: {}",
                remoca_blkback::export::error_chain(error)
            );
        }
    })
    .context("standby")?;
    if failed > 0 {
        bail!(
            "{failed} guest(s) could not be moved ({} moved)",
            moved.len()
        );
    }
    Ok(())
}

/// `remoca blkback status`.
fn run_status(a: &StatusArgs) -> anyhow::Result<()> {
    use failover::status;
    let dir = status_dir(a.status_dir.as_deref());
    let entries =
        status::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
    if entries.is_empty() {
        outln!(
            "no failover endpoint is running (no status file in {})",
            dir.display()
        )?;
        return Ok(());
    }
    outln!("{}", status::COLUMNS.join("\t"))?;
    for (path, fields) in entries {
        match fields {
            Ok(f) => {
                let mut row: Vec<&str> = status::COLUMNS
                    .iter()
                    .map(|c| f.get(*c).map_or("-", String::as_str))
                    .collect();
                if !status::writer_alive(&f) {
                    row.push("(stale: its endpoint is not running)");
                }
                outln!("{}", row.join("\t"))?;
            }
            Err(e) => eprintln!("warning: {}: {e}", path.display()),
        }
    }
    Ok(())
}

/// The blkif backend beside NBD, when `--blkif` and the host call for it.
fn start_blkif(mode: &str, g: &Global, exports: &Exports) -> anyhow::Result<Option<BlkifServer>> {
    if mode == "off" {
        return Ok(None);
    }
    let host = g.host()?;
    if mode == "auto" && host.kind() != remoca_xen::BackendKind::Real {
        return Ok(None);
    }
    let server = BlkifServer::spawn(
        host,
        BlkifConfig {
            exports: Some(exports.clone()),
            ..BlkifConfig::default()
        },
    )
    .context("starting the blkif backend")?;
    announce(format_args!(
        "serving Xen vbd3 disks (backend/vbd3 in xenstore)"
    ));
    Ok(Some(server))
}

pub(super) fn open_template(path: &Path) -> anyhow::Result<Arc<dyn Disk>> {
    let t = RawFile::open_read_only(path).context("cannot open template")?;
    Ok(Arc::new(t))
}

pub fn bench(a: BenchArgs, g: &Global) -> anyhow::Result<()> {
    super::init_tracing(g.verbose);
    let cfg = remoca_blkback::bench::BenchConfig {
        size: a.size,
        count: a.count,
        dir: a.dir,
        reps: a.reps,
    };
    let report = remoca_blkback::bench::run(&cfg)?;
    out!("{report}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_spec_parsing() {
        let e = parse_export_spec("name=vm1,template=/t.raw,overlay=/o.ovl,readonly").unwrap();
        assert_eq!(e.name, "vm1");
        assert_eq!(e.overlay, Some(PathBuf::from("/o.ovl")));
        assert!(e.read_only);
        assert!(parse_export_spec("template=/t").is_err());
        assert!(parse_export_spec("name=a,template=/t,bogus=1").is_err());
        assert_eq!(parse_size("64K").unwrap(), 65536);
        let i = parse_image_spec("name=vm1,image=os@2,chunk-list=/l,overlay=/o,block-size=512")
            .unwrap();
        assert!(is_image_spec("name=vm1,image=os@2,chunk-list=/l"));
        assert!(!is_image_spec("name=vm1,template=/t"));
        assert_eq!(i.image, "os@2");
        assert_eq!(
            i.source,
            ImageSource::Node {
                chunk_list: "/l".into()
            }
        );
        assert_eq!((i.overlay, i.min_block), (Some(PathBuf::from("/o")), 512));
        let i = parse_image_spec("name=a,image=os,store=/s,readonly").unwrap();
        assert!(i.read_only && i.source == ImageSource::Store { dir: "/s".into() });
        for bad in [
            "name=a,image=os",
            "name=a,image=os,store=/s,chunk-list=/l",
            "image=os,store=/s",
            "name=a,image=os,store=/s,template=/t",
        ] {
            assert!(parse_image_spec(bad).is_err(), "{bad}");
        }
        assert!(parse_size("x").is_err());
    }
}
