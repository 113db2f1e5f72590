//! The Xen blkif backend: serves guests' `xvd*` disks from the blkback disk stack, over
//! the `remoca-xen` traits only, so the same code runs on real Xen and on the simulated host.
//!
//! ```text
//!  xenstore /local/domain/0/backend/vbd3/<domid>/<devid>   (libxl, backendtype=tap)
//!        │ watch
//!   serve() ── one control thread per device (device.rs: xenbus state machine)
//!                 │ InitWait → Connected: map ring (GrantTables), bind port (EventChannels)
//!                 ▼
//!              ring thread (dataplane.rs) ── parse.rs ──▶ WorkerPool ──▶ request::execute
//!                                                         │ grant copy in/out      │
//!                                                         ▼                        ▼
//!                                                      guest pages            Disk layers
//! ```
//!
//! - [`parse`]: the blkif request layouts (x86_64 and x86_32), checked before use; fuzzed.
//! - [`xenbus`]: states, the keys the backend publishes, the ring the frontend describes.
//! - [`params`]: which disk a device serves (`params`, `mode`, configured exports).
//! - `device`: the per-device control thread; `dataplane`: the ring loop.
//!
//! The frontend is never trusted: every request is copied out of the ring and checked, data
//! moves only by grant copy (no guest page stays mapped but the ring), a bad request gets
//! `BLKIF_RSP_ERROR` and the ring keeps serving. `docs/blkback.md` has the xl disk line, the
//! xenstore keys and the state machine.

mod dataplane;
mod device;
pub mod params;
pub mod parse;
pub mod standby;
pub mod xenbus;

pub use dataplane::{RingStats, RESPONSE_MARK, RESPONSE_MARK_32};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{select, Receiver, Sender};
use parking_lot::Mutex;
use remoca_xen::{DomId, Host, Tx, XenStore};

use crate::export::Exports;
use crate::workers::WorkerPool;

use device::DeviceId;
use parse::MAX_INDIRECT_SEGMENTS;

/// Why the backend (or one device) could not be served.
#[derive(Debug, thiserror::Error)]
pub enum BlkifError {
    #[error("Xen call failed")]
    Xen(#[from] remoca_xen::Error),
    #[error("device parameters: {0}")]
    Params(String),
    #[error("frontend: {0}")]
    Frontend(String),
    #[error("invalid blkif configuration: {0}")]
    Config(String),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("the xenstore watch on {0} was lost")]
    WatchLost(String),
    #[error("standby takeover: {0}")]
    Standby(String),
}

/// Largest `max-ring-page-order` offered (32 pages, 1024 x86_64 slots), as Linux.
pub const MAX_RING_PAGE_ORDER: u32 = 5;

/// How the backend serves.
#[derive(Debug, Clone)]
pub struct BlkifConfig {
    /// The domain this backend runs in (0 for dom0; a driver domain's id otherwise).
    pub backend_domid: DomId,
    /// The backend directory kind: `vbd3` is what libxl writes for `backendtype=tap`.
    pub backend_kind: String,
    /// Exports that a disk line's `target=<name>` refers to; absolute targets are raw files.
    pub exports: Option<Exports>,
    /// `max-ring-page-order` offered (0..=5).
    pub max_ring_page_order: u32,
    /// `feature-max-indirect-segments` offered (0 = no indirect requests; at most 4096).
    pub max_indirect_segments: u16,
    /// Disk worker threads shared by all devices.
    pub workers: usize,
    /// Open raw-path targets with `O_DSYNC`, so a write is answered only once it is on the
    /// storage below this domain: a driver domain's page cache dies with it, and a standby
    /// domain taking the disk over must find every answered write (docs/failover.md, "Tier 2").
    pub write_through: bool,
}

impl Default for BlkifConfig {
    fn default() -> Self {
        BlkifConfig {
            backend_domid: 0,
            backend_kind: "vbd3".into(),
            exports: None,
            max_ring_page_order: 4,
            max_indirect_segments: 256,
            workers: crate::workers::DEFAULT_WORKERS,
            write_through: false,
        }
    }
}

impl BlkifConfig {
    /// Check the limits.
    ///
    /// # Errors
    /// [`BlkifError::Config`] naming the bad value.
    pub fn validate(&self) -> Result<(), BlkifError> {
        if self.max_ring_page_order > MAX_RING_PAGE_ORDER {
            return Err(BlkifError::Config(format!(
                "max_ring_page_order {} is above {MAX_RING_PAGE_ORDER}",
                self.max_ring_page_order
            )));
        }
        if self.max_indirect_segments > MAX_INDIRECT_SEGMENTS {
            return Err(BlkifError::Config(format!(
                "max_indirect_segments {} is above {MAX_INDIRECT_SEGMENTS}",
                self.max_indirect_segments
            )));
        }
        if self.backend_kind.is_empty() || self.backend_kind.contains('/') {
            return Err(BlkifError::Config(format!(
                "backend kind {:?} is not a directory name",
                self.backend_kind
            )));
        }
        Ok(())
    }

    /// `/local/domain/<backend_domid>/backend/<backend_kind>`.
    pub fn root(&self) -> String {
        format!(
            "/local/domain/{}/backend/{}",
            self.backend_domid, self.backend_kind
        )
    }
}

/// Counters per device (`<domid>/<devid>`), shared with a status display.
pub type DeviceStats = Arc<Mutex<BTreeMap<String, Arc<RingStats>>>>;

struct Running {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

/// A device thread's last word: its device, and which thread it was.
type Done = ((DomId, u32), std::thread::ThreadId);

/// Serve every blkif device under [`BlkifConfig::root`] until `shutdown` fires (a message
/// or the sender dropped). Blocks the calling thread; run it on a thread of its own.
///
/// On shutdown each device answers its in-flight requests and releases its ring and event
/// channel; xenstore states are left as they are, so a restarted backend re-attaches to
/// live frontends.
///
/// # Errors
/// An invalid configuration, the watch on the root failing, or threads that cannot start.
pub fn serve(host: &Host, config: BlkifConfig, shutdown: Receiver<()>) -> Result<(), BlkifError> {
    serve_with_stats(host, config, shutdown, DeviceStats::default())
}

/// [`serve`], publishing per-device counters into `stats`.
///
/// # Errors
/// As [`serve`].
pub fn serve_with_stats(
    host: &Host,
    config: BlkifConfig,
    shutdown: Receiver<()>,
    stats: DeviceStats,
) -> Result<(), BlkifError> {
    serve_inner(host, config, shutdown, stats, &Arc::default())
}

/// [`serve_with_stats`]; `crash` set before `shutdown` fires leaves every ring as a killed
/// process would ([`BlkifServer::crash`]).
fn serve_inner(
    host: &Host,
    config: BlkifConfig,
    shutdown: Receiver<()>,
    stats: DeviceStats,
    crash: &Arc<AtomicBool>,
) -> Result<(), BlkifError> {
    config.validate()?;
    let config = Arc::new(config);
    let root = config.root();
    let watch = host.store.watch(&root, "remoca-blkif")?;
    let pool = Arc::new(WorkerPool::new(config.workers, "blkif-io").map_err(BlkifError::Thread)?);
    let mut devices: BTreeMap<(DomId, u32), Running> = BTreeMap::new();
    // A device thread says here when it ends, so a device directory written again while its
    // old thread was still closing (libxl removing and re-adding a disk) is picked up then:
    // no xenstore event would come for it afterwards. The message names the thread: by the
    // time it is read, `scan` may have reaped that thread and started a new one for the same
    // device, which must not be taken for it (joining it would wait forever).
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
    tracing::info!(%root, "blkif backend watching");
    // After a failed scan (a node read mid-change, a permission not yet set), scan again
    // in a second even if no event comes: a device must not stay unserved.
    let mut retry = crossbeam_channel::never();
    let result = loop {
        select! {
            recv(retry) -> _ => {},
            recv(watch.receiver()) -> ev => if ev.is_err() {
                break Err(BlkifError::WatchLost(root.clone()));
            },
            recv(done_rx) -> msg => if let Ok((key, ended)) = msg {
                if devices.get(&key).is_some_and(|d| d.thread.thread().id() == ended) {
                    if let Some(d) = devices.remove(&key) {
                        let _ = d.thread.join();
                        stats.lock().remove(&format!("{}/{}", key.0, key.1));
                    }
                }
            },
            recv(shutdown) -> _ => break Ok(()),
        }
        while watch.try_next().is_some() {}
        retry = crossbeam_channel::never();
        if let Err(e) = scan(host, &config, &pool, &stats, &mut devices, &done_tx, crash) {
            tracing::warn!(
                error = crate::export::error_chain(&e),
                "scanning backend devices; again in 1 s"
            );
            retry = crossbeam_channel::after(std::time::Duration::from_secs(1));
        }
    };
    for (_, d) in std::mem::take(&mut devices) {
        drop(d.stop);
        let _ = d.thread.join();
    }
    if crash.load(Ordering::Acquire) {
        // A killed process does not wait for its workers: let them finish elsewhere.
        let _ = std::thread::Builder::new()
            .name("blkif-io-drop".into())
            .spawn(move || drop(pool));
    }
    tracing::info!("blkif backend stopped");
    result
}

/// The children of `path`; none when it does not exist.
fn list(store: &dyn XenStore, path: &str) -> Result<Vec<String>, BlkifError> {
    match store.directory(Tx::NONE, path) {
        Ok(v) => Ok(v),
        Err(e) if e.is_errno(libc::ENOENT) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

fn scan(
    host: &Host,
    config: &Arc<BlkifConfig>,
    pool: &Arc<WorkerPool>,
    stats: &DeviceStats,
    devices: &mut BTreeMap<(DomId, u32), Running>,
    done: &crossbeam_channel::Sender<Done>,
    crash: &Arc<AtomicBool>,
) -> Result<(), BlkifError> {
    let finished: Vec<_> = devices
        .iter()
        .filter(|(_, d)| d.thread.is_finished())
        .map(|(k, _)| *k)
        .collect();
    for k in finished {
        if let Some(d) = devices.remove(&k) {
            let _ = d.thread.join();
            stats.lock().remove(&format!("{}/{}", k.0, k.1));
        }
    }
    let root = config.root();
    for dom in list(&*host.store, &root)? {
        let Ok(domid) = dom.parse::<DomId>() else {
            continue;
        };
        for dev in list(&*host.store, &format!("{root}/{dom}"))? {
            let Ok(devid) = dev.parse::<u32>() else {
                continue;
            };
            if devices.contains_key(&(domid, devid)) {
                continue;
            }
            let id = DeviceId {
                frontend_id: domid,
                devid,
                backend: format!("{root}/{dom}/{dev}"),
            };
            let ring_stats = Arc::new(RingStats::default());
            stats.lock().insert(id.name(), ring_stats.clone());
            let (stop, stop_rx) = crossbeam_channel::bounded(0);
            let (host, config, pool) = (host.clone(), config.clone(), pool.clone());
            let (done, crash) = (done.clone(), crash.clone());
            let thread = std::thread::Builder::new()
                .name(format!("blkif-dev-{}", id.name()))
                .spawn(move || {
                    device::run(host, id, config, pool, ring_stats, stop_rx, &crash);
                    let _ = done.send(((domid, devid), std::thread::current().id()));
                })
                .map_err(BlkifError::Thread)?;
            devices.insert((domid, devid), Running { stop, thread });
        }
    }
    Ok(())
}

/// A backend running on its own thread.
#[derive(Debug)]
pub struct BlkifServer {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<Result<(), BlkifError>>>,
    stats: DeviceStats,
    crash: Arc<AtomicBool>,
}

impl BlkifServer {
    /// Start [`serve`] on a new thread.
    ///
    /// # Errors
    /// An invalid configuration or a thread that cannot start.
    pub fn spawn(host: Host, config: BlkifConfig) -> Result<BlkifServer, BlkifError> {
        config.validate()?;
        let (stop, rx) = crossbeam_channel::bounded(0);
        let stats = DeviceStats::default();
        let s = stats.clone();
        let crash = Arc::new(AtomicBool::new(false));
        let c = crash.clone();
        let thread = std::thread::Builder::new()
            .name("blkif".into())
            .spawn(move || serve_inner(&host, config, rx, s, &c))
            .map_err(BlkifError::Thread)?;
        Ok(BlkifServer {
            stop: Some(stop),
            thread: Some(thread),
            stats,
            crash,
        })
    }

    /// Per-device counters.
    pub fn stats(&self) -> &DeviceStats {
        &self.stats
    }

    /// Stop serving (in-flight requests are answered) and wait.
    ///
    /// # Errors
    /// What [`serve`] returned.
    pub fn shutdown(mut self) -> Result<(), BlkifError> {
        self.finish()
    }

    /// Stop as a SIGKILLed backend process stops, for tests of the restart path (failover
    /// tier 1): no more requests are taken, the in-flight ones are never answered, every ring
    /// mapping and event channel is released, and xenstore is left as it is. Workers already
    /// running a request may still finish its disk work.
    ///
    /// # Errors
    /// What [`serve`] returned.
    #[doc(hidden)]
    pub fn crash(mut self) -> Result<(), BlkifError> {
        self.crash.store(true, Ordering::Release);
        self.finish()
    }

    fn finish(&mut self) -> Result<(), BlkifError> {
        drop(self.stop.take());
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(BlkifError::Config("the blkif thread panicked".into()))),
            None => Ok(()),
        }
    }
}

impl Drop for BlkifServer {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
