//! A blocking peer-protocol client: GET a batch of chunks, ask which of a batch a peer holds.
//!
//! Every call runs under a deadline: connect, each read and each write time out after
//! [`PeerClient::timeout`], so a peer that dies or hangs mid-transfer costs at most that long.
//! A peer that is pulling the chunk from the origin says so with WAIT frames, and is waited
//! for (up to `PATIENCE` timeouts per GET) instead of being taken for a hung one: abandoning
//! it would fetch the chunk from the origin a second time.
//! Connections are kept in a small pool and reused; one that failed is dropped. The client
//! does not check chunk bytes against their ids — the fetcher does, and decides what a bad
//! chunk means for the peer.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::wire::{self, Frame, MAX_BATCH};
use crate::images::chunk::ChunkId;

/// Idle connections kept per peer.
const POOL: usize = 8;
/// How many read timeouts a GET may last in all while the peer keeps sending WAIT (it is
/// pulling from the origin); a peer that sends nothing times out after one.
const PATIENCE: u32 = 15;

/// A client of one peer (or of the origin).
#[derive(Debug)]
pub struct PeerClient {
    addr: SocketAddr,
    timeout: Duration,
    idle: Mutex<Vec<TcpStream>>,
}

/// What a peer answered for one asked chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Bytes the peer claims are the chunk (not yet checked).
    Data(Vec<u8>),
    Missing,
}

impl PeerClient {
    pub fn new(addr: SocketAddr, timeout: Duration) -> PeerClient {
        PeerClient {
            addr,
            timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn connect(&self) -> io::Result<TcpStream> {
        if let Some(s) = self.idle.lock().pop() {
            return Ok(s);
        }
        let s = TcpStream::connect_timeout(&self.addr, self.timeout)?;
        s.set_read_timeout(Some(self.timeout))?;
        s.set_write_timeout(Some(self.timeout))?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    fn release(&self, s: TcpStream) {
        let mut idle = self.idle.lock();
        if idle.len() < POOL {
            idle.push(s);
        }
    }

    /// Drop every pooled connection (after the peer failed).
    pub fn reset(&self) {
        self.idle.lock().clear();
    }

    /// Ask for `wants` (at most [`MAX_BATCH`] chunks, id and expected length); with `pull`,
    /// the peer fetches what it lacks from the origin first. One answer per asked chunk, in
    /// order. A reply that names another chunk than the one asked, a chunk of the wrong
    /// length, or anything but CHUNK/MISSING is an [`io::ErrorKind::InvalidData`] error.
    ///
    /// # Errors
    /// Connection errors and timeouts; protocol violations as above.
    pub fn get(&self, wants: &[(ChunkId, u32)], pull: bool) -> io::Result<Vec<Answer>> {
        assert!(!wants.is_empty() && wants.len() <= MAX_BATCH);
        let mut s = self.connect()?;
        let res = (|| {
            s.write_all(&wire::encode(&Frame::Get {
                pull,
                wants: wants.to_vec(),
            }))?;
            let mut out = Vec::with_capacity(wants.len());
            let started = Instant::now();
            for (id, len) in wants {
                let mut frame = wire::read_frame(&mut s)?;
                // WAIT: the peer is fetching the chunk from the origin. Wait on, up to
                // PATIENCE read timeouts for the whole GET.
                while frame == Frame::Wait {
                    if started.elapsed() > self.timeout * PATIENCE {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("peer still waiting for {id} after {:?}", started.elapsed()),
                        ));
                    }
                    frame = wire::read_frame(&mut s)?;
                }
                match frame {
                    Frame::Chunk { id: got, data } if got == *id && data.len() == *len as usize => {
                        out.push(Answer::Data(data))
                    }
                    Frame::Missing(got) if got == *id => out.push(Answer::Missing),
                    Frame::Error(msg) => {
                        return Err(io::Error::other(format!("peer error: {msg}")))
                    }
                    other => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("asked for {id} ({len} bytes), got {}", describe(&other)),
                        ))
                    }
                }
            }
            Ok(out)
        })();
        if res.is_ok() {
            self.release(s);
        }
        res
    }

    /// Which of `ids` (at most [`MAX_BATCH`]) the peer holds now.
    ///
    /// # Errors
    /// Connection errors and timeouts; a reply that is not a HAVE of the right length.
    pub fn have(&self, ids: &[ChunkId]) -> io::Result<Vec<bool>> {
        assert!(!ids.is_empty() && ids.len() <= MAX_BATCH);
        let mut s = self.connect()?;
        s.write_all(&wire::encode(&Frame::HaveQuery(ids.to_vec())))?;
        match wire::read_frame(&mut s)? {
            Frame::Have(bits) if bits.len() == ids.len() => {
                self.release(s);
                Ok(bits)
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "asked HAVE of {} chunks, got {}",
                    ids.len(),
                    describe(&other)
                ),
            )),
        }
    }
}

fn describe(f: &Frame) -> String {
    match f {
        Frame::Chunk { id, data } => format!("CHUNK {id} of {} bytes", data.len()),
        Frame::Missing(id) => format!("MISSING {id}"),
        Frame::Have(b) => format!("HAVE of {}", b.len()),
        Frame::Get { .. } => "GET".into(),
        Frame::HaveQuery(_) => "HAVE_QUERY".into(),
        Frame::Error(m) => format!("ERROR {m}"),
        Frame::Wait => "WAIT".into(),
    }
}
