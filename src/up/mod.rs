//! `remoca up`: the long-running Dom0 service set.
//!
//! One process opens the Xen host (real, or the simulated host with a demo domain), starts
//! every enabled service on one tokio runtime, publishes where each listens under
//! `/tool/remoca/up/` in xenstore, prints a status line every few seconds, and on SIGINT or
//! SIGTERM stops the services (each finishes its in-flight requests) and removes what it
//! published. Each later service plugs in here as one `start_*` function and one status
//! column.
//!
//! ```text
//!   remoca up ── Host (real | sim + xenstore socket)
//!        ├── memserver   (tokio task: remoca_memserver::server::serve)
//!        ├── blkback NBD (tokio task: remoca_blkback::nbd::run)
//!        ├── blkif       (threads: remoca_blkback::blkif::BlkifServer, same exports)
//!        ├── failover    (exports with `failover = true`: an endpoint each, served above,
//!        │                two `remoca blkback driver` children, a supervisor thread)
//!        ├── pagers      (a thread per domain: remoca_paging::service::run_pager; on the
//!        │                simulated host a demo HVM guest with a checking workload that
//!        │                also swaps to demo-swap and reads the demo disk)
//!        ├── wss         (a thread: remoca_paging::mrc::published::Publisher, estimates
//!        │                fed by the swap devices and read caches, in xenstore every
//!        │                wss.interval seconds)
//!        └── status      (every host.status_interval seconds)
//! ```

pub(crate) mod blkback;
pub mod config;
mod demo_guest;
mod failover;
mod pager;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use remoca_memserver::byte_size::format_size;
use remoca_memserver::protocol::auth::AuthKey;
use remoca_memserver::server::ServerConfig;
use remoca_memserver::store::{Store, StoreConfig};
use remoca_paging::mrc::live::{LiveConfig, WorkingSets};
use remoca_paging::mrc::published::Publisher;
use remoca_xen::sim::{SimHost, StoreServer};
use remoca_xen::xenstore::Tx;
use remoca_xen::{BackendChoice, Host};
use tokio::sync::watch;

pub use config::Config;

/// Where `up` publishes its services in xenstore.
pub const XENSTORE_DIR: &str = "/tool/remoca/up";

/// What the command line adds to the config file.
#[derive(Debug)]
pub struct Options {
    pub config: Config,
    /// `--backend`, when given, wins over `host.backend`.
    pub backend: Option<BackendChoice>,
    /// Stop by itself after this long (demos and tests); otherwise run until a signal.
    pub duration: Option<Duration>,
}

/// Run the service set until SIGINT/SIGTERM or `duration`.
///
/// # Errors
/// Anything that stops a service from starting: Xen absent with `backend = "real"`, another
/// `up` already serving the simulated host, a port in use, a missing template.
pub fn run(opts: Options) -> anyhow::Result<()> {
    let cfg = &opts.config;
    let state_dir = state_dir(&cfg.host.state_dir)?;
    let choice = match opts.backend {
        Some(c) => c,
        None => cfg.host.backend.parse()?,
    };
    let (host, _store_server) = open_host(choice, cfg, &state_dir)?;
    crate::cli::announce(format_args!("remoca up: {} Xen host", describe(&host)));
    let own = blkback::backend_domid(&host, &cfg.blkback.backend_domain)?;
    match host.domains() {
        Ok(list) => {
            for d in list {
                crate::cli::announce(format_args!(
                    "  domain {:>4} {:<24} {:>6} MiB",
                    d.domid,
                    d.name,
                    d.tot_pages * 4 / 1024
                ));
            }
        }
        // A driver domain may not ask the hypervisor about other domains.
        Err(e) if own != 0 => {
            crate::cli::announce(format_args!("  (domain {own}: no domain list: {e})"));
        }
        Err(e) => return Err(e.into()),
    }
    let dir = xenstore_dir(own);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(serve(&host, cfg, &state_dir, (own, &dir), opts.duration));
    // Whatever happened, take down what we published.
    let _ = host.store.rm(Tx::NONE, &dir);
    result
}

fn describe(host: &Host) -> String {
    match host.fallback_reason() {
        Some(why) => format!("simulated ({why})"),
        None => host.kind().to_string(),
    }
}

fn state_dir(configured: &Path) -> anyhow::Result<PathBuf> {
    let dir = if configured.as_os_str().is_empty() {
        remoca_xen::sim::attached::runtime_dir()
    } else {
        configured.to_path_buf()
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create state directory {}", dir.display()))?;
    Ok(dir)
}

/// The host, and on the simulated host the server of its xenstore (dropped last).
fn open_host(
    choice: BackendChoice,
    cfg: &Config,
    state_dir: &Path,
) -> anyhow::Result<(Host, Option<StoreServer>)> {
    let fallback = match choice {
        BackendChoice::Real => return Ok((remoca_xen::open(BackendChoice::Real)?, None)),
        BackendChoice::Sim => None,
        BackendChoice::Auto => match remoca_xen::open(BackendChoice::Real) {
            Ok(host) => return Ok((host, None)),
            Err(remoca_xen::Error::Absent { reason }) => Some(reason),
            Err(e) => return Err(e).context("Xen is present but cannot be opened"),
        },
    };
    let sim = SimHost::demo()?;
    if cfg.pager.enabled {
        let pages = cfg.pager.demo_size / remoca_xen::PAGE_SIZE as u64;
        sim.create_domain(remoca_xen::sim::DomainSpec::hvm(pager::DEMO_DOMAIN, pages))?;
    }
    let socket = if cfg.host.sim_xenstore_socket.as_os_str().is_empty() {
        if std::env::var_os("REMOCA_SIM_XENSTORE").is_some() {
            remoca_xen::sim::attached::default_socket()
        } else {
            state_dir.join("sim-xenstored.socket")
        }
    } else {
        cfg.host.sim_xenstore_socket.clone()
    };
    let server = StoreServer::start(sim.xenstore().clone(), &socket).with_context(|| {
        format!(
            "cannot serve the simulated xenstore at {} (is another `remoca up` running?)",
            socket.display()
        )
    })?;
    crate::cli::announce(format_args!(
        "simulated xenstore at {} (remoca xen store ... reaches it)",
        socket.display()
    ));
    let mut host = Host::from_sim(sim);
    if let Some(reason) = fallback {
        host = host.with_fallback_reason(reason);
    }
    Ok((host, Some(server)))
}

/// A running service's status column.
pub(crate) type StatusFn = Box<dyn Fn() -> String + Send>;

async fn serve(
    host: &Host,
    cfg: &Config,
    state_dir: &Path,
    (own, dir): (remoca_xen::DomId, &str),
    duration: Option<Duration>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut columns: Vec<StatusFn> = Vec::new();
    host.store.mkdir(Tx::NONE, dir)?;
    host.store.write(
        Tx::NONE,
        &format!("{dir}/pid"),
        std::process::id().to_string().as_bytes(),
    )?;

    let mut memserver = None;
    if cfg.memserver.enabled {
        let (addr, status) = start_memserver(cfg, &mut tasks, stop_rx.clone()).await?;
        publish(host, dir, "memserver", &addr.to_string())?;
        crate::cli::announce(format_args!("memserver listening on {addr}"));
        columns.push(status);
        memserver = Some(addr);
    }
    let sets = cfg.wss.enabled.then(|| {
        Arc::new(WorkingSets::new(LiveConfig {
            rate: cfg.wss.rate,
            max_samples: cfg.wss.max_samples,
            tolerance: cfg.wss.tolerance,
            ..LiveConfig::default()
        }))
    });
    let mut blkif = None;
    let mut failover = failover::FailoverDisks::default();
    let mut demo_disks = demo_guest::GuestDisks::default();
    if cfg.blkback.enabled {
        let observe = sets.as_ref().map(|s| (host, s));
        let (addr, status, exports, f) = blkback::start(
            cfg,
            state_dir,
            memserver,
            observe,
            &mut tasks,
            stop_rx.clone(),
        )
        .await?;
        failover = f;
        demo_disks = demo_guest::GuestDisks {
            swap: exports.get("demo-swap").map(|e| e.disk.clone()),
            disk: exports.get("demo").map(|e| e.disk.clone()),
        };
        publish(host, dir, "blkback/nbd", &addr.to_string())?;
        crate::cli::announce(format_args!("blkback NBD listening on {addr}"));
        columns.extend(status);
        if cfg.blkback.blkif {
            let (server, root, status) = blkback::start_blkif(host, exports, own)?;
            crate::cli::announce(format_args!("blkback serving Xen vbd3 disks ({root})"));
            blkif = Some(server);
            columns.push(status);
        }
    }
    let mut pagers = if cfg.pager.enabled {
        let (pagers, status) = pager::start(host, cfg, state_dir, memserver, demo_disks)?;
        columns.extend(status);
        pagers
    } else {
        pager::Pagers::default()
    };
    let mut publisher = match sets {
        Some(sets) => {
            let interval = Duration::from_secs_f64(cfg.wss.interval);
            let p = Publisher::spawn(host.clone(), sets, interval)
                .context("starting the working-set publisher")?;
            columns.push(wss_column(&p));
            Some(p)
        }
        None => None,
    };
    crate::cli::announce(format_args!("running; Ctrl-C stops"));

    let started = Instant::now();
    let interval = Duration::from_secs_f64(cfg.host.status_interval);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let until = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until);
    let reason = loop {
        tokio::select! {
            _ = ticker.tick() => status_line(host, started, &columns),
            _ = tokio::signal::ctrl_c() => break "interrupt",
            _ = term.recv() => break "SIGTERM",
            () = &mut until => break "--duration elapsed",
            Some(res) = tasks.join_next() => {
                // A service ending by itself is a failure: stop the others and say why.
                tokio::task::block_in_place(|| pagers.stop());
                if let Some(p) = publisher.take() {
                    tokio::task::block_in_place(|| p.stop());
                }
                let _ = stop_tx.send(true);
                while tasks.join_next().await.is_some() {}
                match res {
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(())) => bail!("a service stopped unexpectedly"),
                    Err(e) => bail!("a service panicked: {e}"),
                }
            }
        }
    };
    crate::cli::announce(format_args!("stopping ({reason})"));
    // Pagers first: they page everything back from the memory server before it stops.
    tokio::task::block_in_place(|| pagers.stop());
    // Removes the estimates it published.
    if let Some(p) = publisher.take() {
        tokio::task::block_in_place(|| p.stop());
    }
    let _ = stop_tx.send(true);
    if let Some(server) = blkif {
        // Answers in-flight ring requests, releases rings and event channels; blocking.
        tokio::task::block_in_place(|| server.shutdown()).context("blkif backend")?;
    }
    while let Some(res) = tasks.join_next().await {
        res.context("service task")??;
    }
    status_line(host, started, &columns);
    // After the NBD server flushed them: endpoints, status files, driver processes.
    tokio::task::block_in_place(|| failover.stop());
    crate::cli::announce(format_args!("stopped"));
    Ok(())
}

/// `wss d2 6.0 MiB, target 6.0 MiB, remote 2.0 MiB` per estimated guest.
fn wss_column(p: &Publisher) -> StatusFn {
    let latest = p.latest_handle();
    Box::new(move || {
        let l = latest.lock();
        if l.is_empty() {
            return "wss -".into();
        }
        let kib = |k: u64| format_size(k * 1024);
        l.iter()
            .map(|(dom, e)| {
                format!(
                    "wss d{dom} {}, target {}, remote {}",
                    kib(e.wss_kib),
                    kib(e.balloon_target_kib),
                    kib(e.remote_share_kib)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// Where this `up` publishes itself: [`XENSTORE_DIR`] in dom0; a driver domain may only
/// write under its own home, so there its `data/remoca/up`.
fn xenstore_dir(own: remoca_xen::DomId) -> String {
    if own == 0 {
        XENSTORE_DIR.to_owned()
    } else {
        format!("/local/domain/{own}/data/remoca/up")
    }
}

fn publish(host: &Host, dir: &str, key: &str, value: &str) -> anyhow::Result<()> {
    host.store
        .write(Tx::NONE, &format!("{dir}/{key}"), value.as_bytes())
        .with_context(|| format!("publishing {key} in xenstore"))
}

fn status_line(host: &Host, started: Instant, columns: &[StatusFn]) {
    let doms = host
        .domains()
        .map(|d| d.len().to_string())
        .unwrap_or_else(|e| format!("? ({e})"));
    let mut line = format!("[{:>6.0}s] domains {doms}", started.elapsed().as_secs_f64());
    for c in columns {
        line.push_str(" | ");
        line.push_str(&c());
    }
    crate::cli::announce(format_args!("{line}"));
}

pub(crate) async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

pub(crate) type Tasks = tokio::task::JoinSet<anyhow::Result<()>>;

async fn start_memserver(
    cfg: &Config,
    tasks: &mut Tasks,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, StatusFn)> {
    let m = &cfg.memserver;
    let mut config = ServerConfig::new(StoreConfig {
        capacity: m.capacity,
        headroom: m.headroom,
    });
    if !m.key_file.as_os_str().is_empty() {
        let bytes = std::fs::read(&m.key_file)
            .with_context(|| format!("memserver.key_file {}", m.key_file.display()))?;
        config.auth_key = Some(
            AuthKey::from_secret(&bytes)
                .with_context(|| format!("memserver.key_file {}", m.key_file.display()))?,
        );
    }
    let listener = tokio::net::TcpListener::bind(m.listen)
        .await
        .with_context(|| format!("memserver cannot listen on {}", m.listen))?;
    let addr = listener.local_addr()?;
    let store = Arc::new(Store::with_proc_meminfo(config.store));
    let status_store = store.clone();
    tasks.spawn(async move {
        remoca_memserver::server::serve(listener, store, config, stopped(stop))
            .await
            .context("memserver")
    });
    let status: StatusFn = Box::new(move || {
        let s = status_store.stats();
        let puts: u64 = s.pools.iter().map(|p| p.puts).sum();
        let hits: u64 = s.pools.iter().map(|p| p.hits).sum();
        format!(
            "memserver {} of {} used, {} puts, {} hits, {} clients",
            format_size(s.used),
            format_size(s.limit),
            puts,
            hits,
            s.connections
        )
    });
    Ok((addr, status))
}
