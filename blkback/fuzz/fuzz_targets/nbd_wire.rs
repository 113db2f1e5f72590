//! Fuzz the NBD frame parsers: option header, GO/INFO data, meta-context data, request
//! header. None may panic; a parsed request header must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remoca_blkback::nbd::wire::*;

fuzz_target!(|data: &[u8]| {
    let _ = parse_export_request(data);
    let _ = parse_meta_request(data);
    if let Some(b) = data.get(..OPTION_HEADER_LEN) {
        let _ = parse_option_header(b.try_into().unwrap());
    }
    if let Some(b) = data.get(..REQUEST_HEADER_LEN) {
        let b: &[u8; REQUEST_HEADER_LEN] = b.try_into().unwrap();
        if let Ok(h) = parse_request(b) {
            assert_eq!(&encode_request(&h), b);
        }
    }
});
