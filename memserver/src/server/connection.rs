//! One client connection: decode frames, enforce the handshake, execute, reply.
//!
//! The handler reads into one buffer, executes every whole frame in it, and writes all their
//! replies with one `write_all`, so a pipelining client gets batched syscalls. Cheap requests
//! run inline; DROP-NAMESPACE and STATS walk whole maps and run on the blocking pool, their
//! replies arriving later through a channel, so replies may come back out of order (the
//! client matches them by request id).
//!
//! A frame that cannot be decoded (bad magic, version, opcode, oversize length, bad shape, or
//! a connection closed mid-frame) is answered with `Malformed` and a reason where possible,
//! logged with the peer address, and the connection is closed; other connections carry on.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::Shutdown;
use crate::protocol::auth::AuthKey;
use crate::protocol::control::{self, HelloReply, NONCE_LEN};
use crate::protocol::frame::{Header, Opcode, Status, FLAG_REPLY, PROTOCOL_VERSION};
use crate::protocol::message::ReplyWriter;
use crate::protocol::{decode, FrameError, Request};
use crate::store::{PutError, Store};

const READ_CHUNK: usize = 256 << 10;
/// How long a closing connection keeps draining input so its last replies are not reset.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

enum Phase {
    AwaitHello,
    AwaitAuth {
        server_nonce: [u8; NONCE_LEN],
        client_nonce: [u8; NONCE_LEN],
    },
    Ready,
}

/// Whether to keep the connection after a frame.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

pub(super) struct Handler {
    socket: Option<TcpStream>,
    peer: SocketAddr,
    store: Arc<Store>,
    auth: Option<AuthKey>,
    shutdown: Shutdown,
    _complete: mpsc::Sender<()>,
    phase: Phase,
    /// Replies of requests that ran on the blocking pool.
    late_tx: mpsc::Sender<BytesMut>,
    late_rx: mpsc::Receiver<BytesMut>,
}

impl Handler {
    pub(super) fn new(
        socket: TcpStream,
        peer: SocketAddr,
        store: Arc<Store>,
        auth: Option<AuthKey>,
        shutdown: Shutdown,
        complete: mpsc::Sender<()>,
    ) -> Handler {
        let (late_tx, late_rx) = mpsc::channel(16);
        Handler {
            socket: Some(socket),
            peer,
            store,
            auth,
            shutdown,
            _complete: complete,
            phase: Phase::AwaitHello,
            late_tx,
            late_rx,
        }
    }

    pub(super) async fn run(mut self) {
        self.store.connection_opened();
        if let Some(s) = &self.socket {
            let _ = s.set_nodelay(true);
        }
        let span = tracing::debug_span!("conn", peer = %self.peer);
        let _e = span.enter();
        match self.serve().await {
            Ok(()) => tracing::debug!(peer = %self.peer, "connection closed"),
            Err(e) => tracing::debug!(peer = %self.peer, error = %e, "connection ended"),
        }
        self.store.connection_closed();
    }

    async fn serve(&mut self) -> std::io::Result<()> {
        let socket = self.socket.take().expect("serve runs once");
        let (mut rd, mut wr) = socket.into_split();
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut out = BytesMut::with_capacity(READ_CHUNK);
        // Replies ready to send: header runs from `out` and stored values, not copied.
        let mut segs: Vec<Bytes> = Vec::new();
        let mut closing = false;
        while !closing {
            // Execute every whole frame already buffered.
            loop {
                match decode(&mut buf) {
                    Ok(Some(frame)) => {
                        let h = frame.header;
                        match Request::from_frame(frame) {
                            Ok((_, req)) => {
                                if self.execute(&h, req, &mut out, &mut segs) == Flow::Close {
                                    closing = true;
                                    break;
                                }
                            }
                            Err(e) => {
                                self.malformed(Some(&h), &e, &mut out);
                                closing = true;
                                break;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.malformed(None, &e, &mut out);
                        closing = true;
                        break;
                    }
                }
            }
            if !out.is_empty() {
                segs.push(out.split().freeze());
            }
            if !segs.is_empty() {
                write_segments(&mut wr, &mut segs).await?;
            }
            if closing || self.shutdown.is_shutdown() {
                break;
            }
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                n = rd.read_buf(&mut buf) => {
                    if n? == 0 {
                        if !buf.is_empty() {
                            let e = FrameError::Truncated(buf.len());
                            tracing::warn!(peer = %self.peer, reason = %e, "closing connection: malformed frame");
                        }
                        break;
                    }
                }
                Some(late) = self.late_rx.recv() => {
                    wr.write_all(&late).await?;
                }
                _ = self.shutdown.recv() => {}
            }
        }
        // Finish requests still running on the blocking pool, then close.
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.late_tx, tx));
        while let Some(late) = self.late_rx.recv().await {
            wr.write_all(&late).await?;
        }
        flush_and_close(&mut wr).await?;
        // Lingering close: closing a socket with unread input makes the kernel send a reset,
        // which can destroy replies the client has not read yet. Discard input until the
        // client closes too (or briefly, if it does not).
        let mut scratch = vec![0u8; 64 << 10];
        let _ = tokio::time::timeout(LINGER, async {
            while matches!(rd.read(&mut scratch).await, Ok(n) if n > 0) {}
        })
        .await;
        Ok(())
    }

    fn malformed(&self, h: Option<&Header>, e: &FrameError, out: &mut BytesMut) {
        tracing::warn!(peer = %self.peer, reason = %e, "closing connection: malformed frame");
        let h = h
            .copied()
            .unwrap_or_else(|| Header::request(Opcode::Ping, 0));
        ReplyWriter { out }.error(&h, Status::Malformed, &e.to_string());
    }

    fn execute(
        &mut self,
        h: &Header,
        req: Request,
        out: &mut BytesMut,
        segs: &mut Vec<Bytes>,
    ) -> Flow {
        let mut w = ReplyWriter { out };
        match (&self.phase, req) {
            (Phase::AwaitHello, Request::Hello(hello)) => {
                if hello.min_version > PROTOCOL_VERSION || hello.max_version < PROTOCOL_VERSION {
                    tracing::warn!(peer = %self.peer, min = hello.min_version, max = hello.max_version,
                        "closing connection: no common protocol version");
                    w.error(
                        h,
                        Status::VersionMismatch,
                        &format!("server speaks version {PROTOCOL_VERSION} only"),
                    );
                    return Flow::Close;
                }
                let mut server_nonce = [0u8; NONCE_LEN];
                rand::thread_rng().fill_bytes(&mut server_nonce);
                let reply = HelloReply {
                    version: PROTOCOL_VERSION,
                    min_version: PROTOCOL_VERSION,
                    auth_required: self.auth.is_some(),
                    server_nonce,
                };
                w.payload(h, &control::encode(&reply));
                self.phase = if self.auth.is_some() {
                    Phase::AwaitAuth {
                        server_nonce,
                        client_nonce: hello.client_nonce,
                    }
                } else {
                    Phase::Ready
                };
                Flow::Continue
            }
            (
                Phase::AwaitAuth {
                    server_nonce,
                    client_nonce,
                },
                Request::Auth { proof },
            ) => {
                let key = self.auth.as_ref().expect("AwaitAuth only with a key");
                if key.verify_client(server_nonce, client_nonce, &proof) {
                    let sp = key.server_proof(server_nonce, client_nonce);
                    w.payload(h, &sp);
                    self.phase = Phase::Ready;
                    tracing::debug!(peer = %self.peer, "client authenticated");
                    Flow::Continue
                } else {
                    tracing::warn!(peer = %self.peer, "closing connection: authentication failed");
                    w.error(h, Status::AuthFailed, "wrong pre-shared key");
                    Flow::Close
                }
            }
            (Phase::AwaitHello | Phase::AwaitAuth { .. }, req) => {
                tracing::warn!(peer = %self.peer, op = ?req.opcode(),
                    "closing connection: request before the handshake completed");
                w.error(h, Status::Unauthenticated, "complete HELLO and AUTH first");
                Flow::Close
            }
            (Phase::Ready, req) => {
                self.execute_ready(h, req, &mut w, segs);
                Flow::Continue
            }
        }
    }

    fn execute_ready(
        &self,
        h: &Header,
        req: Request,
        w: &mut ReplyWriter<'_>,
        segs: &mut Vec<Bytes>,
    ) {
        let store = &self.store;
        match req {
            Request::Hello(_) | Request::Auth { .. } => {
                w.error(h, Status::BadRequest, "handshake already done")
            }
            Request::Ping => w.status(h, Status::Ok),
            Request::Put {
                pool,
                namespace,
                key,
                value,
            } => {
                let st = put_status(store.put(pool, namespace, key, own(&value)));
                w.status(h, st);
            }
            Request::Get {
                pool,
                namespace,
                key,
            } => match store.get(pool, namespace, key) {
                Some(v) => {
                    reply_head(w.out, h, v.len());
                    push_value(w.out, segs, v);
                }
                None => w.status(h, Status::NotFound),
            },
            Request::Delete {
                pool,
                namespace,
                key,
            } => {
                let st = if store.delete(pool, namespace, key) {
                    Status::Ok
                } else {
                    Status::NotFound
                };
                w.status(h, st);
            }
            Request::PutBatch {
                pool,
                namespace,
                entries,
            } => {
                let st: Vec<Status> = entries
                    .iter()
                    .map(|(k, v)| put_status(store.put(pool, namespace, *k, own(v))))
                    .collect();
                w.statuses(h, &st);
            }
            Request::GetBatch {
                pool,
                namespace,
                keys,
            } => {
                let vals: Vec<Option<Bytes>> = keys
                    .iter()
                    .map(|k| store.get(pool, namespace, *k))
                    .collect();
                let len: usize = vals
                    .iter()
                    .map(|v| 5 + v.as_ref().map_or(0, Bytes::len))
                    .sum();
                reply_head(w.out, h, len);
                for v in vals {
                    match v {
                        Some(v) => {
                            w.out.put_u8(Status::Ok as u8);
                            w.out.put_u32_le(v.len() as u32);
                            push_value(w.out, segs, v);
                        }
                        None => {
                            w.out.put_u8(Status::NotFound as u8);
                            w.out.put_u32_le(0);
                        }
                    }
                }
            }
            Request::DeleteBatch {
                pool,
                namespace,
                keys,
            } => {
                let st: Vec<Status> = keys
                    .iter()
                    .map(|k| {
                        if store.delete(pool, namespace, *k) {
                            Status::Ok
                        } else {
                            Status::NotFound
                        }
                    })
                    .collect();
                w.statuses(h, &st);
            }
            Request::DropNamespace { namespace } => {
                let (store, tx, h) = (Arc::clone(store), self.late_tx.clone(), *h);
                tokio::task::spawn_blocking(move || {
                    let (pages, bytes) = store.drop_namespace(namespace);
                    tracing::info!(namespace, pages, bytes, "namespace dropped");
                    let mut out = BytesMut::new();
                    ReplyWriter { out: &mut out }.dropped(&h, pages, bytes);
                    let _ = tx.blocking_send(out);
                });
            }
            Request::Stats => {
                let (store, tx, h) = (Arc::clone(store), self.late_tx.clone(), *h);
                tokio::task::spawn_blocking(move || {
                    let body = control::encode(&store.stats());
                    let mut out = BytesMut::new();
                    ReplyWriter { out: &mut out }.payload(&h, &body);
                    let _ = tx.blocking_send(out);
                });
            }
        }
    }
}

/// Values at least this long are sent from the store's own buffer (vectored write).
const ZERO_COPY_MIN: usize = 1024;

/// An Ok reply header for `req` with `len` payload bytes.
fn reply_head(out: &mut BytesMut, req: &Header, len: usize) {
    let mut h = *req;
    h.flags = FLAG_REPLY;
    h.status = Status::Ok;
    h.payload_len = len as u32;
    h.write(out);
}

/// Append a value to the reply stream: small ones are copied into `out`, large ones end the
/// current run of `out` and go out as their own segment, without a copy.
fn push_value(out: &mut BytesMut, segs: &mut Vec<Bytes>, v: Bytes) {
    if v.len() < ZERO_COPY_MIN {
        out.extend_from_slice(&v);
        return;
    }
    if !out.is_empty() {
        segs.push(out.split().freeze());
    }
    segs.push(v);
}

/// Write every segment, in order, with vectored writes.
async fn write_segments(wr: &mut OwnedWriteHalf, segs: &mut Vec<Bytes>) -> std::io::Result<()> {
    let mut i = 0;
    loop {
        while i < segs.len() && segs[i].is_empty() {
            i += 1;
        }
        if i == segs.len() {
            break;
        }
        let slices: Vec<std::io::IoSlice<'_>> = segs[i..]
            .iter()
            .take(256)
            .map(|b| std::io::IoSlice::new(b))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let l = segs[i].len();
            if n >= l {
                n -= l;
                i += 1;
            } else {
                segs[i].advance(n);
                n = 0;
            }
        }
    }
    segs.clear();
    Ok(())
}

/// Copy a value out of the read buffer so a stored page pins only its own bytes.
fn own(v: &Bytes) -> Bytes {
    Bytes::copy_from_slice(v)
}

fn put_status(r: Result<(), PutError>) -> Status {
    match r {
        Ok(()) => Status::Ok,
        Err(PutError::PersistentFull) => Status::PersistentFull,
        Err(PutError::NoSpace) => Status::NoSpace,
    }
}

async fn flush_and_close(wr: &mut OwnedWriteHalf) -> std::io::Result<()> {
    wr.flush().await?;
    wr.shutdown().await
}
