//! The body of the `nbd_session` fuzz target, run by proptest on every `cargo test`: random
//! client bytes, raw or after a valid handshake, must never panic or hang the server.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use remoca_blkback::memory::MemDisk;
use remoca_blkback::nbd::serve_stream;
use remoca_blkback::nbd::wire::*;
use remoca_blkback::{Disk, Exports};
use tokio::io::AsyncWriteExt;

fn session(input: Vec<u8>) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let disk: Arc<dyn Disk> = Arc::new(MemDisk::new(1 << 20));
        let exports = Exports::from_disks(vec![(String::new(), String::new(), disk)]).unwrap();
        let (client, server) = tokio::io::duplex(1 << 16);
        let (sr, sw) = tokio::io::split(server);
        let (mut cr, mut cw) = tokio::io::split(client);
        let feed = async move {
            let _ = cw.write_all(&input).await;
            let _ = cw.shutdown().await;
        };
        let drain = async move {
            let _ = tokio::io::copy(&mut cr, &mut tokio::io::sink()).await;
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(feed, drain, serve_stream(sr, sw, exports))
        })
        .await
        .is_ok()
    })
}

/// Client flags, STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, GO "".
fn valid_prefix() -> Vec<u8> {
    let mut b = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let mut opt = |o: u32, d: &[u8]| {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(d.len() as u32).to_be_bytes());
        b.extend_from_slice(d);
    };
    opt(OPT_STRUCTURED_REPLY, &[]);
    let mut m = 0u32.to_be_bytes().to_vec();
    m.extend_from_slice(&1u32.to_be_bytes());
    m.extend_from_slice(&15u32.to_be_bytes());
    m.extend_from_slice(b"base:allocation");
    opt(OPT_SET_META_CONTEXT, &m);
    let mut g = 0u32.to_be_bytes().to_vec();
    g.extend_from_slice(&0u16.to_be_bytes());
    opt(OPT_GO, &g);
    b
}

/// Requests with a valid magic and random fields (lengths kept small so WRITE payloads
/// mostly arrive).
fn request() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u16>(),
        0u16..10,
        any::<u64>(),
        0u64..(2 << 20),
        0u32..70000,
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(flags, command, cookie, offset, len, tail)| {
            let h = RequestHeader {
                flags: flags & 0x3f,
                command,
                cookie,
                offset,
                len,
            };
            let mut b = encode_request(&h).to_vec();
            b.extend_from_slice(&tail);
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_bytes_never_break_the_server(raw in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(session(raw));
    }

    #[test]
    fn random_requests_after_a_valid_handshake(reqs in proptest::collection::vec(request(), 0..20)) {
        let mut input = valid_prefix();
        for r in reqs {
            input.extend_from_slice(&r);
        }
        prop_assert!(session(input));
    }
}
