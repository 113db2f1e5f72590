//! The endpoint: a [`Disk`] that forwards every call to the active driver over the channel,
//! keeps every unanswered request in an ordered in-flight table, and fails over to a backup
//! driver when the monitor declares the active one faulty.
//!
//! Two ways in: the blocking `Disk` calls park their caller until the reply, and
//! [`Disk::submit`] (what the NBD server uses) sends from the caller's task and has the
//! connection's reader thread answer through a callback, so no thread waits per request.
//! Both share the in-flight table, so failover treats them alike.
//!
//! **Failover**, in the monitor thread:
//!
//! 1. stop sending to the old driver and shut its connection down;
//! 2. as an extra measure (unless `kill_local` is off), SIGKILL a driver on a Unix socket,
//!    which is local (its pid came in the hello and is checked against `/proc/PID/stat`'s
//!    start time, so a reused pid is never hit), and wait until the process is gone and its
//!    connection's reader has exited. What stops a superseded driver's writes in every case
//!    is the drivers' generation fence ([`super::fence`]): the new driver records its newer
//!    generation next to the storage before its first write;
//! 3. take the standby connection (kept connected and heart-beating) or connect to the next
//!    driver address that answers;
//! 4. re-send, one at a time in the order they completed, the writes (and discards and
//!    write-zeroes) that were **acknowledged since the last completed flush**: the new driver
//!    opens the overlay afresh and sees its map as last flushed, so without them an
//!    acknowledged, unflushed write would read back as older data. Applying them again is
//!    harmless (every write is idempotent). A local driver reports the writes that need no
//!    re-applying (stored in the page cache as a new driver would open them); those are not
//!    kept unless they overlap a kept one ([`super::kept`]);
//! 5. re-send every unanswered request, in id order, and answer the original callers from
//!    the new driver.
//!
//! The acknowledged-unflushed set is bounded: past `unflushed_limit` bytes the endpoint sends
//! a flush of its own.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use super::kept::Kept;
use super::monitor::{Monitor, MonitorConfig, Outstanding};
use super::shm;
use super::wire::{self, ChannelKey, RequestHeader};
use super::{Addr, Stream};
use crate::disk::{push_extent, Disk, DiskError, Done, Extent, WriteFlags, ZeroFlags};
use crate::iobuf::Piece;
use crate::request::{Completion, Op, RequestError};

/// Endpoint settings.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// The export every driver is asked for.
    pub export: String,
    /// Driver addresses: the first that answers is active, the next one is the standby;
    /// after a failover the old address becomes the standby once a driver answers there.
    pub drivers: Vec<Addr>,
    pub key: Option<ChannelKey>,
    pub monitor: MonitorConfig,
    /// How often the monitor checks the drivers.
    pub tick: Duration,
    /// How long to look for a driver (at start, and at failover) before failing requests.
    pub connect_timeout: Duration,
    /// Handshake read timeout.
    pub handshake_timeout: Duration,
    /// SIGKILL a local (Unix socket) driver declared faulty and wait for it to die before
    /// replaying.
    pub kill_local: bool,
    /// Bytes of acknowledged writes kept for replay before the endpoint flushes on its own.
    pub unflushed_limit: u64,
    /// Offer drivers on Unix sockets a shared-memory data area ([`super::shm`]).
    pub shm: bool,
    /// Pin the thread that reads the drivers' replies to this CPU; give the drivers the
    /// same one ([`super::affinity`]). The frontend's reply writer then runs on a thread of
    /// the endpoint's kept off that CPU ([`Disk::reply_runtime`]).
    pub reader_cpu: Option<usize>,
}

impl EndpointConfig {
    /// Defaults for `export` served by `drivers`.
    pub fn new(export: &str, drivers: Vec<Addr>) -> Self {
        Self {
            export: export.to_owned(),
            drivers,
            key: None,
            monitor: MonitorConfig::default(),
            tick: Duration::from_millis(10),
            connect_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(2),
            kill_local: true,
            unflushed_limit: 256 << 20,
            shm: true,
            reader_cpu: None,
        }
    }
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("no driver addresses given")]
    NoDrivers,
    #[error("no driver answered within {0:?}: {1}")]
    Unreachable(Duration, String),
    #[error(transparent)]
    ReaderCpu(std::io::Error),
    #[error("cannot start the reply writer thread")]
    Writer(#[source] std::io::Error),
}

/// One failover, as `status` shows it.
#[derive(Debug, Clone)]
pub struct FailoverRecord {
    pub at: SystemTime,
    pub from: String,
    pub to: String,
    pub reason: String,
    /// Acknowledged-unflushed writes re-applied.
    pub reapplied: usize,
    /// Unanswered requests re-sent.
    pub resent: usize,
    /// From the fault being declared to the last request re-sent.
    pub took: Duration,
}

/// A snapshot for `status`.
#[derive(Debug, Clone)]
pub struct EndpointStatus {
    pub active: Option<String>,
    /// The active driver's process id, as its hello reported it (on its own host).
    pub active_pid: Option<u32>,
    pub standby: Option<String>,
    pub generation: u64,
    pub in_flight: usize,
    /// Acknowledged, unflushed writes kept for re-applying after a failover (stored ones
    /// are not counted: they need none).
    pub unflushed_writes: usize,
    pub failovers: u64,
    pub last_failover: Option<FailoverRecord>,
    /// The CPU the channel's readers are pinned to ([`EndpointConfig::reader_cpu`]).
    pub reader_cpu: Option<usize>,
}

#[derive(Debug, Clone)]
struct Req {
    op: u8,
    flags: u8,
    offset: u64,
    length: u32,
    data: Bytes,
}

fn mutates(op: u8) -> bool {
    matches!(
        op,
        wire::OP_WRITE | wire::OP_DISCARD | wire::OP_WRITE_ZEROES
    )
}

type Outcome = Result<Vec<u8>, i32>;

/// A reply's outcome as the reader has it: the data read off the socket (after the waiter's
/// headroom) or lent from the connection's shared area, or the driver's errno.
type Reply = Result<Piece, i32>;

/// Who waits for a request's outcome: a blocked caller (the `Disk` calls, the endpoint's own
/// requests) or a callback run by the connection's reader (requests taken by
/// [`Disk::submit`], answered with no thread parked on them). A callback's reply data comes
/// after its `usize` bytes of headroom (the frontend's reply header goes there), read so by
/// the reader: no copy of the data to make room; or, for a READ answered in a slot of the
/// shared area, lent from the slot itself, which the frontend sends from there.
enum Waiter {
    Chan(Sender<Outcome>),
    Call(Box<dyn FnOnce(Reply) + Send>, usize),
}

impl Waiter {
    fn headroom(&self) -> usize {
        match self {
            Waiter::Chan(_) => 0,
            Waiter::Call(_, h) => *h,
        }
    }

    fn finish(self, o: Reply) {
        match self {
            Waiter::Chan(tx) => {
                let _ = tx.send(o.map(Piece::into_vec));
            }
            Waiter::Call(f, _) => f(o),
        }
    }
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Waiter::Chan(_) => "Waiter::Chan",
            Waiter::Call(..) => "Waiter::Call",
        })
    }
}

/// The `DiskError` for an errno a driver answered.
fn disk_error(errno: i32) -> DiskError {
    match errno {
        libc::EPERM => DiskError::ReadOnly,
        libc::EOPNOTSUPP => DiskError::NotSupported,
        e => DiskError::Io(io::Error::from_raw_os_error(e)),
    }
}

#[derive(Debug)]
struct Pending {
    req: Req,
    /// Generation and time it was last sent; `None` while no driver is active.
    sent: Option<(u64, Instant)>,
    done: Waiter,
    /// Sent by the endpoint itself (a re-applied write, its own flush): not a caller's
    /// request, not re-acknowledged.
    internal: bool,
    /// For a flush: acknowledged writes up to this completion number are covered by it.
    flush_mark: u64,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    next_gen: u64,
    pending: BTreeMap<u64, Pending>,
    /// Acknowledged mutating requests since the last flush, by completion number, except
    /// those the driver reported stored (see [`super::kept`]).
    acked: Kept<Req>,
    completions: u64,
    own_flush: bool,
    active: Option<Arc<Conn>>,
    standby: Option<Arc<Conn>>,
    failovers: u64,
    last_failover: Option<FailoverRecord>,
}

#[derive(Debug)]
struct Conn {
    addr_idx: usize,
    addr: Addr,
    generation: u64,
    pid: u32,
    start_time: Option<u64>,
    /// The socket, and request frames queued by [`Disk::submit`] until
    /// [`Disk::submit_flush`] (always written before any later frame, so the driver sees
    /// requests in the order they were sent).
    writer: Mutex<(Stream, Vec<u8>)>,
    ctl: Stream,
    monitor: Mutex<Monitor>,
    broken: AtomicBool,
    reader_exit: Receiver<()>,
    /// The shared data area, when the driver took it.
    shm: Option<Arc<shm::Slots>>,
    /// The driver sends stored-write replies ([`wire::HELLO_STORED`]).
    stored: bool,
}

impl Conn {
    /// A request's header and the data to send after it: none when the data goes through
    /// a free area slot (a READ's slot is filled by the driver).
    fn header<'a>(&self, id: u64, r: &'a Req) -> ([u8; wire::REQUEST_HEADER_LEN], &'a [u8]) {
        let mut h = RequestHeader {
            op: r.op,
            flags: r.flags,
            id,
            generation: self.generation,
            offset: r.offset,
            length: r.length,
            slot: 0,
        };
        let mut data: &[u8] = &r.data;
        if let Some(s) = &self.shm {
            if matches!(r.op, wire::OP_READ | wire::OP_WRITE) {
                if let Some(slot) = s.assign(id, r.length as usize) {
                    let put = match r.op {
                        wire::OP_WRITE if r.data.len() == r.length as usize => {
                            s.area.put(slot.into(), &r.data).is_ok()
                        }
                        wire::OP_WRITE => false,
                        _ => true,
                    };
                    if put {
                        h.flags |= wire::FLAG_SLOT;
                        h.slot = slot as u16; // parse_offer: at most 65536 slots
                        data = &[];
                    } else {
                        s.release(id);
                    }
                }
            }
        }
        (wire::encode_request(&h), data)
    }

    /// Send a request now (after whatever is queued).
    fn send(&self, id: u64, r: &Req) {
        let (head, data) = self.header(id, r);
        let mut w = self.writer.lock();
        let (stream, queued) = &mut *w;
        let res = super::write_parts(stream, &[queued, &head, data]);
        queued.clear();
        drop(w);
        if res.is_err() {
            self.on_write_error();
        }
    }

    /// Queue a request, sent by the next [`Conn::send`] or [`Conn::send_queued`]. One with
    /// [`super::DIRECT_DATA`] bytes of data or more is sent now, after what is queued,
    /// straight from its buffer (copying it into the queue would cost more than the
    /// system call the queue saves).
    fn queue(&self, id: u64, r: &Req) {
        let (head, data) = self.header(id, r);
        let mut w = self.writer.lock();
        if data.len() < super::DIRECT_DATA {
            w.1.extend_from_slice(&head);
            w.1.extend_from_slice(data);
            return;
        }
        let (stream, queued) = &mut *w;
        let res = super::write_parts(stream, &[queued, &head, data]);
        queued.clear();
        drop(w);
        if res.is_err() {
            self.on_write_error();
        }
    }

    /// Send the queued requests in one write.
    fn send_queued(&self) {
        let mut w = self.writer.lock();
        let (stream, queued) = &mut *w;
        if queued.is_empty() {
            return;
        }
        let res = stream.write_all(queued);
        queued.clear();
        if queued.capacity() > super::READ_BUFFER {
            *queued = Vec::new();
        }
        drop(w);
        if res.is_err() {
            self.on_write_error();
        }
    }

    fn on_write_error(&self) {
        self.broken.store(true, Ordering::Release);
        self.monitor.lock().on_broken();
    }

    fn shutdown(&self) {
        self.ctl.shutdown();
    }

    /// Wait for the reader thread to exit (it does once the stream is shut down).
    fn wait_reader(&self, t: Duration) -> bool {
        matches!(
            self.reader_exit.recv_timeout(t),
            Err(RecvTimeoutError::Disconnected)
        )
    }

    fn healthy(&self, now: Instant) -> bool {
        !self.broken.load(Ordering::Acquire)
            && self
                .monitor
                .lock()
                .check(now, Outstanding::default())
                .is_none()
    }
}

/// Whether `buf` starts with a whole reply frame.
fn whole_reply(buf: &[u8]) -> bool {
    buf.len() >= wire::REPLY_HEADER_LEN
        && buf[..wire::REPLY_HEADER_LEN]
            .try_into()
            .ok()
            .and_then(|b| wire::parse_reply(b).ok())
            .is_some_and(|h| buf.len() - wire::REPLY_HEADER_LEN >= h.socket_data_len())
}

/// A process's state letter and start time from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Whether the process that had `start_time` is gone (exited, a zombie, or its pid reused).
fn process_gone(pid: u32, start_time: u64) -> bool {
    match proc_stat(pid) {
        None => true,
        Some((state, start)) => start != start_time || state == 'Z' || state == 'X',
    }
}

#[derive(Debug)]
struct Inner {
    cfg: EndpointConfig,
    size: u64,
    read_only: bool,
    state: Mutex<State>,
    closed: AtomicBool,
    /// With pinned readers: the runtime of the `fo-writer` thread, kept off the readers'
    /// CPU, which runs the frontend's reply writer. It stops when the endpoint is dropped.
    writer: Option<ReplyWriter>,
}

/// A one-thread runtime on a thread of its own, kept off the readers' CPU, where the NBD
/// frontend runs its writer task: every reply of 64 KiB or more, and whatever the socket
/// does not take at once, is written from there, so a large reply's copy into the socket
/// runs beside the readers' copies rather than after them on the same CPU.
#[derive(Debug)]
struct ReplyWriter {
    handle: tokio::runtime::Handle,
    /// Dropped with the endpoint: the thread's runtime stops.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ReplyWriter {
    fn start(reader_cpu: usize) -> io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("fo-writer".into())
            .spawn(move || {
                if let Err(e) = super::affinity::keep_this_thread_off(reader_cpu) {
                    tracing::warn!(cpu = reader_cpu, error = %e, "cannot keep the reply writer off the readers' CPU");
                }
                let _ = rt.block_on(stopped);
            })?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }
}

/// The failover endpoint. Cheap to clone (all clones share one endpoint).
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

struct Handshaken {
    stream: Stream,
    area: Option<shm::Area>,
    /// The driver sends stored-write replies.
    stored: bool,
    generation: u64,
    pid: u32,
    size: u64,
    read_only: bool,
}

/// What a hello offers beyond the key (Unix sockets only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Offer {
    shm: bool,
    stored: bool,
}

/// Handshake with the driver at `addr`. A driver of an older build refuses a hello flag it
/// does not know by closing the connection: it is asked again offering less, the newest
/// feature dropped first (stored-write replies, then the shared area).
fn handshake(cfg: &EndpointConfig, addr: &Addr, generation: u64) -> Result<Handshaken, String> {
    let offers = [
        Offer {
            shm: cfg.shm,
            stored: true,
        },
        Offer {
            shm: cfg.shm,
            stored: false,
        },
        Offer {
            shm: false,
            stored: false,
        },
    ];
    let mut last = String::new();
    for (i, &offer) in offers.iter().enumerate() {
        if offers[..i].contains(&offer) {
            continue;
        }
        match handshake_with(cfg, addr, generation, offer) {
            Err((e, true)) => {
                tracing::debug!(error = %e, ?offer, "driver closed on the offer; trying with less");
                last = e;
            }
            r => return r.map_err(|(e, _)| e),
        }
    }
    Err(last)
}

/// As [`handshake`], with one `offer`; an error says whether the driver closed the
/// connection on a hello that offered something.
fn handshake_with(
    cfg: &EndpointConfig,
    addr: &Addr,
    generation: u64,
    offer: Offer,
) -> Result<Handshaken, (String, bool)> {
    let no_retry = |e: String| (e, false);
    let mut s = addr
        .connect(cfg.handshake_timeout)
        .map_err(|e| no_retry(format!("{addr}: {e}")))?;
    let io = |e: io::Error| no_retry(format!("{addr}: handshake: {e}"));
    s.set_read_timeout(Some(cfg.handshake_timeout))
        .map_err(io)?;
    s.set_write_timeout(Some(cfg.handshake_timeout))
        .map_err(io)?;
    let nonce = wire::fresh_nonce();
    let unix = matches!(s, Stream::Unix(_));
    let (offer_shm, offer_stored) = (offer.shm && unix, offer.stored && unix);
    let hello = wire::Hello {
        keyed: cfg.key.is_some(),
        shm: offer_shm,
        stored: offer_stored,
        generation,
        nonce,
        export: cfg.export.clone(),
    };
    s.write_all(&wire::encode_hello(&hello)).map_err(io)?;
    let mut b = [0u8; wire::HELLO_REPLY_LEN];
    if let Err(e) = s.read_exact(&mut b) {
        let closed = matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
        );
        return Err((
            format!("{addr}: handshake: {e}"),
            (offer_shm || offer_stored) && closed,
        ));
    }
    let r = wire::parse_hello_reply(&b).map_err(|e| no_retry(format!("{addr}: {e}")))?;
    if r.status != 0 {
        return Err(no_retry(format!(
            "{addr}: driver refused export {:?}: {}",
            cfg.export,
            io::Error::from_raw_os_error(r.status as i32)
        )));
    }
    let mac = match &cfg.key {
        Some(k) => {
            if !r.keyed || !k.check_driver_mac(&nonce, &r.nonce, generation, &r.mac) {
                return Err(no_retry(format!("{addr}: driver failed authentication")));
            }
            k.endpoint_mac(&nonce, &r.nonce, generation)
        }
        None => [0; 32],
    };
    s.write_all(&wire::encode_auth(&mac)).map_err(io)?;
    let mut rd = [0u8; wire::READY_LEN];
    s.read_exact(&mut rd).map_err(io)?;
    let status = wire::parse_ready(&rd).map_err(|e| no_retry(format!("{addr}: {e}")))?;
    if status != 0 {
        return Err(no_retry(format!(
            "{addr}: driver refused our authentication"
        )));
    }
    let area = match &s {
        Stream::Unix(u) if offer_shm && r.shm => {
            let a = shm::Area::create(shm::DEFAULT_SLOTS, shm::DEFAULT_SLOT_SIZE).map_err(io)?;
            shm::send_offer(u, &a).map_err(io)?;
            Some(a)
        }
        _ => None,
    };
    s.set_read_timeout(None).map_err(io)?;
    s.set_write_timeout(None).map_err(io)?;
    Ok(Handshaken {
        stream: s,
        area,
        stored: offer_stored && r.stored,
        generation,
        pid: r.pid,
        size: r.size,
        read_only: r.read_only,
    })
}

impl Endpoint {
    /// Connect to the first driver that answers and start the monitor and standby threads.
    ///
    /// # Errors
    /// [`EndpointError`] when no driver answers within `connect_timeout`.
    pub fn start(cfg: EndpointConfig) -> Result<Self, EndpointError> {
        if cfg.drivers.is_empty() {
            return Err(EndpointError::NoDrivers);
        }
        if let Some(cpu) = cfg.reader_cpu {
            super::affinity::check_cpu(cpu).map_err(EndpointError::ReaderCpu)?;
        }
        let t0 = Instant::now();
        // Generations start at the wall clock in microseconds, so the drivers of a restarted
        // endpoint supersede (and fence) every driver of its predecessor.
        let first_gen = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64)
            .max(1);
        let (idx, h) = loop {
            let mut last = String::new();
            let mut found = None;
            for (i, a) in cfg.drivers.iter().enumerate() {
                match handshake(&cfg, a, first_gen) {
                    Ok(h) => {
                        found = Some((i, h));
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            if let Some(f) = found {
                break f;
            }
            if t0.elapsed() > cfg.connect_timeout {
                return Err(EndpointError::Unreachable(cfg.connect_timeout, last));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let writer = match cfg.reader_cpu {
            Some(cpu) => Some(ReplyWriter::start(cpu).map_err(EndpointError::Writer)?),
            None => None,
        };
        let inner = Arc::new(Inner {
            writer,
            size: h.size,
            read_only: h.read_only,
            state: Mutex::new(State {
                next_id: 1,
                next_gen: first_gen + 1,
                ..State::default()
            }),
            closed: AtomicBool::new(false),
            cfg,
        });
        let conn = inner.adopt(idx, h);
        inner.state.lock().active = Some(conn);
        let i2 = inner.clone();
        std::thread::Builder::new()
            .name("fo-monitor".into())
            .spawn(move || i2.monitor_loop())
            .expect("spawn the monitor thread");
        let i3 = inner.clone();
        std::thread::Builder::new()
            .name("fo-standby".into())
            .spawn(move || i3.standby_loop())
            .expect("spawn the standby thread");
        Ok(Self { inner })
    }

    /// A snapshot of the endpoint's state.
    pub fn status(&self) -> EndpointStatus {
        let st = self.inner.state.lock();
        EndpointStatus {
            active: st.active.as_ref().map(|c| c.addr.to_string()),
            active_pid: st.active.as_ref().map(|c| c.pid),
            standby: st.standby.as_ref().map(|c| c.addr.to_string()),
            generation: st.active.as_ref().map_or(0, |c| c.generation),
            in_flight: st.pending.values().filter(|p| !p.internal).count(),
            unflushed_writes: st.acked.len(),
            failovers: st.failovers,
            last_failover: st.last_failover.clone(),
            reader_cpu: self.inner.cfg.reader_cpu,
        }
    }

    /// Stop the threads and close the driver connections; later calls fail with EIO.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let mut st = self.inner.state.lock();
        for c in [st.active.take(), st.standby.take()].into_iter().flatten() {
            c.shutdown();
        }
        let failed = std::mem::take(&mut st.pending);
        drop(st);
        for (_, p) in failed {
            p.done.finish(Err(libc::EIO));
        }
    }

    fn call(&self, req: Req) -> Result<Vec<u8>, DiskError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(DiskError::Io(io::Error::from_raw_os_error(libc::EIO)));
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (id, active) = self.inner.submit(req.clone(), Waiter::Chan(tx), false);
        if let Some(c) = active {
            c.send(id, &req);
        }
        match rx.recv() {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(errno)) => Err(disk_error(errno)),
            Err(_) => Err(DiskError::Io(io::Error::from_raw_os_error(libc::EIO))),
        }
    }

    fn simple(&self, op: u8, flags: u8, offset: u64, len: u64) -> Result<(), DiskError> {
        // Ops without data may cover more than a u32: split them.
        let mut done = 0;
        while done < len || (len == 0 && done == 0) {
            let n = (len - done).min(1 << 30);
            self.call(Req {
                op,
                flags,
                offset: offset + done,
                length: n as u32,
                data: Bytes::new(),
            })?;
            done += n;
            if len == 0 {
                break;
            }
        }
        Ok(())
    }
}

impl Inner {
    fn submit(&self, req: Req, done: Waiter, internal: bool) -> (u64, Option<Arc<Conn>>) {
        let mut st = self.state.lock();
        let id = st.next_id;
        st.next_id += 1;
        let active = st.active.clone();
        let flush_mark = st.completions;
        st.pending.insert(
            id,
            Pending {
                req,
                sent: active.as_ref().map(|c| (c.generation, Instant::now())),
                done,
                internal,
                flush_mark,
            },
        );
        (id, active)
    }

    /// Wrap a handshaken stream and start its reader.
    fn adopt(self: &Arc<Self>, idx: usize, h: Handshaken) -> Arc<Conn> {
        let addr = self.cfg.drivers[idx].clone();
        let start_time = if addr.is_local() {
            proc_stat(h.pid).map(|(_, s)| s)
        } else {
            None
        };
        let (exit_tx, exit_rx) = crossbeam_channel::bounded::<()>(0);
        let writer = h.stream.try_clone().expect("dup the channel socket");
        let ctl = h.stream.try_clone().expect("dup the channel socket");
        let conn = Arc::new(Conn {
            addr_idx: idx,
            addr,
            generation: h.generation,
            pid: h.pid,
            start_time,
            writer: Mutex::new((writer, Vec::new())),
            ctl,
            monitor: Mutex::new(Monitor::new(self.cfg.monitor, Instant::now())),
            broken: AtomicBool::new(false),
            reader_exit: exit_rx,
            shm: h.area.map(|a| Arc::new(shm::Slots::new(a))),
            stored: h.stored,
        });
        let (me, c) = (self.clone(), conn.clone());
        let mut stream = h.stream;
        let cpu = self.cfg.reader_cpu;
        std::thread::Builder::new()
            .name("fo-reader".into())
            .spawn(move || {
                super::affinity::pin_reader(cpu, "endpoint");
                let r = me.read_replies(
                    &mut io::BufReader::with_capacity(super::READ_BUFFER, &mut stream),
                    &c,
                );
                if let Err(e) = r {
                    tracing::debug!(driver = %c.addr, error = %e, "driver connection ended");
                }
                c.broken.store(true, Ordering::Release);
                c.monitor.lock().on_broken();
                drop(exit_tx);
            })
            .expect("spawn a reader thread");
        conn
    }

    /// Read replies until the connection ends, completing each request. The callbacks of
    /// one batch (the replies one `read` brought in) queue their output, sent when no whole
    /// reply is left in the buffer, just before the reader would block again.
    fn read_replies<R: Read>(&self, s: &mut io::BufReader<R>, conn: &Conn) -> io::Result<()> {
        struct EndBatch;
        impl Drop for EndBatch {
            fn drop(&mut self) {
                crate::disk::end_completion_batch();
            }
        }
        crate::disk::batch_completions_on_this_thread();
        let _end = EndBatch;
        loop {
            if !whole_reply(s.buffer()) {
                crate::disk::end_completion_batch();
            }
            let mut hb = [0u8; wire::REPLY_HEADER_LEN];
            s.read_exact(&mut hb)?;
            let h = wire::parse_reply(&hb)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if h.kind == wire::KIND_HEARTBEAT {
                conn.monitor.lock().on_heartbeat(Instant::now());
                continue;
            }
            let stored = h.kind == wire::KIND_REPLY_STORED;
            if stored && !conn.stored {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a stored-write reply on a connection that did not agree to them",
                ));
            }
            // The slot this connection gave request `id`, from our own table (a driver's
            // reply names none).
            let slots = conn.shm.as_ref();
            let data = if h.kind == wire::KIND_REPLY_SLOT {
                let Some(sl) = slots else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a slot reply on a connection without a shared area",
                    ));
                };
                // The slot comes from our table and the driver's length is checked against
                // it; the slot stays lent to the data (and off the free list) until the
                // frontend has sent it.
                let lent = sl.lend(h.id, h.data_len as usize);
                Piece::Lent(lent.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?)
            } else {
                // Data on the socket goes after the waiter's headroom (lent data needs none).
                let headroom = {
                    let st = self.state.lock();
                    st.pending.get(&h.id).map_or(0, |p| p.done.headroom())
                };
                Piece::Owned(super::read_data(s, headroom, h.data_len as usize)?)
            };
            // A request that had a slot and was answered on the socket (an error, a driver
            // that chose the socket) frees it here.
            if let Some(sl) = slots {
                sl.release(h.id);
            }
            let now = Instant::now();
            let latency = self.complete(h.id, h.error, data, stored, now);
            if let Some(l) = latency {
                conn.monitor.lock().on_completion(now, l);
            }
        }
    }

    /// Answer request `id`; the latency since it was last sent. `stored`: the driver
    /// reported the write stored, so it is kept for re-applying only if it overlaps a kept
    /// one.
    fn complete(
        &self,
        id: u64,
        error: u32,
        data: Piece,
        stored: bool,
        now: Instant,
    ) -> Option<Duration> {
        let mut st = self.state.lock();
        let p = st.pending.remove(&id)?;
        if error == 0 && mutates(p.req.op) && !p.internal {
            st.completions += 1;
            let n = st.completions;
            let (offset, len) = (p.req.offset, u64::from(p.req.length));
            if !stored || st.acked.overlaps(offset, len) {
                let bytes = p.req.data.len() as u64;
                st.acked.insert(n, offset, len, bytes, p.req.clone());
            }
        }
        if p.req.op == wire::OP_FLUSH {
            if error == 0 {
                st.acked.release_through(p.flush_mark);
            }
            if p.internal {
                st.own_flush = false;
            }
        }
        drop(st);
        let out = if error == 0 {
            Ok(data)
        } else {
            Err(error as i32)
        };
        p.done.finish(out);
        p.sent.map(|(_, t)| now.saturating_duration_since(t))
    }

    fn monitor_loop(self: Arc<Self>) {
        while !self.closed.load(Ordering::Acquire) {
            std::thread::sleep(self.cfg.tick);
            let now = Instant::now();
            let (active, standby, out, own_flush) = {
                let st = self.state.lock();
                let mut out = Outstanding::default();
                if let Some(a) = &st.active {
                    for p in st.pending.values() {
                        if let Some((g, t)) = p.sent {
                            if g == a.generation && !p.internal {
                                out.oldest_sent = Some(out.oldest_sent.map_or(t, |o| o.min(t)));
                                out.newest_sent = Some(out.newest_sent.map_or(t, |o| o.max(t)));
                            }
                        }
                    }
                }
                let flush = !st.own_flush && st.acked.bytes() > self.cfg.unflushed_limit;
                (st.active.clone(), st.standby.clone(), out, flush)
            };
            match active {
                None => self.failover(None, "no active driver".into()),
                Some(a) => {
                    let fault = a.monitor.lock().check(now, out);
                    if let Some(f) = fault {
                        self.failover(Some(a), f.to_string());
                        continue;
                    }
                }
            }
            if let Some(s) = standby {
                if !s.healthy(now) {
                    tracing::info!(driver = %s.addr, "standby driver lost");
                    s.shutdown();
                    let mut st = self.state.lock();
                    if st.standby.as_ref().is_some_and(|x| Arc::ptr_eq(x, &s)) {
                        st.standby = None;
                    }
                }
            }
            if own_flush {
                self.state.lock().own_flush = true;
                let (tx, _rx) = crossbeam_channel::bounded(1);
                let req = Req {
                    op: wire::OP_FLUSH,
                    flags: 0,
                    offset: 0,
                    length: 0,
                    data: Bytes::new(),
                };
                let (id, active) = self.submit(req.clone(), Waiter::Chan(tx), true);
                if let Some(c) = active {
                    c.send(id, &req);
                }
            }
        }
    }

    fn standby_loop(self: Arc<Self>) {
        let n = self.cfg.drivers.len();
        let mut next = 0usize;
        while !self.closed.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
            let active_idx = {
                let st = self.state.lock();
                if st.standby.is_some() || n < 2 {
                    continue;
                }
                st.active.as_ref().map(|c| c.addr_idx)
            };
            next = (next + 1) % n;
            if Some(next) == active_idx {
                continue;
            }
            let generation = self.new_generation();
            let Ok(h) = handshake(&self.cfg, &self.cfg.drivers[next], generation) else {
                continue;
            };
            if h.size != self.size {
                tracing::error!(driver = %self.cfg.drivers[next], size = h.size, "driver serves a different size; ignored");
                continue;
            }
            let conn = self.adopt(next, h);
            let mut st = self.state.lock();
            let clash = st.active.as_ref().is_some_and(|a| a.addr_idx == next);
            if clash || st.standby.is_some() {
                conn.shutdown();
            } else {
                tracing::info!(driver = %conn.addr, generation, "standby driver connected");
                st.standby = Some(conn);
            }
        }
    }

    fn new_generation(&self) -> u64 {
        let mut st = self.state.lock();
        let g = st.next_gen;
        st.next_gen += 1;
        g
    }

    /// Make sure a faulty driver can no longer write: shut its connection, and for a local
    /// driver SIGKILL it and wait until it is gone.
    fn fence(&self, c: &Conn) {
        c.shutdown();
        if self.cfg.kill_local && c.addr.is_local() && c.pid != 0 {
            if let Some(start) = c.start_time {
                if !process_gone(c.pid, start) {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &c.pid.to_string()])
                        .stderr(std::process::Stdio::null())
                        .status();
                }
                let t0 = Instant::now();
                while !process_gone(c.pid, start) {
                    if t0.elapsed() > Duration::from_secs(10) {
                        tracing::error!(
                            pid = c.pid,
                            "faulty driver did not die within 10 s; replaying anyway"
                        );
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        if !c.wait_reader(Duration::from_secs(10)) {
            tracing::error!(driver = %c.addr, "reader of the faulty driver did not stop");
        }
    }

    fn failover(self: &Arc<Self>, old: Option<Arc<Conn>>, reason: String) {
        let t0 = Instant::now();
        {
            let mut st = self.state.lock();
            if let Some(o) = &old {
                if st.active.as_ref().is_some_and(|a| Arc::ptr_eq(a, o)) {
                    st.active = None;
                }
            }
        }
        let from = old.as_ref().map_or("-".to_owned(), |o| o.addr.to_string());
        if let Some(o) = &old {
            tracing::warn!(driver = %o.addr, generation = o.generation, reason = %reason, "driver declared faulty");
            self.fence(o);
        }
        let start_idx = old.as_ref().map_or(0, |o| o.addr_idx + 1);
        let mut failed_requests = false;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let Some(new) = self.find_driver(start_idx) else {
                // Past the bound, fail what is pending and keep failing what arrives while
                // no driver answers, so callers (and the NBD server's shutdown) never wait
                // on a request no driver holds.
                if t0.elapsed() > self.cfg.connect_timeout {
                    if !failed_requests {
                        tracing::error!(
                            "no driver answered within {:?}; failing requests",
                            self.cfg.connect_timeout
                        );
                        failed_requests = true;
                    }
                    let failed = {
                        let mut st = self.state.lock();
                        st.own_flush = false;
                        std::mem::take(&mut st.pending)
                    };
                    for (_, p) in failed {
                        p.done.finish(Err(libc::EIO));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            match self.replay(&new) {
                Ok((reapplied, resent)) => {
                    let rec = FailoverRecord {
                        at: SystemTime::now(),
                        from,
                        to: new.addr.to_string(),
                        reason,
                        reapplied,
                        resent,
                        took: t0.elapsed(),
                    };
                    tracing::warn!(
                        to = %rec.to, generation = new.generation, reapplied, resent,
                        took_ms = rec.took.as_millis() as u64, "failed over"
                    );
                    let mut st = self.state.lock();
                    if old.is_some() {
                        st.failovers += 1;
                        st.last_failover = Some(rec);
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(driver = %new.addr, error = %e, "backup failed during replay");
                    self.fence(&new);
                }
            }
        }
    }

    /// The standby if healthy, else a fresh connection to the first address that answers
    /// (starting after the failed one).
    fn find_driver(self: &Arc<Self>, start_idx: usize) -> Option<Arc<Conn>> {
        let now = Instant::now();
        let standby = self.state.lock().standby.take();
        if let Some(s) = standby {
            if s.healthy(now) {
                return Some(s);
            }
            s.shutdown();
        }
        let n = self.cfg.drivers.len();
        for k in 0..n {
            let idx = (start_idx + k) % n;
            let generation = self.new_generation();
            match handshake(&self.cfg, &self.cfg.drivers[idx], generation) {
                Ok(h) if h.size == self.size => return Some(self.adopt(idx, h)),
                Ok(_) => {
                    tracing::error!(driver = %self.cfg.drivers[idx], "driver serves a different size")
                }
                Err(e) => tracing::debug!(error = %e, "driver not available"),
            }
        }
        None
    }

    /// Re-apply the acknowledged-unflushed writes one at a time, then re-send every
    /// unanswered request in order and make `new` active. Returns the two counts.
    fn replay(self: &Arc<Self>, new: &Arc<Conn>) -> Result<(usize, usize), String> {
        let acked: Vec<Req> = self.state.lock().acked.items().cloned().collect();
        for req in &acked {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let id = {
                let mut st = self.state.lock();
                let id = st.next_id;
                st.next_id += 1;
                st.pending.insert(
                    id,
                    Pending {
                        req: req.clone(),
                        sent: Some((new.generation, Instant::now())),
                        done: Waiter::Chan(tx),
                        internal: true,
                        flush_mark: 0,
                    },
                );
                id
            };
            new.send(id, req);
            loop {
                match rx.recv_timeout(self.cfg.tick) {
                    Ok(Ok(_)) => break,
                    Ok(Err(e)) => {
                        tracing::error!(
                            errno = e,
                            offset = req.offset,
                            "re-applying an acknowledged write failed"
                        );
                        break;
                    }
                    Err(_) => {
                        let fault = new
                            .monitor
                            .lock()
                            .check(Instant::now(), Outstanding::default());
                        if let Some(f) = fault {
                            self.state.lock().pending.remove(&id);
                            return Err(f.to_string());
                        }
                    }
                }
            }
        }
        let mut st = self.state.lock();
        let now = Instant::now();
        let mark = st.completions;
        let mut resent = 0;
        let ids: Vec<u64> = st.pending.keys().copied().collect();
        for id in ids {
            let p = st.pending.get_mut(&id).expect("present");
            p.sent = Some((new.generation, now));
            if p.req.op == wire::OP_FLUSH {
                p.flush_mark = mark;
            }
            if !p.internal {
                resent += 1;
            }
            new.send(id, &p.req);
        }
        st.active = Some(new.clone());
        Ok((acked.len(), resent))
    }
}

impl Disk for Endpoint {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        for (i, chunk) in buf.chunks_mut(wire::MAX_DATA as usize).enumerate() {
            let off = offset + (i as u64) * u64::from(wire::MAX_DATA);
            let data = self.call(Req {
                op: wire::OP_READ,
                flags: 0,
                offset: off,
                length: chunk.len() as u32,
                data: Bytes::new(),
            })?;
            if data.len() != chunk.len() {
                return Err(DiskError::Io(io::Error::other("driver sent a short read")));
            }
            chunk.copy_from_slice(&data);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<(), DiskError> {
        for (i, chunk) in buf.chunks(wire::MAX_DATA as usize).enumerate() {
            let off = offset + (i as u64) * u64::from(wire::MAX_DATA);
            self.call(Req {
                op: wire::OP_WRITE,
                flags: if flags.fua { wire::FLAG_FUA } else { 0 },
                offset: off,
                length: chunk.len() as u32,
                data: Bytes::copy_from_slice(chunk),
            })?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.simple(wire::OP_FLUSH, 0, 0, 0)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.simple(wire::OP_DISCARD, 0, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), DiskError> {
        let mut f = 0;
        if flags.fua {
            f |= wire::FLAG_FUA;
        }
        if flags.fast_only {
            f |= wire::FLAG_FAST_ZERO;
        }
        self.simple(wire::OP_WRITE_ZEROES, f, offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        let mut out = Vec::new();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(u64::from(wire::MAX_DATA));
            let data = self.call(Req {
                op: wire::OP_BLOCK_STATUS,
                flags: 0,
                offset: offset + done,
                length: n as u32,
                data: Bytes::new(),
            })?;
            let ext = wire::parse_extents(&data)
                .map_err(|e| DiskError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            if ext.iter().map(|e| e.len).sum::<u64>() != n {
                return Err(DiskError::Io(io::Error::other(
                    "driver's extents do not cover the range",
                )));
            }
            for e in ext {
                push_extent(&mut out, e);
            }
            done += n;
        }
        Ok(out)
    }

    /// Requests that fit one channel request are queued for the driver (sent by
    /// [`Disk::submit_flush`] from the caller's thread) and answered by the connection's
    /// reader through `done`: no thread waits for them.
    /// Block status, a discard with FUA and requests larger than one channel request take
    /// the blocking path (the default: the frontend runs them on a worker).
    fn submit(&self, mut op: Op, headroom: usize, done: Done) -> Result<(), (Op, Done)> {
        const MAX_SIMPLE: u64 = 1 << 30;
        let mut req = match &op {
            Op::Read { offset, len } if *len <= wire::MAX_DATA => Req {
                op: wire::OP_READ,
                flags: 0,
                offset: *offset,
                length: *len,
                data: Bytes::new(),
            },
            Op::Write { offset, data, fua } if data.len() <= wire::MAX_DATA as usize => Req {
                op: wire::OP_WRITE,
                flags: if *fua { wire::FLAG_FUA } else { 0 },
                offset: *offset,
                length: data.len() as u32,
                data: Bytes::new(), // taken from the op below, once it is valid
            },
            Op::Flush => Req {
                op: wire::OP_FLUSH,
                flags: 0,
                offset: 0,
                length: 0,
                data: Bytes::new(),
            },
            Op::Discard {
                offset,
                len,
                fua: false,
            } if *len <= MAX_SIMPLE => Req {
                op: wire::OP_DISCARD,
                flags: 0,
                offset: *offset,
                length: *len as u32,
                data: Bytes::new(),
            },
            Op::WriteZeroes {
                offset,
                len,
                fua,
                fast_only,
            } if *len <= MAX_SIMPLE => Req {
                op: wire::OP_WRITE_ZEROES,
                flags: if *fua { wire::FLAG_FUA } else { 0 }
                    | if *fast_only { wire::FLAG_FAST_ZERO } else { 0 },
                offset: *offset,
                length: *len as u32,
                data: Bytes::new(),
            },
            _ => return Err((op, done)),
        };
        if let Err(error) = op.validate(self) {
            done(Err(RequestError { op, error }));
            return Ok(());
        }
        if self.inner.closed.load(Ordering::Acquire) {
            let error = DiskError::Io(io::Error::from_raw_os_error(libc::EIO));
            done(Err(RequestError { op, error }));
            return Ok(());
        }
        // A write's data moves into the request without a copy; the op keeps it only for
        // an error report, which gets it back from the request.
        if let Op::Write { data, .. } = &mut op {
            req.data = Bytes::from(std::mem::take(data));
        }
        let written = req.data.clone();
        let headroom = if matches!(op, Op::Read { .. }) {
            headroom
        } else {
            0
        };
        let waiter = Waiter::Call(
            Box::new(move |o: Reply| {
                let r = match (o, &mut op) {
                    (Ok(data), Op::Read { len, .. }) => {
                        let want = *len as usize;
                        match data {
                            Piece::Owned(buf) if buf.len() == headroom + want => {
                                Ok(Completion::Read { buf, headroom })
                            }
                            Piece::Lent(data) if data.len() == want => Ok(Completion::Lent(data)),
                            _ => {
                                let e = io::Error::other("driver sent a short read");
                                Err(RequestError {
                                    op,
                                    error: DiskError::Io(e),
                                })
                            }
                        }
                    }
                    (Ok(_), _) => Ok(Completion::Done),
                    (Err(errno), op_ref) => {
                        if let Op::Write { data, .. } = op_ref {
                            *data = written.to_vec();
                        }
                        Err(RequestError {
                            op,
                            error: disk_error(errno),
                        })
                    }
                };
                done(r);
            }),
            headroom,
        );
        let (id, active) = self.inner.submit(req.clone(), waiter, false);
        if let Some(c) = active {
            c.queue(id, &req);
        }
        Ok(())
    }

    /// Send the requests `submit` queued, in one write: the NBD server calls this before
    /// it waits for anything, so the requests read from one client read reach the driver
    /// together (and the driver answers them together).
    fn submit_flush(&self) {
        let active = self.inner.state.lock().active.clone();
        if let Some(c) = active {
            c.send_queued();
        }
    }

    fn reply_runtime(&self) -> Option<tokio::runtime::Handle> {
        self.inner.writer.as_ref().map(|w| w.handle.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::super::driver::{self, DriverConfig, DriverListener};
    use super::*;
    use crate::memory::MemDisk;

    fn start_driver(dir: &Path, name: &str, disk: Arc<dyn Disk>, key: Option<&[u8]>) -> Addr {
        start_driver_on(dir, name, disk, key, None)
    }

    fn start_driver_on(
        dir: &Path,
        name: &str,
        disk: Arc<dyn Disk>,
        key: Option<&[u8]>,
        reader_cpu: Option<usize>,
    ) -> Addr {
        let addr = Addr::Unix(dir.join(name));
        let l = DriverListener::bind(&addr).unwrap();
        let cfg = DriverConfig {
            opener: Arc::new(move |n: &str| {
                if n == "vm" {
                    Ok(disk.clone())
                } else {
                    Err("no such export".into())
                }
            }),
            fencer: None,
            heartbeat_interval: Duration::from_millis(20),
            key: key.map(ChannelKey::from_secret),
            workers: 4,
            reader_cpu,
        };
        std::thread::spawn(move || driver::run(l, cfg));
        addr
    }

    /// The rest of an unkeyed driver's handshake after the hello's fixed part: reads the
    /// export name, replies (taking the shared area if `shm`), reads the auth, sends READY.
    fn fake_driver_handshake(
        s: &mut std::os::unix::net::UnixStream,
        fixed: &[u8; wire::HELLO_FIXED_LEN],
        shm: bool,
    ) {
        let h = wire::parse_hello_header(fixed).unwrap();
        let mut name = vec![0u8; h.name_len];
        s.read_exact(&mut name).unwrap();
        let reply = wire::HelloReply {
            keyed: false,
            shm,
            stored: false,
            status: 0,
            pid: 0,
            size: 1 << 20,
            read_only: false,
            nonce: [0; 32],
            mac: [0; 32],
        };
        s.write_all(&wire::encode_hello_reply(&reply)).unwrap();
        let mut auth = [0u8; wire::AUTH_LEN];
        s.read_exact(&mut auth).unwrap();
        s.write_all(&wire::encode_ready(0)).unwrap();
    }

    fn cfg(addrs: Vec<Addr>) -> EndpointConfig {
        let mut c = EndpointConfig::new("vm", addrs);
        c.connect_timeout = Duration::from_secs(5);
        c
    }

    #[test]
    fn requests_reach_the_driver_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(MemDisk::new(1 << 20));
        let a = start_driver(dir.path(), "a", disk.clone(), None);
        let ep = Endpoint::start(cfg(vec![a])).unwrap();
        assert_eq!(ep.size(), 1 << 20);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        ep.write_at(&data, 4096, WriteFlags::default()).unwrap();
        ep.flush().unwrap();
        let mut back = vec![0u8; 8192];
        ep.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
        assert_eq!(&disk.contents()[4096..4096 + 8192], &data[..]);
        ep.write_zeroes(4096, 4096, ZeroFlags::default()).unwrap();
        ep.read_at(&mut back, 4096).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        let ext = ep.block_status(0, 1 << 20).unwrap();
        assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 1 << 20);
        let e = ep.read_at(&mut back, (1 << 20) - 10).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        assert_eq!(ep.status().in_flight, 0);
        ep.close();
    }

    #[test]
    fn readers_pinned_to_one_cpu_serve_and_a_cpu_not_allowed_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(MemDisk::new(1 << 20));
        let cpu = super::super::affinity::first_allowed_cpu().unwrap();
        let a = start_driver_on(dir.path(), "a", disk.clone(), None, Some(cpu));
        let mut c = cfg(vec![a]);
        c.reader_cpu = Some(cpu);
        let ep = Endpoint::start(c.clone()).unwrap();
        let data: Vec<u8> = (0..(256u32 << 10)).map(|i| (i % 253) as u8).collect();
        for off in [0u64, 4096, 512 << 10] {
            ep.write_at(&data[..4096], off, WriteFlags::default())
                .unwrap();
        }
        ep.write_at(&data, 512 << 10, WriteFlags::default())
            .unwrap();
        ep.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        ep.read_at(&mut back, 512 << 10).unwrap();
        assert_eq!(back, data);
        assert_eq!(&disk.contents()[..4096], &data[..4096]);
        ep.close();
        c.reader_cpu = Some(usize::MAX);
        let Err(e) = Endpoint::start(c) else {
            panic!("an endpoint started with a reader CPU it may not run on");
        };
        let e = e.to_string();
        assert!(e.contains("reader CPU"), "{e}");
    }

    /// With pinned readers, the NBD frontend's reply writer runs on the endpoint's
    /// `fo-writer` thread, which may run on every allowed CPU but the readers' one; read
    /// replies far larger than the socket takes at once (the client reads nothing for a
    /// while) still arrive whole with their own data. Unpinned, the frontend keeps its own.
    #[test]
    fn pinned_readers_get_a_reply_writer_off_their_cpu_that_delivers_whole_replies() {
        use crate::nbd::wire::CMD_READ;
        use rustix::thread::sched_getaffinity;
        const MIB: usize = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(MemDisk::new(8 * MIB as u64));
        let cpu = super::super::affinity::first_allowed_cpu().unwrap();
        let unpinned =
            Endpoint::start(cfg(vec![start_driver(dir.path(), "u", disk.clone(), None)])).unwrap();
        assert!(unpinned.reply_runtime().is_none());
        unpinned.close();

        let a = start_driver_on(dir.path(), "a", disk.clone(), None, Some(cpu));
        let mut c = cfg(vec![a]);
        c.reader_cpu = Some(cpu);
        let ep = Endpoint::start(c).unwrap();
        let writer = ep.reply_runtime().expect("a reply writer runtime");
        let waiter = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (name, set) = waiter
            .block_on(writer.spawn(async {
                let t = std::thread::current();
                (
                    t.name().map(str::to_owned),
                    sched_getaffinity(None).unwrap(),
                )
            }))
            .unwrap();
        assert_eq!(name.as_deref(), Some("fo-writer"));
        let allowed = sched_getaffinity(None).unwrap();
        for c in 0..rustix::thread::CpuSet::MAX_CPU {
            let want = allowed.is_set(c) && (c != cpu || allowed.count() == 1);
            assert_eq!(set.is_set(c), want, "CPU {c}");
        }

        let pattern =
            |i: usize| -> Vec<u8> { (0..MIB).map(|j| (i * 31 + j / 512) as u8).collect() };
        for i in 0..8 {
            ep.write_at(&pattern(i), (i * MIB) as u64, WriteFlags::default())
                .unwrap();
        }
        let srv = super::super::bench::NbdServer::start(
            Arc::new(ep.clone()),
            dir.path().join("nbd.sock"),
        )
        .unwrap();
        {
            let mut client = srv.client().unwrap();
            // 256 KiB reads go through the shared area's slots, 1 MiB ones over the socket.
            for len in [256 << 10, MIB] {
                let mut sent = std::collections::HashMap::new();
                for off in (0..8 * MIB).step_by(len) {
                    let ck = client
                        .send(CMD_READ, 0, off as u64, len as u32, &[])
                        .unwrap();
                    sent.insert(ck, off);
                }
                std::thread::sleep(Duration::from_millis(200));
                for _ in 0..sent.len() {
                    let r = client.recv().unwrap();
                    assert_eq!(r.error, 0);
                    let off = sent.remove(&r.cookie).expect("a reply for a request sent");
                    let want = &pattern(off / MIB)[off % MIB..off % MIB + len];
                    assert!(r.data == want, "{len}-byte read at {off} came back wrong");
                }
            }
            client.disconnect().unwrap();
        }
        drop(srv);
        ep.close();
    }

    #[test]
    fn keys_must_match_and_unknown_exports_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(MemDisk::new(4096));
        let a = start_driver(dir.path(), "a", disk.clone(), Some(b"right"));
        let mut c = cfg(vec![a.clone()]);
        c.connect_timeout = Duration::from_millis(200);
        c.key = Some(ChannelKey::from_secret(b"wrong"));
        assert!(Endpoint::start(c.clone()).is_err());
        c.key = None;
        assert!(Endpoint::start(c.clone()).is_err());
        c.key = Some(ChannelKey::from_secret(b"right"));
        let ep = Endpoint::start(c.clone()).unwrap();
        ep.write_at(&[7; 512], 0, WriteFlags::default()).unwrap();
        ep.close();
        c.export = "other".into();
        let e = Endpoint::start(c).unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
    }

    /// The data of a submitted read's completion: after the headroom asked for when it came
    /// on the socket, or lent from a slot of the shared area.
    fn read_bytes(r: Result<Completion, crate::request::RequestError>, headroom: usize) -> Vec<u8> {
        match r {
            Ok(Completion::Read { buf, headroom: h }) => {
                assert_eq!(h, headroom);
                buf[h..].to_vec()
            }
            Ok(Completion::Lent(data)) => data.to_vec(),
            other => panic!("read: {other:?}"),
        }
    }

    /// Large and small requests in flight together through `submit` (the NBD path): large
    /// data goes around the channel buffers, yet every write lands and every read returns
    /// what was written, after the headroom asked for.
    #[test]
    fn large_and_small_submitted_requests_in_flight_together_keep_their_data() {
        use crate::request::{Completion, Op, RequestError};
        type Res = Result<Completion, RequestError>;
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(MemDisk::new(8 << 20));
        let a = start_driver(dir.path(), "a", disk.clone(), None);
        let ep = Endpoint::start(cfg(vec![a])).unwrap();
        let sizes = [
            256usize << 10,
            4096,
            1 << 20,
            512,
            (64 << 10) - 512,
            3 << 20,
        ];
        let pattern = |i: usize, n: usize| -> Vec<u8> {
            (0..n).map(|j| ((i * 7919 + j) % 251) as u8).collect()
        };
        let offsets: Vec<u64> = sizes
            .iter()
            .scan(0u64, |o, &n| {
                let at = *o;
                *o += n as u64;
                Some(at)
            })
            .collect();
        let mut rxs = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let (tx, rx) = crossbeam_channel::bounded::<Res>(1);
            let op = Op::Write {
                offset: offsets[i],
                data: pattern(i, n),
                fua: false,
            };
            assert!(ep
                .submit(op, 0, Box::new(move |r| tx.send(r).unwrap()))
                .is_ok());
            rxs.push(rx);
        }
        ep.submit_flush();
        for rx in rxs {
            let r = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert!(matches!(r, Ok(Completion::Done)), "{r:?}");
        }
        let mut rxs = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let (tx, rx) = crossbeam_channel::bounded::<Res>(1);
            let op = Op::Read {
                offset: offsets[i],
                len: n as u32,
            };
            assert!(ep
                .submit(op, i * 4, Box::new(move |r| tx.send(r).unwrap()))
                .is_ok());
            rxs.push(rx);
        }
        ep.submit_flush();
        for (i, rx) in rxs.into_iter().enumerate() {
            let got = read_bytes(rx.recv_timeout(Duration::from_secs(10)).unwrap(), i * 4);
            assert_eq!(got.len(), sizes[i], "read {i}");
            assert!(got == pattern(i, sizes[i]), "read {i}");
        }
        let end = offsets[sizes.len() - 1] + (3 << 20);
        let all: Vec<u8> = (0..sizes.len())
            .flat_map(|i| pattern(i, sizes[i]))
            .collect();
        assert!(
            disk.contents()[..end as usize] == all[..],
            "the disk holds every write"
        );
        ep.close();
    }

    /// `Disk::submit` answers through the callback from the connection's reader: data with
    /// the asked headroom, range errors at once, block status handed back, and requests
    /// submitted across a failover answered by the backup.
    #[test]
    fn submitted_requests_are_answered_through_the_callback_and_across_failover() {
        use crate::request::{Completion, Op, RequestError};
        type Res = Result<Completion, RequestError>;
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(MemDisk::new(1 << 20));
        let a = start_driver(dir.path(), "a", disk.clone(), None);
        let b = start_driver(dir.path(), "b", disk.clone(), None);
        let mut c = cfg(vec![a, b]);
        c.kill_local = false; // both drivers are threads of this test process
        let ep = Endpoint::start(c).unwrap();
        let submit = |op: Op, headroom: usize| -> Receiver<Res> {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let done: Done = Box::new(move |r| tx.send(r).unwrap());
            assert!(
                ep.submit(op, headroom, done).is_ok(),
                "endpoint took the op"
            );
            ep.submit_flush();
            rx
        };
        let wait = |rx: Receiver<Res>| rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
        let w = Op::Write {
            offset: 8192,
            data: data.clone(),
            fua: false,
        };
        assert!(matches!(wait(submit(w, 0)), Ok(Completion::Done)));
        let read = Op::Read {
            offset: 8192,
            len: 4096,
        };
        assert_eq!(read_bytes(wait(submit(read, 16)), 16), data);
        let past = Op::Read {
            offset: 1 << 20,
            len: 1,
        };
        let e = wait(submit(past, 0)).unwrap_err();
        assert!(matches!(e.error, DiskError::OutOfRange { .. }), "{e:?}");
        let (tx, _rx) = crossbeam_channel::bounded::<Res>(1);
        let bs = Op::BlockStatus {
            offset: 0,
            len: 4096,
        };
        let back = ep.submit(bs, 0, Box::new(move |r| tx.send(r).unwrap()));
        assert!(matches!(back, Err((Op::BlockStatus { .. }, _))));
        // Break the active connection and keep submitting: every write is answered (by the
        // backup after the failover) and lands.
        let active = ep.inner.state.lock().active.clone().unwrap();
        active.shutdown();
        let waiting: Vec<_> = (0..16u64)
            .map(|i| {
                let op = Op::Write {
                    offset: i * 4096,
                    data: vec![i as u8 + 1; 4096],
                    fua: false,
                };
                submit(op, 0)
            })
            .collect();
        for rx in waiting {
            assert!(matches!(wait(rx), Ok(Completion::Done)));
        }
        assert!(matches!(wait(submit(Op::Flush, 0)), Ok(Completion::Done)));
        assert_eq!(ep.status().failovers, 1);
        assert_eq!(ep.status().in_flight, 0);
        let now = disk.contents();
        for i in 0..16usize {
            assert!(now[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&x| x == i as u8 + 1));
        }
        ep.close();
    }

    /// Break the active driver's connection from the endpoint's side and wait (up to 10 s)
    /// for the first failover.
    fn break_active_and_wait_for_failover(ep: &Endpoint) {
        ep.inner.state.lock().active.clone().unwrap().shutdown();
        let t0 = Instant::now();
        while ep.status().failovers == 0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "no failover");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The active driver's connection breaks; the endpoint fails over to the backup and
    /// re-applies the writes acknowledged since the last flush, in order, before anything else.
    #[test]
    fn unflushed_acknowledged_writes_are_reapplied_after_failover() {
        let dir = tempfile::tempdir().unwrap();
        // Two drivers with *separate* disks: what the backup holds after the failover is
        // exactly what the endpoint re-applied to it.
        let (da, db) = (
            Arc::new(MemDisk::new(1 << 16)),
            Arc::new(MemDisk::new(1 << 16)),
        );
        let a = start_driver(dir.path(), "a", da.clone(), None);
        let b = start_driver(dir.path(), "b", db.clone(), None);
        let mut c = cfg(vec![a, b]);
        c.kill_local = false; // both drivers are threads of this test process
        let ep = Endpoint::start(c).unwrap();
        ep.write_at(&[1; 4096], 0, WriteFlags::default()).unwrap();
        ep.flush().unwrap();
        ep.write_at(&[2; 4096], 4096, WriteFlags::default())
            .unwrap();
        ep.write_at(&[3; 4096], 4096, WriteFlags::default())
            .unwrap();
        assert_eq!(ep.status().unflushed_writes, 2);
        break_active_and_wait_for_failover(&ep);
        let st = ep.status();
        assert_eq!(st.last_failover.as_ref().unwrap().reapplied, 2);
        // The flushed write is not re-applied, the two unflushed ones are, in order.
        let b_now = db.contents();
        assert!(b_now[..4096].iter().all(|&x| x == 0));
        assert!(b_now[4096..8192].iter().all(|&x| x == 3));
        let mut back = vec![0u8; 4096];
        ep.read_at(&mut back, 4096).unwrap();
        assert!(back.iter().all(|&x| x == 3));
        ep.flush().unwrap();
        assert_eq!(ep.status().unflushed_writes, 0);
        ep.close();
    }

    /// A disk whose writes from `from` on are stored (as overwrites of mapped overlay
    /// clusters are), the rest not.
    #[derive(Debug)]
    struct StoredFrom {
        inner: Arc<MemDisk>,
        from: u64,
    }

    impl Disk for StoredFrom {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn is_read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64, f: WriteFlags) -> Result<(), DiskError> {
            self.inner.write_at(buf, offset, f)
        }
        fn flush(&self) -> Result<(), DiskError> {
            self.inner.flush()
        }
        fn write_is_stored(&self, offset: u64, _len: u64) -> bool {
            offset >= self.from
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
            self.inner.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, f: ZeroFlags) -> Result<(), DiskError> {
            self.inner.write_zeroes(offset, len, f)
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
            self.inner.block_status(offset, len)
        }
    }

    /// Writes the driver reports stored are not kept for re-applying, unless they overlap
    /// a kept one; after a failover the kept ones are re-applied in order, so the newest
    /// bytes land last.
    #[test]
    fn stored_writes_are_kept_only_when_they_overlap_a_kept_one() {
        let dir = tempfile::tempdir().unwrap();
        let (da, db) = (
            Arc::new(MemDisk::new(1 << 16)),
            Arc::new(MemDisk::new(1 << 16)),
        );
        let stored = |d: &Arc<MemDisk>| {
            Arc::new(StoredFrom {
                inner: d.clone(),
                from: 8192,
            })
        };
        let a = start_driver(dir.path(), "a", stored(&da), None);
        let b = start_driver(dir.path(), "b", stored(&db), None);
        let mut c = cfg(vec![a, b]);
        c.kill_local = false;
        let ep = Endpoint::start(c).unwrap();
        assert!(ep.inner.state.lock().active.as_ref().unwrap().stored);
        let w = |v: u8, offset: u64, len: usize| {
            ep.write_at(&vec![v; len], offset, WriteFlags::default())
                .unwrap();
        };
        w(1, 0, 4096); // not stored: kept
        w(2, 8192, 4096); // stored, overlaps nothing kept
        w(3, 12288, 4096); // stored
        assert_eq!(ep.status().unflushed_writes, 1);
        w(5, 4096, 8192); // not stored (starts below 8192): kept, covers 8192..12288
        w(6, 8192, 4096); // stored, but re-applying 5 would undo it: kept too
        assert_eq!(ep.status().unflushed_writes, 3);

        break_active_and_wait_for_failover(&ep);
        assert_eq!(ep.status().last_failover.unwrap().reapplied, 3);
        // The backup's separate disk holds exactly what was re-applied.
        let b_now = db.contents();
        let part = |r: std::ops::Range<usize>| b_now[r].iter().copied().max().unwrap();
        assert_eq!(part(0..4096), 1);
        assert_eq!(part(4096..8192), 5);
        assert!(b_now[8192..12288].iter().all(|&x| x == 6), "newest last");
        assert_eq!(part(12288..16384), 0, "a stored write is not re-applied");
        ep.flush().unwrap();
        assert_eq!(ep.status().unflushed_writes, 0);
        ep.close();
    }

    /// Unix drivers take the shared area by default; requests that fit a slot go through
    /// it, larger ones through socket frames, and both give back what was written, as the
    /// socket-only channel does.
    #[test]
    fn shared_area_and_socket_frames_carry_the_same_data() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(MemDisk::new(8 << 20));
        let a = start_driver(dir.path(), "a", disk.clone(), None);
        for shm in [true, false] {
            let mut c = cfg(vec![a.clone()]);
            c.shm = shm;
            let ep = Endpoint::start(c).unwrap();
            let active = ep.inner.state.lock().active.clone().unwrap();
            assert_eq!(active.shm.is_some(), shm);
            let slot_size = shm::DEFAULT_SLOT_SIZE as usize;
            for (len, at) in [
                (4096usize, 0u64),
                (slot_size, 1 << 20),
                (slot_size + 4096, 3 << 20),
            ] {
                let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8 ^ u8::from(shm)).collect();
                ep.write_at(&data, at, WriteFlags::default()).unwrap();
                let mut back = vec![0u8; len];
                ep.read_at(&mut back, at).unwrap();
                assert_eq!(back, data, "{len} bytes, shm {shm}");
                assert_eq!(&disk.contents()[at as usize..at as usize + len], &data[..]);
            }
            // Every slot is free again once its request is answered.
            if let Some(s) = &active.shm {
                for id in 0..u64::from(shm::DEFAULT_SLOTS) {
                    assert!(s.assign(1 << 40 | id, 1).is_some(), "slot leaked");
                }
            }
            ep.close();
        }
    }

    /// A driver that answers with a slot reply the endpoint cannot accept (longer than a
    /// slot, or for a request it gave no slot) breaks only its own connection: the caller
    /// gets an error once no driver answers, and nothing panics.
    #[test]
    fn a_hostile_slot_reply_breaks_the_connection_cleanly() {
        use std::os::unix::net::UnixListener;
        for case in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("evil");
            let l = UnixListener::bind(&path).unwrap();
            let fake = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let mut fixed = [0u8; wire::HELLO_FIXED_LEN];
                s.read_exact(&mut fixed).unwrap();
                assert!(
                    wire::parse_hello_header(&fixed).unwrap().shm,
                    "a unix endpoint offers the area"
                );
                fake_driver_handshake(&mut s, &fixed, true);
                let area = shm::recv_offer(&s).unwrap();
                let mut hb = [0u8; wire::REQUEST_HEADER_LEN];
                s.read_exact(&mut hb).unwrap();
                let req = wire::parse_request(&hb).unwrap();
                assert_ne!(
                    req.flags & wire::FLAG_SLOT,
                    0,
                    "a 4 KiB read goes in a slot"
                );
                let (id, data_len) = match case {
                    0 => (req.id, area.slot_size() + 1),
                    _ => (req.id + 1000, 4096),
                };
                let bad = wire::ReplyHeader {
                    kind: wire::KIND_REPLY_SLOT,
                    error: 0,
                    id,
                    data_len,
                };
                let _ = s.write_all(&wire::encode_reply(&bad));
                // Hold the socket until the endpoint drops it.
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            });
            let mut c = cfg(vec![Addr::Unix(path)]);
            c.kill_local = false;
            c.connect_timeout = Duration::from_millis(300);
            c.handshake_timeout = Duration::from_millis(100);
            let ep = Endpoint::start(c).unwrap();
            let mut buf = vec![0u8; 4096];
            let e = ep.read_at(&mut buf, 0).unwrap_err();
            assert_eq!(e.errno(), libc::EIO, "case {case}");
            ep.close();
            fake.join().unwrap();
        }
    }

    /// A driver of an older build closes the connection on a hello with a flag it does not
    /// know; the endpoint asks again offering less (stored-write replies dropped first, then
    /// the shared area) and is served by frames.
    #[test]
    fn a_driver_that_refuses_the_offer_is_asked_again_without_it() {
        for known in [wire::HELLO_KEYED, wire::HELLO_KEYED | wire::HELLO_SHM] {
            let hellos = old_driver_hellos(known);
            let (shm, stored) = (wire::HELLO_SHM, wire::HELLO_STORED);
            if known & shm == 0 {
                assert_eq!(hellos, [shm | stored, shm, 0], "before the shared area");
            } else {
                assert_eq!(hellos, [shm | stored, shm], "before stored replies");
            }
        }
    }

    /// Serve one read from a driver that knows only the hello flags `known` (and declines
    /// the shared area); the flags of every hello it got.
    fn old_driver_hellos(known: u16) -> Vec<u16> {
        use std::os::unix::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old");
        let l = UnixListener::bind(&path).unwrap();
        let old = std::thread::spawn(move || {
            let mut hellos = Vec::new();
            loop {
                let (mut s, _) = l.accept().unwrap();
                let mut fixed = [0u8; wire::HELLO_FIXED_LEN];
                s.read_exact(&mut fixed).unwrap();
                let flags = u16::from_be_bytes([fixed[6], fixed[7]]);
                hellos.push(flags);
                if flags & !known != 0 {
                    continue; // drops the connection, as an old build does
                }
                fake_driver_handshake(&mut s, &fixed, false);
                let mut hb = [0u8; wire::REQUEST_HEADER_LEN];
                s.read_exact(&mut hb).unwrap();
                let req = wire::parse_request(&hb).unwrap();
                assert_eq!(req.flags & wire::FLAG_SLOT, 0, "no slot without the area");
                let r = wire::ReplyHeader {
                    kind: wire::KIND_REPLY,
                    error: 0,
                    id: req.id,
                    data_len: req.length,
                };
                s.write_all(&wire::encode_reply(&r)).unwrap();
                s.write_all(&vec![0x5a; req.length as usize]).unwrap();
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
                return hellos;
            }
        });
        let mut c = cfg(vec![Addr::Unix(path)]);
        c.kill_local = false;
        let ep = Endpoint::start(c).unwrap();
        let active = ep.inner.state.lock().active.clone().unwrap();
        assert!(active.shm.is_none() && !active.stored);
        let mut buf = vec![0u8; 4096];
        ep.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5a));
        ep.close();
        old.join().unwrap()
    }

    /// A driver refuses slot requests it cannot honour (a slot past the area, a length over
    /// a slot) by closing the connection, and answers a good one from the slot.
    #[test]
    fn the_driver_checks_slot_numbers_and_lengths_from_the_endpoint() {
        use std::os::unix::net::UnixStream;
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(MemDisk::new(1 << 20));
        disk.write_at(&[9; 4096], 8192, WriteFlags::default())
            .unwrap();
        let Addr::Unix(path) = start_driver(dir.path(), "a", disk, None) else {
            unreachable!()
        };
        // (slot, length, accepted)
        for (slot, length, ok) in [(1u16, 4096u32, true), (2, 4096, false), (0, 4097, false)] {
            let mut s = UnixStream::connect(&path).unwrap();
            let hello = wire::Hello {
                keyed: false,
                shm: true,
                stored: false,
                generation: 5,
                nonce: [0; 32],
                export: "vm".into(),
            };
            s.write_all(&wire::encode_hello(&hello)).unwrap();
            let mut b = [0u8; wire::HELLO_REPLY_LEN];
            s.read_exact(&mut b).unwrap();
            assert!(wire::parse_hello_reply(&b).unwrap().shm);
            s.write_all(&wire::encode_auth(&[0; 32])).unwrap();
            let mut rd = [0u8; wire::READY_LEN];
            s.read_exact(&mut rd).unwrap();
            assert_eq!(wire::parse_ready(&rd).unwrap(), 0);
            let area = shm::Area::create(2, 4096).unwrap();
            shm::send_offer(&s, &area).unwrap();
            let req = RequestHeader {
                op: wire::OP_READ,
                flags: wire::FLAG_SLOT,
                id: 1,
                generation: 5,
                offset: 8192,
                length,
                slot,
            };
            s.write_all(&wire::encode_request(&req)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let answer = loop {
                let mut hb = [0u8; wire::REPLY_HEADER_LEN];
                if s.read_exact(&mut hb).is_err() {
                    break None;
                }
                let h = wire::parse_reply(&hb).unwrap();
                if h.kind != wire::KIND_HEARTBEAT {
                    break Some(h);
                }
            };
            if ok {
                let h = answer.expect("a reply");
                assert_eq!(
                    (h.kind, h.error, h.id, h.data_len),
                    (wire::KIND_REPLY_SLOT, 0, 1, 4096)
                );
                let mut out = vec![0u8; 4096];
                area.take(slot.into(), &mut out).unwrap();
                assert!(out.iter().all(|&x| x == 9));
            } else {
                assert_eq!(
                    answer, None,
                    "slot {slot} length {length} must close the connection"
                );
            }
        }
    }
}
