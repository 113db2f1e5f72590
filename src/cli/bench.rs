//! `remoca bench ...`: each benchmark measures remoca and its baseline in the same run.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use remoca_paging::bench::{self as paging_bench, PagingBenchConfig};

use super::Global;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Memory server against memcached over loopback, with the raw TCP ceiling.
    Memserver(super::memserver::BenchArgs),
    /// Save/restore modes against zstd, lz4 and snappy on the corpus.
    Save(super::saverestore::BenchArgs),
    /// The block backend against qemu-nbd with the same clients.
    Blkback(super::blkback::BenchArgs),
    /// Remote page-in, swap and read cache against a local page file (O_DIRECT and
    /// buffered), and SHARDS against exact LRU.
    Paging(PagingBenchArgs),
    /// Failover: detection time and client-visible pause over many driver kills and hangs,
    /// and the endpoint + driver split's throughput against the plain backend.
    Failover(FailoverBenchArgs),
    /// Image deployment: N nodes behind a shaped origin link, with and without the peer cache.
    Images(super::image_node::BenchArgs),
}

#[derive(Debug, Args)]
pub struct FailoverBenchArgs {
    /// Scratch directory for the template and overlays.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Disk size in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Seconds per throughput row.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Throughput rounds (fresh stacks each; plain and split take turns of 100 ms within each row); rows show medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// SIGKILLs of the active driver.
    #[arg(long, default_value_t = 100)]
    kills: usize,
    /// SIGSTOP hangs of the active driver.
    #[arg(long, default_value_t = 20)]
    hangs: usize,
    /// The CPU of a third stack's two channel readers (endpoint + driver, as
    /// `--reader-cpu` pins them), or `off` to leave that stack out. Default: the lowest
    /// CPU the bench may run on.
    #[arg(long, value_name = "CPU|off")]
    reader_cpu: Option<String>,
}

fn failover(a: FailoverBenchArgs) -> anyhow::Result<()> {
    if a.size_mib == 0 || !(a.seconds > 0.0 && a.seconds.is_finite()) || a.rounds == 0 {
        anyhow::bail!("--size-mib, --seconds and --rounds must be positive (and --seconds finite)");
    }
    use remoca_blkback::failover::affinity;
    let reader_cpu = match a.reader_cpu.as_deref() {
        None => Some(affinity::first_allowed_cpu()?),
        Some("off") => None,
        Some(c) => {
            let cpu: usize = c
                .parse()
                .map_err(|_| anyhow::anyhow!("--reader-cpu {c:?}: a CPU number or `off`"))?;
            affinity::check_cpu(cpu)?;
            Some(cpu)
        }
    };
    let cfg = remoca_blkback::failover::bench::BenchConfig {
        exe: std::env::current_exe()?,
        dir: a.dir,
        size: a.size_mib << 20,
        seconds: a.seconds,
        rounds: a.rounds,
        kills: a.kills,
        hangs: a.hangs,
        reader_cpu,
    };
    remoca_blkback::failover::bench::run(&cfg, &mut std::io::stdout())
        .map_err(|e| anyhow::anyhow!("bench failover: {e}"))
}

#[derive(Debug, Args)]
pub struct PagingBenchArgs {
    /// Directory for the local page/swap files: a real disk (tmpfs refuses O_DIRECT).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Pages stored remotely and in the page file.
    #[arg(long, default_value_t = 16_384)]
    pages: u64,
    /// Timed page-ins per system.
    #[arg(long, default_value_t = 5_000)]
    samples: usize,
    /// Untimed page-ins first.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// 4 KiB blocks per swap pass.
    #[arg(long, default_value_t = 16_384)]
    swap_blocks: u64,
    /// Working set of the cache's re-read trace, in blocks.
    #[arg(long, default_value_t = 4_096)]
    cache_blocks: u64,
    /// Passes over the working set.
    #[arg(long, default_value_t = 4)]
    cache_passes: usize,
    /// References in the MRC trace.
    #[arg(long, default_value_t = 1_000_000)]
    mrc_refs: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn paging(a: PagingBenchArgs) -> anyhow::Result<()> {
    let cfg = PagingBenchConfig {
        pages: a.pages,
        samples: a.samples,
        warmup: a.warmup,
        swap_blocks: a.swap_blocks,
        cache_blocks: a.cache_blocks,
        cache_passes: a.cache_passes,
        mrc_refs: a.mrc_refs,
        seed: a.seed,
        ..PagingBenchConfig::standard(a.dir)
    };
    let report = paging_bench::run(&cfg)?;
    out!("{}", report.text)?;
    Ok(())
}

pub fn run(args: BenchArgs, g: &Global) -> anyhow::Result<()> {
    match args.which {
        Which::Memserver(a) => super::memserver::bench(a, g),
        Which::Save(a) => super::saverestore::bench(a, g),
        Which::Blkback(a) => super::blkback::bench(a, g),
        Which::Paging(a) => paging(a),
        Which::Failover(a) => failover(a),
        Which::Images(a) => super::image_node::bench(a, g),
    }
}
