//! Fuzz a whole server session: the input is everything a client sends (handshake, options,
//! requests) to a server with one small writable in-memory export. The server must not
//! panic, hang or allocate beyond its limits, whatever arrives.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use remoca_blkback::memory::MemDisk;
use remoca_blkback::nbd::serve_stream;
use remoca_blkback::{Disk, Exports};
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let disk: Arc<dyn Disk> = Arc::new(MemDisk::new(1 << 20));
        let exports = Exports::from_disks(vec![(String::new(), String::new(), disk)]).unwrap();
        let (client, server) = tokio::io::duplex(1 << 16);
        let (sr, sw) = tokio::io::split(server);
        let (mut cr, mut cw) = tokio::io::split(client);
        let input = data.to_vec();
        let feed = async move {
            let _ = cw.write_all(&input).await;
            let _ = cw.shutdown().await;
        };
        // Drain replies concurrently so the server never blocks on a full pipe.
        let drain = async move {
            let _ = tokio::io::copy(&mut cr, &mut tokio::io::sink()).await;
        };
        let serve = serve_stream(sr, sw, exports);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::join!(feed, drain, serve)
        })
        .await;
    });
});
