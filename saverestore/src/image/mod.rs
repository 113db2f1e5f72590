//! remoca's save image format (version 3; versions 1 and 2 are read too). Full operator description: `docs/save-format.md`.
//!
//! ```text
//! offset 0   file header, 32 B
//!            | magic "RMCSAVE\n" (8) | version u32 = 3 | flags u32 = 0 |
//!            | codec choice u8 (0 auto, 1 snap, 2 zstd, 3 lz4) | level i8 | block_pages u16 |
//!            | page_size u32 = 4096 | reserved u64 = 0 |
//! 32         frames, written in one streaming pass, per window of pages:
//!              BLOCK frames of that window, then its VERBATIM / PAGE_RECORD frames in
//!              stream order
//!            frame header, 16 B
//!            | kind u8 | sub u8 | reserved u16 | len u32 | aux u32 | crc32c u32 |
//!            payload, len B                (crc32c covers header bytes 0..12 + payload)
//!              kind 1 VERBATIM     sub = stream part, aux = record type, payload = the bytes
//!              kind 2 PAGE_RECORD  aux = count, payload = u32 reserved, u32 0, u64 words[count]
//!              kind 3 BLOCK        sub = codec id (1 snappy, 2 zstd, 3 lz4), aux = raw length (pages * 4096),
//!                                  payload = compressed pages
//!              kind 4 INDEX        aux = raw length, payload = zstd(index), the last frame
//! end-32     trailer, 32 B
//!            | magic "RMCSIDX\n" (8) | index frame offset u64 | trailer offset u64 |
//!            | crc32c of the previous 24 bytes u32 | reserved u32 |
//! ```
//! Index (little-endian, after zstd):
//! ```text
//! | pages u64 | blocks u64 | records u64 | stream_len u64 | stream_check u64 |
//! | zero u64 | word u64 | dup u64 | nodata u64 | reserved u64 |              (80 B)
//! blocks[blocks]:  | frame offset u64 | frame len u32 | pages u16 | codec u8 | 0 u8 |
//! pages[pages]:    | pfn_and_type word u64 | class u32 | 0 u32 | arg u64 |
//!   one entry per PAGE_DATA word, in stream order; class 0 NODATA (BROKEN/XALLOC/XTAB),
//!   1 ZERO, 2 WORD (arg = the repeated u64), 3 DUP (arg = entry index of the first copy,
//!   which is a BLOCK entry), 4 BLOCK (arg = block << 16 | slot)
//! ```
//! Limits checked before allocating: frames at most 128 MiB + 16, blocks at most 256 pages,
//! the index at most [`MAX_INDEX_RAW`] bytes and consistent with its counts.

pub mod error;
pub mod frame;
pub mod index;
pub mod read_at;
pub mod reader;

pub use error::ImageError;
pub use frame::{FileHeader, FrameHeader, FrameKind, Trailer};
pub use index::{BlockEntry, Index, PageClass, PageEntry};
pub use read_at::ReadAt;
pub use reader::ImageReader;

/// File magic.
pub const MAGIC: &[u8; 8] = b"RMCSAVE\n";
/// Trailer magic.
pub const TRAILER_MAGIC: &[u8; 8] = b"RMCSIDX\n";
/// Format version this code writes: 2 added the LZ4 block codec (id 3); 3 replaced the
/// stream's CRC32C in the index by its digest ([`crate::digest`]); nothing else changed.
pub const VERSION: u32 = 3;
/// Oldest format version this code reads (version-1 images hold snappy and zstd blocks only).
pub const MIN_VERSION: u32 = 1;

/// How the index's `stream_check` checks the whole regenerated stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCheck {
    /// Formats 1 and 2: CRC32C of the stream.
    Crc32c,
    /// Format 3 on: the digest of [`crate::digest`].
    Digest,
}

impl StreamCheck {
    pub fn of_version(version: u32) -> Self {
        if version >= 3 {
            StreamCheck::Digest
        } else {
            StreamCheck::Crc32c
        }
    }

    /// A check value as `remoca inspect` and error messages show it.
    pub fn show(self, value: u64) -> String {
        match self {
            StreamCheck::Crc32c => format!("crc32c {value:#010x}"),
            StreamCheck::Digest => format!("digest {value:#018x}"),
        }
    }
}
/// Largest frame payload: a whole libxc record of `REC_LENGTH_MAX` plus header and pad.
pub const MAX_FRAME_PAYLOAD: u32 = (128 << 20) + 16;
/// Largest decompressed index (enough for 2^24 pages entries = 64 GiB of guest RAM).
pub const MAX_INDEX_RAW: u32 = 512 << 20;
/// Pages per block by default: 16 x 4 KiB = 64 KiB.
pub const DEFAULT_BLOCK_PAGES: usize = 16;
