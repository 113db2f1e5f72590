//! The disk services `remoca up` runs: the NBD server and the Xen blkif backend over one set
//! of exports, and the remote-memory layers under them (a swap device whose blocks live on
//! the memory servers, a remote read cache over plain exports).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use remoca_blkback::blkif::{BlkifConfig, BlkifServer};
use remoca_blkback::nbd::{self, Listener};
use remoca_blkback::overlay::{header::DEFAULT_CLUSTER_BITS, Overlay};
use remoca_blkback::raw::RawFile;
use remoca_blkback::remote::cache::{CacheConfig, RemoteCache};
use remoca_blkback::remote::client::RemoteClient;
use remoca_blkback::remote::exports::{namespace_for, open_exports, CacheExport, SwapExport};
use remoca_blkback::remote::observe::{AccessObserver, Source};
use remoca_blkback::remote::swap::{SwapConfig, SwapDisk};
use remoca_blkback::{Disk, ExportConfig, Exports};
use remoca_memserver::byte_size::format_size;
use remoca_memserver::client::{ClientConfig, PageSecret};
use remoca_memserver::protocol::auth::AuthKey;
use remoca_paging::mrc::live::WorkingSets;
use remoca_xen::Host;
use tokio::sync::watch;

use super::config::ExportSection;
use super::failover::FailoverDisks;
use super::{stopped, Config, StatusFn, Tasks};

/// The exports and the remote layers opened under them.
pub(crate) struct Opened {
    pub exports: Exports,
    pub swaps: Vec<(String, Arc<SwapDisk>)>,
    pub caches: Vec<(String, Arc<RemoteCache>)>,
}

/// A swap device to open: name, size, spill file, most bytes the spill file may hold.
pub(crate) type SwapSpec = (String, u64, std::path::PathBuf, u64);

/// Open the exports (on the demo default: a template + overlay disk with a remote read
/// cache, and a swap device) and serve them over NBD.
///
/// With `observe`, the remote layers report their guests' traffic to the working-set
/// estimator: a disk's `domain` key names its guest; on the demo default the demo swap
/// device and the demo disk's cache belong to the demo HVM guest.
pub(super) async fn start(
    cfg: &Config,
    state_dir: &Path,
    memserver: Option<SocketAddr>,
    observe: Option<(&Host, &Arc<WorkingSets>)>,
    tasks: &mut Tasks,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, Vec<StatusFn>, Exports, FailoverDisks)> {
    let b = &cfg.blkback;
    let demo = b.export.is_empty() && b.swap.is_empty();
    let mut plain: Vec<(ExportConfig, bool)> = b
        .export
        .iter()
        .filter(|e| !e.failover)
        .map(export_config)
        .collect();
    let fenced: Vec<(ExportConfig, Option<usize>)> = b
        .export
        .iter()
        .filter(|e| e.failover)
        .map(|e| (export_config(e).0, e.reader_cpu))
        .collect();
    let (failover, failover_disks, failover_columns) = {
        let (f, s) = (b.failover.clone(), state_dir.to_owned());
        tokio::task::block_in_place(|| FailoverDisks::start(&fenced, &f, &s, &s.join("blkback")))?
    };
    let mut swaps: Vec<SwapSpec> = b
        .swap
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.size,
                s.spill.clone(),
                s.spill_max.unwrap_or(s.size),
            )
        })
        .collect();
    if demo {
        plain.push((demo_disk(state_dir, b.demo_disk)?, true));
        if b.demo_swap > 0 {
            let spill = state_dir.join("demo-swap.spill");
            swaps.push(("demo-swap".into(), b.demo_swap, spill, b.demo_swap));
        }
    }
    let servers: Vec<SocketAddr> = if b.memservers.is_empty() {
        memserver.into_iter().collect()
    } else {
        b.memservers.clone()
    };
    let wants_remote = !swaps.is_empty() || plain.iter().any(|(_, cached)| *cached);
    let opened = if plain.is_empty() && swaps.is_empty() {
        Opened {
            exports: Exports::from_disks(failover_disks.clone())?,
            swaps: Vec::new(),
            caches: Vec::new(),
        }
    } else if wants_remote && !servers.is_empty() {
        let key = auth_key(cfg)?;
        // The remote layers block on their own runtime while opening: not on a tokio worker.
        tokio::task::spawn_blocking(move || open_remote(plain, swaps, servers, key))
            .await
            .context("opening the remote layers")??
    } else {
        if wants_remote {
            eprintln!(
                "warning: no memory server (memserver disabled and blkback.memservers empty): \
                 swap devices are not served and exports are not cached"
            );
        }
        let configs: Vec<ExportConfig> = plain.into_iter().map(|(c, _)| c).collect();
        let (exports, failed) = Exports::open_available(&configs).context("blkback exports")?;
        for e in failed {
            eprintln!(
                "warning: blkback is not serving: {:#}",
                anyhow::Error::from(e)
            );
        }
        Opened {
            exports,
            swaps: Vec::new(),
            caches: Vec::new(),
        }
    };
    if let Some((host, sets)) = observe {
        let mut owners: Vec<(String, String)> = b
            .export
            .iter()
            .filter_map(|e| Some((e.name.clone(), e.domain.clone()?)))
            .chain(
                b.swap
                    .iter()
                    .filter_map(|s| Some((s.name.clone(), s.domain.clone()?))),
            )
            .collect();
        if demo && host.sim().is_some() && host.find_domain(super::pager::DEMO_DOMAIN).is_ok() {
            for name in ["demo", "demo-swap"] {
                owners.push((name.into(), super::pager::DEMO_DOMAIN.into()));
            }
        }
        observe_layers(host, sets, &owners, &opened);
    }
    let mut opened = opened;
    if !failover_disks.is_empty() && opened.exports.iter().all(|e| e.name != failover_disks[0].0) {
        // Serve the failover endpoints beside the other exports.
        let all: Vec<(String, String, Arc<dyn Disk>)> = opened
            .exports
            .iter()
            .map(|e| (e.name.clone(), e.description.clone(), e.disk.clone()))
            .chain(failover_disks)
            .collect();
        opened.exports = Exports::from_disks(all).context("blkback exports")?;
    }
    for e in opened.exports.iter() {
        crate::cli::announce(format_args!(
            "  export {:?}: {} ({})",
            e.name,
            e.description,
            format_size(e.disk.size())
        ));
    }
    let listener = tokio::net::TcpListener::bind(b.listen)
        .await
        .with_context(|| format!("blkback cannot listen on {}", b.listen))?;
    let addr = listener.local_addr()?;
    let exports = opened.exports.clone();
    let served = exports.clone();
    tasks.spawn(async move {
        let res = nbd::run(Listener::Tcp(listener), served.clone(), stopped(stop)).await;
        served.flush_all();
        res.context("blkback NBD server")
    });
    let mut columns: Vec<StatusFn> = Vec::new();
    let counted = exports.clone();
    columns.push(Box::new(move || {
        let (mut r, mut w, mut c) = (0, 0, 0);
        for e in counted.iter() {
            let s = e.stats.snapshot();
            r += s.bytes_read;
            w += s.bytes_written;
            c += s.connections;
        }
        format!(
            "blkback read {} written {} ({c} connections)",
            format_size(r),
            format_size(w)
        )
    }));
    for (name, swap) in opened.swaps {
        columns.push(Box::new(move || {
            let s = swap.stats();
            format!(
                "swap {name}: {} blocks remote, {} spilled, {} errors",
                s.remote_blocks,
                s.spilled_blocks,
                s.read_errors + s.write_errors
            )
        }));
    }
    for (name, cache) in opened.caches {
        columns.push(Box::new(move || {
            let s = cache.stats();
            format!("cache {name}: {} hits, {} misses", s.hits, s.misses)
        }));
    }
    columns.extend(failover_columns);
    Ok((addr, columns, exports, failover))
}

/// Attach the estimator to the remote layer of every export in `owners` (export name,
/// domain name or id).
fn observe_layers(
    host: &Host,
    sets: &Arc<WorkingSets>,
    owners: &[(String, String)],
    opened: &Opened,
) {
    for (device, (export, domain)) in owners.iter().enumerate() {
        let dom = match host.find_domain(domain) {
            Ok(info) => info.domid,
            Err(e) => {
                eprintln!("warning: export {export:?}: domain {domain:?}: {e}; its accesses are not estimated");
                continue;
            }
        };
        let source = Source {
            dom,
            device: device as u16,
        };
        let observer: Arc<dyn AccessObserver> = sets.clone();
        if let Some((_, swap)) = opened.swaps.iter().find(|(n, _)| n == export) {
            swap.observe(source, observer);
        } else if let Some((_, cache)) = opened.caches.iter().find(|(n, _)| n == export) {
            cache.observe(source, observer);
        } else {
            eprintln!(
                "warning: export {export:?} has no remote swap or cache layer: its accesses are not estimated"
            );
            continue;
        }
        sets.track(dom);
    }
}

fn export_config(e: &ExportSection) -> (ExportConfig, bool) {
    (
        ExportConfig {
            name: e.name.clone(),
            template: e.template.clone(),
            overlay: e.overlay.clone(),
            read_only: e.readonly,
            min_block: 1,
        },
        e.remote_cache,
    )
}

fn auth_key(cfg: &Config) -> anyhow::Result<Option<AuthKey>> {
    let path = &cfg.memserver.key_file;
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("memserver.key_file {}", path.display()))?;
    Ok(Some(AuthKey::from_secret(&bytes).with_context(|| {
        format!("memserver.key_file {}", path.display())
    })?))
}

/// Open plain exports (cached where asked) and swap devices over the memory servers. Call
/// from a plain thread, not a tokio worker.
pub(crate) fn open_remote(
    plain: Vec<(ExportConfig, bool)>,
    swaps: Vec<SwapSpec>,
    servers: Vec<SocketAddr>,
    key: Option<AuthKey>,
) -> anyhow::Result<Opened> {
    // A swap device lives as long as this process, so a fresh sealing key is right: nobody
    // else, and no later run, can read these pages.
    let mut client = ClientConfig::new(servers, key, PageSecret::random());
    client.replicas = 2;
    if client.servers.len() < 2 {
        eprintln!("warning: one memory server: swap blocks have no replica; losing it loses them");
    }
    let client = RemoteClient::connect(client, 2).context("connecting to the memory servers")?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let configs: Vec<ExportConfig> = plain.iter().map(|(c, _)| c.clone()).collect();
    let swap_exports: Vec<SwapExport> = swaps
        .into_iter()
        .map(|(name, size, spill_path, spill_max)| SwapExport {
            swap: SwapConfig {
                size,
                namespace: namespace_for(host, "swap", &name),
                spill_path,
                spill_max,
            },
            name,
        })
        .collect();
    let cache_exports: Vec<CacheExport<'_>> = plain
        .iter()
        .filter(|(_, cached)| *cached)
        .map(|(c, _)| CacheExport {
            export: &c.name,
            cache: CacheConfig::new(namespace_for(host, "cache", &c.name)),
        })
        .collect();
    let o = open_exports(&configs, &swap_exports, &cache_exports, &client)
        .context("blkback exports")?;
    for e in o.failed {
        eprintln!(
            "warning: blkback is not serving: {:#}",
            anyhow::Error::from(e)
        );
    }
    Ok(Opened {
        exports: o.exports,
        swaps: o.swaps,
        caches: o.caches,
    })
}

/// Serve the exports to Xen guests too (vbd3 disks in xenstore, under `backend_domid`'s
/// backend directory). Returns the directory served with the server and its status column.
pub(super) fn start_blkif(
    host: &Host,
    exports: Exports,
    backend_domid: remoca_xen::DomId,
) -> anyhow::Result<(BlkifServer, String, StatusFn)> {
    let config = BlkifConfig {
        backend_domid,
        exports: Some(exports),
        // Outside dom0 this is a driver domain: its page cache dies with it.
        write_through: backend_domid != 0,
        ..BlkifConfig::default()
    };
    let root = config.root();
    let server = BlkifServer::spawn(host.clone(), config).context("starting the blkif backend")?;
    let stats = server.stats().clone();
    let status: StatusFn = Box::new(move || {
        let devices = stats.lock();
        let (mut req, mut err) = (0, 0);
        for s in devices.values() {
            req += s.requests.load(std::sync::atomic::Ordering::Relaxed);
            err += s.errors.load(std::sync::atomic::Ordering::Relaxed);
        }
        format!(
            "blkif {} disks, {req} requests, {err} errors",
            devices.len()
        )
    });
    Ok((server, root, status))
}

/// The `backend_domain` setting: `self` is the domain this process runs in (a driver domain:
/// xenstore resolves the relative path `domid` in the caller's home), otherwise a domid.
pub(super) fn backend_domid(host: &Host, setting: &str) -> anyhow::Result<remoca_xen::DomId> {
    if setting == "self" {
        let id = remoca_xen::xenstore::read_string(
            host.store.as_ref(),
            remoca_xen::xenstore::Tx::NONE,
            "domid",
        )
        .context("backend_domain = \"self\": reading this domain's `domid` from xenstore")?;
        return id.trim().parse().with_context(|| {
            format!("backend_domain = \"self\": xenstore `domid` is {id:?}, not a domid")
        });
    }
    setting.parse().map_err(|_| {
        anyhow::anyhow!(
            "[blkback] backend_domain = {setting:?}: expected \"self\" or a domid such as \"0\""
        )
    })
}

/// A demo template (a 4 KiB pattern block every MiB, the rest sparse) and an overlay over it,
/// made once in the state directory and reused on later runs.
fn demo_disk(state_dir: &Path, size: u64) -> anyhow::Result<ExportConfig> {
    use std::os::unix::fs::FileExt;
    if size == 0 || size % (1 << 20) != 0 {
        bail!("blkback.demo_disk must be a positive whole number of MiB");
    }
    let template = state_dir.join("demo-template.raw");
    let overlay = state_dir.join("demo.overlay");
    let fresh_template = std::fs::metadata(&template)
        .map(|m| m.len() != size)
        .unwrap_or(true);
    if fresh_template {
        let f = std::fs::File::create(&template)
            .with_context(|| format!("creating {}", template.display()))?;
        f.set_len(size)?;
        for mib in 0..size >> 20 {
            let mut block = vec![0u8; 4096];
            let text = format!("remoca demo disk, MiB {mib}\n");
            block[..text.len()].copy_from_slice(text.as_bytes());
            f.write_all_at(&block, mib << 20)?;
        }
        f.sync_all()?;
        let _ = std::fs::remove_file(&overlay);
    }
    if !overlay.exists() {
        let t = RawFile::open_read_only(&template).context("opening the demo template")?;
        Overlay::create(
            &overlay,
            &t,
            DEFAULT_CLUSTER_BITS,
            &template.display().to_string(),
        )
        .with_context(|| format!("creating {}", overlay.display()))?;
    }
    Ok(ExportConfig {
        name: "demo".into(),
        template,
        overlay: Some(overlay),
        read_only: false,
        min_block: 1,
    })
}
