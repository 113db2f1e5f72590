//! The same server driven through the real client (sealing with XChaCha20-Poly1305, location
//! map, pipelined pooled connections): what paging and the block backend actually get.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{BenchError, VALUE_LEN};
use crate::client::{Client, ClientConfig, PageSecret};
use crate::protocol::Pool;

/// Pages per second for (`batch`-page requests, `tasks` concurrent callers), GET or PUT.
///
/// # Errors
/// Client failures.
pub async fn measure(
    addr: SocketAddr,
    keys: u64,
    tasks: usize,
    batch: usize,
    get: bool,
    dur: Duration,
) -> Result<f64, BenchError> {
    let mut cfg = ClientConfig::new(vec![addr], None, PageSecret::random());
    cfg.replicas = 1;
    cfg.connections_per_server = 4;
    let client = Client::connect(cfg)
        .await
        .map_err(|e| BenchError::Protocol(e.to_string()))?;
    let page = vec![0x33u8; VALUE_LEN];
    // Keys 0..keys of namespace 9, stored once so GETs hit.
    let nkeys = keys.max(1);
    let all: Vec<u64> = (0..nkeys).collect();
    for c in all.chunks(256) {
        let pages: Vec<(u64, &[u8])> = c.iter().map(|k| (*k, &page[..])).collect();
        client
            .put_batch(Pool::Ephemeral, 9, &pages)
            .await
            .map_err(|e| BenchError::Protocol(e.to_string()))?;
    }
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let client = client.clone();
        let page = page.clone();
        handles.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut next = (t * 997) as u64;
            while start.elapsed() < dur {
                let ks: Vec<u64> = (0..batch as u64).map(|i| (next + i * 13) % nkeys).collect();
                next = next.wrapping_add(7919);
                if get {
                    let r = client.get_batch(Pool::Ephemeral, 9, &ks).await?;
                    n += r.iter().filter(|p| p.is_some()).count() as u64;
                } else {
                    let pages: Vec<(u64, &[u8])> = ks.iter().map(|k| (*k, &page[..])).collect();
                    client.put_batch(Pool::Ephemeral, 9, &pages).await?;
                    n += batch as u64;
                }
            }
            Ok::<u64, crate::client::ClientError>(n)
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h
            .await
            .map_err(|e| BenchError::Protocol(e.to_string()))?
            .map_err(|e| BenchError::Protocol(e.to_string()))?;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}
