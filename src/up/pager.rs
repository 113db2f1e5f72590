//! The pagers `remoca up` runs: one thread per domain around
//! `remoca_paging::service::run_pager`, and on the simulated host a demo HVM guest whose
//! workload checks every page it reads while the pager holds it below its size.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use parking_lot::Mutex;
use remoca_memserver::protocol::auth::AuthKey;
use remoca_paging::service::{self, PagerRunConfig};
use remoca_xen::{DomId, Host};

use super::demo_guest::{GuestDisks, Workload};
use super::{Config, StatusFn};

/// The demo HVM guest's name on the simulated host.
pub const DEMO_DOMAIN: &str = "demo-hvm";

/// Running pagers (and the demo workload); [`Pagers::stop`] pages everything back.
#[derive(Debug, Default)]
pub struct Pagers {
    stop: Arc<AtomicBool>,
    threads: Vec<(DomId, JoinHandle<()>)>,
    workload: Option<Workload>,
}

impl Pagers {
    /// Stop the workload, then every pager (each pages its domain back in before it returns).
    pub fn stop(&mut self) {
        if let Some(w) = self.workload.take() {
            w.stop();
        }
        self.stop.store(true, Ordering::Relaxed);
        for (dom, t) in self.threads.drain(..) {
            if t.join().is_err() {
                eprintln!("pager for domain {dom} panicked");
            }
        }
    }
}

/// Start a pager for every configured domain (and the demo guest on the simulated host).
///
/// # Errors
/// An unknown domain, an unreadable key file, or a thread that cannot start.
pub fn start(
    host: &Host,
    cfg: &Config,
    state_dir: &Path,
    memserver: Option<SocketAddr>,
    demo_disks: GuestDisks,
) -> anyhow::Result<(Pagers, Vec<StatusFn>)> {
    let p = &cfg.pager;
    let mut pagers = Pagers::default();
    let mut columns = Vec::new();
    let mut targets: Vec<(DomId, Option<u64>)> = Vec::new();
    for d in &p.domains {
        let info = host
            .find_domain(d)
            .with_context(|| format!("pager.domains: {d:?}"))?;
        targets.push((info.domid, p.target.map(|b| b / 1024)));
    }
    if let Some(sim) = host.sim() {
        if let Ok(info) = host.find_domain(DEMO_DOMAIN) {
            targets.push((info.domid, Some(p.demo_target / 1024)));
            let w = Workload::start(sim.clone(), info.domid, info.tot_pages, demo_disks)
                .context("starting the demo guest")?;
            let stats = w.stats.clone();
            columns.push(Box::new(move || {
                format!(
                    "{DEMO_DOMAIN} {} accesses, {} wrong, {} failed, {} swap-ins, {} disk reads",
                    stats.accesses.load(Ordering::Relaxed),
                    stats.wrong.load(Ordering::Relaxed),
                    stats.errors.load(Ordering::Relaxed),
                    stats.swap_ins.load(Ordering::Relaxed),
                    stats.disk_reads.load(Ordering::Relaxed)
                )
            }) as StatusFn);
            pagers.workload = Some(w);
        }
    }
    let auth_key = if cfg.memserver.key_file.as_os_str().is_empty() {
        None
    } else {
        let bytes = std::fs::read(&cfg.memserver.key_file)
            .with_context(|| format!("memserver.key_file {}", cfg.memserver.key_file.display()))?;
        Some(AuthKey::from_secret(&bytes)?)
    };
    let journal_dir = state_dir.join("pager");
    std::fs::create_dir_all(&journal_dir)
        .with_context(|| format!("creating {}", journal_dir.display()))?;
    for (dom, target_kib) in targets {
        let mut run = PagerRunConfig::new(dom.to_string(), journal_dir.clone());
        run.target_kib = target_kib;
        run.memservers = memserver.into_iter().collect();
        run.replicas = 1;
        run.auth_key = auth_key.clone();
        // How the pager ended, once it has; the column shows it instead of the live status.
        let ended = Arc::new(Mutex::new(None::<String>));
        let (h, stop, e) = (host.clone(), pagers.stop.clone(), ended.clone());
        let thread = std::thread::Builder::new()
            .name(format!("pager-{dom}"))
            .spawn(move || {
                let line = match service::run_pager(&h, run, &stop, |_| {}) {
                    Ok(report) => format!("stopped, {} pages paged back", report.paged_back),
                    Err(err) => {
                        let msg = format!("{:#}", anyhow::Error::from(err));
                        eprintln!("pager for domain {dom}: {msg}");
                        format!("FAILED: {msg}")
                    }
                };
                *e.lock() = Some(line);
            })
            .context("starting a pager thread")?;
        pagers.threads.push((dom, thread));
        let h = host.clone();
        columns.push(Box::new(move || {
            let line = match &*ended.lock() {
                Some(end) => end.clone(),
                None => service::pager_status(&h, dom).unwrap_or_else(|| "starting".into()),
            };
            format!("pager d{dom} {line}")
        }) as StatusFn);
    }
    Ok((pagers, columns))
}
