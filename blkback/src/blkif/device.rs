//! One blkif device's control thread: the backend half of the xenbus state machine.
//!
//! ```text
//!  new device dir ──open disk, publish features──▶ InitWait(2)
//!  InitWait + front Initialised(3)/Connected(4) ──map ring, bind port──▶ Connected(4)
//!  Connected + front Closing(5)/Closed(6)/gone ──drain, unmap, unbind──▶ Closed(6)
//!  toolstack writes our state = Closing(5) (xl block-detach, domain teardown)  ──▶ Closed(6)
//!  Closed + front Initialising(1)/InitWait(2) again (frontend reconnect) ──▶ InitWait(2)
//!  backend dir removed by the toolstack ──▶ thread ends
//! ```
//!
//! At start, a device whose backend is already Connected with a Connected frontend (this
//! process restarted under a live guest) is re-attached: the still-granted ring is mapped
//! again, the frontend's port re-bound, and unanswered requests replayed.
//!
//! The backend writes only its own keys (`state` and the feature/disk keys); it never
//! removes anything: the directories belong to the toolstack.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{select, Receiver};
use remoca_xen::{DomId, Host};

use crate::workers::WorkerPool;

use super::dataplane::{Connect, Dataplane, RingStats};
use super::params::{resolve, ResolvedDisk};
use super::parse::Limits;
use super::xenbus::{
    publish, read_frontend_ring, read_opt, read_state, write_state, Features, XenbusState,
    VDISK_CDROM, VDISK_READONLY,
};
use super::{BlkifConfig, BlkifError};

/// Where a device lives.
#[derive(Debug, Clone)]
pub(crate) struct DeviceId {
    pub frontend_id: DomId,
    pub devid: u32,
    /// `/local/domain/<backdom>/backend/vbd3/<domid>/<devid>`.
    pub backend: String,
}

impl DeviceId {
    pub fn name(&self) -> String {
        format!("{}/{}", self.frontend_id, self.devid)
    }
}

struct Device {
    host: Host,
    id: DeviceId,
    config: Arc<BlkifConfig>,
    pool: Arc<WorkerPool>,
    frontend: String,
    disk: ResolvedDisk,
    features: Features,
    /// What we last wrote to our `state`.
    state: XenbusState,
    dataplane: Option<Dataplane>,
    stats: Arc<RingStats>,
}

/// Run a device until its backend directory is removed or `stop` fires. When `crash` is set
/// by then, the ring is dropped as a killed process would leave it (tests of the restart).
pub(crate) fn run(
    host: Host,
    id: DeviceId,
    config: Arc<BlkifConfig>,
    pool: Arc<WorkerPool>,
    stats: Arc<RingStats>,
    stop: Receiver<()>,
    crash: &AtomicBool,
) {
    let span = tracing::info_span!("blkif-device", device = %id.name());
    let _enter = span.enter();
    let store = host.store.clone();
    let back_watch = match store.watch(&id.backend, &format!("remoca-blkif-back-{}", id.name())) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the backend directory");
            return;
        }
    };
    let backend = id.backend.clone();
    let mut dev = match Device::open(host, id, config, pool, stats) {
        Ok(Some(d)) => d,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %e, "device not served");
            // Stay until the toolstack removes the device, so it is not retried in a loop.
            wait_until_gone(&*store, &backend, &back_watch, &stop);
            return;
        }
    };
    let front_watch = match store.watch(
        &format!("{}/state", dev.frontend),
        &format!("remoca-blkif-front-{}", dev.id.name()),
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the frontend");
            return;
        }
    };
    loop {
        match dev.step() {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::error!(error = %e, "handshake failed; device closed");
                dev.close();
            }
        }
        select! {
            recv(back_watch.receiver()) -> ev => if ev.is_err() { break },
            recv(front_watch.receiver()) -> ev => if ev.is_err() { break },
            recv(stop) -> _ => break,
        }
    }
    // Shutdown or removal: answer what is in flight and release the ring, but leave the
    // xenstore state as it is so a restarted backend can re-attach to a live frontend.
    if let Some(dp) = dev.dataplane.take() {
        if crash.load(Ordering::Acquire) {
            dp.abandon();
        } else {
            dp.stop();
        }
    }
}

/// Idle until the toolstack removes the backend directory (or shutdown).
fn wait_until_gone(
    store: &dyn remoca_xen::XenStore,
    backend: &str,
    watch: &remoca_xen::Watch,
    stop: &Receiver<()>,
) {
    let key = format!("{backend}/frontend-id");
    while matches!(read_opt(store, &key), Ok(Some(_))) {
        select! {
            recv(watch.receiver()) -> ev => if ev.is_err() { return },
            recv(stop) -> _ => return,
        }
    }
}

impl Device {
    /// Read the toolstack's keys, open the disk and publish InitWait (or re-attach to a
    /// connected frontend). `Ok(None)` when the directory vanished meanwhile.
    fn open(
        host: Host,
        id: DeviceId,
        config: Arc<BlkifConfig>,
        pool: Arc<WorkerPool>,
        stats: Arc<RingStats>,
    ) -> Result<Option<Device>, BlkifError> {
        let store_arc = host.store.clone();
        let store = &*store_arc;
        let key = |k: &str| format!("{}/{k}", id.backend);
        let Some(frontend) = read_opt(store, &key("frontend"))? else {
            return Ok(None);
        };
        let Some(params) = read_opt(store, &key("params"))? else {
            return Err(BlkifError::Params(format!("{} is missing", key("params"))));
        };
        let mode = read_opt(store, &key("mode"))?;
        let cdrom = read_opt(store, &key("device-type"))?.as_deref() == Some("cdrom");
        let disk = resolve(
            &params,
            mode.as_deref(),
            config.exports.as_ref(),
            config.write_through,
        )?;
        let discard_enable = read_opt(store, &key("discard-enable"))?.as_deref() != Some("0");
        tracing::info!(disk = %disk.description, read_only = disk.read_only, "opened");
        let mut info = 0;
        if disk.read_only {
            info |= VDISK_READONLY;
        }
        if cdrom {
            info |= VDISK_CDROM;
        }
        let features = Features {
            sectors: disk.disk.size() / 512,
            info,
            discard: !disk.read_only && discard_enable,
            max_indirect_segments: config.max_indirect_segments,
            max_ring_page_order: config.max_ring_page_order,
        };
        let mut dev = Device {
            host,
            id,
            config,
            pool,
            frontend: frontend.trim().to_owned(),
            disk,
            features,
            state: XenbusState::Unknown,
            dataplane: None,
            stats,
        };
        let ours = read_state(store, &dev.id.backend)?;
        let theirs = read_state(store, &dev.frontend)?;
        if ours == XenbusState::Connected && theirs == XenbusState::Connected {
            tracing::info!("backend and frontend already connected: re-attaching to the ring");
            dev.state = XenbusState::InitWait;
            match dev.connect(true) {
                Ok(()) => return Ok(Some(dev)),
                Err(e) => tracing::warn!(error = %e, "re-attach failed; starting over"),
            }
        }
        publish(store, &dev.id.backend, &dev.features, XenbusState::InitWait)?;
        dev.state = XenbusState::InitWait;
        Ok(Some(dev))
    }

    /// React to the current states. `Ok(false)` when the device is gone.
    fn step(&mut self) -> Result<bool, BlkifError> {
        let store = self.host.store.clone();
        if read_opt(&*store, &format!("{}/frontend-id", self.id.backend))?.is_none() {
            tracing::info!("backend directory removed");
            return Ok(false);
        }
        let ours = read_state(&*store, &self.id.backend)?;
        if ours == XenbusState::Closing && self.state != XenbusState::Closing {
            tracing::info!("toolstack asked to close");
            self.close();
            return Ok(true);
        }
        let theirs = read_state(&*store, &self.frontend)?;
        match (self.state, theirs) {
            (XenbusState::InitWait, XenbusState::Initialised | XenbusState::Connected) => {
                self.connect(false)?;
            }
            (
                XenbusState::InitWait | XenbusState::Connected,
                XenbusState::Closing | XenbusState::Closed | XenbusState::Unknown,
            ) => {
                tracing::info!(frontend = ?theirs, "frontend is going away");
                self.close();
            }
            (XenbusState::Closed, XenbusState::Initialising | XenbusState::InitWait)
                if self.online()? =>
            {
                tracing::info!("frontend reconnecting");
                publish(
                    &*store,
                    &self.id.backend,
                    &self.features,
                    XenbusState::InitWait,
                )?;
                self.state = XenbusState::InitWait;
            }
            _ => {}
        }
        Ok(true)
    }

    /// The toolstack's `online` flag (absent counts as online).
    fn online(&self) -> Result<bool, BlkifError> {
        let online = read_opt(&*self.host.store, &format!("{}/online", self.id.backend))?;
        Ok(online.as_deref().map(str::trim) != Some("0"))
    }

    fn connect(&mut self, attach: bool) -> Result<(), BlkifError> {
        let store = self.host.store.clone();
        let ring = read_frontend_ring(&*store, &self.frontend, self.config.max_ring_page_order)?;
        let dp = Dataplane::start(Connect {
            host: &self.host,
            name: self.id.name(),
            dom: self.id.frontend_id,
            ring: &ring,
            disk: self.disk.clone(),
            discard: self.features.discard,
            limits: Limits {
                max_indirect_segments: self.config.max_indirect_segments,
            },
            pool: self.pool.clone(),
            attach,
            stats: self.stats.clone(),
        })?;
        self.dataplane = Some(dp);
        if let Err(e) = publish(
            &*store,
            &self.id.backend,
            &self.features,
            XenbusState::Connected,
        ) {
            if let Some(dp) = self.dataplane.take() {
                dp.stop();
            }
            return Err(e);
        }
        self.state = XenbusState::Connected;
        tracing::info!(
            abi = ring.abi.name(),
            ring_pages = ring.refs.len(),
            attach,
            "connected"
        );
        Ok(())
    }

    /// Drain, unmap, unbind, then say Closed.
    fn close(&mut self) {
        if let Some(dp) = self.dataplane.take() {
            dp.stop();
        }
        self.state = XenbusState::Closed;
        if let Err(e) = write_state(&*self.host.store, &self.id.backend, XenbusState::Closed) {
            tracing::warn!(error = %e, "writing state Closed");
        }
        tracing::info!("closed");
    }
}
