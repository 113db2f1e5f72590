//! The xenstore wire protocol as a daemon receives it: arbitrary bytes are fed to the
//! simulated xenstored's connection loop (header checks, payload parsing, permissions
//! strings, transactions, watches). It must never panic, hang or allocate past the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remoca_xen::sim::{server, SimXenstore};
use remoca_xen::xenstore::wire;

fuzz_target!(|data: &[u8]| {
    let _ = wire::split_strings(data);
    let _ = wire::errno_from_name(data);
    let out = server::serve_bytes(&SimXenstore::new(), data);
    // Every reply is itself a well-formed frame.
    let mut rest = &out[..];
    while !rest.is_empty() {
        let head: &[u8; wire::HEADER_LEN] = rest[..wire::HEADER_LEN].try_into().expect("whole header");
        let h = wire::Header::decode(head).expect("valid reply header");
        rest = &rest[wire::HEADER_LEN + h.len as usize..];
    }
});
