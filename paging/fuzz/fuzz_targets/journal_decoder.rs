//! Decode arbitrary bytes as a journal (header, then records until the first error or the
//! end): never panics, never reads past the buffer, and re-encoding what decoded gives the
//! same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remoca_paging::journal::format::{self, Decoded};

fuzz_target!(|data: &[u8]| {
    let dom = 7;
    let mut at = match format::check_header(data, dom) {
        Ok(()) => format::HEADER_LEN,
        Err(_) => 0,
    };
    while at < data.len() {
        match format::decode_record(&data[at..]) {
            Ok(Decoded::Record(rec, n)) => {
                assert!(n <= data.len() - at);
                let mut again = Vec::new();
                format::encode_record(&rec, &mut again);
                assert_eq!(&again[..], &data[at..at + n]);
                at += n;
            }
            Ok(Decoded::Incomplete) | Err(_) => break,
        }
    }
});
