//! Any byte string as an image: open, inspect, extract and restore must return errors, never
//! panic or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remoca_saverestore::image::ImageReader;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = ImageReader::open(data) {
        let _ = remoca_saverestore::inspect::describe(&r);
        for pfn in 0..4 {
            let _ = r.extract(pfn);
        }
        let _ = remoca_saverestore::restore_stream(&r, &mut std::io::sink(), 1, &|_| {});
    }
});
