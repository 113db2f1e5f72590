//! In-product NFSv3 client for `nfs://host[:port]/export/path` destinations and sources.
//!
//! * [`xdr`]: XDR encoding; [`rpc`]: ONC RPC over TCP with pipelined calls;
//! * [`mount`]: portmapper and MOUNT v3; [`nfs3`]: the NFSv3 procedures.
//!
//! Writes go to `.NAME.remoca-tmp-PID` in the target directory as UNSTABLE WRITEs with up to
//! [`WINDOW`] requests in flight, then COMMIT and RENAME to the final name; a sink dropped
//! before commit removes its temporary file. Reads issue up to [`WINDOW`] READs at once.

pub mod mount;
pub mod nfs3;
pub mod rpc;
pub mod url;
pub mod xdr;

use std::collections::VecDeque;
use std::io;
use std::sync::Mutex;

pub use url::NfsUrl;

use crate::dest::{DestError, Sink};
use crate::image::ReadAt;
use rpc::RpcConn;

/// Requests kept in flight.
pub const WINDOW: usize = 16;
/// Largest transfer per request.
pub const MAX_IO: usize = 1 << 20;

/// NFS errors.
#[derive(Debug, thiserror::Error)]
pub enum NfsError {
    #[error("bad NFS URL {0:?}: expected nfs://host[:port]/export/path/file")]
    BadUrl(String),
    #[error("NFS server {peer} is unreachable")]
    Unreachable {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("connection to NFS server {peer} failed")]
    Io {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("{host} has no RPC program {prog} v{vers} registered (is the NFS server running?)")]
    NotRegistered { host: String, prog: u32, vers: u32 },
    #[error("{host} exports no directory above {path} to us (MOUNT status {status})")]
    NotExported {
        host: String,
        path: String,
        status: u32,
    },
    #[error("{what} failed with NFS status {status}{}", if *.noent { " (no such file or directory)" } else { "" })]
    Status {
        what: String,
        status: u32,
        noent: bool,
    },
    #[error("destination is full (NFS server has no space left)")]
    Full,
    #[error("NFS protocol: {0}")]
    Protocol(String),
}

impl From<NfsError> for io::Error {
    fn from(e: NfsError) -> io::Error {
        let kind = match &e {
            NfsError::Full => io::ErrorKind::StorageFull,
            NfsError::Status { noent: true, .. } => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

struct Opened {
    conn: RpcConn,
    dir: Vec<u8>,
    name: String,
    rsize: usize,
    wsize: usize,
}

fn open_dir(u: &NfsUrl) -> Result<Opened, NfsError> {
    let (root, rest) = mount::mount(&u.host, &u.path)?;
    let port = match u.port {
        Some(p) => p,
        None => mount::getport(&u.host, mount::NFS_PROG, 3)?,
    };
    let mut conn = RpcConn::connect(&u.host, port, mount::NFS_PROG, 3)?;
    let (name, dirs) = rest
        .split_last()
        .ok_or_else(|| NfsError::BadUrl(u.to_string()))?;
    let mut dir = root;
    for d in dirs {
        dir = nfs3::lookup(&mut conn, &dir, d)?;
    }
    let (r, w) = nfs3::fsinfo(&mut conn, &dir)?;
    let clamp = |v: u32| (v as usize).clamp(4096, MAX_IO);
    Ok(Opened {
        conn,
        dir,
        name: name.clone(),
        rsize: clamp(r),
        wsize: clamp(w),
    })
}

/// An image being written to an NFS server.
pub struct NfsSink {
    o: Opened,
    fh: Vec<u8>,
    tmp: String,
    buf: Vec<u8>,
    offset: u64,
    inflight: VecDeque<(u32, usize)>,
    committed: bool,
}

impl std::fmt::Debug for NfsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfsSink")
            .field("peer", &self.o.conn.peer)
            .field("tmp", &self.tmp)
            .finish()
    }
}

impl NfsSink {
    /// Creates the temporary file beside the final name.
    ///
    /// # Errors
    /// Server unreachable, path not exported, directory missing, create refused.
    pub fn create(u: &NfsUrl) -> Result<Self, NfsError> {
        let mut o = open_dir(u)?;
        let tmp = format!(".{}.remoca-tmp-{}", o.name, std::process::id());
        let fh = nfs3::create(&mut o.conn, &o.dir, &tmp)?;
        let cap = o.wsize;
        Ok(NfsSink {
            o,
            fh,
            tmp,
            buf: Vec::with_capacity(cap),
            offset: 0,
            inflight: VecDeque::new(),
            committed: false,
        })
    }

    fn reap_one(&mut self) -> Result<(), NfsError> {
        if let Some((xid, len)) = self.inflight.pop_front() {
            let r = self.o.conn.wait(xid)?;
            let n = nfs3::write_reply(&r)?;
            if n as usize != len {
                return Err(NfsError::Protocol(format!(
                    "short WRITE: {n} of {len} bytes"
                )));
            }
        }
        Ok(())
    }

    fn send_buf(&mut self) -> Result<(), NfsError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        while self.inflight.len() >= WINDOW {
            self.reap_one()?;
        }
        let args = nfs3::write_args(&self.fh, self.offset, &self.buf);
        let xid = self.o.conn.send(nfs3::WRITE, &args.0)?;
        self.inflight.push_back((xid, self.buf.len()));
        self.offset += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    fn finish(&mut self) -> Result<(), NfsError> {
        self.send_buf()?;
        while !self.inflight.is_empty() {
            self.reap_one()?;
        }
        nfs3::commit(&mut self.o.conn, &self.fh)?;
        nfs3::rename(&mut self.o.conn, &self.o.dir, &self.tmp, &self.o.name)
    }
}

impl io::Write for NfsSink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = b.len().min(self.o.wsize - self.buf.len());
        self.buf.extend_from_slice(&b[..n]);
        if self.buf.len() == self.o.wsize {
            self.send_buf()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Sink for NfsSink {
    fn commit(mut self: Box<Self>) -> Result<(), DestError> {
        self.finish()?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for NfsSink {
    fn drop(&mut self) {
        if !self.committed {
            while !self.inflight.is_empty() {
                if self.reap_one().is_err() {
                    self.inflight.clear();
                }
            }
            let _ = nfs3::remove(&mut self.o.conn, &self.o.dir, &self.tmp);
        }
    }
}

/// An image on an NFS server, read at offsets with pipelined READs.
pub struct NfsFile {
    o: Mutex<Opened>,
    fh: Vec<u8>,
    size: u64,
}

impl std::fmt::Debug for NfsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfsFile").field("size", &self.size).finish()
    }
}

impl NfsFile {
    /// Opens an existing file.
    ///
    /// # Errors
    /// Server unreachable, path not exported, file missing.
    pub fn open(u: &NfsUrl) -> Result<Self, NfsError> {
        let mut o = open_dir(u)?;
        let fh = nfs3::lookup(&mut o.conn, &o.dir, &o.name.clone())?;
        let size = nfs3::size(&mut o.conn, &fh)?;
        Ok(NfsFile {
            o: Mutex::new(o),
            fh,
            size,
        })
    }
}

impl ReadAt for NfsFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset + buf.len() as u64 > self.size {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut o = self
            .o
            .lock()
            .map_err(|_| io::Error::other("NFS connection poisoned"))?;
        let rsize = o.rsize;
        let chunks: Vec<(usize, usize)> = (0..buf.len())
            .step_by(rsize)
            .map(|s| (s, (buf.len() - s).min(rsize)))
            .collect();
        let mut inflight: VecDeque<(u32, usize, usize)> = VecDeque::new();
        let mut next = 0;
        while next < chunks.len() || !inflight.is_empty() {
            while next < chunks.len() && inflight.len() < WINDOW {
                let (s, n) = chunks[next];
                let xid = o.conn.send(
                    nfs3::READ,
                    &nfs3::read_args(&self.fh, offset + s as u64, n as u32).0,
                )?;
                inflight.push_back((xid, s, n));
                next += 1;
            }
            let (xid, s, n) = inflight.pop_front().expect("non-empty");
            let r = o.conn.wait(xid)?;
            let got = nfs3::read_reply(&r, &mut buf[s..s + n])?;
            if got < n {
                // Short read: fetch the rest synchronously.
                let mut done = got;
                while done < n {
                    let r = o.conn.call(
                        nfs3::READ,
                        &nfs3::read_args(&self.fh, offset + (s + done) as u64, (n - done) as u32).0,
                    )?;
                    let k = nfs3::read_reply(&r, &mut buf[s + done..s + n])?;
                    if k == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    done += k;
                }
            }
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}
