//! ONC RPC v2 (RFC 5531) over TCP with record marking, AUTH_SYS credentials, and
//! pipelining: many calls can be sent before their replies are read; replies are matched
//! by xid.
//!
//! ```text
//! record mark u32 BE: bit 31 = last fragment, bits 30..0 = fragment length (≤ MAX_FRAGMENT)
//! call:  xid | 0 CALL | 2 | prog | vers | proc | cred (AUTH_SYS) | verf (AUTH_NONE) | args
//! reply: xid | 1 REPLY | 0 ACCEPTED | verf | 0 SUCCESS | results
//! ```

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::xdr::{XdrIn, XdrOut};
use super::NfsError;

/// Largest reply we accept (a READ of 1 MiB plus headers, with room).
pub const MAX_REPLY: usize = 4 << 20;

/// One TCP connection to one RPC program.
#[derive(Debug)]
pub struct RpcConn {
    sock: TcpStream,
    prog: u32,
    vers: u32,
    next_xid: u32,
    /// Replies that arrived while waiting for another xid.
    early: HashMap<u32, Vec<u8>>,
    pub peer: String,
}

impl RpcConn {
    /// Connects to `host:port` for program `prog` version `vers`.
    ///
    /// # Errors
    /// [`NfsError::Unreachable`] when the server cannot be reached within 5 s.
    pub fn connect(host: &str, port: u16, prog: u32, vers: u32) -> Result<Self, NfsError> {
        let peer = format!("{host}:{port}");
        let unreachable = |e| NfsError::Unreachable {
            peer: peer.clone(),
            source: e,
        };
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(unreachable)?
            .next()
            .ok_or_else(|| unreachable(std::io::Error::other("no address")))?;
        let sock =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(unreachable)?;
        sock.set_nodelay(true).map_err(unreachable)?;
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(unreachable)?;
        sock.set_write_timeout(Some(Duration::from_secs(60)))
            .map_err(unreachable)?;
        let seed = std::process::id().wrapping_mul(0x9E37_79B9) ^ (prog << 8);
        Ok(RpcConn {
            sock,
            prog,
            vers,
            next_xid: seed,
            early: HashMap::new(),
            peer,
        })
    }

    /// Sends a call and returns its xid without waiting for the reply.
    ///
    /// # Errors
    /// The connection failed.
    pub fn send(&mut self, procedure: u32, args: &[u8]) -> Result<u32, NfsError> {
        self.next_xid = self.next_xid.wrapping_add(1);
        let xid = self.next_xid;
        let mut h = XdrOut::default();
        h.u32(0)
            .u32(xid)
            .u32(0)
            .u32(2)
            .u32(self.prog)
            .u32(self.vers)
            .u32(procedure);
        // AUTH_SYS: stamp, machine name, uid 0, gid 0, no extra gids.
        let mut cred = XdrOut::default();
        cred.u32(0).string("remoca").u32(0).u32(0).u32(0);
        h.u32(1).opaque(&cred.0).u32(0).u32(0);
        let len = h.0.len() - 4 + args.len();
        h.0[0..4].copy_from_slice(&(0x8000_0000u32 | len as u32).to_be_bytes());
        let io = |e| NfsError::Io {
            peer: self.peer.clone(),
            source: e,
        };
        self.sock.write_all(&h.0).map_err(io)?;
        self.sock.write_all(args).map_err(io)?;
        Ok(xid)
    }

    fn read_record(&mut self) -> Result<Vec<u8>, NfsError> {
        let mut rec = Vec::new();
        loop {
            let mut m = [0u8; 4];
            let peer = self.peer.clone();
            self.sock.read_exact(&mut m).map_err(|e| NfsError::Io {
                peer: peer.clone(),
                source: e,
            })?;
            let mark = u32::from_be_bytes(m);
            let len = (mark & 0x7fff_ffff) as usize;
            if rec.len() + len > MAX_REPLY {
                return Err(NfsError::Protocol(format!(
                    "reply of {} bytes is over the limit",
                    rec.len() + len
                )));
            }
            let start = rec.len();
            rec.resize(start + len, 0);
            self.sock
                .read_exact(&mut rec[start..])
                .map_err(|e| NfsError::Io { peer, source: e })?;
            if mark & 0x8000_0000 != 0 {
                return Ok(rec);
            }
        }
    }

    /// Waits for the reply to `xid` and returns its results (after the RPC header).
    ///
    /// # Errors
    /// Connection failure, or the server refused the call.
    pub fn wait(&mut self, xid: u32) -> Result<Vec<u8>, NfsError> {
        let rec = match self.early.remove(&xid) {
            Some(r) => r,
            None => loop {
                let rec = self.read_record()?;
                let got = XdrIn::new(&rec)
                    .u32()
                    .map_err(|_| NfsError::Protocol("short reply".into()))?;
                if got == xid {
                    break rec;
                }
                self.early.insert(got, rec);
            },
        };
        let mut x = XdrIn::new(&rec);
        let short = |_| NfsError::Protocol("short reply header".into());
        x.u32().map_err(short)?;
        if x.u32().map_err(short)? != 1 {
            return Err(NfsError::Protocol("not a reply".into()));
        }
        if x.u32().map_err(short)? != 0 {
            return Err(NfsError::Protocol(
                "call denied by the server (auth or RPC version)".into(),
            ));
        }
        x.u32().map_err(short)?;
        x.opaque().map_err(short)?;
        let accept = x.u32().map_err(short)?;
        if accept != 0 {
            return Err(NfsError::Protocol(format!(
                "program {} v{} refused the call (accept_stat {accept})",
                self.prog, self.vers
            )));
        }
        let at = x.position();
        Ok(rec[at..].to_vec())
    }

    /// Sends a call and waits for its reply.
    ///
    /// # Errors
    /// As [`RpcConn::send`] and [`RpcConn::wait`].
    pub fn call(&mut self, procedure: u32, args: &[u8]) -> Result<Vec<u8>, NfsError> {
        let xid = self.send(procedure, args)?;
        self.wait(xid)
    }
}
