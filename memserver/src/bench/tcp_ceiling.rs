//! Raw loopback TCP bandwidth: `streams` connections each sending 256 KiB writes to a reader
//! that discards them. The best any request protocol over loopback can do.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::BenchError;

/// Measured MB/s (10^6 bytes per second) over `dur`.
///
/// # Errors
/// Socket failures.
pub async fn measure(streams: usize, dur: Duration) -> Result<f64, BenchError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(BenchError::Io)?;
    let addr = l.local_addr().map_err(BenchError::Io)?;
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..streams.max(1) {
        let mut w = TcpStream::connect(addr).await.map_err(BenchError::Io)?;
        let (mut r, _) = l.accept().await.map_err(BenchError::Io)?;
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0u64;
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            total
        }));
        writers.push(tokio::spawn(async move {
            let chunk = vec![0x5au8; 256 << 10];
            let end = Instant::now() + dur;
            while Instant::now() < end {
                if w.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        }));
    }
    let start = Instant::now();
    for w in writers {
        let _ = w.await;
    }
    let mut total = 0;
    for r in readers {
        total += r.await.unwrap_or(0);
    }
    Ok(total as f64 / start.elapsed().as_secs_f64() / 1e6)
}
