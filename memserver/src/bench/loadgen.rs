//! A closed-loop load generator shared by both systems: each connection keeps `window`
//! requests outstanding, writes what the window allows in one `write_all`, and reads replies
//! in order, timing each request from its write to its reply.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::BenchError;
use crate::protocol::{decode, Pool, Reply, Request, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Set,
}

/// A request/reply codec the generator can drive.
pub trait Proto: Send + 'static {
    /// Append one request (a batch when `keys.len() > 1`) to `out`.
    fn encode(&mut self, op: Op, keys: &[u64], value: &[u8], out: &mut BytesMut);
    /// Consume one whole reply from `buf` if it has arrived; returns the pages it covered.
    ///
    /// # Errors
    /// A reply that is not a success.
    fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<usize>, BenchError>;
}

/// The memserver wire protocol, ephemeral pool, namespace 1, no encryption (the raw server
/// against the raw baseline).
#[derive(Debug, Default)]
pub struct MemserverWire {
    next_id: u64,
}

impl Proto for MemserverWire {
    fn encode(&mut self, op: Op, keys: &[u64], value: &[u8], out: &mut BytesMut) {
        self.next_id += 1;
        let (pool, namespace) = (Pool::Ephemeral, 1);
        let v = bytes::Bytes::copy_from_slice(value);
        let req = match (op, keys) {
            (Op::Get, [key]) => Request::Get {
                pool,
                namespace,
                key: *key,
            },
            (Op::Set, [key]) => Request::Put {
                pool,
                namespace,
                key: *key,
                value: v,
            },
            (Op::Get, keys) => Request::GetBatch {
                pool,
                namespace,
                keys: keys.to_vec(),
            },
            (Op::Set, keys) => Request::PutBatch {
                pool,
                namespace,
                entries: keys.iter().map(|k| (*k, v.clone())).collect(),
            },
        };
        req.encode(self.next_id, out);
    }

    fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<usize>, BenchError> {
        let Some(f) = decode(buf).map_err(|e| BenchError::Protocol(e.to_string()))? else {
            return Ok(None);
        };
        let n = f.header.count.max(1) as usize;
        let r = Reply::from_frame(f).map_err(|e| BenchError::Protocol(e.to_string()))?;
        if r.status != Status::Ok {
            return Err(BenchError::Protocol(format!(
                "memserver answered {:?}",
                r.status
            )));
        }
        Ok(Some(n))
    }
}

/// What one connection measured.
#[derive(Debug, Default)]
pub struct Measured {
    pub pages: u64,
    /// Per-request latencies in nanoseconds.
    pub latencies: Vec<u64>,
}

/// Parameters of one measured cell, per connection.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub window: usize,
    pub batch: usize,
    /// Fraction of requests that are GETs.
    pub get_ratio: f64,
    pub keys: u64,
    pub duration: Duration,
    pub seed: u64,
}

/// Drive one connection until `load.duration` has passed and every reply is in.
///
/// # Errors
/// I/O or a failed reply.
pub async fn drive<P: Proto>(
    mut s: TcpStream,
    mut proto: P,
    load: Load,
    value: &[u8],
) -> Result<Measured, BenchError> {
    let _ = s.set_nodelay(true);
    let mut rng = rand::rngs::StdRng::seed_from_u64(load.seed);
    let mut out = BytesMut::with_capacity(1 << 20);
    let mut rbuf = BytesMut::with_capacity(1 << 20);
    let mut sent: std::collections::VecDeque<Instant> = Default::default();
    let mut m = Measured::default();
    let mut keys = vec![0u64; load.batch];
    let deadline = Instant::now() + load.duration;
    loop {
        let now = Instant::now();
        while sent.len() < load.window && now < deadline {
            let op = if rng.gen_bool(load.get_ratio) {
                Op::Get
            } else {
                Op::Set
            };
            for k in keys.iter_mut() {
                *k = rng.gen_range(0..load.keys);
            }
            proto.encode(op, &keys, value, &mut out);
            sent.push_back(now);
        }
        if sent.is_empty() {
            break;
        }
        if !out.is_empty() {
            s.write_all(&out).await.map_err(BenchError::Io)?;
            out.clear();
        }
        let mut got = false;
        while !got {
            while let Some(n) = proto.parse(&mut rbuf)? {
                let t0 = sent
                    .pop_front()
                    .ok_or_else(|| BenchError::Protocol("unsolicited reply".into()))?;
                m.latencies.push(t0.elapsed().as_nanos() as u64);
                m.pages += n as u64;
                got = true;
            }
            if !got {
                if rbuf.capacity() - rbuf.len() < 256 << 10 {
                    rbuf.reserve(1 << 20);
                }
                if s.read_buf(&mut rbuf).await.map_err(BenchError::Io)? == 0 {
                    return Err(BenchError::Protocol("server closed the connection".into()));
                }
            }
        }
    }
    Ok(m)
}

/// Store every key once so GETs hit.
///
/// # Errors
/// I/O or a failed reply.
pub async fn preload<P: Proto>(
    mut s: TcpStream,
    mut proto: P,
    keys: u64,
    value: &[u8],
) -> Result<(), BenchError> {
    let mut out = BytesMut::new();
    let mut rbuf = BytesMut::new();
    let all: Vec<u64> = (0..keys).collect();
    for chunk in all.chunks(64) {
        proto.encode(Op::Set, chunk, value, &mut out);
        s.write_all(&out).await.map_err(BenchError::Io)?;
        out.clear();
        loop {
            if proto.parse(&mut rbuf)?.is_some() {
                break;
            }
            if s.read_buf(&mut rbuf).await.map_err(BenchError::Io)? == 0 {
                return Err(BenchError::Protocol("server closed the connection".into()));
            }
        }
    }
    Ok(())
}
