//! The transmission phase: read requests, run them on worker threads, send replies.
//!
//! ```text
//!   reader (this task) ──Op──▶ WorkerPool: request::execute ──frame──▶ writer task
//!        │  (or Disk::submit, when the disk takes it: the failover endpoint)    │
//!        │  at most MAX_IN_FLIGHT requests outstanding (a semaphore)            │
//!        └── header errors that need no disk (bad flags, bad command) ──────────┘
//! ```
//!
//! On a socket (unix or TCP), a disk that completes requests from its own I/O thread (the
//! failover endpoint, through `Disk::submit`) has that thread write the replies of one
//! batch to the socket itself ([`Sink`], [`crate::disk::defer_to_batch_end`]): no task is
//! woken per reply. Replies finished on worker threads go through the writer task, which
//! gathers what is queued into one `writev` ([`crate::iobuf::OutQueue`]: large reads, and
//! reads lent from a failover driver's shared memory, are not copied on the way). On other
//! streams (tests, fuzzing) every reply goes through the writer task as one buffer.
//!
//! Requests are pipelined and replies may leave out of order, as the protocol allows. A
//! FLUSH is executed after every earlier request *completed* (the client only counts on
//! writes it saw replies for), which the disk's `flush` contract covers. On DISC or shutdown
//! the reader stops, every outstanding request is answered, and the connection closes.

use std::any::Any;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, Interest};
use tokio::sync::{mpsc, Semaphore};

use super::handshake::{Session, CTX_ALLOCATION_DEPTH, CTX_BASE_ALLOCATION};
use super::shutdown::Shutdown;
use super::wire::*;
use crate::disk::{defer_to_batch_end, BatchOutput, DiskError, Extent};
use crate::export::{Export, ExportStats};
use crate::iobuf::{Frame, Lent, OutQueue};
use crate::request::{execute, Completion, Op, RequestError};
use crate::workers::WorkerPool;

/// Requests one connection may have outstanding.
pub const MAX_IN_FLIGHT: u32 = 64;
/// Most descriptors sent in one block-status chunk.
const MAX_DESCRIPTORS: usize = 1 << 16;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    #[error("connection I/O")]
    Io(#[from] io::Error),
    #[error("bad request magic; closing")]
    BadMagic(#[from] WireError),
}

/// The NBD errno for a disk error on `command`.
pub fn nbd_errno(command: u16, e: &DiskError) -> u32 {
    match e {
        DiskError::OutOfRange { .. } if matches!(command, CMD_WRITE | CMD_WRITE_ZEROES) => ENOSPC,
        DiskError::OutOfRange { .. } => EINVAL,
        DiskError::ReadOnly => EPERM,
        DiskError::NotSupported => ENOTSUP,
        DiskError::Corrupt(_) => EIO,
        DiskError::Io(io) => match io.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
            Some(libc::EPERM | libc::EROFS) => EPERM,
            Some(libc::ENOMEM) => ENOMEM,
            Some(libc::EINVAL) => EINVAL,
            _ => EIO,
        },
    }
}

/// Encodes replies for one session.
#[derive(Debug, Clone)]
struct Replier {
    structured: bool,
    contexts: Arc<Vec<u32>>,
}

impl Replier {
    fn read_headroom(&self) -> usize {
        if self.structured {
            CHUNK_HEADER_LEN + 8
        } else {
            SIMPLE_REPLY_LEN
        }
    }

    fn error(&self, cookie: u64, errno: u32, msg: &str) -> Vec<u8> {
        if self.structured {
            error_chunk(cookie, errno, msg)
        } else {
            let mut b = vec![0u8; SIMPLE_REPLY_LEN];
            put_simple_reply(&mut b, errno, cookie);
            b
        }
    }

    fn ok(&self, cookie: u64) -> Vec<u8> {
        let mut b = vec![0u8; SIMPLE_REPLY_LEN];
        put_simple_reply(&mut b, 0, cookie);
        b
    }

    fn read(&self, cookie: u64, offset: u64, mut buf: Vec<u8>, headroom: usize) -> Frame {
        let len = buf.len() - headroom;
        if self.structured && len == 0 {
            return chunk(REPLY_FLAG_DONE, CHUNK_NONE, cookie, &[]).into();
        }
        self.put_read_header(&mut buf[..headroom], cookie, offset, len);
        buf.into()
    }

    /// The reply to a read whose data is lent: the header here, the data sent from where
    /// it is.
    fn read_lent(&self, cookie: u64, offset: u64, data: Lent) -> Frame {
        if self.structured && data.is_empty() {
            return chunk(REPLY_FLAG_DONE, CHUNK_NONE, cookie, &[]).into();
        }
        let mut head = vec![0u8; self.read_headroom()];
        self.put_read_header(&mut head, cookie, offset, data.len());
        Frame {
            head,
            body: Some(data),
        }
    }

    /// The header of a successful read's reply with `len` bytes of data at `offset`: a
    /// structured OFFSET_DATA chunk's, or a simple reply's.
    fn put_read_header(&self, head: &mut [u8], cookie: u64, offset: u64, len: usize) {
        if self.structured {
            put_chunk_header(
                head,
                REPLY_FLAG_DONE,
                CHUNK_OFFSET_DATA,
                cookie,
                len as u32 + 8,
            );
            head[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 8].copy_from_slice(&offset.to_be_bytes());
        } else {
            put_simple_reply(head, 0, cookie);
        }
    }

    fn block_status(&self, cookie: u64, extents: &[Extent], req_one: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &ctx) in self.contexts.iter().enumerate() {
            let value = |e: &Extent| match ctx {
                CTX_BASE_ALLOCATION => {
                    (if e.hole { STATE_HOLE } else { 0 }) | (if e.zero { STATE_ZERO } else { 0 })
                }
                CTX_ALLOCATION_DEPTH => e.depth,
                _ => 0,
            };
            let mut descs: Vec<(u32, u32)> = Vec::new();
            for e in extents {
                let v = value(e);
                match descs.last_mut() {
                    Some(last) if last.1 == v => last.0 += e.len as u32,
                    _ => descs.push((e.len as u32, v)),
                }
            }
            let keep = if req_one { 1 } else { MAX_DESCRIPTORS };
            descs.truncate(keep);
            let mut p = ctx.to_be_bytes().to_vec();
            for (len, v) in descs {
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(&v.to_be_bytes());
            }
            let last = i + 1 == self.contexts.len();
            let flags = if last { REPLY_FLAG_DONE } else { 0 };
            out.extend_from_slice(&chunk(flags, CHUNK_BLOCK_STATUS, cookie, &p));
        }
        out
    }
}

fn count(stats: &ExportStats, op: &Op) {
    match op {
        Op::Read { len, .. } => {
            ExportStats::add(&stats.reads, 1);
            ExportStats::add(&stats.bytes_read, u64::from(*len));
        }
        Op::Write { data, .. } => {
            ExportStats::add(&stats.writes, 1);
            ExportStats::add(&stats.bytes_written, data.len() as u64);
        }
        Op::Flush => ExportStats::add(&stats.flushes, 1),
        Op::Discard { .. } => ExportStats::add(&stats.trims, 1),
        Op::WriteZeroes { .. } => ExportStats::add(&stats.zeroes, 1),
        Op::BlockStatus { .. } => {}
    }
}

/// A request decoded from its header: either work for the disk or an immediate reply.
enum Decoded {
    Run(Op),
    Reply(u32, &'static str),
    Ok,
    Disconnect,
}

/// Serve requests until the client disconnects or `shutdown` fires.
///
/// # Errors
/// [`TransmissionError`] for I/O errors and unrecoverable framing errors.
pub async fn serve<R, W>(
    reader: &mut R,
    writer: W,
    session: Session,
    workers: &Arc<WorkerPool>,
    shutdown: &mut Shutdown,
) -> Result<(), TransmissionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let export = session.export.clone();
    let replier = Replier {
        structured: session.structured,
        contexts: Arc::new(session.contexts),
    };
    let (replies, writer_task) = match SinkSocket::from_writer(writer) {
        Ok(sock) => {
            let reply_rt = export.disk.reply_runtime();
            let sink = Arc::new(Sink::new(sock, reply_rt.is_some()));
            let task = match reply_rt {
                Some(rt) => rt.spawn(sink.clone().write_rest()),
                None => tokio::spawn(sink.clone().write_rest()),
            };
            (Replies::Direct(sink), task)
        }
        Err(writer) => {
            let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
            (Replies::Queue(tx), tokio::spawn(write_replies(writer, rx)))
        }
    };
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize));
    let result = read_requests(
        reader, &export, &replier, &replies, &in_flight, workers, shutdown,
    )
    .await;
    export.disk.submit_flush();
    // Answer everything outstanding before closing.
    let _all = in_flight.acquire_many(MAX_IN_FLIGHT).await;
    replies.close();
    let written = writer_task.await.map_err(io::Error::other)?;
    result?;
    written?;
    Ok(())
}

/// Where replies go: straight to the socket, or through the writer task.
#[derive(Clone)]
enum Replies {
    Direct(Arc<Sink>),
    Queue(mpsc::UnboundedSender<Vec<u8>>),
}

impl Replies {
    fn send(&self, frame: Frame) {
        match self {
            Replies::Direct(s) => s.send(frame),
            Replies::Queue(tx) => {
                let _ = tx.send(frame.into_vec());
            }
        }
    }

    /// No more replies: the writer task ends once everything queued is written.
    fn close(self) {
        if let Replies::Direct(s) = self {
            s.close();
        }
    }
}

/// The write half of a client socket, written from any thread with non-blocking writes.
enum SinkSocket {
    Unix(tokio::net::unix::OwnedWriteHalf),
    Tcp(tokio::net::tcp::OwnedWriteHalf),
}

impl SinkSocket {
    /// The socket behind `writer`, when it is one; else `writer` back.
    fn from_writer<W: Send + 'static>(writer: W) -> Result<Self, W> {
        let any: Box<dyn Any + Send> = Box::new(writer);
        let any = match any.downcast::<tokio::net::unix::OwnedWriteHalf>() {
            Ok(w) => return Ok(SinkSocket::Unix(*w)),
            Err(a) => a,
        };
        let any = match any.downcast::<tokio::net::tcp::OwnedWriteHalf>() {
            Ok(w) => return Ok(SinkSocket::Tcp(*w)),
            Err(a) => a,
        };
        Err(*any.downcast::<W>().expect("the writer's own type"))
    }

    /// Write what the socket takes of `q` now, without waiting.
    fn try_write(&self, q: &mut OutQueue) -> io::Result<usize> {
        match self {
            SinkSocket::Unix(w) => {
                let s: &tokio::net::UnixStream = w.as_ref();
                s.try_io(Interest::WRITABLE, || q.write_to(s.as_fd()))
            }
            SinkSocket::Tcp(w) => {
                let s: &tokio::net::TcpStream = w.as_ref();
                s.try_io(Interest::WRITABLE, || q.write_to(s.as_fd()))
            }
        }
    }

    async fn writable(&self) -> io::Result<()> {
        match self {
            SinkSocket::Unix(w) => w.writable().await,
            SinkSocket::Tcp(w) => w.writable().await,
        }
    }
}

#[derive(Default)]
struct SinkState {
    /// Whole frames not written yet (the start of the first may have been written).
    out: OutQueue,
    /// The writer task owns the socket until `out` is empty: nobody else writes.
    handed_off: bool,
    closed: bool,
    error: Option<io::Error>,
}

/// A client socket that a disk's I/O thread writes its replies to itself.
///
/// Replies are queued whole, in order ([`OutQueue`]: large and lent data are not copied). A disk's I/O thread writes the queue with a
/// non-blocking write at the end of its batch; what the socket does not take, and what
/// other threads queue, the writer task ([`Sink::write_rest`]) writes, waiting for the
/// socket. Frames never interleave: only one writer writes at a time (under the lock, or
/// the writer task while `handed_off`).
struct Sink {
    sock: SinkSocket,
    state: Mutex<SinkState>,
    wake: tokio::sync::Notify,
    /// Frames of [`LARGE_REPLY`] bytes or more always go to the writer task (which runs
    /// where the disk asked, [`crate::disk::Disk::reply_runtime`]), not through the disk
    /// thread's own write.
    large_to_writer: bool,
}

/// See [`Sink::large_to_writer`].
const LARGE_REPLY: usize = 64 << 10;

impl Sink {
    fn new(sock: SinkSocket, large_to_writer: bool) -> Self {
        Self {
            sock,
            state: Mutex::new(SinkState::default()),
            wake: tokio::sync::Notify::new(),
            large_to_writer,
        }
    }

    /// Queue `frame`. On a thread that batches its completions (a disk's own I/O thread,
    /// see [`crate::disk::batch_completions_on_this_thread`]) it is written by that thread at
    /// the end of its batch; from any other thread (a worker, the reader task) the writer
    /// task is woken to write it, as it gathers whatever else is queued by then.
    fn send(self: &Arc<Self>, frame: Frame) {
        let mut st = self.state.lock();
        if st.error.is_some() || st.closed {
            return;
        }
        let large = self.large_to_writer
            && frame.head.len() + frame.body.as_ref().map_or(0, |b| b.len()) >= LARGE_REPLY;
        st.out.push(frame);
        let out: Arc<dyn BatchOutput> = self.clone();
        if !large && defer_to_batch_end(&out) {
            return;
        }
        if !st.handed_off {
            st.handed_off = true;
            self.wake.notify_one();
        }
    }

    /// Write what is queued, unless the writer task owns the socket.
    fn write_queued(&self, st: &mut SinkState) {
        if st.handed_off || st.out.is_empty() || st.error.is_some() {
            return;
        }
        while !st.out.is_empty() {
            match self.sock.try_write(&mut st.out) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    st.handed_off = true;
                    self.wake.notify_one();
                    return;
                }
                Err(e) => return self.fail(st, e),
            }
        }
    }

    fn fail(&self, st: &mut SinkState, e: io::Error) {
        st.out = OutQueue::default();
        st.error = Some(e);
        self.wake.notify_one();
    }

    fn close(&self) {
        self.state.lock().closed = true;
        self.wake.notify_one();
    }

    /// The writer task: write what the socket did not take at once, waiting until it is
    /// writable; end when closed with nothing left (or at the first error).
    async fn write_rest(self: Arc<Self>) -> io::Result<()> {
        loop {
            let chunk = {
                let mut st = self.state.lock();
                if let Some(e) = &st.error {
                    return Err(io::Error::new(e.kind(), e.to_string()));
                }
                if st.handed_off && !st.out.is_empty() {
                    Some(std::mem::take(&mut st.out))
                } else {
                    st.handed_off = false;
                    if st.closed {
                        // Batched frames not yet written (none once every request is
                        // answered and its batch ended; kept for safety).
                        if !st.out.is_empty() {
                            st.handed_off = true;
                            Some(std::mem::take(&mut st.out))
                        } else {
                            return Ok(());
                        }
                    } else {
                        None
                    }
                }
            };
            let Some(mut chunk) = chunk else {
                self.wake.notified().await;
                continue;
            };
            while !chunk.is_empty() {
                self.sock.writable().await?;
                match self.sock.try_write(&mut chunk) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => {
                        let mut st = self.state.lock();
                        self.fail(&mut st, io::Error::new(e.kind(), e.to_string()));
                        return Err(e);
                    }
                }
            }
        }
    }
}

impl BatchOutput for Sink {
    fn end_of_batch(&self) {
        let mut st = self.state.lock();
        self.write_queued(&mut st);
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(64 << 10, writer);
    while let Some(frame) = rx.recv().await {
        w.write_all(&frame).await?;
        while let Ok(more) = rx.try_recv() {
            w.write_all(&more).await?;
        }
        w.flush().await?;
    }
    w.shutdown().await.or(Ok(()))
}

async fn read_requests<R: AsyncRead + Unpin>(
    reader: &mut R,
    export: &Arc<Export>,
    replier: &Replier,
    tx: &Replies,
    in_flight: &Arc<Semaphore>,
    workers: &WorkerPool,
    shutdown: &mut Shutdown,
) -> Result<(), TransmissionError> {
    loop {
        let mut hb = [0u8; REQUEST_HEADER_LEN];
        let header = {
            let mut read = std::pin::pin!(reader.read_exact(&mut hb));
            match poll_once(read.as_mut()).await {
                Some(r) => r,
                None => {
                    // Nothing more buffered: start what the disk held back before waiting.
                    export.disk.submit_flush();
                    tokio::select! {
                        r = read => r,
                        _ = shutdown.recv() => return Ok(()),
                    }
                }
            }
        };
        match header {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let h = parse_request(&hb)?;
        let decoded = {
            let mut dec = std::pin::pin!(decode(reader, &h, export, replier));
            match poll_once(dec.as_mut()).await {
                Some(d) => d,
                None => {
                    export.disk.submit_flush();
                    dec.await
                }
            }
        }?;
        let op = match decoded {
            Decoded::Disconnect => return Ok(()),
            Decoded::Ok => {
                tx.send(replier.ok(h.cookie).into());
                continue;
            }
            Decoded::Reply(errno, msg) => {
                ExportStats::add(&export.stats.errors, 1);
                tx.send(replier.error(h.cookie, errno, msg).into());
                continue;
            }
            Decoded::Run(op) => op,
        };
        let permit = match in_flight.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                export.disk.submit_flush();
                in_flight
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed")
            }
        };
        let (export, replier, tx) = (export.clone(), replier.clone(), tx.clone());
        let req_one = h.flags & CMD_FLAG_REQ_ONE != 0;
        count(&export.stats, &op);
        let headroom = replier.read_headroom();
        let finish = {
            let export = export.clone();
            move |res: Result<Completion, RequestError>| {
                tx.send(reply_frame(&export, &replier, &h, req_one, res));
                drop(permit);
            }
        };
        // A disk that completes requests from its own I/O thread (the failover endpoint)
        // takes the request here, with no worker hand-off; the others run on a worker.
        if let Err((op, finish)) = export.disk.submit(op, headroom, Box::new(finish)) {
            workers.submit(move || finish(execute(&*export.disk, op, headroom)));
        }
    }
}

/// Poll `fut` once: its output if it is ready now, `None` if it would wait (its waker is
/// registered; poll it again to wait).
async fn poll_once<F: std::future::Future + Unpin>(fut: F) -> Option<F::Output> {
    let mut fut = fut;
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// The reply frame for a finished request.
fn reply_frame(
    export: &Export,
    replier: &Replier,
    h: &RequestHeader,
    req_one: bool,
    res: Result<Completion, RequestError>,
) -> Frame {
    match res {
        Ok(Completion::Read { buf, headroom }) => replier.read(h.cookie, h.offset, buf, headroom),
        Ok(Completion::Lent(data)) => replier.read_lent(h.cookie, h.offset, data),
        Ok(Completion::Done) => replier.ok(h.cookie).into(),
        Ok(Completion::Extents(e)) => replier.block_status(h.cookie, &e, req_one).into(),
        Err(err) => {
            ExportStats::add(&export.stats.errors, 1);
            let errno = nbd_errno(h.command, &err.error);
            tracing::debug!(export = %export.name, command = h.command, offset = h.offset,
                len = h.len, error = %err.error, "request failed");
            replier
                .error(h.cookie, errno, &err.error.to_string())
                .into()
        }
    }
}

/// Turn a header (and a WRITE's payload) into an [`Op`] or an immediate reply.
async fn decode<R: AsyncRead + Unpin>(
    reader: &mut R,
    h: &RequestHeader,
    export: &Export,
    replier: &Replier,
) -> io::Result<Decoded> {
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (h.offset, u64::from(h.len));
    let mb = u64::from(export.min_block);
    let misaligned = matches!(
        h.command,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE
    ) && (offset % mb != 0 || len % mb != 0);
    if h.command == CMD_WRITE {
        // The payload follows whatever we think of the request: consume it first.
        if h.len > MAX_PAYLOAD {
            tokio::io::copy(&mut (&mut *reader).take(len), &mut tokio::io::sink()).await?;
            return Ok(Decoded::Reply(
                EINVAL,
                "write larger than the maximum block size",
            ));
        }
        // Read into the vector's spare capacity: no zero-fill of a buffer about to be
        // overwritten (a memset of every written byte).
        let n = h.len as usize;
        let mut data = Vec::with_capacity(n);
        let mut payload = (&mut *reader).take(len);
        while data.len() < n {
            if payload.read_buf(&mut data).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        if h.flags & !CMD_FLAGS_KNOWN != 0 {
            return Ok(Decoded::Reply(EINVAL, "unknown command flags"));
        }
        if misaligned {
            return Ok(Decoded::Reply(
                EINVAL,
                "request not aligned to the minimum block size",
            ));
        }
        return Ok(Decoded::Run(Op::Write { offset, data, fua }));
    }
    if h.flags & !CMD_FLAGS_KNOWN != 0 {
        return Ok(Decoded::Reply(EINVAL, "unknown command flags"));
    }
    if misaligned {
        return Ok(Decoded::Reply(
            EINVAL,
            "request not aligned to the minimum block size",
        ));
    }
    Ok(match h.command {
        CMD_READ if h.len > MAX_PAYLOAD => {
            Decoded::Reply(EINVAL, "read larger than the maximum block size")
        }
        CMD_READ => Decoded::Run(Op::Read { offset, len: h.len }),
        CMD_DISC => Decoded::Disconnect,
        CMD_FLUSH => Decoded::Run(Op::Flush),
        CMD_TRIM => Decoded::Run(Op::Discard { offset, len, fua }),
        CMD_WRITE_ZEROES => Decoded::Run(Op::WriteZeroes {
            offset,
            len,
            fua,
            fast_only: h.flags & CMD_FLAG_FAST_ZERO != 0,
        }),
        CMD_BLOCK_STATUS if !replier.structured || replier.contexts.is_empty() => {
            Decoded::Reply(EINVAL, "no meta context negotiated")
        }
        CMD_BLOCK_STATUS if h.len == 0 => Decoded::Reply(EINVAL, "zero-length block status"),
        CMD_BLOCK_STATUS => Decoded::Run(Op::BlockStatus { offset, len }),
        CMD_CACHE => match offset.checked_add(len) {
            Some(end) if end <= export.disk.size() => Decoded::Ok,
            _ => Decoded::Reply(EINVAL, "range beyond the end of the export"),
        },
        _ => Decoded::Reply(EINVAL, "unknown command"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{Disk, Done, WriteFlags, ZeroFlags};
    use crate::memory::MemDisk;
    use crate::nbd::client::Client;

    /// A disk that completes the requests it takes (all but flushes) from its own thread,
    /// several per batch, as the failover endpoint's connection reader does.
    #[derive(Debug)]
    struct ThreadedDisk {
        mem: Arc<MemDisk>,
        tx: std::sync::Mutex<std::sync::mpsc::Sender<(Op, usize, Done)>>,
    }

    impl ThreadedDisk {
        fn new(size: u64) -> Self {
            let mem = Arc::new(MemDisk::new(size));
            let (tx, rx) = std::sync::mpsc::channel::<(Op, usize, Done)>();
            let m = mem.clone();
            std::thread::spawn(move || {
                crate::disk::batch_completions_on_this_thread();
                while let Ok(first) = rx.recv() {
                    for (op, headroom, done) in std::iter::once(first).chain(rx.try_iter()) {
                        done(execute(&*m, op, headroom));
                    }
                    crate::disk::end_completion_batch();
                }
            });
            Self {
                mem,
                tx: std::sync::Mutex::new(tx),
            }
        }
    }

    impl Disk for ThreadedDisk {
        fn size(&self) -> u64 {
            self.mem.size()
        }
        fn is_read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64, f: WriteFlags) -> Result<(), DiskError> {
            self.mem.write_at(buf, offset, f)
        }
        fn flush(&self) -> Result<(), DiskError> {
            self.mem.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
            self.mem.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, f: ZeroFlags) -> Result<(), DiskError> {
            self.mem.write_zeroes(offset, len, f)
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
            self.mem.block_status(offset, len)
        }
        fn submit(&self, op: Op, headroom: usize, done: Done) -> Result<(), (Op, Done)> {
            if matches!(op, Op::Flush) {
                return Err((op, done));
            }
            self.tx
                .lock()
                .unwrap()
                .send((op, headroom, done))
                .map_err(|e| (e.0 .0, e.0 .2))
        }
    }

    /// Replies written by the disk's own thread (batched) and by the writer task (flushes
    /// run on a worker) share the socket: with the client not reading until 24 MiB of read
    /// replies are queued (far more than the socket buffer holds, so the disk thread's
    /// non-blocking writes stop short and the writer task finishes them), every reply
    /// arrives whole and carries its own block's data.
    #[test]
    fn replies_from_the_disk_thread_and_workers_arrive_whole() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let l = {
            let _g = rt.enter();
            tokio::net::UnixListener::bind(&sock).unwrap()
        };
        let disk: Arc<dyn Disk> = Arc::new(ThreadedDisk::new(32 * MIB));
        let exports =
            crate::export::Exports::from_disks(vec![("vm".into(), "t".into(), disk)]).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(crate::nbd::run(
            crate::nbd::Listener::Unix(l),
            exports,
            async move {
                let _ = stopped.await;
            },
        ));
        // Structured replies: the raw client reads a simple reply's data only in `read`.
        let structured = true;
        {
            let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            let mut c = Client::connect(s, "vm", structured).unwrap();
            let block = |i: u64| -> Vec<u8> {
                (0..MIB)
                    .map(|j| (i * 7 + j / 4096 + u64::from(structured)) as u8)
                    .collect()
            };
            for i in 0..24 {
                c.write(i * MIB, &block(i), false).unwrap();
            }
            // First reads only (the disk thread's own writes stop short), then reads mixed
            // with flushes (answered through the writer task).
            for flushes in [false, true] {
                let mut cookies = std::collections::HashMap::new();
                for i in 0..24 {
                    let ck = c.send(CMD_READ, 0, i * MIB, MIB as u32, &[]).unwrap();
                    cookies.insert(ck, Some(i));
                    if flushes && i % 6 == 0 {
                        cookies.insert(c.send(CMD_FLUSH, 0, 0, 0, &[]).unwrap(), None);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(300));
                for _ in 0..cookies.len() {
                    let r = c.recv().unwrap();
                    assert_eq!(r.error, 0);
                    match cookies
                        .remove(&r.cookie)
                        .expect("a reply for a request sent")
                    {
                        Some(i) => assert!(
                            r.data == block(i),
                            "block {i} read back wrong ({} bytes)",
                            r.data.len()
                        ),
                        None => assert!(r.data.is_empty()),
                    }
                }
            }
            c.disconnect().unwrap();
        }
        let _ = stop.send(());
        rt.block_on(server).unwrap().unwrap();
    }

    #[test]
    fn errno_mapping_follows_the_protocol() {
        let oor = DiskError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(nbd_errno(CMD_WRITE, &oor), ENOSPC);
        assert_eq!(nbd_errno(CMD_READ, &oor), EINVAL);
        assert_eq!(nbd_errno(CMD_TRIM, &oor), EINVAL);
        assert_eq!(nbd_errno(CMD_TRIM, &DiskError::ReadOnly), EPERM);
        assert_eq!(
            nbd_errno(CMD_WRITE_ZEROES, &DiskError::NotSupported),
            ENOTSUP
        );
        let q = DiskError::Io(io::Error::from_raw_os_error(libc::EDQUOT));
        assert_eq!(nbd_errno(CMD_WRITE, &q), ENOSPC);
    }

    #[test]
    fn block_status_merges_per_context_and_honours_req_one() {
        let r = Replier {
            structured: true,
            contexts: Arc::new(vec![CTX_BASE_ALLOCATION]),
        };
        let ext = [
            Extent {
                len: 10,
                hole: false,
                zero: false,
                depth: 1,
            },
            Extent {
                len: 6,
                hole: false,
                zero: false,
                depth: 2,
            },
            Extent {
                len: 4,
                hole: true,
                zero: true,
                depth: 1,
            },
        ];
        let b = r.block_status(7, &ext, false);
        // header + ctx id + 2 descriptors (the first two merge for base:allocation)
        assert_eq!(b.len(), CHUNK_HEADER_LEN + 4 + 16);
        assert_eq!(
            &b[CHUNK_HEADER_LEN + 4..CHUNK_HEADER_LEN + 8],
            &16u32.to_be_bytes()
        );
        let one = r.block_status(7, &ext, true);
        assert_eq!(one.len(), CHUNK_HEADER_LEN + 4 + 8);
    }
}
