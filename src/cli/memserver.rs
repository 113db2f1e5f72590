//! `remoca memserver`: the memory-server daemon and its stats client; `remoca bench memserver`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use remoca_memserver::bench::{self, BenchConfig};
use remoca_memserver::byte_size::{format_size, parse_size};
use remoca_memserver::protocol::auth::AuthKey;
use remoca_memserver::server::{self, ServerConfig};
use remoca_memserver::store::StoreConfig;

use super::Global;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MemserverArgs {
    #[command(subcommand)]
    command: Option<MemserverCommand>,
    /// Address to listen on, e.g. 0.0.0.0:7100 (port 0 picks a free port; the bound address
    /// is printed on stdout).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Most memory to lend, e.g. 8G.
    #[arg(long, value_parser = parse_size)]
    capacity: Option<u64>,
    /// Always leave at least this much host memory available (MemAvailable), e.g. 1G.
    #[arg(long, value_parser = parse_size, default_value = "512M")]
    headroom: u64,
    /// Pre-shared key file (at least 16 bytes); clients must prove they hold it.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Most simultaneous client connections.
    #[arg(long, default_value_t = server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
}

#[derive(Debug, Subcommand)]
enum MemserverCommand {
    /// Print a running server's counters per pool and namespace.
    Stats {
        /// The server's address.
        addr: SocketAddr,
        /// Pre-shared key file, if the server requires one.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Server threads for both the memserver and memcached.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Memory for both servers.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    memory: u64,
    /// Seconds per measured cell and system (split over the rounds).
    #[arg(long, default_value_t = 1.5)]
    seconds: f64,
    /// Distinct 4 KiB keys preloaded and used.
    #[arg(long, default_value_t = 16384)]
    keys: u64,
    /// Pages per batched request.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Client connections the outstanding requests are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Alternating rounds per cell (median reported), to damp noise from other load.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// memcached binary.
    #[arg(long, default_value = "memcached")]
    memcached: PathBuf,
}

fn read_key(path: &Option<PathBuf>) -> anyhow::Result<Option<AuthKey>> {
    let Some(p) = path else { return Ok(None) };
    let bytes = std::fs::read(p).with_context(|| format!("reading key file {}", p.display()))?;
    Ok(Some(
        AuthKey::from_secret(&bytes).with_context(|| format!("key file {}", p.display()))?,
    ))
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = threads {
        b.worker_threads(t.max(1));
    }
    b.enable_all().build().context("starting the tokio runtime")
}

async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub fn run(args: MemserverArgs, _g: &Global) -> anyhow::Result<()> {
    if let Some(MemserverCommand::Stats { addr, key_file }) = &args.command {
        let key = read_key(key_file)?;
        let rt = runtime(Some(1))?;
        let st = rt
            .block_on(remoca_memserver::client::fetch_stats(
                *addr,
                key.as_ref(),
                Duration::from_secs(5),
            ))
            .with_context(|| format!("asking {addr} for stats"))?;
        out!(
            "{}",
            remoca_memserver::stats_table::render(&addr.to_string(), &st)
        )?;
        return Ok(());
    }
    let listen = args.listen.context("--listen ADDR is required")?;
    let capacity = args.capacity.context("--capacity SIZE is required")?;
    let mut config = ServerConfig::new(StoreConfig {
        capacity,
        headroom: args.headroom,
    });
    config.auth_key = read_key(&args.key_file)?;
    config.max_connections = args.max_connections;
    let rt = runtime(args.threads)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let bound = listener.local_addr()?;
        super::announce(format_args!("memserver listening on {bound}"));
        tracing::info!(%bound, capacity = %format_size(capacity), headroom = %format_size(args.headroom), "memory server started");
        server::run(listener, config, terminated()).await?;
        tracing::info!("memory server stopped");
        Ok(())
    })
}

pub fn bench(args: BenchArgs, _g: &Global) -> anyhow::Result<()> {
    let cfg = BenchConfig {
        threads: args.threads,
        memory: args.memory,
        seconds: args.seconds,
        keys: args.keys,
        batch: args.batch,
        connections: args.connections,
        memcached: args.memcached,
        rounds: args.rounds,
    };
    let report = bench::run(&cfg).context("memserver benchmark")?;
    out!("{report}")?;
    Ok(())
}
