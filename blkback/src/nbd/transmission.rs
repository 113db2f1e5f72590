//! The transmission phase: read requests, run them on worker threads, send replies.
//!
//! ```text
//!   reader (this task) ──Op──▶ WorkerPool: request::execute ──frame──▶ writer task
//!        │  (or Disk::submit, when the disk takes it: the failover endpoint)    │
//!        │  at most MAX_IN_FLIGHT requests outstanding (a semaphore)            │
//!        └── header errors that need no disk (bad flags, bad command) ──────────┘
//! ```
//!
//! Requests are pipelined and replies may leave out of order, as the protocol allows. A
//! FLUSH is executed after every earlier request *completed* (the client only counts on
//! writes it saw replies for), which the disk's `flush` contract covers. On DISC or shutdown
//! the reader stops, every outstanding request is answered, and the connection closes.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, Semaphore};

use super::handshake::{Session, CTX_ALLOCATION_DEPTH, CTX_BASE_ALLOCATION};
use super::shutdown::Shutdown;
use super::wire::*;
use crate::disk::{DiskError, Extent};
use crate::export::{Export, ExportStats};
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

    fn read(&self, cookie: u64, offset: u64, mut buf: Vec<u8>, headroom: usize) -> Vec<u8> {
        let len = buf.len() - headroom;
        if self.structured {
            if len == 0 {
                return chunk(REPLY_FLAG_DONE, CHUNK_NONE, cookie, &[]);
            }
            put_chunk_header(
                &mut buf,
                REPLY_FLAG_DONE,
                CHUNK_OFFSET_DATA,
                cookie,
                len as u32 + 8,
            );
            buf[CHUNK_HEADER_LEN..headroom].copy_from_slice(&offset.to_be_bytes());
        } else {
            put_simple_reply(&mut buf, 0, cookie);
        }
        buf
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
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer_task = tokio::spawn(write_replies(writer, rx));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize));
    let result = read_requests(
        reader, &export, &replier, &tx, &in_flight, workers, shutdown,
    )
    .await;
    // Answer everything outstanding before closing.
    let _all = in_flight.acquire_many(MAX_IN_FLIGHT).await;
    drop(tx);
    let written = writer_task.await.map_err(io::Error::other)?;
    result?;
    written?;
    Ok(())
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
    tx: &mpsc::UnboundedSender<Vec<u8>>,
    in_flight: &Arc<Semaphore>,
    workers: &WorkerPool,
    shutdown: &mut Shutdown,
) -> Result<(), TransmissionError> {
    loop {
        let mut hb = [0u8; REQUEST_HEADER_LEN];
        tokio::select! {
            r = reader.read_exact(&mut hb) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            },
            _ = shutdown.recv() => return Ok(()),
        }
        let h = parse_request(&hb)?;
        let decoded = decode(reader, &h, export, replier).await?;
        let op = match decoded {
            Decoded::Disconnect => return Ok(()),
            Decoded::Ok => {
                let _ = tx.send(replier.ok(h.cookie));
                continue;
            }
            Decoded::Reply(errno, msg) => {
                ExportStats::add(&export.stats.errors, 1);
                let _ = tx.send(replier.error(h.cookie, errno, msg));
                continue;
            }
            Decoded::Run(op) => op,
        };
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let (export, replier, tx) = (export.clone(), replier.clone(), tx.clone());
        let req_one = h.flags & CMD_FLAG_REQ_ONE != 0;
        count(&export.stats, &op);
        let headroom = replier.read_headroom();
        let finish = {
            let export = export.clone();
            move |res: Result<Completion, RequestError>| {
                let _ = tx.send(reply_frame(&export, &replier, &h, req_one, res));
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

/// The reply frame for a finished request.
fn reply_frame(
    export: &Export,
    replier: &Replier,
    h: &RequestHeader,
    req_one: bool,
    res: Result<Completion, RequestError>,
) -> Vec<u8> {
    match res {
        Ok(Completion::Read { buf, headroom }) => replier.read(h.cookie, h.offset, buf, headroom),
        Ok(Completion::Done) => replier.ok(h.cookie),
        Ok(Completion::Extents(e)) => replier.block_status(h.cookie, &e, req_one),
        Err(err) => {
            ExportStats::add(&export.stats.errors, 1);
            let errno = nbd_errno(h.command, &err.error);
            tracing::debug!(export = %export.name, command = h.command, offset = h.offset,
                len = h.len, error = %err.error, "request failed");
            replier.error(h.cookie, errno, &err.error.to_string())
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
        let mut data = vec![0u8; h.len as usize];
        reader.read_exact(&mut data).await?;
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
