//! Any byte string: the xl save parser either errors or yields events that regenerate the
//! exact bytes it consumed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remoca_saverestore::stream::{write_event, StreamParser};

fuzz_target!(|data: &[u8]| {
    let mut p = StreamParser::new(data);
    let mut out = Vec::new();
    while let Ok(Some(ev)) = p.next_event() {
        write_event(&mut out, &ev).unwrap();
    }
    assert!(out.len() as u64 <= p.offset());
    assert_eq!(&out[..], &data[..out.len()]);
});
