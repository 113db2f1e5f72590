//! Fuzz the blkif request parser: any ring entry, in either ABI, with any advertised
//! indirect limit, and any indirect page. Nothing may panic; an accepted request must
//! re-encode to bytes that parse to the same request, and respect the limits it was
//! checked against.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remoca_blkback::blkif::parse::*;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let abi = if selector & 1 == 0 {
        Abi::X86_64
    } else {
        Abi::X86_32
    };
    let limits = Limits {
        max_indirect_segments: u16::from(selector >> 1) * 32,
    };
    match parse_request(abi, rest, limits) {
        Ok(req) => {
            let again = parse_request(abi, &encode_request(abi, &req), limits)
                .expect("an accepted request re-encodes to an accepted one");
            assert_eq!(again, req);
            match &req.op {
                BlkifOp::Read { segments, .. } | BlkifOp::Write { segments, .. } => {
                    assert!((1..=11).contains(&segments.len()));
                    assert!(segments
                        .iter()
                        .all(|s| s.first_sect <= s.last_sect && s.last_sect < 8));
                }
                BlkifOp::Flush { segments, .. } => assert!(segments.len() <= 11),
                BlkifOp::Indirect {
                    nr_segments, pages, ..
                } => {
                    assert!(*nr_segments >= 1 && *nr_segments <= limits.max_indirect_segments);
                    assert_eq!(pages.len(), usize::from(*nr_segments).div_ceil(512));
                }
                BlkifOp::Discard { .. } => {}
            }
        }
        Err(rejected) => assert!(rejected.status == -1 || rejected.status == -2),
    }
    if let Ok(segs) = parse_indirect_segments(rest, rest.len() / 8) {
        assert_eq!(encode_segments(&segs).len(), segs.len() * 8);
    }
});
