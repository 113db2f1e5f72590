//! The request loop of one connected device: the frontend's ring mapped through the grant
//! tables, its event channel bound, requests decoded by [`super::parse`] and run on the
//! shared [`WorkerPool`], data moved by grant copy, responses posted with Xen's
//! notification hold-off.
//!
//! ```text
//!  ring thread:  wait(evtchn) -> unmask -> next_request* -> parse -> submit(job)
//!                     ^              (rejected requests are answered at once)
//!                     +-- final_check_for_requests (re-arms req_event) --+
//!  worker:       [indirect pages] -> grant copy in -> Disk -> grant copy out
//!                -> lock ring: answer in turn, publish, notify if rsp_event asks
//! ```
//!
//! Responses are pushed in the order the requests were taken from the ring: a request that
//! finishes before an earlier one waits for it. So whatever happens to this process, every
//! request before the published `rsp_prod` was answered and every one from there to
//! `req_prod` still sits untouched in its slot (a response only overwrites the slot of the
//! request it answers, and no later one). That is what lets a new backend process replay
//! exactly the unanswered requests after this one was killed (failover tier 1,
//! `docs/failover.md`); answering out of order would overwrite an unanswered request with a
//! later one's response and answer that later one twice. The price: a slow request holds
//! back the answers of faster ones behind it.
//!
//! A kill between writing a response into its slot and publishing `rsp_prod` leaves a
//! response where the replay expects a request. So every response carries a mark in its
//! padding ([`RESPONSE_MARK`] in the x86_64 layout's last four bytes, which in a request are
//! the high half of its id; [`RESPONSE_MARK_32`] in the x86_32 layout's pad byte, a byte of
//! the request's id there), and a re-attaching backend publishes marked responses it finds
//! from `rsp_prod` on instead of replaying those slots. Linux blkfront's ids are small ring
//! indexes, so no request of it carries a mark; a frontend whose ids do could have a request
//! taken for an answer.
//!
//! Invariants: a request is answered exactly once, whatever happens to it (a malformed
//! request, a bad grant or a disk error is `BLKIF_RSP_ERROR` for that request only; the
//! ring keeps serving). Teardown stops consuming, waits until every consumed request is
//! answered, then drops the ring mapping and unbinds the port, so nothing stays mapped.
//! Only a frontend whose producer index is impossible stops the ring.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use remoca_xen::abi::blkif::{
    Request, Request32, Response, Response32, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY,
};
use remoca_xen::ring::{BackRing, RingError};
use remoca_xen::{
    DomId, EventChannelHandle, GrantCopy, GrantHandle, GrantRef, Host, Port, PAGE_SIZE,
};

use crate::disk::check_range;
use crate::export::ExportStats;
use crate::request::{execute, Completion, Op};
use crate::workers::WorkerPool;

use super::params::ResolvedDisk;
use super::parse::{
    entry_bytes_32, entry_bytes_64, parse_indirect_segments, parse_request, Abi, BlkifOp,
    BlkifRequest, DataSegment, Limits, SECTOR_SIZE, SEGMENT_SIZE,
};
use super::xenbus::FrontendRing;
use super::BlkifError;

/// Written into the padding of every x86_64 response (`pad2`): "RMCA".
pub const RESPONSE_MARK: u32 = u32::from_le_bytes(*b"RMCA");
/// Written into the pad byte of every x86_32 response.
pub const RESPONSE_MARK_32: u8 = 0xa5;

/// How often an idle ring thread looks at its stop flag.
const IDLE_TICK: Duration = Duration::from_millis(100);
/// Guest-triggered warnings logged per device before going quiet (then every 1000th).
const LOUD_REJECTS: u64 = 8;

/// The ring in the frontend's ABI (closed set).
#[derive(Debug)]
enum Ring {
    X64(BackRing<Request, Response>),
    X32(BackRing<Request32, Response32>),
}

impl Ring {
    fn next(&mut self) -> Result<Option<Vec<u8>>, RingError> {
        Ok(match self {
            Ring::X64(r) => r.next_request()?.map(|e| entry_bytes_64(&e).to_vec()),
            Ring::X32(r) => r.next_request()?.map(|e| entry_bytes_32(&e).to_vec()),
        })
    }

    fn push(&mut self, id: u64, operation: u8, status: i16) {
        match self {
            Ring::X64(r) => r.push_response(Response {
                id,
                operation,
                pad: 0,
                status,
                pad2: RESPONSE_MARK,
            }),
            Ring::X32(r) => r.push_response(Response32 {
                id,
                operation,
                pad: RESPONSE_MARK_32,
                status,
            }),
        }
    }

    fn publish(&mut self) -> bool {
        match self {
            Ring::X64(r) => r.publish(),
            Ring::X32(r) => r.publish(),
        }
    }

    fn final_check(&mut self) -> Result<bool, RingError> {
        match self {
            Ring::X64(r) => r.final_check_for_requests(),
            Ring::X32(r) => r.final_check_for_requests(),
        }
    }

    /// After a re-attach: publish the responses a killed backend wrote but did not publish
    /// (marked ones, from `rsp_prod` on). Returns how many.
    fn adopt_written_responses(&mut self) -> Result<u32, RingError> {
        let answer = |status: i16| matches!(status, RSP_OKAY | RSP_ERROR | RSP_EOPNOTSUPP);
        let mut n = 0;
        while match self {
            Ring::X64(r) => {
                r.adopt_written_response(|x| x.pad2 == RESPONSE_MARK && answer(x.status))?
            }
            Ring::X32(r) => {
                r.adopt_written_response(|x| x.pad == RESPONSE_MARK_32 && answer(x.status))?
            }
        } {
            n += 1;
        }
        if n > 0 {
            self.publish();
        }
        Ok(n)
    }

    fn in_flight(&self) -> u32 {
        match self {
            Ring::X64(r) => r.in_flight(),
            Ring::X32(r) => r.in_flight(),
        }
    }
}

/// The mapped ring and the answers waiting for their turn.
#[derive(Debug)]
struct Live {
    ring: Ring,
    /// The number the next request taken from the ring gets.
    taken: u64,
    /// The number of the request whose response goes out next.
    answered: u64,
    /// Responses of requests that finished before an earlier one: (id, operation, status).
    early: BTreeMap<u64, (u64, u8, i16)>,
}

impl Live {
    fn new(ring: Ring) -> Live {
        Live {
            ring,
            taken: 0,
            answered: 0,
            early: BTreeMap::new(),
        }
    }

    /// Number the request just taken from the ring.
    fn take(&mut self) -> u64 {
        self.taken += 1;
        self.taken - 1
    }

    /// Record the response of request `seq` and push every response whose turn it now is.
    fn answer(&mut self, seq: u64, id: u64, operation: u8, status: i16) {
        if seq != self.answered {
            self.early.insert(seq, (id, operation, status));
            return;
        }
        self.ring.push(id, operation, status);
        self.answered += 1;
        while let Some((id, operation, status)) = self.early.remove(&self.answered) {
            self.ring.push(id, operation, status);
            self.answered += 1;
        }
    }
}

/// Counters of one device.
#[derive(Debug, Default)]
pub struct RingStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub rejected: AtomicU64,
}

/// State the ring thread and the workers share.
struct Shared {
    name: String,
    dom: DomId,
    abi: Abi,
    limits: Limits,
    /// `None` once torn down (the mapping is released with it).
    ring: Mutex<Option<Live>>,
    /// Signalled when the last in-flight request is answered.
    idle: Condvar,
    evtchn: Box<dyn EventChannelHandle>,
    port: Port,
    grants: Box<dyn GrantHandle>,
    disk: ResolvedDisk,
    discard: bool,
    stats: Arc<RingStats>,
}

/// A running request loop; [`Dataplane::stop`] tears it down.
pub(crate) struct Dataplane {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("device", &self.shared.name)
            .finish_non_exhaustive()
    }
}

/// What [`Dataplane::start`] needs.
pub(crate) struct Connect<'a> {
    pub host: &'a Host,
    pub name: String,
    pub dom: DomId,
    pub ring: &'a FrontendRing,
    pub disk: ResolvedDisk,
    pub discard: bool,
    pub limits: Limits,
    pub pool: Arc<WorkerPool>,
    /// Resume a ring a previous backend process served (requests between `rsp_prod` and
    /// `req_prod` are replayed) instead of starting from a fresh ring.
    pub attach: bool,
    pub stats: Arc<RingStats>,
}

impl Dataplane {
    /// Map the ring, bind the event channel and start the ring thread.
    ///
    /// # Errors
    /// [`BlkifError::Xen`] from mapping or binding (nothing stays mapped or bound), or
    /// [`BlkifError::Frontend`] for a ring too small to hold a request.
    pub fn start(c: Connect<'_>) -> Result<Dataplane, BlkifError> {
        let grants = c.host.grants.open()?;
        let map = Arc::new(grants.map(c.dom, &c.ring.refs, true)?);
        let bad_ring = |e: RingError| BlkifError::Frontend(e.to_string());
        let mut ring = match (c.ring.abi, c.attach) {
            (Abi::X86_64, false) => Ring::X64(BackRing::new(map).map_err(bad_ring)?),
            (Abi::X86_64, true) => Ring::X64(BackRing::attach(map).map_err(bad_ring)?),
            (Abi::X86_32, false) => Ring::X32(BackRing::new(map).map_err(bad_ring)?),
            (Abi::X86_32, true) => Ring::X32(BackRing::attach(map).map_err(bad_ring)?),
        };
        let mut adopted = 0;
        if c.attach {
            match ring.adopt_written_responses() {
                Ok(0) => {}
                Ok(n) => {
                    adopted = n;
                    tracing::info!(device = %c.name, responses = n, "re-attached ring: published the responses the last backend wrote")
                }
                Err(e) => {
                    tracing::warn!(device = %c.name, error = %e, "re-attached ring is inconsistent")
                }
            }
            let waiting = match &ring {
                Ring::X64(r) => r.unconsumed(),
                Ring::X32(r) => r.unconsumed(),
            };
            match waiting {
                Ok(n) => {
                    tracing::info!(device = %c.name, requests = n, "re-attached ring: replaying the unanswered requests")
                }
                Err(e) => {
                    tracing::warn!(device = %c.name, error = %e, "re-attached ring is inconsistent")
                }
            }
        }
        let evtchn = c.host.evtchn.open()?;
        let port = evtchn.bind_interdomain(c.dom, c.ring.port)?;
        if adopted > 0 {
            // Published before the port was ours: tell the frontend now.
            if let Err(e) = evtchn.notify(port) {
                tracing::warn!(device = %c.name, error = %e, "notifying the frontend");
            }
        }
        let shared = Arc::new(Shared {
            name: c.name,
            dom: c.dom,
            abi: c.ring.abi,
            limits: c.limits,
            ring: Mutex::new(Some(Live::new(ring))),
            idle: Condvar::new(),
            evtchn,
            port,
            grants,
            disk: c.disk,
            discard: c.discard,
            stats: c.stats,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (shared, stop, pool) = (shared.clone(), stop.clone(), c.pool);
            std::thread::Builder::new()
                .name(format!("blkif-{}", shared.name))
                .spawn(move || ring_loop(&shared, &stop, &pool))
                .map_err(BlkifError::Thread)?
        };
        Ok(Dataplane {
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Stop consuming requests, wait until every consumed one is answered, unmap the ring
    /// and unbind the event channel.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut ring = self.shared.ring.lock();
        while ring.as_ref().is_some_and(|r| r.ring.in_flight() > 0) {
            self.shared.idle.wait(&mut ring);
        }
        *ring = None;
        drop(ring);
        if let Err(e) = self.shared.evtchn.unbind(self.shared.port) {
            tracing::warn!(device = %self.shared.name, error = %e, "unbinding the event channel");
        }
    }
}

impl Dataplane {
    /// What a killed backend process leaves behind, for tests of the restart path: stop
    /// taking requests, drop the answers of those in flight (their workers may still finish
    /// the disk work, as a dying process's last writes may land), release the ring mapping
    /// and unbind the event channel, as the kernel does when the process dies.
    pub fn abandon(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        *self.shared.ring.lock() = None;
        if let Err(e) = self.shared.evtchn.unbind(self.shared.port) {
            tracing::warn!(device = %self.shared.name, error = %e, "unbinding the event channel");
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        // A dataplane dropped without stop() (a panic unwinding) still stops its thread.
        self.stop.store(true, Ordering::Release);
    }
}

fn ring_loop(shared: &Arc<Shared>, stop: &AtomicBool, pool: &WorkerPool) {
    let span = tracing::info_span!("blkif", device = %shared.name);
    let _enter = span.enter();
    // The ring is read on start (a re-attached ring may hold requests), then only when the
    // frontend's event fires, as on Xen: the idle tick only looks at the stop flag, so a
    // frontend or backend that gets the notification hold-off wrong stalls in tests
    // instead of being rescued by polling.
    let mut woken = true;
    loop {
        // Read the flag before the consume pass: once it is set, one more whole pass runs,
        // so whatever the frontend published before teardown began is answered.
        let stopping = stop.load(Ordering::Acquire);
        if woken || stopping {
            match consume(shared, pool) {
                Ok(true) if !stopping => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "frontend broke the ring protocol; no more requests are taken from it");
                    return;
                }
            }
        }
        if stopping {
            return;
        }
        woken = match shared.evtchn.wait(IDLE_TICK) {
            Ok(Some(p)) => {
                if let Err(e) = shared.evtchn.unmask(p) {
                    tracing::warn!(error = %e, "unmasking the event channel");
                }
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::error!(error = %e, "waiting on the event channel");
                return;
            }
        };
    }
}

/// Take every published request: answer malformed ones at once, hand the rest to the
/// workers. Returns whether more arrived after re-arming `req_event`.
fn consume(shared: &Arc<Shared>, pool: &WorkerPool) -> Result<bool, RingError> {
    let mut jobs = Vec::new();
    let result = {
        let mut guard = shared.ring.lock();
        let Some(live) = guard.as_mut() else {
            return Ok(false);
        };
        let mut result = Ok(());
        loop {
            match live.ring.next() {
                Ok(Some(entry)) => {
                    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
                    let seq = live.take();
                    match parse_request(shared.abi, &entry, shared.limits) {
                        Ok(req) => jobs.push((seq, req)),
                        Err(rej) => {
                            let n = shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                            if n < LOUD_REJECTS || n % 1000 == 0 {
                                tracing::warn!(id = rej.id, reason = %rej.reason, rejected = n + 1, "malformed request");
                            }
                            live.answer(seq, rej.id, rej.operation, rej.status);
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if live.ring.publish() {
            shared.notify();
        }
        result.and_then(|()| live.ring.final_check())
    };
    for (seq, req) in jobs {
        let s = shared.clone();
        pool.submit(move || s.serve(seq, req));
    }
    result
}

impl Shared {
    /// Kick the frontend. Called with the ring lock held, so teardown cannot unbind the port
    /// between the last response and its notification.
    fn notify(&self) {
        if let Err(e) = self.evtchn.notify(self.port) {
            tracing::warn!(device = %self.name, error = %e, "notifying the frontend");
        }
    }

    /// Run request number `seq` on a worker and answer it (in turn).
    fn serve(&self, seq: u64, req: BlkifRequest) {
        let status = match self.execute(&req) {
            Ok(()) => RSP_OKAY,
            Err(status) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                if let Some(e) = &self.disk.export {
                    ExportStats::add(&e.stats.errors, 1);
                }
                status
            }
        };
        let mut guard = self.ring.lock();
        if let Some(live) = guard.as_mut() {
            live.answer(seq, req.id, req.response_operation(), status);
            if live.ring.publish() {
                self.notify();
            }
            if live.ring.in_flight() == 0 {
                self.idle.notify_all();
            }
        }
    }

    fn execute(&self, req: &BlkifRequest) -> Result<(), i16> {
        match &req.op {
            BlkifOp::Read { sector, segments } => self.read(*sector, segments),
            BlkifOp::Write { sector, segments } => self.write(*sector, segments, false),
            BlkifOp::Flush { sector, segments } => {
                self.run(Op::Flush)?;
                self.count(|s| &s.flushes, 1);
                if segments.is_empty() {
                    Ok(())
                } else {
                    self.write(*sector, segments, true)
                }
            }
            BlkifOp::Discard {
                sector,
                nr_sectors,
                secure,
            } => {
                if *secure || !self.discard {
                    return Err(RSP_EOPNOTSUPP);
                }
                let len = nr_sectors.checked_mul(SECTOR_SIZE).ok_or(RSP_ERROR)?;
                self.run(Op::Discard {
                    offset: sector * SECTOR_SIZE,
                    len,
                    fua: false,
                })?;
                self.count(|s| &s.trims, 1);
                Ok(())
            }
            BlkifOp::Indirect {
                write,
                sector,
                nr_segments,
                pages,
            } => {
                let segments = self.indirect_segments(pages, usize::from(*nr_segments))?;
                if *write {
                    self.write(*sector, &segments, false)
                } else {
                    self.read(*sector, &segments)
                }
            }
        }
    }

    fn count(&self, counter: impl Fn(&ExportStats) -> &AtomicU64, n: u64) {
        if let Some(e) = &self.disk.export {
            ExportStats::add(counter(&e.stats), n);
        }
    }

    fn run(&self, op: Op) -> Result<Option<Vec<u8>>, i16> {
        match execute(&*self.disk.disk, op, 0) {
            Ok(Completion::Read { buf, .. }) => Ok(Some(buf)),
            Ok(Completion::Lent(data)) => Ok(Some(data.to_vec())),
            Ok(_) => Ok(None),
            Err(e) => {
                tracing::debug!(device = %self.name, error = %e.error, "disk request failed");
                Err(RSP_ERROR)
            }
        }
    }

    fn copy(&self, ops: &mut [GrantCopy<'_>]) -> Result<(), i16> {
        self.grants.copy(ops).map_err(|e| {
            let n = self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            if n < LOUD_REJECTS || n % 1000 == 0 {
                tracing::warn!(device = %self.name, error = %e, "grant copy failed");
            }
            RSP_ERROR
        })
    }

    fn checked_range(&self, sector: u64, segments: &[DataSegment]) -> Result<(u64, usize), i16> {
        let total: usize = segments.iter().map(DataSegment::len).sum();
        let offset = sector * SECTOR_SIZE;
        check_range(offset, total as u64, self.disk.disk.size()).map_err(|_| RSP_ERROR)?;
        Ok((offset, total))
    }

    fn read(&self, sector: u64, segments: &[DataSegment]) -> Result<(), i16> {
        let (offset, total) = self.checked_range(sector, segments)?;
        let buf = self
            .run(Op::Read {
                offset,
                len: total as u32,
            })?
            .unwrap_or_default();
        let mut ops = Vec::with_capacity(segments.len());
        let mut rest: &[u8] = &buf;
        for s in segments {
            let (head, tail) = rest.split_at(s.len());
            ops.push(GrantCopy::ToGuest {
                dom: self.dom,
                gref: s.gref,
                offset: s.offset(),
                buf: head,
            });
            rest = tail;
        }
        self.copy(&mut ops)?;
        self.count(|s| &s.reads, 1);
        self.count(|s| &s.bytes_read, total as u64);
        Ok(())
    }

    fn write(&self, sector: u64, segments: &[DataSegment], fua: bool) -> Result<(), i16> {
        if self.disk.read_only {
            return Err(RSP_ERROR);
        }
        let (offset, total) = self.checked_range(sector, segments)?;
        let mut data = vec![0u8; total];
        {
            let mut ops = Vec::with_capacity(segments.len());
            let mut rest: &mut [u8] = &mut data;
            for s in segments {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(s.len());
                ops.push(GrantCopy::FromGuest {
                    dom: self.dom,
                    gref: s.gref,
                    offset: s.offset(),
                    buf: head,
                });
                rest = tail;
            }
            self.copy(&mut ops)?;
        }
        self.run(Op::Write { offset, data, fua })?;
        self.count(|s| &s.writes, 1);
        self.count(|s| &s.bytes_written, total as u64);
        Ok(())
    }

    /// Fetch the segment descriptors of an indirect request from its granted pages.
    fn indirect_segments(&self, pages: &[GrantRef], count: usize) -> Result<Vec<DataSegment>, i16> {
        let mut bytes = vec![0u8; count * SEGMENT_SIZE];
        {
            let mut ops = Vec::with_capacity(pages.len());
            for (gref, chunk) in pages.iter().zip(bytes.chunks_mut(PAGE_SIZE)) {
                ops.push(GrantCopy::FromGuest {
                    dom: self.dom,
                    gref: *gref,
                    offset: 0,
                    buf: chunk,
                });
            }
            self.copy(&mut ops)?;
        }
        parse_indirect_segments(&bytes, count).map_err(|reason| {
            let n = self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            if n < LOUD_REJECTS || n % 1000 == 0 {
                tracing::warn!(device = %self.name, %reason, "malformed indirect segment");
            }
            RSP_ERROR
        })
    }
}
