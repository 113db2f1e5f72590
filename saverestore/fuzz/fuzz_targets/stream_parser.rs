//! Any byte string: the xl save parser either errors or yields events that regenerate the
//! exact bytes it consumed; the borrowing parser (pages left in the input) yields the same
//! events and stops at the same point.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remoca_saverestore::stream::{write_event, Event, StreamParser};

fuzz_target!(|data: &[u8]| {
    let mut p = StreamParser::new(data);
    let mut out = Vec::new();
    while let Ok(Some(ev)) = p.next_event() {
        write_event(&mut out, &ev).unwrap();
    }
    assert!(out.len() as u64 <= p.offset());
    assert_eq!(&out[..], &data[..out.len()]);

    let mut b = StreamParser::new(std::io::Cursor::new(data));
    let mut again = Vec::new();
    while let Ok(Some((mut ev, pages))) = b.next_event_borrowed() {
        if let Event::Pages(r) = &mut ev {
            r.pages = pages.to_vec();
        }
        write_event(&mut again, &ev).unwrap();
    }
    assert_eq!(again, out);
});
