//! The pager: xenpaging's protocol on the [`remoca_xen::Host`] capability traits.
//!
//! ```text
//!   guest touches a paged-out gfn            pager (this module, one thread)
//!   Xen pauses the vCPU, posts a request --> ring --> serve_faults: store.get, check hash,
//!   and fires the event channel                       load, response(version), notify,
//!                                                     resume            (always first)
//!   tot_pages above target  ----------------------->  evict_batch: CLOCK picks victims,
//!                                                     nominate, foreign-map + copy,
//!                                                     store.put_batch, journal Out + fsync,
//!                                                     evict
//! ```
//!
//! Invariants:
//! - A page is evicted only after its copy is acknowledged by the store *and* its journal
//!   record is on disk, so a crash never leaves a page out that no one can find.
//! - Faults are served before any eviction work, and again between nominating and
//!   copying a batch, so a blocked vCPU never waits behind a batch.
//! - Responses carry the hypervisor's own vm_event version (Xen drops any other).
//! - The pager never disables paging with pages out (Xen would crash the guest):
//!   [`Pager::shutdown`] pages everything back first and refuses to disable otherwise.
//! - A restarted pager finds paging still enabled (`EBUSY`); it loads every page the
//!   journal lists from the store, disables paging (which also releases vCPUs blocked on
//!   the dead pager's ring), and enables it afresh.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use remoca_xen::abi::vm_event::{VmEvent, PAGING_DROP_PAGE};
use remoca_xen::mem_paging::unavailable_reason;
use remoca_xen::ring::{BackRing, RingError};
use remoca_xen::{DomId, EventChannelHandle, Gfn, Host, Port, Tx, Watch, PAGE_SIZE};

use crate::journal::format::Record;
use crate::journal::{Journal, JournalError};
use crate::store::{PageStore, StoreError};
use crate::victim::Clock;

/// KiB in a page (xenstore sizes are in KiB).
pub const PAGE_KIB: u64 = (PAGE_SIZE / 1024) as u64;

/// How long evictions pause after the store refused a batch.
const PUT_RETRY: Duration = Duration::from_secs(1);

/// What the pager holds the domain to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A fixed size in KiB (`--target`).
    Kib(u64),
    /// Follow xenstore `/local/domain/<id>/memory/target-tot_pages` (KiB), watched.
    Xenstore,
}

/// Validated pager settings.
#[derive(Debug, Clone)]
pub struct PagerConfig {
    pub dom: DomId,
    pub target: Target,
    /// The journal file (one per domain).
    pub journal: PathBuf,
    /// Pages nominated, copied, stored and evicted together.
    pub batch: usize,
    /// Longest wait for an event when there is nothing to do.
    pub idle_wait: Duration,
}

impl PagerConfig {
    /// Batches of 64, 100 ms idle wait.
    pub fn new(dom: DomId, target: Target, journal: PathBuf) -> Self {
        PagerConfig {
            dom,
            target,
            journal,
            batch: 64,
            idle_wait: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    /// `enable` failed for a reason an operator must fix (see `unavailable_reason`).
    #[error("mem_paging is unavailable for domain {dom}: {reason}")]
    Unavailable {
        dom: DomId,
        reason: &'static str,
        #[source]
        source: remoca_xen::Error,
    },
    #[error("{op}")]
    Xen {
        op: &'static str,
        #[source]
        source: remoca_xen::Error,
    },
    #[error("vm_event ring")]
    Ring(#[from] RingError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Pages the store could not give back; paging stays enabled so they are not lost.
    #[error("{} page(s) of domain {dom} could not be paged back (first {:#x})", gfns.len(), gfns.first().copied().unwrap_or(0))]
    PagesLost {
        dom: DomId,
        gfns: Vec<Gfn>,
        #[source]
        last: Option<StoreError>,
    },
}

fn xen(op: &'static str) -> impl FnOnce(remoca_xen::Error) -> PagerError {
    move |source| PagerError::Xen { op, source }
}

/// Counters a person can read (`remoca up`, `remoca pager` status lines).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PagerStats {
    pub dom: DomId,
    /// Target in pages, if any.
    pub target_pages: Option<u64>,
    /// Pages present in the guest (`tot_pages`).
    pub resident_pages: u64,
    /// Pages out (in the store).
    pub out_pages: u64,
    pub evicted: u64,
    pub faults: u64,
    pub nominate_busy: u64,
    pub evict_busy: u64,
    pub put_failures: u64,
    /// Faults waiting for a page the store cannot give right now.
    pub unserved_faults: u64,
    /// Set once the store lost a page: evictions stop and everything else was paged back.
    pub store_lost: Option<String>,
}

impl std::fmt::Display for PagerStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kib = |p: u64| p * PAGE_KIB;
        write!(
            f,
            "dom {} resident {} KiB, out {} KiB, target {}; evicted {}, faults {}, busy {}/{}",
            self.dom,
            kib(self.resident_pages),
            kib(self.out_pages),
            self.target_pages
                .map_or("none".to_string(), |t| format!("{} KiB", kib(t))),
            self.evicted,
            self.faults,
            self.nominate_busy,
            self.evict_busy,
        )?;
        if self.put_failures > 0 {
            write!(f, ", store refused {} batches", self.put_failures)?;
        }
        if let Some(why) = &self.store_lost {
            write!(f, ", STORE LOST: {why}")?;
        }
        Ok(())
    }
}

/// What [`Pager::shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    pub paged_back: u64,
}

/// A failed shutdown hands the pager back: paging is still enabled and the pager can keep
/// serving faults for the pages it could not bring back.
#[derive(Debug, thiserror::Error)]
#[error("pager shutdown")]
pub struct ShutdownFailed {
    pub pager: Box<Pager>,
    #[source]
    pub error: PagerError,
}

/// What one [`Pager::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Faults answered and/or pages evicted.
    Worked { faults: usize, evicted: usize },
    /// Nothing to do; waited for an event (or `idle_wait`).
    Idle,
}

/// A running pager for one domain.
pub struct Pager {
    host: Host,
    dom: DomId,
    version: u32,
    ring: BackRing<VmEvent, VmEvent>,
    evtchn: Box<dyn EventChannelHandle>,
    port: Port,
    store: Arc<dyn PageStore>,
    journal: Journal,
    clock: Clock,
    target: Target,
    target_watch: Option<Watch>,
    batch: usize,
    idle_wait: Duration,
    /// Requests whose page could not be fetched yet; retried every step.
    waiting: VecDeque<VmEvent>,
    evictions_paused_until: Option<Instant>,
    stats: PagerStats,
}

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager")
            .field("dom", &self.dom)
            .field("port", &self.port)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// The xenstore path of a domain's paging target.
pub fn target_path(dom: DomId) -> String {
    format!("/local/domain/{dom}/memory/target-tot_pages")
}

fn kib_to_pages(kib: u64) -> u64 {
    kib / PAGE_KIB
}

/// Fetch a page and check it is the copy the journal recorded.
fn fetch(store: &dyn PageStore, dom: DomId, gfn: Gfn, hash: u64) -> Result<Vec<u8>, StoreError> {
    let page = store.get(dom, gfn)?;
    if page.len() != PAGE_SIZE || twox_hash::XxHash3_64::oneshot(&page) != hash {
        return Err(StoreError::Unavailable {
            source: format!("page {gfn:#x} of domain {dom}: store copy does not match the journal")
                .into(),
        });
    }
    Ok(page)
}

/// Load every page the journal lists, without a ring (a previous pager's ring is still
/// enabled). Pages Xen refuses with `EINVAL` are resident already (their `In` record was
/// lost). Returns the pages that could not be fetched.
fn load_all(
    host: &Host,
    dom: DomId,
    store: &dyn PageStore,
    journal: &mut Journal,
) -> Result<(u64, Vec<Gfn>, Option<StoreError>), PagerError> {
    let mut list: Vec<(Gfn, u64)> = journal.out().iter().map(|(g, h)| (*g, *h)).collect();
    list.sort_unstable();
    let before: Vec<Gfn> = list.iter().map(|(g, _)| *g).collect();
    let (mut loaded, mut lost, mut last) = (0, Vec::new(), None);
    for (gfn, hash) in list {
        match fetch(store, dom, gfn, hash) {
            Ok(page) => {
                match host.paging.load(dom, gfn, &page) {
                    Ok(()) => loaded += 1,
                    Err(e) if e.is_errno(libc::EINVAL) => {}
                    Err(e) => return Err(xen("loading a page back")(e)),
                }
                journal.record(Record::In { gfn });
            }
            Err(e) => {
                tracing::error!(dom, gfn, error = %e, "cannot page back");
                lost.push(gfn);
                last = Some(e);
            }
        }
    }
    journal.sync()?;
    let back: Vec<Gfn> = before.into_iter().filter(|g| !lost.contains(g)).collect();
    if let Err(e) = store.remove(dom, &back) {
        tracing::debug!(dom, error = %e, "store did not forget paged-in pages");
    }
    Ok((loaded, lost, last))
}

impl Pager {
    /// Enable paging for `config.dom` (recovering a previous pager's pages from the journal
    /// if paging is still enabled) and bind its event channel.
    ///
    /// # Errors
    /// `Unavailable` with the reason when the hypervisor cannot page this guest; `PagesLost`
    /// when a restart cannot bring back a previous pager's pages; Xen, ring and journal
    /// errors.
    pub fn start(
        host: &Host,
        config: PagerConfig,
        store: Arc<dyn PageStore>,
    ) -> Result<Pager, PagerError> {
        let dom = config.dom;
        let version = host
            .domains
            .hypervisor()
            .map_err(xen("reading the hypervisor version"))?
            .vm_event_version;
        let info = host.domains.info(dom).map_err(xen("reading the domain"))?;
        let mut journal = Journal::open(&config.journal, dom)?;
        let ring = match host.paging.enable(dom) {
            Ok(ring) => {
                if !journal.out().is_empty() {
                    // Paging was off, so no page can be out: the journal is from an earlier
                    // life of this domain id.
                    tracing::warn!(
                        dom,
                        stale = journal.out().len(),
                        "journal lists pages out but paging was disabled; forgetting them"
                    );
                    let gfns: Vec<Gfn> = journal.out().keys().copied().collect();
                    for gfn in gfns {
                        journal.record(Record::In { gfn });
                    }
                    journal.sync()?;
                }
                ring
            }
            Err(e) if e.is_errno(libc::EBUSY) => {
                tracing::info!(
                    dom,
                    out = journal.out().len(),
                    "paging already enabled: a previous pager died; paging its pages back in"
                );
                let (loaded, lost, last) = load_all(host, dom, &*store, &mut journal)?;
                if !lost.is_empty() {
                    return Err(PagerError::PagesLost {
                        dom,
                        gfns: lost,
                        last,
                    });
                }
                tracing::info!(dom, loaded, "recovered; re-enabling paging");
                host.paging
                    .disable(dom)
                    .map_err(xen("disabling the previous pager's ring"))?;
                host.paging
                    .enable(dom)
                    .map_err(xen("re-enabling mem_paging"))?
            }
            Err(e) => {
                return Err(match e.errno().and_then(unavailable_reason) {
                    Some(reason) => PagerError::Unavailable {
                        dom,
                        reason,
                        source: e,
                    },
                    None => xen("enabling mem_paging")(e),
                })
            }
        };
        let evtchn = host.evtchn.open().map_err(xen("opening event channels"))?;
        let port = evtchn
            .bind_interdomain(dom, ring.remote_port)
            .map_err(xen("binding the paging event channel"))?;
        let ring = BackRing::new(Arc::new(ring.ring))?;
        let target_watch = match config.target {
            Target::Xenstore => Some(
                host.store
                    .watch(&target_path(dom), "remoca-pager-target")
                    .map_err(xen("watching the paging target"))?,
            ),
            Target::Kib(_) => None,
        };
        let mut pager = Pager {
            host: host.clone(),
            dom,
            version,
            ring,
            evtchn,
            port,
            store,
            journal,
            clock: Clock::new(info.max_pages),
            target: config.target,
            target_watch,
            batch: config.batch.max(1),
            idle_wait: config.idle_wait,
            waiting: VecDeque::new(),
            evictions_paused_until: None,
            stats: PagerStats {
                dom,
                ..PagerStats::default()
            },
        };
        pager.read_target();
        pager.stats.resident_pages = info.tot_pages;
        tracing::info!(dom, port, version, "pager started");
        Ok(pager)
    }

    pub fn stats(&self) -> &PagerStats {
        &self.stats
    }

    pub fn dom(&self) -> DomId {
        self.dom
    }

    /// Pages out now.
    pub fn out_pages(&self) -> u64 {
        self.journal.out().len() as u64
    }

    /// Override the target (KiB).
    pub fn set_target_kib(&mut self, kib: u64) {
        self.target = Target::Kib(kib);
        self.target_watch = None;
        self.stats.target_pages = Some(kib_to_pages(kib));
    }

    fn read_target(&mut self) {
        self.stats.target_pages = match self.target {
            Target::Kib(kib) => Some(kib_to_pages(kib)),
            Target::Xenstore => remoca_xen::xenstore::read_string(
                &*self.host.store,
                Tx::NONE,
                &target_path(self.dom),
            )
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(kib_to_pages),
        };
    }

    fn poll_target(&mut self) {
        let mut fired = false;
        if let Some(w) = &self.target_watch {
            while w.try_next().is_some() {
                fired = true;
            }
        }
        if fired {
            let before = self.stats.target_pages;
            self.read_target();
            if before != self.stats.target_pages {
                tracing::info!(dom = self.dom, target = ?self.stats.target_pages, "paging target changed");
            }
        }
    }

    /// Serve faults, then evict one batch if the guest is above its target, else wait for
    /// an event (at most `idle_wait`).
    ///
    /// # Errors
    /// Xen, ring and journal errors.
    pub fn step(&mut self) -> Result<Step, PagerError> {
        self.poll_target();
        let faults = self.serve_faults()?;
        let evicted = self.evict_if_above_target()?;
        if faults + evicted > 0 {
            return Ok(Step::Worked { faults, evicted });
        }
        if self.ring.final_check_for_requests()? {
            return Ok(Step::Worked {
                faults: 0,
                evicted: 0,
            });
        }
        if let Some(p) = self
            .evtchn
            .wait(self.idle_wait)
            .map_err(xen("waiting on the event channel"))?
        {
            self.evtchn
                .unmask(p)
                .map_err(xen("unmasking the event channel"))?;
        }
        Ok(Step::Idle)
    }

    /// Step until `stop` is set.
    ///
    /// # Errors
    /// As [`Pager::step`].
    pub fn run_until(&mut self, stop: &AtomicBool) -> Result<(), PagerError> {
        while !stop.load(Ordering::Relaxed) {
            self.step()?;
        }
        Ok(())
    }

    /// Answer every request on the ring (and retry earlier ones whose page was not
    /// available). Returns the number answered.
    fn serve_faults(&mut self) -> Result<usize, PagerError> {
        let retries = self.waiting.len();
        let mut todo: Vec<VmEvent> = self.waiting.drain(..).collect();
        while let Some(req) = self.ring.next_request()? {
            self.stats.faults += 1;
            todo.push(req);
        }
        if todo.is_empty() {
            return Ok(0);
        }
        let mut answered = 0;
        let mut back_in = Vec::new();
        for (i, req) in todo.into_iter().enumerate() {
            let p = req.paging_data();
            let gfn = p.gfn;
            let out = self.journal.out().get(&gfn).copied();
            match out {
                Some(_) if p.flags & PAGING_DROP_PAGE != 0 => {
                    // The guest dropped the page: nothing to load.
                    self.journal.record(Record::In { gfn });
                    self.clock.paged_in(gfn);
                    back_in.push(gfn);
                }
                Some(hash) => match fetch(&*self.store, self.dom, gfn, hash) {
                    Ok(page) => {
                        match self.host.paging.load(self.dom, gfn, &page) {
                            Ok(()) => {}
                            Err(e) if e.is_errno(libc::EINVAL) => {
                                tracing::debug!(dom = self.dom, gfn, "page already resident");
                            }
                            Err(e) => return Err(xen("loading a faulted page")(e)),
                        }
                        self.journal.record(Record::In { gfn });
                        self.clock.paged_in(gfn);
                        back_in.push(gfn);
                    }
                    Err(e) => {
                        // Logged once per fault, not on every retry (a guest can trigger it).
                        if i >= retries {
                            tracing::error!(dom = self.dom, gfn, error = %e, "fault cannot be served");
                        }
                        self.waiting.push_back(req);
                        if self.stats.store_lost.is_none() {
                            self.stats.store_lost = Some(e.to_string());
                            self.page_back_what_can_be()?;
                        }
                        continue;
                    }
                },
                None => {
                    // Not ours (a duplicate request for a page already loaded): answer so
                    // the vCPU runs.
                    tracing::debug!(dom = self.dom, gfn, "request for a page not out");
                }
            }
            let mut rsp = req.response();
            rsp.version = self.version;
            self.ring.push_response(rsp);
            answered += 1;
        }
        self.stats.unserved_faults = self.waiting.len() as u64;
        self.journal.flush()?;
        if answered > 0 {
            self.ring.publish();
            self.evtchn
                .notify(self.port)
                .map_err(xen("notifying the paging event channel"))?;
            self.host
                .paging
                .resume(self.dom)
                .map_err(xen("resuming the domain's vCPUs"))?;
        }
        if !back_in.is_empty() {
            if let Err(e) = self.store.remove(self.dom, &back_in) {
                tracing::debug!(dom = self.dom, error = %e, "store did not forget paged-in pages");
            }
        }
        self.stats.out_pages = self.out_pages();
        Ok(answered)
    }

    /// The store lost a page: stop evicting and bring back every page it still has, so
    /// the guest depends on the store as little as possible.
    fn page_back_what_can_be(&mut self) -> Result<(), PagerError> {
        let (loaded, lost, _) = load_all(&self.host, self.dom, &*self.store, &mut self.journal)?;
        for g in self.journal.out().keys().copied().collect::<Vec<_>>() {
            self.clock.paged_out(g);
        }
        tracing::error!(
            dom = self.dom,
            loaded,
            lost = lost.len(),
            "page store lost pages: paged back what it still had; evictions stopped"
        );
        Ok(())
    }

    fn evict_if_above_target(&mut self) -> Result<usize, PagerError> {
        if self.stats.store_lost.is_some() {
            return Ok(0);
        }
        if let Some(t) = self.evictions_paused_until {
            if Instant::now() < t {
                return Ok(0);
            }
            self.evictions_paused_until = None;
        }
        let Some(target) = self.stats.target_pages else {
            return Ok(0);
        };
        let info = self
            .host
            .domains
            .info(self.dom)
            .map_err(xen("reading the domain's size"))?;
        self.stats.resident_pages = info.tot_pages;
        let excess = info.tot_pages.saturating_sub(target);
        if excess == 0 {
            return Ok(0);
        }
        self.evict_batch(excess.min(self.batch as u64) as usize)
    }

    /// Nominate, copy, store, journal and evict up to `n` pages. Returns pages evicted.
    fn evict_batch(&mut self, n: usize) -> Result<usize, PagerError> {
        let dom = self.dom;
        let mut nominated = Vec::with_capacity(n);
        for gfn in self.clock.pick(n) {
            match self.host.paging.nominate(dom, gfn) {
                Ok(()) => nominated.push(gfn),
                Err(e) if e.is_errno(libc::EBUSY) => {
                    self.stats.nominate_busy += 1;
                    self.clock.referenced(gfn);
                }
                Err(e) => {
                    tracing::debug!(dom, gfn, error = %e, "page cannot be paged; excluded");
                    self.clock.exclude(gfn);
                }
            }
        }
        if nominated.is_empty() {
            return Ok(0);
        }
        // A vCPU may have faulted while we nominated: it goes first.
        self.serve_faults()?;
        let (map, errs) = self
            .host
            .foreign
            .map_sparse(dom, &nominated, false)
            .map_err(xen("mapping nominated pages"))?;
        let mut buf = vec![0u8; nominated.len() * PAGE_SIZE];
        let mut copied = Vec::with_capacity(nominated.len());
        for (i, gfn) in nominated.iter().enumerate() {
            if errs[i] != 0 {
                // Left nominated: Xen turns it back into RAM on the next access.
                continue;
            }
            let slot = &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            map.read(i * PAGE_SIZE, slot)
                .map_err(xen("copying a nominated page"))?;
            copied.push((*gfn, i));
        }
        drop(map);
        let pages: Vec<(Gfn, &[u8])> = copied
            .iter()
            .map(|&(g, i)| (g, &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]))
            .collect();
        if let Err(e) = self.store.put_batch(dom, &pages) {
            // Nothing is evicted; the nominated pages turn back into RAM when touched.
            self.stats.put_failures += 1;
            self.evictions_paused_until = Some(Instant::now() + PUT_RETRY);
            for &(g, _) in &copied {
                self.clock.referenced(g);
            }
            tracing::warn!(dom, error = %e, "store refused a batch; evictions paused");
            return Ok(0);
        }
        for (g, page) in &pages {
            self.journal.record(Record::Out {
                gfn: *g,
                hash: twox_hash::XxHash3_64::oneshot(page),
            });
        }
        self.journal.sync()?;
        let mut evicted = 0;
        let mut kept = Vec::new();
        for &(gfn, _) in &copied {
            match self.host.paging.evict(dom, gfn) {
                Ok(()) => {
                    evicted += 1;
                    self.clock.paged_out(gfn);
                }
                Err(e) => {
                    if e.is_errno(libc::EBUSY) {
                        self.stats.evict_busy += 1;
                        self.clock.referenced(gfn);
                    } else {
                        tracing::warn!(dom, gfn, error = %e, "evict failed");
                        self.clock.exclude(gfn);
                    }
                    self.journal.record(Record::In { gfn });
                    kept.push(gfn);
                }
            }
        }
        self.journal.flush()?;
        if !kept.is_empty() {
            let _ = self.store.remove(dom, &kept);
        }
        self.stats.evicted += evicted as u64;
        self.stats.out_pages = self.out_pages();
        Ok(evicted)
    }

    /// Page everything back, answer every waiting vCPU, then disable paging. The domain
    /// keeps running. If a page cannot be brought back, paging stays enabled (disabling
    /// would crash the guest) and the pager is handed back in the error.
    ///
    /// # Errors
    /// [`ShutdownFailed`] with `PagesLost` or the Xen/journal error.
    pub fn shutdown(mut self) -> Result<ShutdownReport, ShutdownFailed> {
        match self.page_back_and_disable() {
            Ok(r) => Ok(r),
            Err(error) => Err(ShutdownFailed {
                pager: Box::new(self),
                error,
            }),
        }
    }

    fn page_back_and_disable(&mut self) -> Result<ShutdownReport, PagerError> {
        self.serve_faults()?;
        let (loaded, lost, last) = load_all(&self.host, self.dom, &*self.store, &mut self.journal)?;
        // Requests that arrived meanwhile are for pages now loaded: answer them.
        self.serve_faults()?;
        if !lost.is_empty() {
            return Err(PagerError::PagesLost {
                dom: self.dom,
                gfns: lost,
                last,
            });
        }
        self.journal.compact()?;
        self.host
            .paging
            .disable(self.dom)
            .map_err(xen("disabling mem_paging"))?;
        let _ = self.evtchn.unbind(self.port);
        tracing::info!(dom = self.dom, loaded, "pager stopped; every page is back");
        Ok(ShutdownReport { paged_back: loaded })
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        let out = self.journal.out().len();
        if out > 0 {
            // Do not disable: Xen would crash the guest. A pager started with the same
            // journal and store brings the pages back.
            tracing::warn!(
                dom = self.dom,
                out,
                journal = %self.journal.path().display(),
                "pager dropped with pages out; restart it with the same journal"
            );
        }
        let _ = self.journal.flush();
    }
}
