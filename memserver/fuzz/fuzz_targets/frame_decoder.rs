//! Feed arbitrary bytes to the frame decoder and the request/reply parsers, as a hostile peer
//! would. Properties: no panic, no allocation beyond the limits (libFuzzer's -rss_limit_mb
//! and -malloc_limit_mb catch that), and every request that decodes re-encodes to a frame that
//! decodes to the same request.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use remoca_memserver::protocol::{decode, Reply, Request};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decode(&mut buf) {
        let _ = Reply::from_frame(frame.clone());
        if let Ok((id, req)) = Request::from_frame(frame) {
            let mut again = BytesMut::new();
            req.encode(id, &mut again);
            let f2 = decode(&mut again).expect("re-encoded frame decodes").expect("whole frame");
            let (id2, req2) = Request::from_frame(f2).expect("re-encoded request parses");
            assert_eq!(id, id2);
            assert_eq!(req, req2);
            assert!(again.is_empty());
        }
    }
});
