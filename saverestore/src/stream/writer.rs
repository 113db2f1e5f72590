//! Regenerates an `xl save` stream from parser events, byte for byte.

use std::io::{self, Write};

use super::format::LIBXC_PAGE_DATA;
use super::parser::{Event, PageRecord};

/// Writes a PAGE_DATA record: `{type 1, length}`, `count`, reserved, words, pages. Its length
/// is a multiple of 8, so it never has padding.
///
/// # Errors
/// The writer's error.
pub fn write_page_record<W: Write + ?Sized>(out: &mut W, rec: &PageRecord) -> io::Result<()> {
    let mut head = Vec::with_capacity(16 + 8 * rec.words.len());
    head.extend_from_slice(&LIBXC_PAGE_DATA.to_le_bytes());
    head.extend_from_slice(&(rec.record_len() as u32).to_le_bytes());
    head.extend_from_slice(&(rec.words.len() as u32).to_le_bytes());
    head.extend_from_slice(&rec.reserved.to_le_bytes());
    for w in &rec.words {
        head.extend_from_slice(&w.to_le_bytes());
    }
    out.write_all(&head)?;
    out.write_all(&rec.pages)
}

/// Writes one event as it was in the original stream.
///
/// # Errors
/// The writer's error.
pub fn write_event<W: Write + ?Sized>(out: &mut W, ev: &Event) -> io::Result<()> {
    match ev {
        Event::Verbatim { bytes, .. } => out.write_all(bytes),
        Event::Pages(rec) => write_page_record(out, rec),
    }
}
