//! `run`-style entry points so the CLI stays thin: `remoca pager` ([`run_pager`]),
//! `remoca mrc` ([`run_mrc`]) and the pager column of `remoca up` ([`pager_status`]).

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use remoca_memserver::client::{ClientConfig, ClientError, PageSecret};
use remoca_memserver::protocol::auth::AuthKey;
use remoca_xen::{DomId, Host, Tx};

use crate::mrc::{self, Mrc, Shards};
use crate::pager::{Pager, PagerConfig, PagerError, PagerStats, ShutdownReport, Target};
use crate::store::{MemoryStore, MemserverStore, PageStore};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("domain {0:?}")]
    Domain(String, #[source] remoca_xen::Error),
    #[error("connecting to the memory servers")]
    Memserver(#[source] ClientError),
    #[error(transparent)]
    Pager(#[from] PagerError),
    #[error("trace line {line}: {text:?} is not a page number")]
    Trace { line: usize, text: String },
    #[error("reading the trace")]
    Read(#[source] std::io::Error),
    #[error("writing the report")]
    Write(#[source] std::io::Error),
}

/// Settings of `remoca pager --domain DOM [--target KIB] [--memserver ADDR...]`.
#[derive(Debug, Clone)]
pub struct PagerRunConfig {
    /// Domain id or name.
    pub domain: String,
    /// Fixed target in KiB; `None` follows xenstore `memory/target-tot_pages`.
    pub target_kib: Option<u64>,
    /// Memory servers for the persistent pool; empty keeps pages in this process.
    pub memservers: Vec<SocketAddr>,
    pub auth_key: Option<AuthKey>,
    /// Secret the pages are sealed under (derive it from a host secret file).
    pub page_secret: PageSecret,
    /// Copies of each page (clamped to the number of servers).
    pub replicas: usize,
    /// Directory of the journals (`<dir>/dom<id>.journal`).
    pub journal_dir: PathBuf,
    pub batch: usize,
    /// How often status is published (xenstore) and reported to the caller.
    pub status_interval: Duration,
}

impl PagerRunConfig {
    /// Defaults: xenstore target, in-process store, 2 replicas, batches of 64, status
    /// every second.
    pub fn new(domain: impl Into<String>, journal_dir: PathBuf) -> Self {
        PagerRunConfig {
            domain: domain.into(),
            target_kib: None,
            memservers: Vec::new(),
            auth_key: None,
            page_secret: PageSecret::random(),
            replicas: 2,
            journal_dir,
            batch: 64,
            status_interval: Duration::from_secs(1),
        }
    }
}

/// Where a pager publishes its one-line status: dom0's own xenstore area, which guests
/// cannot write.
pub fn status_path(dom: DomId) -> String {
    format!("/local/domain/0/remoca/pager/{dom}")
}

/// The status a running pager published for `dom` (the `remoca up` pager column), if a
/// pager runs for it.
pub fn pager_status(host: &Host, dom: DomId) -> Option<String> {
    remoca_xen::xenstore::read_string(&*host.store, Tx::NONE, &status_path(dom)).ok()
}

/// A short form of the stats for a status column: `out 224 MiB / tgt 1.0 GiB`.
pub fn status_column(stats: &PagerStats) -> String {
    let size = |pages: u64| {
        let kib = pages * crate::pager::PAGE_KIB;
        if kib >= 1 << 20 {
            format!("{:.1} GiB", kib as f64 / (1u64 << 20) as f64)
        } else if kib >= 1024 {
            format!("{} MiB", kib / 1024)
        } else {
            format!("{kib} KiB")
        }
    };
    let mut s = format!(
        "out {} / tgt {}",
        size(stats.out_pages),
        stats.target_pages.map_or("-".into(), size)
    );
    if stats.store_lost.is_some() {
        s.push_str(" STORE LOST");
    } else if stats.unserved_faults > 0 {
        s.push_str(" WAITING");
    }
    s
}

fn publish(host: &Host, stats: &PagerStats) {
    let line = status_column(stats);
    if let Err(e) = host
        .store
        .write(Tx::NONE, &status_path(stats.dom), line.as_bytes())
    {
        tracing::debug!(error = %e, "cannot publish pager status");
    }
}

/// Run a pager for one domain until `stop` is set (SIGTERM/SIGINT), then page everything
/// back and disable paging. `on_status` sees the counters every `status_interval`.
///
/// It never returns with pages out: if some cannot be paged back (store lost), it keeps
/// serving faults and retries every `status_interval`; a restarted pager with the same
/// journal directory recovers the pages once the store is back.
///
/// # Errors
/// The domain is unknown, the memory servers cannot be reached, or the pager cannot start
/// (`PagerError::Unavailable` says why mem_paging cannot work here) or fails.
pub fn run_pager(
    host: &Host,
    cfg: PagerRunConfig,
    stop: &AtomicBool,
    mut on_status: impl FnMut(&PagerStats),
) -> Result<ShutdownReport, ServiceError> {
    let dom = host
        .find_domain(&cfg.domain)
        .map_err(|e| ServiceError::Domain(cfg.domain.clone(), e))?
        .domid;
    let store: Arc<dyn PageStore> = if cfg.memservers.is_empty() {
        tracing::warn!(dom, "no memory server: evicted pages stay in this process");
        Arc::new(MemoryStore::new())
    } else {
        let mut client = ClientConfig::new(cfg.memservers.clone(), cfg.auth_key, cfg.page_secret);
        client.replicas = cfg.replicas.clamp(1, cfg.memservers.len());
        Arc::new(MemserverStore::connect(client).map_err(ServiceError::Memserver)?)
    };
    let target = cfg.target_kib.map_or(Target::Xenstore, Target::Kib);
    let mut config = PagerConfig::new(
        dom,
        target,
        cfg.journal_dir.join(format!("dom{dom}.journal")),
    );
    config.batch = cfg.batch;
    let _span = tracing::info_span!("pager", dom).entered();
    let mut pager = Pager::start(host, config, store)?;
    let mut next_status = Instant::now();
    let mut report = |pager: &Pager, next: &mut Instant| {
        if Instant::now() >= *next {
            publish(host, pager.stats());
            on_status(pager.stats());
            *next = Instant::now() + cfg.status_interval;
        }
    };
    loop {
        while !stop.load(Ordering::Relaxed) {
            pager.step()?;
            report(&pager, &mut next_status);
        }
        match pager.shutdown() {
            Ok(done) => {
                let _ = host.store.rm(Tx::NONE, &status_path(dom));
                return Ok(done);
            }
            Err(failed) => {
                tracing::error!(dom, error = %failed.error, "cannot stop with pages out; still serving");
                pager = *failed.pager;
                let retry = Instant::now() + cfg.status_interval;
                while Instant::now() < retry {
                    pager.step()?;
                    report(&pager, &mut next_status);
                }
            }
        }
    }
}

/// Where `remoca mrc` gets its references.
pub enum MrcInput {
    /// One page number per line (decimal or `0x` hex; blank lines and `#` comments skipped).
    Trace(Box<dyn BufRead>),
    /// [`mrc::synthetic::zipf_scan_mix`].
    Synthetic {
        refs: usize,
        pages: u64,
        scan_fraction: f64,
        seed: u64,
    },
}

impl std::fmt::Debug for MrcInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MrcInput::Trace(_) => f.write_str("Trace(..)"),
            MrcInput::Synthetic { refs, pages, .. } => {
                write!(f, "Synthetic({refs} refs over {pages} pages)")
            }
        }
    }
}

/// How the curve is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MrcMethod {
    Exact,
    Shards { rate: f64 },
    ShardsFixedSize { max_pages: usize, rate: f64 },
}

/// Settings of `remoca mrc`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MrcRunConfig {
    pub method: MrcMethod,
    /// Also compute the exact curve and print the mean absolute error.
    pub compare_exact: bool,
    /// Curve resolution in pages.
    pub bucket_pages: u64,
    /// Recommended size: within this much miss ratio of the asymptote.
    pub tolerance: f64,
    pub width: usize,
    pub height: usize,
}

impl Default for MrcRunConfig {
    fn default() -> Self {
        MrcRunConfig {
            method: MrcMethod::ShardsFixedSize {
                max_pages: 8192,
                rate: 0.1,
            },
            compare_exact: false,
            bucket_pages: 256,
            tolerance: 0.02,
            width: 60,
            height: 10,
        }
    }
}

/// What `remoca mrc` found.
#[derive(Debug, Clone)]
pub struct MrcReport {
    pub curve: Mrc,
    pub recommended_pages: u64,
    /// Against the exact curve, when asked for.
    pub mae: Option<f64>,
}

fn read_trace(input: MrcInput) -> Result<Vec<u64>, ServiceError> {
    match input {
        MrcInput::Synthetic {
            refs,
            pages,
            scan_fraction,
            seed,
        } => Ok(mrc::synthetic::zipf_scan_mix(refs, pages, scan_fraction, seed).collect()),
        MrcInput::Trace(reader) => {
            let mut out = Vec::new();
            for (i, line) in reader.lines().enumerate() {
                let line = line.map_err(ServiceError::Read)?;
                let t = line.split('#').next().unwrap_or("").trim();
                if t.is_empty() {
                    continue;
                }
                let v = match t.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => t.parse(),
                };
                out.push(v.map_err(|_| ServiceError::Trace {
                    line: i + 1,
                    text: t.to_string(),
                })?);
            }
            Ok(out)
        }
    }
}

/// Compute a miss-ratio curve, print it with a plot and the recommended size to `out`.
///
/// # Errors
/// Unreadable or malformed trace; failure to write.
pub fn run_mrc(
    cfg: &MrcRunConfig,
    input: MrcInput,
    out: &mut dyn Write,
) -> Result<MrcReport, ServiceError> {
    let trace = read_trace(input)?;
    let (curve, label) = match cfg.method {
        MrcMethod::Exact => (
            mrc::exact_lru(trace.iter().copied(), cfg.bucket_pages),
            "exact LRU".to_string(),
        ),
        MrcMethod::Shards { rate } => {
            let mut s = Shards::fixed_rate(rate, cfg.bucket_pages);
            trace.iter().for_each(|&k| s.access(k));
            (s.curve(), format!("SHARDS rate {rate}"))
        }
        MrcMethod::ShardsFixedSize { max_pages, rate } => {
            let mut s = Shards::fixed_size(max_pages, rate, cfg.bucket_pages);
            trace.iter().for_each(|&k| s.access(k));
            (
                s.curve(),
                format!(
                    "SHARDS fixed size {max_pages} pages (rate now {:.4})",
                    s.rate()
                ),
            )
        }
    };
    let mae = (cfg.compare_exact && cfg.method != MrcMethod::Exact).then(|| {
        mrc::mean_absolute_error(
            &curve,
            &mrc::exact_lru(trace.iter().copied(), cfg.bucket_pages),
        )
    });
    let recommended = curve.recommend(cfg.tolerance);
    let w = |e| ServiceError::Write(e);
    writeln!(out, "miss-ratio curve: {} references, {label}", trace.len()).map_err(w)?;
    out.write_all(mrc::plot::render(&curve, cfg.width, cfg.height, Some(recommended)).as_bytes())
        .map_err(w)?;
    writeln!(
        out,
        "recommended: {} KiB ({} pages), miss ratio {:.3}; asymptote {:.3} (tolerance {})",
        recommended * crate::pager::PAGE_KIB,
        recommended,
        curve.miss_ratio(recommended),
        curve.asymptote(),
        cfg.tolerance
    )
    .map_err(w)?;
    if let Some(mae) = mae {
        writeln!(out, "mean absolute error against exact LRU: {mae:.4}").map_err(w)?;
    }
    Ok(MrcReport {
        curve,
        recommended_pages: recommended,
        mae,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mrc_report_from_a_trace_reader() {
        let text: String = (0..3000u64).map(|i| format!("{:#x}\n", i % 300)).collect();
        let cfg = MrcRunConfig {
            method: MrcMethod::Shards { rate: 1.0 },
            compare_exact: true,
            bucket_pages: 10,
            ..MrcRunConfig::default()
        };
        let mut out = Vec::new();
        let r = run_mrc(
            &cfg,
            MrcInput::Trace(Box::new(std::io::Cursor::new(text))),
            &mut out,
        )
        .unwrap();
        assert_eq!(r.recommended_pages, 300);
        assert!(r.mae.unwrap() < 1e-9);
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("recommended: 1200 KiB (300 pages)"), "{s}");
        let bad = run_mrc(
            &cfg,
            MrcInput::Trace(Box::new(std::io::Cursor::new("12\nxyz\n"))),
            &mut Vec::new(),
        );
        assert!(matches!(bad, Err(ServiceError::Trace { line: 2, .. })));
    }

    #[test]
    fn status_column_is_short() {
        let s = PagerStats {
            out_pages: 57344,
            target_pages: Some(262144),
            ..PagerStats::default()
        };
        assert_eq!(status_column(&s), "out 224 MiB / tgt 1.0 GiB");
    }
}
