//! A storage driver: serves channel requests ([`super::wire`]) from a disk stack, many in
//! flight, and sends a heartbeat on every connection.
//!
//! Each connection opens its own disk stack when its **first request** arrives, not at
//! hello: a standby connection may sit idle for hours while the active driver writes the
//! same overlay, and the overlay keeps its cluster map in memory between flushes. Opening at
//! takeover (after the endpoint made sure the old driver is gone) reads the map as the old
//! driver last flushed it; the endpoint then re-sends the writes acknowledged since that
//! flush, so the new stack sees every acknowledged write. The hello only probes the export
//! for its size.
//!
//! Threads: one accept loop; per connection a reader and a heartbeat thread; a shared pool
//! of workers. The reader runs reads and writes up to 128 KiB itself, in order, and sends
//! their replies in one write per batch (while whole requests are already buffered it keeps
//! going), so a burst costs no thread hand-off; flushes, discards, write-zeroes, block
//! status and larger requests go to the pool, whose workers write their replies under the
//! connection's writer lock.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;

use super::fence::{self, Fence, FencedDisk};
use super::shm;
use super::wire::{self, ChannelKey, HelloReply, ReplyHeader, RequestHeader};
use super::{Addr, Stream};
use crate::disk::{check_range, Disk, DiskError, WriteFlags, ZeroFlags};
use crate::export::{ExportConfig, Exports};

/// Opens the disk stack of an export by name: a fresh stack on every call.
pub type Opener = Arc<dyn Fn(&str) -> Result<Arc<dyn Disk>, String> + Send + Sync>;

/// The fence record of an export by name (`None`: not fenced). See [`super::fence`].
pub type Fencer = Arc<dyn Fn(&str) -> Option<PathBuf> + Send + Sync>;

/// A fencer over export configurations: `<overlay>.fence` (or `<template>.fence`), none for
/// read-only exports.
pub fn fencer_for(configs: Vec<ExportConfig>) -> Fencer {
    Arc::new(move |name: &str| {
        configs
            .iter()
            .find(|c| c.name == name)
            .and_then(fence::record_for)
    })
}

/// An opener over export configurations (template, overlay): each call opens the files.
pub fn opener_for(configs: Vec<ExportConfig>) -> Opener {
    Arc::new(move |name: &str| {
        let c = configs
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| format!("no export {name:?}"))?;
        let ex = Exports::open(std::slice::from_ref(c)).map_err(|e| {
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                s.push_str(": ");
                s.push_str(&c.to_string());
                cur = c.source();
            }
            s
        })?;
        let disk = ex.get(name).map(|e| e.disk.clone());
        disk.ok_or_else(|| format!("no export {name:?}"))
    })
}

/// Driver settings.
#[derive(Clone)]
pub struct DriverConfig {
    pub opener: Opener,
    /// Where each export's fence record is; `None` turns the generation fence off.
    pub fencer: Option<Fencer>,
    /// How often a heartbeat is sent on every connection.
    pub heartbeat_interval: Duration,
    /// Pre-shared key; connections without it are refused.
    pub key: Option<ChannelKey>,
    /// Worker threads running disk calls.
    pub workers: usize,
    /// Pin each connection's reader (which also runs the small requests) to this CPU and
    /// keep the workers off it; give the endpoint the same one ([`super::affinity`]).
    pub reader_cpu: Option<usize>,
}

impl std::fmt::Debug for DriverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverConfig")
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("keyed", &self.key.is_some())
            .field("fenced", &self.fencer.is_some())
            .field("workers", &self.workers)
            .field("reader_cpu", &self.reader_cpu)
            .finish()
    }
}

/// A bound driver socket.
#[derive(Debug)]
pub enum DriverListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl DriverListener {
    /// Bind `addr`. A Unix socket file left by a dead driver (nobody accepts on it) is
    /// removed first, so a restarted driver takes its old place.
    ///
    /// # Errors
    /// Bind errors, or a live listener already on the path.
    pub fn bind(addr: &Addr) -> io::Result<Self> {
        match addr {
            Addr::Unix(p) => match UnixListener::bind(p) {
                Ok(l) => Ok(Self::Unix(l)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    if std::os::unix::net::UnixStream::connect(p).is_ok() {
                        return Err(e);
                    }
                    std::fs::remove_file(p)?;
                    Ok(Self::Unix(UnixListener::bind(p)?))
                }
                Err(e) => Err(e),
            },
            Addr::Tcp(a) => Ok(Self::Tcp(TcpListener::bind(a.as_str())?)),
        }
    }

    /// The bound address, for printing (`tcp:` with the real port).
    pub fn local_addr(&self) -> io::Result<Addr> {
        Ok(match self {
            Self::Unix(l) => Addr::Unix(
                l.local_addr()?
                    .as_pathname()
                    .map(|p| p.to_owned())
                    .unwrap_or_default(),
            ),
            Self::Tcp(l) => Addr::Tcp(l.local_addr()?.to_string()),
        })
    }

    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Self::Unix(l) => Stream::Unix(l.accept()?.0),
            Self::Tcp(l) => {
                let s = l.accept()?.0;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        })
    }
}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Serve connections on `listener` until the process ends. Each connection gets its own
/// threads; a connection's failure never stops the others.
///
/// # Errors
/// The reader CPU is not one this process may run on; the worker threads cannot be
/// started; `accept` fails persistently.
pub fn run(listener: DriverListener, cfg: DriverConfig) -> io::Result<()> {
    if let Some(cpu) = cfg.reader_cpu {
        super::affinity::check_cpu(cpu)?;
    }
    let (tx, rx) = crossbeam_channel::unbounded::<Job>();
    for i in 0..cfg.workers.max(1) {
        let rx = rx.clone();
        let reader_cpu = cfg.reader_cpu;
        std::thread::Builder::new()
            .name(format!("fo-driver-{i}"))
            .spawn(move || {
                // Large requests and flushes run here: off the readers' CPU, so they never
                // stand between a reader and its CPU.
                if let Some(cpu) = reader_cpu {
                    if let Err(e) = super::affinity::keep_this_thread_off(cpu) {
                        tracing::warn!(cpu, error = %e, "cannot keep a worker off the reader CPU");
                    }
                }
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
    }
    let mut failures = 0;
    loop {
        match listener.accept() {
            Ok(stream) => {
                failures = 0;
                let (cfg, tx) = (cfg.clone(), tx.clone());
                std::thread::Builder::new()
                    .name("fo-driver-conn".into())
                    .spawn(move || {
                        super::affinity::pin_reader(cfg.reader_cpu, "driver");
                        if let Err(e) = serve_connection(stream, &cfg, &tx) {
                            tracing::info!(error = %e, "driver connection ended");
                        }
                    })?;
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "accept failed");
                if failures > 100 {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn bad(e: wire::WireError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// One connection's shared state.
struct Conn {
    writer: Mutex<Stream>,
    closed: AtomicBool,
    generation: u64,
    export: String,
    opener: Opener,
    fencer: Option<Fencer>,
    fence: OnceLock<Arc<Fence>>,
    disk: OnceLock<Result<Arc<dyn Disk>, String>>,
    /// The endpoint's shared data area, when it offered one.
    area: Option<shm::Area>,
    /// Both sides agreed on stored-write replies ([`wire::HELLO_STORED`]).
    stored: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(f) = self.fence.get() {
            if f.refused() > 0 {
                tracing::warn!(
                    export = %self.export, generation = self.generation, refused = f.refused(),
                    "connection ended; the fence refused its writes after a newer driver took over"
                );
            }
        }
    }
}

impl Conn {
    fn send(&self, h: &ReplyHeader, data: &[u8]) {
        let mut w = self.writer.lock();
        let r = super::write_frame(&mut *w, &wire::encode_reply(h), data);
        if r.is_err() {
            self.close(&w);
        }
    }

    /// Send already encoded reply frames.
    fn send_raw(&self, frames: &[u8]) {
        let mut w = self.writer.lock();
        if w.write_all(frames).is_err() {
            self.close(&w);
        }
    }

    fn close(&self, w: &Stream) {
        self.closed.store(true, Ordering::Release);
        w.shutdown();
    }

    /// The connection's disk stack, opened on first use: first the storage is taken over for
    /// this connection's generation (the fence), then the stack is opened and wrapped so its
    /// writes stop once a newer generation takes over.
    fn disk(&self) -> Result<Arc<dyn Disk>, String> {
        self.disk
            .get_or_init(|| {
                let record = self.fencer.as_ref().and_then(|f| f(&self.export));
                let fence = match record {
                    None => None,
                    Some(path) => {
                        let f = Fence::take_over(&path, self.generation, |waited| {
                            tracing::warn!(
                                record = %path.display(), waited_ms = waited.as_millis() as u64,
                                "takeover waits for a write of a superseded driver to end"
                            )
                        });
                        match f {
                            Ok(f) => {
                                let f = Arc::new(f);
                                let _ = self.fence.set(f.clone());
                                Some(f)
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot take the storage over");
                                return Err(e.to_string());
                            }
                        }
                    }
                };
                let r = (self.opener)(&self.export).map(|d| match &fence {
                    Some(f) => Arc::new(FencedDisk::new(d, f.clone())) as Arc<dyn Disk>,
                    None => d,
                });
                match &r {
                    Ok(_) => tracing::info!(export = %self.export, generation = self.generation, "opened the disk stack"),
                    Err(e) => tracing::error!(export = %self.export, error = %e, "cannot open the disk stack"),
                }
                r
            })
            .clone()
    }
}

/// What a handshake agreed: generation, export, shared area, stored-write replies.
type Accepted = (u64, String, Option<shm::Area>, bool);

fn handshake(s: &mut Stream, cfg: &DriverConfig) -> io::Result<Option<Accepted>> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut fixed = [0u8; wire::HELLO_FIXED_LEN];
    s.read_exact(&mut fixed)?;
    let h = wire::parse_hello_header(&fixed).map_err(bad)?;
    let mut name = vec![0u8; h.name_len];
    s.read_exact(&mut name)?;
    let export = String::from_utf8(name).map_err(|_| bad(wire::WireError::BadName))?;
    let nonce = wire::fresh_nonce();
    let (mut status, mut size, mut read_only) = (0u32, 0, false);
    if cfg.key.is_some() && !h.keyed {
        status = libc::EACCES as u32;
    } else {
        match (cfg.opener)(&export) {
            Ok(d) => (size, read_only) = (d.size(), d.is_read_only()),
            Err(e) => {
                tracing::warn!(export = %export, error = %e, "hello for an export that does not open");
                status = libc::ENOENT as u32;
            }
        }
    }
    let mac = match &cfg.key {
        Some(k) => k.driver_mac(&h.nonce, &nonce, h.generation),
        None => [0; 32],
    };
    let unix = status == 0 && matches!(s, Stream::Unix(_));
    let take_shm = h.shm && unix;
    // Stored writes are in this host's page cache: that helps an endpoint on the same host
    // only (one whose kernel goes down with ours), so Unix sockets only.
    let stored = h.stored && unix;
    let reply = HelloReply {
        keyed: cfg.key.is_some(),
        shm: take_shm,
        stored,
        status,
        pid: std::process::id(),
        size,
        read_only,
        nonce,
        mac,
    };
    s.write_all(&wire::encode_hello_reply(&reply))?;
    if status != 0 {
        return Ok(None);
    }
    let mut auth = [0u8; wire::AUTH_LEN];
    s.read_exact(&mut auth)?;
    let their = wire::parse_auth(&auth).map_err(bad)?;
    let ok = match &cfg.key {
        Some(k) => k.check_endpoint_mac(&h.nonce, &nonce, h.generation, &their),
        None => true,
    };
    s.write_all(&wire::encode_ready(if ok {
        0
    } else {
        libc::EACCES as u32
    }))?;
    if !ok {
        tracing::warn!("endpoint failed authentication");
        return Ok(None);
    }
    let area = match s {
        Stream::Unix(u) if take_shm => Some(shm::recv_offer(&*u)?),
        _ => None,
    };
    s.set_read_timeout(None)?;
    Ok(Some((h.generation, export, area, stored)))
}

fn serve_connection(
    mut stream: Stream,
    cfg: &DriverConfig,
    jobs: &crossbeam_channel::Sender<Job>,
) -> io::Result<()> {
    let Some((generation, export, area, stored)) = handshake(&mut stream, cfg)? else {
        return Ok(());
    };
    tracing::info!(export = %export, generation, "endpoint connected");
    let conn = Arc::new(Conn {
        writer: Mutex::new(stream.try_clone()?),
        closed: AtomicBool::new(false),
        generation,
        export,
        opener: cfg.opener.clone(),
        fencer: cfg.fencer.clone(),
        fence: OnceLock::new(),
        disk: OnceLock::new(),
        area,
        stored,
    });
    let hb = conn.clone();
    let interval = cfg.heartbeat_interval;
    std::thread::Builder::new()
        .name("fo-heartbeat".into())
        .spawn(move || {
            let mut seq = 0u64;
            while !hb.closed.load(Ordering::Acquire) {
                seq += 1;
                let h = ReplyHeader {
                    kind: wire::KIND_HEARTBEAT,
                    error: 0,
                    id: seq,
                    data_len: 0,
                };
                hb.send(&h, &[]);
                std::thread::sleep(interval);
            }
        })?;
    let r = read_requests(
        &mut io::BufReader::with_capacity(super::READ_BUFFER, &mut stream),
        &conn,
        jobs,
    );
    conn.close(&stream);
    r
}

/// Replies of requests run inline are sent once this many bytes are queued, or when no more
/// requests are buffered.
const REPLY_BATCH: usize = 256 << 10;

/// Requests up to this size run inline in the connection's reader (reads into a shared
/// slot at any size); larger ones and flushes (a sync can take long) go to the worker pool.
const INLINE_MAX: u32 = 128 << 10;

/// Whether `buf` starts with a whole request frame (header and data), so the next request
/// can be read without waiting for the endpoint.
fn whole_request(buf: &[u8]) -> bool {
    let Some(head) = buf.first_chunk::<{ wire::REQUEST_HEADER_LEN }>() else {
        return false;
    };
    wire::parse_request(head).is_ok_and(|h| buf.len() - head.len() >= h.data_len())
}

/// Run a READ or WRITE whose data is in area slot `h.slot` (checked by the caller): a READ
/// reads straight into the slot. The reply header to send (no data on the socket).
fn run_slot(conn: &Conn, area: &shm::Area, h: &RequestHeader) -> ReplyHeader {
    let reply = |kind, error, data_len| ReplyHeader {
        kind,
        error,
        id: h.id,
        data_len,
    };
    if h.generation != conn.generation {
        return reply(wire::KIND_REPLY, libc::ESTALE as u32, 0);
    }
    let Ok(d) = conn.disk() else {
        return reply(wire::KIND_REPLY, libc::EIO as u32, 0);
    };
    // A bad or busy slot (the endpoint named it for another request still running).
    let Ok(mut buf) = area.slot_mut(h.slot.into(), h.length as usize) else {
        return reply(wire::KIND_REPLY, libc::EINVAL as u32, 0);
    };
    let r = check_range(h.offset, h.length.into(), d.size()).and_then(|()| {
        if h.op == wire::OP_READ {
            d.read_at(&mut buf, h.offset)
        } else {
            let fua = h.flags & wire::FLAG_FUA != 0;
            d.write_at(&buf, h.offset, WriteFlags { fua })
        }
    });
    drop(buf);
    match r {
        Ok(()) if h.op == wire::OP_READ => reply(wire::KIND_REPLY_SLOT, 0, h.length),
        Ok(()) => reply(done_kind(conn, &*d, h), 0, 0),
        Err(e) => reply(wire::KIND_REPLY, e.errno() as u32, 0),
    }
}

/// The kind of a successful reply without data to `h`: a write, discard or write-zeroes
/// whose result the disk already holds as a new driver would open it is reported stored,
/// when the endpoint agreed to such replies.
fn done_kind(conn: &Conn, d: &dyn Disk, h: &RequestHeader) -> u8 {
    let mutates = matches!(
        h.op,
        wire::OP_WRITE | wire::OP_DISCARD | wire::OP_WRITE_ZEROES
    );
    if conn.stored && mutates && d.write_is_stored(h.offset, h.length.into()) {
        wire::KIND_REPLY_STORED
    } else {
        wire::KIND_REPLY
    }
}

/// Run a request whose data (if any) is on the socket: the reply header and its data.
fn run_request(conn: &Conn, h: &RequestHeader, data: &[u8]) -> (ReplyHeader, Vec<u8>) {
    let reply = |kind, error, out: Vec<u8>| {
        let r = ReplyHeader {
            kind,
            error,
            id: h.id,
            data_len: out.len() as u32,
        };
        (r, out)
    };
    if h.generation != conn.generation {
        return reply(wire::KIND_REPLY, libc::ESTALE as u32, Vec::new());
    }
    match conn.disk() {
        Ok(d) => match execute(&*d, h, data) {
            Ok(out) if out.is_empty() => reply(done_kind(conn, &*d, h), 0, out),
            Ok(out) => reply(wire::KIND_REPLY, 0, out),
            Err(e) => reply(wire::KIND_REPLY, e.errno() as u32, Vec::new()),
        },
        Err(_) => reply(wire::KIND_REPLY, libc::EIO as u32, Vec::new()),
    }
}

/// Read requests and run them. Small reads and writes, and reads into a shared slot, run
/// here, in order, and their replies
/// are batched: they go out in one write when no further request is already buffered (or
/// the batch is large), so a burst of requests costs one read and one write and no thread
/// hand-off. Flushes, discards, write-zeroes, block status and the other large requests run
/// on the worker pool, so a slow sync does not hold up the reads and writes behind it.
fn read_requests<R: Read>(
    stream: &mut io::BufReader<R>,
    conn: &Arc<Conn>,
    jobs: &crossbeam_channel::Sender<Job>,
) -> io::Result<()> {
    let mut batch: Vec<u8> = Vec::with_capacity(REPLY_BATCH);
    // One fence section around the batch's writes: one lock and record check per batch
    // instead of per write. Left before the replies go out, so no answered write is ever
    // inside a section (a driver stopped after answering holds no lock).
    let mut section = None;
    loop {
        if !batch.is_empty() && (!whole_request(stream.buffer()) || batch.len() >= REPLY_BATCH) {
            drop(section.take());
            conn.send_raw(&batch);
            batch.clear();
        }
        let mut hb = [0u8; wire::REQUEST_HEADER_LEN];
        match stream.read_exact(&mut hb) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let h = wire::parse_request(&hb).map_err(bad)?;
        let in_slot = h.flags & wire::FLAG_SLOT != 0;
        if in_slot {
            // The slot and length come from the endpoint: check them before any use.
            let area = conn.area.as_ref().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "a slot request without an area")
            })?;
            area.check(h.slot.into(), h.length as usize)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        let data = super::read_data(stream, 0, h.data_len())?;
        // A read into a shared slot runs here whatever its size (a slot holds at most
        // `shm::DEFAULT_SLOT_SIZE`): handing it to a worker costs a wake-up on another CPU
        // and the reply a second send, more than the copy it would move off this thread.
        let inline = (h.op == wire::OP_READ && in_slot)
            || (matches!(h.op, wire::OP_READ | wire::OP_WRITE) && h.length <= INLINE_MAX);
        if inline {
            if h.op == wire::OP_WRITE && section.is_none() && conn.disk().is_ok() {
                section = conn.fence.get().and_then(|f| f.hold());
            }
            if let (true, Some(area)) = (in_slot, &conn.area) {
                batch.extend_from_slice(&wire::encode_reply(&run_slot(conn, area, &h)));
                continue;
            }
            let (r, out) = run_request(conn, &h, &data);
            batch.extend_from_slice(&wire::encode_reply(&r));
            batch.extend_from_slice(&out);
            continue;
        }
        let conn = conn.clone();
        let job: Job = Box::new(move || {
            if let (true, Some(area)) = (in_slot, &conn.area) {
                conn.send(&run_slot(&conn, area, &h), &[]);
                return;
            }
            let (r, out) = run_request(&conn, &h, &data);
            conn.send(&r, &out);
        });
        if jobs.send(job).is_err() {
            return Err(io::Error::other("worker pool stopped"));
        }
    }
}

/// Run one request against `disk`: the reply data (read data, encoded extents) or the error.
///
/// # Errors
/// The disk's error; out-of-range requests.
pub fn execute(disk: &dyn Disk, h: &RequestHeader, data: &[u8]) -> Result<Vec<u8>, DiskError> {
    let len = u64::from(h.length);
    if h.op != wire::OP_FLUSH {
        check_range(h.offset, len, disk.size())?;
    }
    let fua = h.flags & wire::FLAG_FUA != 0;
    match h.op {
        wire::OP_READ => {
            let mut buf = vec![0u8; h.length as usize];
            disk.read_at(&mut buf, h.offset)?;
            Ok(buf)
        }
        wire::OP_WRITE => disk
            .write_at(data, h.offset, WriteFlags { fua })
            .map(|()| Vec::new()),
        wire::OP_FLUSH => disk.flush().map(|()| Vec::new()),
        wire::OP_DISCARD => disk.discard(h.offset, len).map(|()| Vec::new()),
        wire::OP_WRITE_ZEROES => {
            let flags = ZeroFlags {
                fua,
                fast_only: h.flags & wire::FLAG_FAST_ZERO != 0,
            };
            disk.write_zeroes(h.offset, len, flags).map(|()| Vec::new())
        }
        wire::OP_BLOCK_STATUS => Ok(wire::encode_extents(&disk.block_status(h.offset, len)?)),
        _ => Err(DiskError::NotSupported),
    }
}
