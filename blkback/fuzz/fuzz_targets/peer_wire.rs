//! Fuzz the peer protocol's frame parsers (issue 8's chunk cache): no input may panic, a header
//! that passes never announces more than MAX_BODY bytes, and an accepted frame re-encodes to
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remoca_blkback::images::peer::wire::*;

fuzz_target!(|data: &[u8]| {
    if let Some(b) = data.get(..HEADER_LEN) {
        let b: &[u8; HEADER_LEN] = b.try_into().unwrap();
        if let Ok(h) = parse_header(b) {
            assert!(h.body_len as usize <= MAX_BODY);
        }
    }
    if let Ok(f) = parse_frame(data) {
        assert_eq!(encode(&f), data);
    }
    let mut r = data;
    while let Ok(f) = read_frame(&mut r) {
        let _ = encode(&f);
    }
});
