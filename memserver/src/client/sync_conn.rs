//! One blocking, authenticated connection that the calling thread drives itself.
//!
//! The pipelined [`super::Connection`] hands every request to a writer task and every reply
//! back through a reader task and a oneshot: four thread hand-offs per round trip on top of
//! the server's. A worker thread with a single request outstanding (a page fault, one swap
//! read) does better writing the request and reading the reply on its own socket: the only
//! hand-offs left are the kernel's. A `SyncConnection` carries one request at a time; it is
//! checked out of its [`super::server_link::ServerLink`]'s idle list for the call and put
//! back after a clean reply. Any failure (I/O, timeout, protocol, a reply to another id)
//! drops it, so a late reply can never be taken for the next request's.
//!
//! While it waits for the reply the thread first polls the socket for a short, bounded time
//! ([`super::ClientConfig::reply_spin`]) before sleeping: on a virtual machine, waking a
//! sleeping thread costs about as much as the loopback round trip itself.
//!
//! Same wire protocol, same handshake (HELLO, then AUTH when the server asks) as the
//! pipelined connection; the server cannot tell them apart.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::RngCore;

use super::connection::{hello_request, refused};
use super::error::ClientError;
use crate::protocol::auth::AuthKey;
use crate::protocol::control::NONCE_LEN;
use crate::protocol::frame::Status;
use crate::protocol::{decode, Reply, ReplyBody, Request};

/// Bytes read per `read` call.
const READ_CHUNK: usize = 64 << 10;

#[derive(Debug)]
pub(crate) struct SyncConnection {
    addr: SocketAddr,
    stream: TcpStream,
    /// Received bytes not yet decoded.
    buf: BytesMut,
    /// The encoded request; reused across calls.
    out: BytesMut,
    scratch: Box<[u8]>,
    next_id: u64,
    /// How long to poll for the reply before sleeping in `read`.
    spin: Duration,
    /// Whether the socket is in non-blocking mode (it stays so between spinning calls).
    nonblocking: bool,
}

impl SyncConnection {
    /// Connect within `connect_timeout`, handshake, and use `request_timeout` for every later
    /// read and write.
    ///
    /// # Errors
    /// As [`super::Connection::connect`].
    pub(crate) fn connect(
        addr: SocketAddr,
        auth: Option<&AuthKey>,
        connect_timeout: Duration,
        request_timeout: Duration,
        spin: Duration,
    ) -> Result<SyncConnection, ClientError> {
        let io = |e| ClientError::Io { addr, source: e };
        let stream = TcpStream::connect_timeout(&addr, connect_timeout).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(Some(connect_timeout)).map_err(io)?;
        stream
            .set_write_timeout(Some(connect_timeout))
            .map_err(io)?;
        let mut c = SyncConnection {
            addr,
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: BytesMut::with_capacity(8 << 10),
            scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
            next_id: 1,
            spin: Duration::ZERO,
            nonblocking: false,
        };
        let mut client_nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut client_nonce);
        let r = c.round_trip(&hello_request(client_nonce), 0)?;
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
            let r = c.round_trip(&Request::Auth { proof }, 0)?;
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
        c.stream
            .set_read_timeout(Some(request_timeout))
            .map_err(io)?;
        c.stream
            .set_write_timeout(Some(request_timeout))
            .map_err(io)?;
        c.spin = spin;
        Ok(c)
    }

    /// Send one request and wait for its reply on this thread.
    ///
    /// # Errors
    /// `Io`, `Timeout`, `ConnectionLost` or `Protocol`; the connection must then be dropped.
    pub(crate) fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.round_trip(req, id)
    }

    fn round_trip(&mut self, req: &Request, id: u64) -> Result<Reply, ClientError> {
        let addr = self.addr;
        self.out.clear();
        req.encode(id, &mut self.out);
        self.write_request()?;
        let r = self.read_reply(Instant::now() + self.spin)?;
        if r.request_id != id {
            if r.status == Status::Malformed && r.request_id == 0 {
                // The server is closing this connection and says why.
                return Err(ClientError::ConnectionLost { addr });
            }
            return Err(ClientError::Protocol {
                addr,
                source: crate::protocol::FrameError::BadShape {
                    op: r.opcode,
                    why: "reply to a request that is not outstanding",
                },
            });
        }
        Ok(r)
    }

    fn set_nonblocking(&mut self, on: bool) -> Result<(), ClientError> {
        if self.nonblocking != on {
            let addr = self.addr;
            self.stream
                .set_nonblocking(on)
                .map_err(|e| ClientError::Io { addr, source: e })?;
            self.nonblocking = on;
        }
        Ok(())
    }

    /// Write the encoded request; a socket left non-blocking by the last spin is switched
    /// back to blocking only if the kernel's send buffer is full.
    fn write_request(&mut self) -> Result<(), ClientError> {
        let addr = self.addr;
        let mut done = 0;
        while done < self.out.len() {
            match self.stream.write(&self.out[done..]) {
                Ok(0) => return Err(ClientError::ConnectionLost { addr }),
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock && self.nonblocking => {
                    self.set_nonblocking(false)?;
                }
                Err(e) => return Err(io_error(addr, e)),
            }
        }
        Ok(())
    }

    /// Read until one whole reply frame is buffered. Until `spin_until` the socket is polled
    /// (a loopback or LAN reply usually arrives within tens of microseconds, and waking a
    /// sleeping thread costs about as much again); after that the thread sleeps in `read`,
    /// bounded by the request timeout.
    fn read_reply(&mut self, spin_until: Instant) -> Result<Reply, ClientError> {
        let addr = self.addr;
        let proto = |e| ClientError::Protocol { addr, source: e };
        loop {
            if let Some(f) = decode(&mut self.buf).map_err(proto)? {
                return Reply::from_frame(f).map_err(proto);
            }
            let spinning = Instant::now() < spin_until;
            self.set_nonblocking(spinning)?;
            let n = match self.stream.read(&mut self.scratch) {
                Ok(0) => return Err(ClientError::ConnectionLost { addr }),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if spinning && e.kind() == ErrorKind::WouldBlock => {
                    std::hint::spin_loop();
                    continue;
                }
                Err(e) => return Err(io_error(addr, e)),
            };
            self.buf.extend_from_slice(&self.scratch[..n]);
        }
    }
}

/// A socket timeout shows as `WouldBlock` (or `TimedOut`): report it as the request timeout
/// the pipelined connection would give.
fn io_error(addr: SocketAddr, e: std::io::Error) -> ClientError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ClientError::Timeout { addr },
        _ => ClientError::Io { addr, source: e },
    }
}
