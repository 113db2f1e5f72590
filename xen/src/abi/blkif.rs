//! Block-interface ring entries (`io/blkif.h`), x86_64 layout, plus the x86_32 request
//! layout that frontends writing no `protocol` key use.

use super::ring::ring_size;

pub const OP_READ: u8 = 0;
pub const OP_WRITE: u8 = 1;
pub const OP_WRITE_BARRIER: u8 = 2;
pub const OP_FLUSH_DISKCACHE: u8 = 3;
pub const OP_DISCARD: u8 = 5;
pub const OP_INDIRECT: u8 = 6;

pub const RSP_OKAY: i16 = 0;
pub const RSP_ERROR: i16 = -1;
pub const RSP_EOPNOTSUPP: i16 = -2;

/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`.
pub const MAX_SEGMENTS: usize = 11;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`.
pub const MAX_INDIRECT_PAGES: usize = 8;
/// Segments in one indirect page.
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = 4096 / core::mem::size_of::<Segment>();

/// `struct blkif_request_segment`: sectors are 512-byte units within one 4 KiB frame.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub gref: u32,
    pub first_sect: u8,
    pub last_sect: u8,
    pub pad: u16,
}

/// `struct blkif_request` (x86_64): 112 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Request {
    pub operation: u8,
    pub nr_segments: u8,
    pub handle: u16,
    pub pad: u32,
    pub id: u64,
    pub sector_number: u64,
    pub seg: [Segment; MAX_SEGMENTS],
}

/// `struct blkif_request_discard` (x86_64), overlaying [`Request`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiscardRequest {
    pub operation: u8,
    pub flag: u8,
    pub handle: u16,
    pub pad: u32,
    pub id: u64,
    pub sector_number: u64,
    pub nr_sectors: u64,
}

/// `struct blkif_request_indirect` (x86_64), overlaying [`Request`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndirectRequest {
    pub operation: u8,
    pub indirect_op: u8,
    pub nr_segments: u16,
    pub pad: u32,
    pub id: u64,
    pub sector_number: u64,
    pub handle: u16,
    pub pad2: u16,
    pub indirect_grefs: [u32; MAX_INDIRECT_PAGES],
    pub pad3: u32,
}

/// `struct blkif_response` (both ABIs): 16 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    pub operation: u8,
    pub pad: u8,
    pub status: i16,
    pub pad2: u32,
}

/// `struct blkif_x86_32_request`: 64-bit fields are only 4-byte aligned; 108 bytes.
#[repr(C, packed(4))]
#[derive(Debug, Clone, Copy, Default)]
pub struct Request32 {
    pub operation: u8,
    pub nr_segments: u8,
    pub handle: u16,
    pub id: u64,
    pub sector_number: u64,
    pub seg: [Segment; MAX_SEGMENTS],
}

/// `struct blkif_x86_32_response`: 12 bytes.
#[repr(C, packed(4))]
#[derive(Debug, Clone, Copy, Default)]
pub struct Response32 {
    pub id: u64,
    pub operation: u8,
    pub pad: u8,
    pub status: i16,
}

/// Entries in a one-page x86_64 blkif ring.
pub const RING_SIZE_ONE_PAGE: u32 = ring_size(4096, core::mem::size_of::<Request>());

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn sizes() {
        assert_eq!(size_of::<Request>(), 112);
        assert_eq!(size_of::<DiscardRequest>(), 32);
        assert_eq!(size_of::<IndirectRequest>(), 64);
        assert_eq!(size_of::<Response>(), 16);
        assert_eq!(size_of::<Request32>(), 108);
        assert_eq!(size_of::<Response32>(), 12);
        assert_eq!(RING_SIZE_ONE_PAGE, 32);
        assert_eq!(SEGMENTS_PER_INDIRECT_PAGE, 512);
    }
}
