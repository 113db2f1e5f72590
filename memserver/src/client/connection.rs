//! One pipelined, authenticated client connection to one server.
//!
//! Callers encode a request, register a oneshot under a fresh request id and hand the bytes to
//! a writer task that coalesces everything queued into one `write_all`. A reader task decodes
//! replies and completes the oneshot with the matching id, in whatever order they arrive. When
//! the socket fails, every pending request fails with `ConnectionLost` and the connection is
//! marked dead so the pool replaces it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::error::ClientError;
use crate::protocol::auth::AuthKey;
use crate::protocol::control::{Hello, NONCE_LEN};
use crate::protocol::frame::{Status, PROTOCOL_VERSION};
use crate::protocol::{decode, Reply, ReplyBody, Request};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

/// A live connection. Cheap to share; dropping the last handle closes the socket.
#[derive(Debug)]
pub struct Connection {
    addr: SocketAddr,
    tx: mpsc::UnboundedSender<BytesMut>,
    pending: Pending,
    next_id: AtomicU64,
    dead: Arc<AtomicBool>,
}

async fn read_reply(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    addr: SocketAddr,
) -> Result<Reply, ClientError> {
    loop {
        if let Some(f) = decode(buf).map_err(|e| ClientError::Protocol { addr, source: e })? {
            return Reply::from_frame(f).map_err(|e| ClientError::Protocol { addr, source: e });
        }
        if s.read_buf(buf)
            .await
            .map_err(|e| ClientError::Io { addr, source: e })?
            == 0
        {
            return Err(ClientError::ConnectionLost { addr });
        }
    }
}

/// The HELLO this client sends: exactly this protocol version.
pub(super) fn hello_request(client_nonce: [u8; NONCE_LEN]) -> Request {
    Request::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        client_nonce,
        client_name: format!("remoca-client/{}", env!("CARGO_PKG_VERSION")),
    })
}

pub(super) fn refused(addr: SocketAddr, r: &Reply) -> ClientError {
    let reason = match &r.body {
        ReplyBody::Error(s) => s.clone(),
        _ => String::new(),
    };
    if r.status == Status::AuthFailed || r.status == Status::Unauthenticated {
        return ClientError::AuthRefused { addr, reason };
    }
    ClientError::Refused {
        addr,
        status: r.status,
        reason,
    }
}

impl Connection {
    /// Connect, negotiate the version and, if the server asks, prove the pre-shared key (and
    /// check the server's proof).
    ///
    /// # Errors
    /// Connection, handshake or authentication failures, or `Timeout` after `timeout`.
    pub async fn connect(
        addr: SocketAddr,
        auth: Option<&AuthKey>,
        timeout: Duration,
    ) -> Result<Arc<Connection>, ClientError> {
        tokio::time::timeout(timeout, Self::connect_inner(addr, auth))
            .await
            .map_err(|_| ClientError::Timeout { addr })?
    }

    async fn connect_inner(
        addr: SocketAddr,
        auth: Option<&AuthKey>,
    ) -> Result<Arc<Connection>, ClientError> {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| ClientError::Io { addr, source: e })?;
        let _ = s.set_nodelay(true);
        let mut client_nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut client_nonce);
        let mut out = BytesMut::new();
        hello_request(client_nonce).encode(0, &mut out);
        let io = |e| ClientError::Io { addr, source: e };
        s.write_all(&out).await.map_err(io)?;
        let mut buf = BytesMut::with_capacity(4096);
        let r = read_reply(&mut s, &mut buf, addr).await?;
        let hello = match (&r.status, &r.body) {
            (Status::Ok, ReplyBody::Hello(h)) => h.clone(),
            _ => return Err(refused(addr, &r)),
        };
        if hello.auth_required {
            let key = auth.ok_or(ClientError::AuthRefused {
                addr,
                reason: "server requires a pre-shared key and none is configured".into(),
            })?;
            let proof = key.client_proof(&hello.server_nonce, &client_nonce);
            out.clear();
            Request::Auth { proof }.encode(0, &mut out);
            s.write_all(&out).await.map_err(io)?;
            let r = read_reply(&mut s, &mut buf, addr).await?;
            match (&r.status, &r.body) {
                (Status::Ok, ReplyBody::Auth { server_proof })
                    if key.verify_server(&hello.server_nonce, &client_nonce, server_proof) => {}
                (Status::Ok, _) => {
                    return Err(ClientError::AuthRefused {
                        addr,
                        reason: "server could not prove it holds the key".into(),
                    })
                }
                _ => return Err(refused(addr, &r)),
            }
        }
        let (rd, wr) = s.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        tokio::spawn(write_loop(wr, rx, Arc::clone(&dead)));
        tokio::spawn(read_loop(
            rd,
            buf,
            Arc::clone(&pending),
            Arc::clone(&dead),
            addr,
        ));
        Ok(Arc::new(Connection {
            addr,
            tx,
            pending,
            next_id: AtomicU64::new(1),
            dead,
        }))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Relaxed)
    }

    /// Send one request and wait for its reply.
    ///
    /// # Errors
    /// `ConnectionLost` if the socket fails, `Timeout` after `timeout`.
    pub async fn call(&self, req: &Request, timeout: Duration) -> Result<Reply, ClientError> {
        let addr = self.addr;
        if self.is_dead() {
            return Err(ClientError::ConnectionLost { addr });
        }
        let id = self.next_id.fetch_add(1, Relaxed);
        let mut out = BytesMut::new();
        req.encode(id, &mut out);
        let (otx, orx) = oneshot::channel();
        self.pending.lock().insert(id, otx);
        if self.tx.send(out).is_err() {
            self.pending.lock().remove(&id);
            return Err(ClientError::ConnectionLost { addr });
        }
        match tokio::time::timeout(timeout, orx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(ClientError::ConnectionLost { addr }),
            Err(_) => {
                self.pending.lock().remove(&id);
                Err(ClientError::Timeout { addr })
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.dead.store(true, Relaxed);
    }
}

async fn write_loop(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<BytesMut>,
    dead: Arc<AtomicBool>,
) {
    while let Some(mut chunk) = rx.recv().await {
        while chunk.len() < (1 << 20) {
            match rx.try_recv() {
                Ok(more) => chunk.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if wr.write_all(&chunk).await.is_err() {
            dead.store(true, Relaxed);
            return;
        }
    }
    let _ = wr.shutdown().await;
}

async fn read_loop(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut buf: BytesMut,
    pending: Pending,
    dead: Arc<AtomicBool>,
    addr: SocketAddr,
) {
    let why = loop {
        match decode(&mut buf) {
            Ok(Some(f)) => match Reply::from_frame(f) {
                Ok(r) => {
                    if r.status == Status::Malformed && r.request_id == 0 {
                        break format!("server closed the connection: {:?}", r.body);
                    }
                    if let Some(tx) = pending.lock().remove(&r.request_id) {
                        let _ = tx.send(r);
                    }
                    continue;
                }
                Err(e) => break e.to_string(),
            },
            Ok(None) => {}
            Err(e) => break e.to_string(),
        }
        if buf.capacity() - buf.len() < 64 << 10 {
            buf.reserve(256 << 10);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => break "closed by server".to_string(),
            Ok(_) => {}
            Err(e) => break e.to_string(),
        }
        if dead.load(Relaxed) && pending.lock().is_empty() {
            break "closed by client".to_string();
        }
    };
    tracing::debug!(%addr, reason = %why, "memserver connection ended");
    dead.store(true, Relaxed);
    // Dropping the senders fails every waiting call with ConnectionLost.
    pending.lock().clear();
}
