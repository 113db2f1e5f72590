//! Fuzz the failover channel's frame parsers: hello, hello reply, auth, ready, request and
//! reply headers, block-status extents, the shared-memory offer. None may panic; an accepted
//! fixed-size frame must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remoca_blkback::failover::shm;
use remoca_blkback::failover::wire::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse_hello(data) {
        assert_eq!(encode_hello(&h), data);
    }
    let _ = parse_extents(data);
    if let Some(b) = data.get(..REQUEST_HEADER_LEN) {
        let b: &[u8; REQUEST_HEADER_LEN] = b.try_into().unwrap();
        if let Ok(h) = parse_request(b) {
            assert_eq!(&encode_request(&h), b);
            assert!(h.data_len() <= MAX_DATA as usize);
        }
    }
    if let Some(b) = data.get(..REPLY_HEADER_LEN) {
        let b: &[u8; REPLY_HEADER_LEN] = b.try_into().unwrap();
        if let Ok(h) = parse_reply(b) {
            assert_eq!(&encode_reply(&h), b);
        }
    }
    if let Some(b) = data.get(..HELLO_REPLY_LEN) {
        let b: &[u8; HELLO_REPLY_LEN] = b.try_into().unwrap();
        if let Ok(h) = parse_hello_reply(b) {
            assert_eq!(&encode_hello_reply(&h), b);
        }
    }
    if let Some(b) = data.get(..AUTH_LEN) {
        let _ = parse_auth(b.try_into().unwrap());
    }
    if let Some(b) = data.get(..READY_LEN) {
        let _ = parse_ready(b.try_into().unwrap());
    }
    if let Some(b) = data.get(..shm::OFFER_LEN) {
        let b: &[u8; shm::OFFER_LEN] = b.try_into().unwrap();
        if let Ok((slots, size)) = shm::parse_offer(b) {
            assert_eq!(&shm::encode_offer(slots, size), b);
            assert!(u64::from(slots) * u64::from(size) <= shm::MAX_AREA);
        }
    }
});
