//! The baseline: a memcached child process and its text protocol (as the load generator
//! speaks it: `set`, pipelined; `get k1 k2 ...` for batches).

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};

use super::loadgen::{Op, Proto};
use super::BenchError;

/// A running memcached, stopped (by its PID) when dropped.
#[derive(Debug)]
pub struct Memcached {
    child: Child,
    pub addr: SocketAddr,
}

impl Memcached {
    /// Start `binary` on a free loopback port with `memory` bytes and `threads` threads.
    ///
    /// # Errors
    /// The binary is missing or does not start listening within 5 s.
    pub fn start(binary: &Path, memory: u64, threads: usize) -> Result<Memcached, BenchError> {
        // Pick a free port by binding port 0, then hand it to memcached.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(BenchError::Io)?
            .port();
        let mut cmd = Command::new(binary);
        cmd.args(["-l", "127.0.0.1", "-U", "0", "-c", "4096"])
            .arg("-p")
            .arg(port.to_string())
            .arg("-m")
            .arg((memory >> 20).max(64).to_string())
            .arg("-t")
            .arg(threads.max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // memcached refuses to run as root unless told which user to be.
        if std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
        {
            cmd.args(["-u", "root"]);
        }
        let child = cmd.spawn().map_err(|e| {
            BenchError::Memcached(format!(
                "cannot start {} ({e}); install Debian's memcached package",
                binary.display()
            ))
        })?;
        let mut m = Memcached {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(m.addr).is_err() {
            if let Ok(Some(st)) = m.child.try_wait() {
                return Err(BenchError::Memcached(format!(
                    "memcached exited at start: {st}"
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Memcached(
                    "memcached did not start listening".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// memcached's text protocol.
#[derive(Debug, Default)]
pub struct MemcachedText {
    /// Replies still expected: (op, number of keys).
    expect: std::collections::VecDeque<(Op, usize)>,
}

fn find_crlf(b: &[u8], from: usize) -> Option<usize> {
    b[from..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

impl Proto for MemcachedText {
    fn encode(&mut self, op: Op, keys: &[u64], value: &[u8], out: &mut BytesMut) {
        match op {
            Op::Set => {
                for k in keys {
                    out.extend_from_slice(format!("set k{k} 0 0 {}\r\n", value.len()).as_bytes());
                    out.extend_from_slice(value);
                    out.extend_from_slice(b"\r\n");
                }
            }
            Op::Get => {
                out.extend_from_slice(b"get");
                for k in keys {
                    out.extend_from_slice(format!(" k{k}").as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
        }
        self.expect.push_back((op, keys.len()));
    }

    fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<usize>, BenchError> {
        let Some(&(op, n)) = self.expect.front() else {
            return Ok(None);
        };
        let bad = |what: &str| BenchError::Protocol(format!("memcached: {what}"));
        match op {
            Op::Set => {
                let need = n * 8;
                if buf.len() < need {
                    return Ok(None);
                }
                for i in 0..n {
                    if &buf[i * 8..i * 8 + 8] != b"STORED\r\n" {
                        return Err(bad(&String::from_utf8_lossy(
                            &buf[i * 8..(i * 8 + 40).min(buf.len())],
                        )));
                    }
                }
                buf.advance(need);
            }
            Op::Get => {
                let mut pos = 0;
                loop {
                    let Some(e) = find_crlf(buf, pos) else {
                        return Ok(None);
                    };
                    let line = &buf[pos..e];
                    if line == b"END" {
                        buf.advance(e + 2);
                        break;
                    }
                    if !line.starts_with(b"VALUE ") {
                        return Err(bad(&String::from_utf8_lossy(line)));
                    }
                    let len: usize = std::str::from_utf8(line)
                        .ok()
                        .and_then(|l| l.rsplit(' ').next())
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| bad("VALUE line without a length"))?;
                    let end = e + 2 + len + 2;
                    if buf.len() < end {
                        return Ok(None);
                    }
                    pos = end;
                }
            }
        }
        self.expect.pop_front();
        Ok(Some(n))
    }
}
