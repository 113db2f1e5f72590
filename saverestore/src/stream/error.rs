//! Errors of the `xl save` stream parser.

use std::io;

use super::Part;

/// What is wrong with an `xl save` stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading the xl save stream")]
    Io(#[source] io::Error),
    #[error("stream truncated in {what} (at byte {offset})")]
    Truncated { what: &'static str, offset: u64 },
    #[error("not an xl save file: bad magic")]
    BadXlMagic,
    #[error("xl header byte order {0:#x} is not 0x01020304 (not a little-endian stream)")]
    BadByteOrder(u32),
    #[error("xl header has unknown mandatory flags {0:#x}")]
    UnknownXlFlags(u32),
    #[error("legacy (pre-v2) xl save stream is not supported")]
    LegacyStream,
    #[error("xl optional data of {0} bytes exceeds the limit")]
    OptionalDataTooLong(u32),
    #[error("bad {what} header: {detail}")]
    BadHeader { what: &'static str, detail: String },
    #[error("{part} record type {rtype:#x} has length {len} above the limit")]
    RecordTooLong { part: Part, rtype: u32, len: u32 },
    #[error("unknown mandatory {part} record type {rtype:#x}")]
    UnknownMandatoryRecord { part: Part, rtype: u32 },
    #[error("checkpointed stream (Remus/COLO {part} record {rtype:#x}) is not supported")]
    Checkpoint { part: Part, rtype: u32 },
    #[error("bad PAGE_DATA record at byte {offset}: {detail}")]
    BadPageData { offset: u64, detail: String },
    #[error("libxl LIBXC_CONTEXT record has length {0}, expected 0")]
    BadLibxcContext(u32),
}
