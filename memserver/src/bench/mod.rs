//! `remoca bench memserver`: the memory server against memcached, same load generator, same
//! memory and threads, over loopback, with the raw loopback TCP bandwidth measured in the
//! same run as the ceiling.
//!
//! Cells: 4 KiB values; GET, SET and 90/10 mixes; 1, 16 and 64 outstanding requests spread
//! over up to `connections` connections; unbatched (one page per request) and batched
//! (`batch` pages per request: GET-BATCH / PUT-BATCH for the memserver, a multi-key `get` and
//! pipelined `set`s for memcached). ops/s and MB/s count pages; latency is per request.

mod full_client;
mod loadgen;
mod memcached;
mod tcp_ceiling;

use std::fmt::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::control::Hello;
use crate::protocol::{decode, Request};
use crate::server::{serve, ServerConfig};
use crate::store::{Store, StoreConfig};
use loadgen::{Load, MemserverWire};
use memcached::{Memcached, MemcachedText};

pub const VALUE_LEN: usize = 4096;

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("I/O")]
    Io(#[source] std::io::Error),
    #[error("memcached: {0}")]
    Memcached(String),
    #[error("protocol: {0}")]
    Protocol(String),
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub threads: usize,
    pub memory: u64,
    pub seconds: f64,
    pub keys: u64,
    pub batch: usize,
    pub connections: usize,
    pub memcached: PathBuf,
    /// Alternating rounds per cell; the median round of each system is reported.
    pub rounds: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    ops: f64,
    mbps: f64,
    p50_us: f64,
    p99_us: f64,
}

async fn memserver_conn(addr: std::net::SocketAddr) -> Result<TcpStream, BenchError> {
    let mut s = TcpStream::connect(addr).await.map_err(BenchError::Io)?;
    let mut out = BytesMut::new();
    Request::Hello(Hello {
        min_version: 1,
        max_version: 1,
        client_nonce: [0; 32],
        client_name: "bench".into(),
    })
    .encode(0, &mut out);
    s.write_all(&out).await.map_err(BenchError::Io)?;
    let mut buf = BytesMut::new();
    loop {
        if decode(&mut buf)
            .map_err(|e| BenchError::Protocol(e.to_string()))?
            .is_some()
        {
            return Ok(s);
        }
        if s.read_buf(&mut buf).await.map_err(BenchError::Io)? == 0 {
            return Err(BenchError::Protocol("memserver closed during HELLO".into()));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Memserver,
    Memcached,
}

async fn connect(sys: System, addr: std::net::SocketAddr) -> Result<TcpStream, BenchError> {
    match sys {
        System::Memserver => memserver_conn(addr).await,
        System::Memcached => TcpStream::connect(addr).await.map_err(BenchError::Io),
    }
}

type Driver = tokio::task::JoinHandle<Result<loadgen::Measured, BenchError>>;

fn spawn_driver(sys: System, s: TcpStream, load: Load, value: Arc<Vec<u8>>) -> Driver {
    match sys {
        System::Memserver => {
            tokio::spawn(
                async move { loadgen::drive(s, MemserverWire::default(), load, &value).await },
            )
        }
        System::Memcached => {
            tokio::spawn(
                async move { loadgen::drive(s, MemcachedText::default(), load, &value).await },
            )
        }
    }
}

fn median(mut cells: Vec<Cell>) -> Cell {
    cells.sort_by(|x, y| x.ops.total_cmp(&y.ops));
    cells[cells.len() / 2]
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    sys: System,
    addr: std::net::SocketAddr,
    cfg: &BenchConfig,
    seconds: f64,
    outstanding: usize,
    batch: usize,
    get_ratio: f64,
    value: &Arc<Vec<u8>>,
) -> Result<Cell, BenchError> {
    let conns = cfg.connections.clamp(1, outstanding);
    let mut tasks = Vec::new();
    let start = Instant::now();
    for c in 0..conns {
        let window = outstanding / conns + usize::from(c < outstanding % conns);
        let load = Load {
            window,
            batch,
            get_ratio,
            keys: cfg.keys,
            duration: Duration::from_secs_f64(seconds),
            seed: 7 + c as u64,
        };
        let s = connect(sys, addr).await?;
        tasks.push(spawn_driver(sys, s, load, Arc::clone(value)));
    }
    let mut pages = 0;
    let mut lat = Vec::new();
    for t in tasks {
        let m = t.await.map_err(|e| BenchError::Protocol(e.to_string()))??;
        pages += m.pages;
        lat.extend(m.latencies);
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    Ok(Cell {
        ops: pages as f64 / secs,
        mbps: pages as f64 * VALUE_LEN as f64 / secs / 1e6,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

/// Run the whole comparison and return the printed report.
///
/// # Errors
/// memcached missing or failing, or a protocol/I/O failure.
pub fn run(cfg: &BenchConfig) -> Result<String, BenchError> {
    // The memory server, in its own runtime with `threads` workers.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads.max(1))
        .thread_name("memserver")
        .enable_all()
        .build()
        .map_err(BenchError::Io)?;
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(BenchError::Io)?;
    std_listener.set_nonblocking(true).map_err(BenchError::Io)?;
    let ms_addr = std_listener.local_addr().map_err(BenchError::Io)?;
    let store_cfg = StoreConfig {
        capacity: cfg.memory,
        headroom: 0,
    };
    let store = Arc::new(Store::with_proc_meminfo(store_cfg));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    {
        let store = Arc::clone(&store);
        server_rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            let _ = serve(l, store, ServerConfig::new(store_cfg), stop_rx).await;
        });
    }
    let mc = Memcached::start(&cfg.memcached, cfg.memory, cfg.threads)?;

    let gen_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("loadgen")
        .enable_all()
        .build()
        .map_err(BenchError::Io)?;
    let value: Arc<Vec<u8>> = Arc::new((0..VALUE_LEN).map(|i| (i * 131 % 251) as u8).collect());
    let mut report = String::new();
    let _ = writeln!(
        report,
        "remoca bench memserver: {} B values, {} server threads each, {} MiB each, {} keys, batch {}, up to {} connections, {:.1} s per cell in {} alternating rounds (median shown)",
        VALUE_LEN, cfg.threads, cfg.memory >> 20, cfg.keys, cfg.batch, cfg.connections, cfg.seconds, cfg.rounds.max(1)
    );
    let _ = writeln!(
        report,
        "memcached pid {} on {}; memserver on {}",
        mc.pid(),
        mc.addr,
        ms_addr
    );
    let result = gen_rt.block_on(async {
        let mut ceiling = 0.0f64;
        for _ in 0..cfg.rounds.max(1) {
            let c = tcp_ceiling::measure(cfg.connections, Duration::from_secs_f64(cfg.seconds / cfg.rounds.max(1) as f64)).await?;
            ceiling = ceiling.max(c);
        }
        let _ = writeln!(report, "loopback TCP ceiling ({} streams, best round): {:.0} MB/s", cfg.connections, ceiling);
        let _ = writeln!(report);
        loadgen::preload(memserver_conn(ms_addr).await?, MemserverWire::default(), cfg.keys, &value).await?;
        loadgen::preload(TcpStream::connect(mc.addr).await.map_err(BenchError::Io)?, MemcachedText::default(), cfg.keys, &value).await?;
        let _ = writeln!(
            report,
            "{:<6} {:>5} {:>5} | {:>10} {:>8} {:>8} {:>8} | {:>10} {:>8} {:>8} {:>8} | {:>6} {:>6} {:>7}",
            "mix", "batch", "outst", "ms ops/s", "MB/s", "p50 us", "p99 us", "mc ops/s", "MB/s", "p50 us", "p99 us", "ops x", "p99 x", "%ceil"
        );
        let mut best_batched = 0.0f64;
        for (mix, ratio) in [("get", 1.0), ("set", 0.0), ("90/10", 0.9)] {
            for batch in [1, cfg.batch.max(2)] {
                for outstanding in [1usize, 16, 64] {
                    // Alternate short rounds and keep each system's median round, so a burst
                    // of unrelated load on the host hits both sides alike.
                    let rounds = cfg.rounds.max(1);
                    let per = cfg.seconds / rounds as f64;
                    let (mut ra, mut rb) = (Vec::new(), Vec::new());
                    for _ in 0..rounds {
                        ra.push(measure(System::Memserver, ms_addr, cfg, per, outstanding, batch, ratio, &value).await?);
                        rb.push(measure(System::Memcached, mc.addr, cfg, per, outstanding, batch, ratio, &value).await?);
                    }
                    let (a, b) = (median(ra), median(rb));
                    if batch > 1 {
                        best_batched = best_batched.max(a.mbps);
                    }
                    let _ = writeln!(
                        report,
                        "{:<6} {:>5} {:>5} | {:>10.0} {:>8.0} {:>8.1} {:>8.1} | {:>10.0} {:>8.0} {:>8.1} {:>8.1} | {:>6.2} {:>6.2} {:>6.0}%",
                        mix, batch, outstanding, a.ops, a.mbps, a.p50_us, a.p99_us, b.ops, b.mbps, b.p50_us, b.p99_us,
                        a.ops / b.ops.max(1e-9), a.p99_us / b.p99_us.max(1e-9), 100.0 * a.mbps / ceiling.max(1e-9)
                    );
                }
            }
        }
        let _ = writeln!(report);
        let _ = writeln!(report, "through the real client (AEAD sealing, location map, 4 pooled connections), pages/s:");
        for (what, get) in [("get", true), ("put", false)] {
            let mut line = format!("  {what:<4}");
            for (tasks, batch) in [(1usize, 1usize), (16, 1), (16, cfg.batch.max(2))] {
                let r = full_client::measure(ms_addr, cfg.keys, tasks, batch, get, Duration::from_secs_f64(cfg.seconds)).await?;
                let _ = write!(line, "   {tasks} callers x batch {batch}: {r:>8.0} ({:.0} MB/s)", r * VALUE_LEN as f64 / 1e6);
            }
            let _ = writeln!(report, "{line}");
        }
        let _ = writeln!(report);
        let _ = writeln!(
            report,
            "best batched memserver throughput: {:.0} MB/s = {:.0}% of the loopback ceiling",
            best_batched,
            100.0 * best_batched / ceiling.max(1e-9)
        );
        let _ = writeln!(report, "ops x = memserver ops/s / memcached ops/s (higher is better); p99 x = memserver p99 / memcached p99 (lower is better)");
        Ok::<(), BenchError>(())
    });
    let _ = stop_tx.send(());
    drop(mc);
    server_rt.shutdown_timeout(Duration::from_secs(2));
    result?;
    Ok(report)
}
