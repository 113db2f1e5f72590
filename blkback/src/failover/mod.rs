//! Fault-tolerant block serving: a small endpoint holds the client's connection and every
//! in-flight request, storage drivers do the work and may fail, and a monitor in the
//! endpoint declares a driver faulty and fails over to a backup, re-sending every
//! unanswered request in order. See docs/failover.md.
//!
//! ```text
//!  NBD client ─▶ nbd::server ─▶ Endpoint (a Disk) ══ channel ══▶ driver A (active)
//!                                  │  in-flight table            driver B (standby)
//!                                  └─ monitor (heartbeat, progress bound)
//! ```
//!
//! - [`affinity`]: pinning the channel's two readers to one CPU.
//! - [`wire`]: the channel's frames (hello, auth, requests, replies, heartbeats).
//! - [`driver`]: serves channel requests from any `Arc<dyn Disk>`.
//! - [`endpoint`]: a `Disk` that forwards to the active driver and fails over.
//! - [`fence`]: the generation fence that stops a superseded driver's writes.
//! - `kept`: the acknowledged writes the endpoint keeps for re-applying until a flush.
//! - [`shm`]: the shared-memory data area of a channel to a local driver.
//! - [`monitor`]: the fault rule (broken connection, lost heartbeat, stuck requests).

pub mod affinity;
pub mod bench;
pub mod driver;
pub mod endpoint;
pub mod fence;
mod kept;
pub mod monitor;
pub mod shm;
pub mod status;
pub mod wire;

use std::io::{self, BufRead, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Where a driver listens: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(String),
}

impl Addr {
    /// Parse `unix:PATH` or `tcp:HOST:PORT`.
    ///
    /// # Errors
    /// A message naming the expected forms.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("unix", p)) if !p.is_empty() => Ok(Addr::Unix(PathBuf::from(p))),
            Some(("tcp", a)) if !a.is_empty() => Ok(Addr::Tcp(a.to_owned())),
            _ => Err(format!("{s:?} is not unix:PATH or tcp:HOST:PORT")),
        }
    }

    /// Whether a driver at this address runs on this host (and so can be killed by pid).
    pub fn is_local(&self) -> bool {
        matches!(self, Addr::Unix(_))
    }

    /// Connect, with a timeout for TCP.
    ///
    /// # Errors
    /// Connection errors.
    pub fn connect(&self, timeout: Duration) -> io::Result<Stream> {
        match self {
            Addr::Unix(p) => Ok(Stream::Unix(UnixStream::connect(p)?)),
            Addr::Tcp(a) => {
                use std::net::ToSocketAddrs;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for sa in a.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A connected channel stream.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// A second handle on the same connection (one thread reads, others write).
    ///
    /// # Errors
    /// From `dup`.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Shut both directions down, waking any thread blocked on the stream.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Set (or clear) the read timeout.
    ///
    /// # Errors
    /// From `setsockopt`.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Set (or clear) the write timeout.
    ///
    /// # Errors
    /// From `setsockopt`.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// Write a frame (header, then data) with as few system calls as the socket allows: one
/// `writev` when it takes everything.
///
/// # Errors
/// The socket's errors; `WriteZero` when it takes nothing.
pub(crate) fn write_frame(w: &mut impl Write, head: &[u8], data: &[u8]) -> io::Result<()> {
    write_parts(w, &[&[], head, data])
}

/// Write `parts` in order with as few system calls as the socket allows (`writev`), without
/// copying them into one buffer first.
///
/// # Errors
/// The socket's errors; `WriteZero` when it takes nothing.
pub(crate) fn write_parts(w: &mut impl Write, parts: &[&[u8]; 3]) -> io::Result<()> {
    let mut bufs = parts.map(IoSlice::new);
    let mut slices: &mut [IoSlice<'_>] = &mut bufs;
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Read buffer of a channel reader: frames queued together cost one `read`.
pub(crate) const READ_BUFFER: usize = 256 << 10;

/// Frame data from this size on is read from the socket straight into its own vector, and
/// written with `writev` straight from where it lies, instead of through the channel
/// buffers: one copy of every byte less for large requests.
pub(crate) const DIRECT_DATA: usize = 64 << 10;

/// Read a frame's `n` data bytes from `r` into a new vector, after `headroom` zero bytes
/// (room for the frontend's reply header, so the data need not be copied again). From
/// [`DIRECT_DATA`] bytes on, what `r` has buffered is taken and the rest read from the
/// socket directly, not through `r`'s buffer.
///
/// # Errors
/// The socket's errors; `UnexpectedEof` when it ends first.
pub(crate) fn read_data<R: Read>(
    r: &mut io::BufReader<R>,
    headroom: usize,
    n: usize,
) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; headroom + n];
    let dst = &mut v[headroom..];
    if n >= DIRECT_DATA {
        let k = r.buffer().len().min(n);
        dst[..k].copy_from_slice(&r.buffer()[..k]);
        r.consume(k);
        // Either everything came from the buffer, or the buffer is empty now.
        r.get_mut().read_exact(&mut dst[k..])?;
    } else {
        r.read_exact(dst)?;
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            Addr::parse("unix:/run/a.sock").unwrap(),
            Addr::Unix("/run/a.sock".into())
        );
        assert_eq!(
            Addr::parse("tcp:127.0.0.1:9").unwrap(),
            Addr::Tcp("127.0.0.1:9".into())
        );
        assert!(Addr::parse("unix:").is_err());
        assert!(Addr::parse("/run/a.sock").is_err());
        assert!(Addr::parse("udp:1.2.3.4:5").is_err());
        assert_eq!(Addr::parse("unix:/x").unwrap().to_string(), "unix:/x");
    }

    /// Frame data read with [`read_data`] comes out whole and in order, with the frames
    /// around it intact, whatever its size and however the socket delivers it.
    #[test]
    fn read_data_keeps_frames_in_order_for_small_and_large_data() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let sizes = [
            0usize,
            5,
            DIRECT_DATA - 1,
            DIRECT_DATA,
            3 * READ_BUFFER + 7,
            17,
        ];
        let t = std::thread::spawn(move || {
            for (i, &n) in sizes.iter().enumerate() {
                let data: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
                b.write_all(&(n as u32).to_le_bytes()).unwrap();
                for c in data.chunks(10_000) {
                    b.write_all(c).unwrap();
                }
            }
        });
        let mut s = Stream::Unix(a);
        let mut r = io::BufReader::with_capacity(READ_BUFFER, &mut s);
        for (i, &n) in sizes.iter().enumerate() {
            let mut len = [0u8; 4];
            r.read_exact(&mut len).unwrap();
            assert_eq!(u32::from_le_bytes(len) as usize, n);
            let headroom = i % 3 * 8;
            let v = read_data(&mut r, headroom, n).unwrap();
            assert_eq!(v.len(), headroom + n);
            assert!(v[..headroom].iter().all(|&x| x == 0));
            let want: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
            assert!(v[headroom..] == want[..], "frame {i} ({n} bytes)");
        }
        t.join().unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(
            read_data(&mut r, 0, 1).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    /// A writer that takes at most 3 bytes per call: the frame still arrives whole, in order.
    #[test]
    fn frames_survive_short_writes() {
        struct Dribble(Vec<u8>);
        impl Write for Dribble {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                let n = b.len().min(3);
                self.0.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = Dribble(Vec::new());
        write_frame(&mut w, b"header", b"and the data").unwrap();
        assert_eq!(w.0, b"headerand the data");
    }
}
