//! The image store's parsers on arbitrary bytes: arena header, chunk record header and
//! payload (raw, lz4, zstd), footer table, trailer, manifest (both formats) and index. None
//! may panic or allocate more than the input justifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remoca_blkback::images::store::{arena, index::IndexFile, manifest, Manifest};

fuzz_target!(|data: &[u8]| {
    arena::parse_any(data);
    // Also sealed with a valid checksum, so the entry decoding (format 1 and 2) is reached.
    manifest::parse_any(data);
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }
    if let Ok(i) = IndexFile::decode(data) {
        assert_eq!(IndexFile::decode(&i.encode()).unwrap(), i);
    }
});
