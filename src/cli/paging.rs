//! `remoca pager` (mem_paging pager for one domain) and `remoca mrc` (miss-ratio curves);
//! logic in `remoca_paging::service`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use remoca_memserver::client::PageSecret;
use remoca_memserver::protocol::auth::AuthKey;
use remoca_paging::mrc::published;
use remoca_paging::service::{self, MrcInput, MrcMethod, MrcRunConfig, PagerRunConfig};

use super::Global;

#[derive(Debug, Args)]
pub struct PagerArgs {
    /// Domain id or name (an HVM guest with HAP, on a hypervisor built with mem_paging).
    #[arg(long)]
    domain: String,
    /// Hold the domain at this many KiB (default: follow xenstore `memory/target-tot_pages`).
    #[arg(long)]
    target: Option<u64>,
    /// Memory server for the evicted pages; repeat for more (pages are replicated). Without
    /// one, pages stay in this process.
    #[arg(long = "memserver", value_name = "ADDR")]
    memservers: Vec<SocketAddr>,
    /// Pre-shared key file of the memory servers.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// File whose contents the page-sealing key is derived from (default: a random key, so
    /// only this process can read its pages back).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Copies of each page (at most the number of memory servers).
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Directory of the gfn journals a restarted pager resumes from.
    #[arg(long, default_value = "/var/lib/remoca/pager")]
    journal_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct MrcArgs {
    /// A trace file (one page number per line, decimal or 0x hex, `#` comments), or a domain
    /// (id or name) whose live working-set estimate `remoca up` publishes in xenstore. An
    /// existing file is a trace. Without it a synthetic zipf + scan trace is used.
    #[arg(value_name = "TRACE|DOMAIN")]
    source: Option<String>,
    /// `exact`, `shards` (fixed rate) or `shards-fixed` (fixed sample size).
    #[arg(long, default_value = "shards-fixed", value_parser = ["exact", "shards", "shards-fixed"])]
    method: String,
    /// SHARDS sampling rate.
    #[arg(long, default_value_t = 0.1)]
    rate: f64,
    /// Most sampled pages for `shards-fixed`.
    #[arg(long, default_value_t = 8192)]
    max_pages: usize,
    /// Also compute the exact LRU curve and print the mean absolute error.
    #[arg(long)]
    compare_exact: bool,
    /// Synthetic trace: number of references.
    #[arg(long, default_value_t = 1_000_000)]
    refs: usize,
    /// Synthetic trace: distinct pages referenced.
    #[arg(long, default_value_t = 65536)]
    pages: u64,
}

pub fn pager(a: PagerArgs, g: &Global) -> anyhow::Result<()> {
    let host = g.host()?;
    std::fs::create_dir_all(&a.journal_dir)
        .with_context(|| format!("creating the journal directory {}", a.journal_dir.display()))?;
    let mut cfg = PagerRunConfig::new(a.domain, a.journal_dir);
    cfg.target_kib = a.target;
    cfg.memservers = a.memservers;
    cfg.replicas = a.replicas;
    if let Some(p) = &a.key_file {
        let bytes =
            std::fs::read(p).with_context(|| format!("reading key file {}", p.display()))?;
        cfg.auth_key = Some(
            AuthKey::from_secret(&bytes).with_context(|| format!("key file {}", p.display()))?,
        );
    }
    if let Some(p) = &a.secret_file {
        let bytes =
            std::fs::read(p).with_context(|| format!("reading secret file {}", p.display()))?;
        cfg.page_secret = PageSecret::derive(&bytes);
    }
    let stop = Arc::new(AtomicBool::new(false));
    // The pager must not run on a tokio runtime (its store client has its own), so signals
    // are awaited on a small runtime of their own that only raises the flag.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut term = rt.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    })?;
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            });
            flag.store(true, Ordering::Relaxed);
        })?;
    // Live counters: a closed stdout must not stop the pager (guest pages are out).
    let report = service::run_pager(&host, cfg, &stop, |stats| {
        super::announce(format_args!("{stats}"))
    })?;
    outln!("pager stopped; {} pages paged back", report.paged_back)?;
    Ok(())
}

/// `remoca mrc DOMAIN`: the live estimate published for a domain.
fn mrc_live(domain: &str, g: &Global) -> anyhow::Result<()> {
    let host = g.host()?;
    let info = host.find_domain(domain)?;
    let estimate = published::read(&*host.store, info.domid)?;
    let who = if info.name.is_empty() {
        format!("domain {}", info.domid)
    } else {
        format!("domain {} ({})", info.domid, info.name)
    };
    published::report(&estimate, &who, 60, 10, &mut std::io::stdout().lock())?;
    Ok(())
}

pub fn mrc(a: MrcArgs, g: &Global) -> anyhow::Result<()> {
    let trace = match a.source {
        Some(s) if !std::path::Path::new(&s).is_file() => return mrc_live(&s, g),
        other => other.map(PathBuf::from),
    };
    let method = match a.method.as_str() {
        "exact" => MrcMethod::Exact,
        "shards" => MrcMethod::Shards { rate: a.rate },
        _ => MrcMethod::ShardsFixedSize {
            max_pages: a.max_pages,
            rate: a.rate,
        },
    };
    if !(a.rate > 0.0 && a.rate <= 1.0) {
        anyhow::bail!("--rate must be in (0, 1]");
    }
    let input = match &trace {
        Some(p) => {
            let f =
                std::fs::File::open(p).with_context(|| format!("opening trace {}", p.display()))?;
            MrcInput::Trace(Box::new(std::io::BufReader::new(f)))
        }
        None => MrcInput::Synthetic {
            refs: a.refs,
            pages: a.pages,
            scan_fraction: 0.2,
            seed: 1,
        },
    };
    let cfg = MrcRunConfig {
        method,
        compare_exact: a.compare_exact,
        ..MrcRunConfig::default()
    };
    service::run_mrc(&cfg, input, &mut std::io::stdout().lock())?;
    Ok(())
}
