//! The `xl save` stream: a streaming parser that keeps every non-page byte verbatim, the
//! writer that regenerates the stream byte for byte, and a builder of realistic streams
//! around a raw RAM image (for tests and benchmarks).
//!
//! ```text
//! [xl header 48 B][optional data: u32 config_len, JSON config]      little-endian
//! [libxl header 16 B: "LibxlFmt", version 2, options]                big-endian
//! [libxl record {u32 type, u32 len} body pad8]...                     little-endian
//!    LIBXC_CONTEXT (len 0) is followed inline by the libxc stream:
//!    [image header 24 B: 0xFFFF_FFFF_FFFF_FFFF, "XENF", version 2|3] big-endian
//!    [domain header 16 B: type 1 PV | 2 HVM, page_shift 12, xen ver]
//!    [libxc record {u32 type, u32 len} body pad8]... until libxc END
//!       PAGE_DATA body: u32 count, u32 res, u64 pfn_and_type[count],
//!                       4096 B per pfn whose type carries data
//! [libxl END]
//! ```
//!
//! Limits: optional data at most [`format::MAX_OPTIONAL_DATA`]; any record at most
//! [`format::REC_LENGTH_MAX`] (the libxc restorer's own limit). Lengths are checked before
//! anything is allocated, and buffers grow only with bytes that actually arrived.

pub mod builder;
pub mod error;
pub mod format;
pub mod parser;
pub mod writer;

pub use builder::{build_stream, BuildOptions, GuestShape};
pub use error::StreamError;
pub use format::{page_has_data, Part, PAGE_SIZE};
pub use parser::{Event, PageRecord, StreamParser};
pub use writer::write_event;
