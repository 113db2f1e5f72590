//! The blkif request wire format (`io/blkif.h`): decode a ring entry, checking every field
//! before anything uses it. Fuzzed by `blkback/fuzz/fuzz_targets/blkif_request.rs`.
//!
//! One ring slot holds one request, in the layout of the frontend's ABI (`protocol` key):
//!
//! ```text
//!  x86_64 (112 bytes)                         x86_32 (108 bytes; u64 only 4-aligned)
//!  0  operation  u8                           0  operation  u8
//!  1  nr_segments | discard flag | ind. op    1  nr_segments | discard flag | ind. op
//!  2  handle u16 | indirect nr_segments u16   2  handle u16 | indirect nr_segments u16
//!  8  id u64                                  4  id u64
//!  16 sector_number u64                       12 sector_number u64
//!  24 seg[11] {gref u32, first u8, last u8}   20 seg[11]
//!     discard: nr_sectors u64 @24                discard: nr_sectors u64 @20
//!     indirect: handle u16 @24, grefs[8] @28     indirect: handle u16 @20, grefs[8] @24
//! ```
//!
//! Limits enforced here: READ/WRITE carry 1..=11 segments, FLUSH_DISKCACHE 0..=11 (with
//! segments it is a write made durable); every segment has `first_sect <= last_sect <= 7`;
//! an INDIRECT request carries 1..=`max_indirect_segments` segments for READ or WRITE, in
//! `ceil(n / 512)` pages; `sector_number * 512` must not overflow. A request that fails a
//! check is [`Rejected`] with the id and operation to answer it with, so the ring keeps
//! going. Ranges against the disk size are checked when the request runs.

use remoca_xen::abi::blkif::{
    self as abi, MAX_INDIRECT_PAGES, MAX_SEGMENTS, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_INDIRECT,
    OP_READ, OP_WRITE, OP_WRITE_BARRIER, RSP_EOPNOTSUPP, RSP_ERROR, SEGMENTS_PER_INDIRECT_PAGE,
};
use remoca_xen::GrantRef;

/// blkif sectors are always 512 bytes, whatever `sector-size` says.
pub const SECTOR_SIZE: u64 = 512;
/// Sectors in one 4 KiB page.
pub const SECTORS_PER_PAGE: u8 = 8;
/// Size of one segment descriptor (in the ring and in indirect pages).
pub const SEGMENT_SIZE: usize = 8;

/// The request layout a frontend uses (closed set: `io/protocols.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abi {
    X86_64,
    X86_32,
}

impl Abi {
    /// The ABI named by the frontend's `protocol` key. No key means x86_32: that is what
    /// Linux blkback (`BLKIF_PROTOCOL_DEFAULT` on x86) and QEMU assume, because frontends
    /// older than the key were 32-bit.
    ///
    /// # Errors
    /// The unknown protocol string (e.g. `arm-abi`, which this x86 backend does not speak).
    pub fn from_protocol(protocol: Option<&str>) -> Result<Abi, String> {
        match protocol {
            None => Ok(Abi::X86_32),
            Some("x86_64-abi") => Ok(Abi::X86_64),
            Some("x86_32-abi") => Ok(Abi::X86_32),
            Some(other) => Err(other.to_owned()),
        }
    }

    /// Bytes of one request entry.
    pub const fn request_size(self) -> usize {
        match self {
            Abi::X86_64 => 112,
            Abi::X86_32 => 108,
        }
    }

    /// The `protocol` string.
    pub const fn name(self) -> &'static str {
        match self {
            Abi::X86_64 => "x86_64-abi",
            Abi::X86_32 => "x86_32-abi",
        }
    }

    const fn id_at(self) -> usize {
        match self {
            Abi::X86_64 => 8,
            Abi::X86_32 => 4,
        }
    }

    const fn sector_at(self) -> usize {
        self.id_at() + 8
    }

    /// Segments, discard `nr_sectors`, and the indirect `handle` all start here.
    const fn body_at(self) -> usize {
        self.sector_at() + 8
    }

    const fn indirect_grefs_at(self) -> usize {
        match self {
            Abi::X86_64 => 28,
            Abi::X86_32 => 24,
        }
    }
}

/// One data segment: `last_sect - first_sect + 1` sectors of the granted page `gref`,
/// starting at sector `first_sect` of that page. Checked: `first <= last <= 7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSegment {
    pub gref: GrantRef,
    pub first_sect: u8,
    pub last_sect: u8,
}

impl DataSegment {
    /// Byte offset of the data in the granted page.
    pub fn offset(&self) -> u16 {
        u16::from(self.first_sect) * SECTOR_SIZE as u16
    }

    /// Bytes of data.
    pub fn len(&self) -> usize {
        usize::from(self.last_sect - self.first_sect + 1) * SECTOR_SIZE as usize
    }

    /// Never true for a checked segment (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlkifOp {
    Read {
        sector: u64,
        segments: Vec<DataSegment>,
    },
    Write {
        sector: u64,
        segments: Vec<DataSegment>,
    },
    /// `FLUSH_DISKCACHE`: flush the disk; with segments, then write them durably.
    Flush {
        sector: u64,
        segments: Vec<DataSegment>,
    },
    Discard {
        sector: u64,
        nr_sectors: u64,
        secure: bool,
    },
    /// Segments live in `pages` (grant refs of indirect pages); fetch them, then parse with
    /// [`parse_indirect_segments`].
    Indirect {
        write: bool,
        sector: u64,
        nr_segments: u16,
        pages: Vec<GrantRef>,
    },
}

/// A decoded, checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkifRequest {
    pub id: u64,
    pub handle: u16,
    pub op: BlkifOp,
}

impl BlkifRequest {
    /// The `operation` to put in the response. For INDIRECT it is the inner READ/WRITE, as
    /// Linux blkback answers (blkfront treats any other value as a bug).
    pub fn response_operation(&self) -> u8 {
        match &self.op {
            BlkifOp::Read { .. } => OP_READ,
            BlkifOp::Write { .. } => OP_WRITE,
            BlkifOp::Flush { .. } => OP_FLUSH_DISKCACHE,
            BlkifOp::Discard { .. } => OP_DISCARD,
            BlkifOp::Indirect { write: true, .. } => OP_WRITE,
            BlkifOp::Indirect { write: false, .. } => OP_READ,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("entry of {0} bytes is shorter than a request")]
    Short(usize),
    #[error("operation {0} is not supported")]
    UnknownOperation(u8),
    #[error("indirect operation {0} is not READ or WRITE")]
    BadIndirectOperation(u8),
    #[error("no segments")]
    NoSegments,
    #[error("{count} segments, at most {max} allowed")]
    TooManySegments { count: usize, max: usize },
    #[error("segment {index}: sectors {first}..={last} are not within one page")]
    BadSegment { index: usize, first: u8, last: u8 },
    #[error("sector {0} overflows a byte offset")]
    SectorOverflow(u64),
}

/// A request that cannot be served, with what is needed to answer it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("blkif request {id} (operation {operation})")]
pub struct Rejected {
    pub id: u64,
    /// The operation to echo in the response.
    pub operation: u8,
    /// `BLKIF_RSP_ERROR` or `BLKIF_RSP_EOPNOTSUPP`.
    pub status: i16,
    #[source]
    pub reason: Reason,
}

/// Limits this backend advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `feature-max-indirect-segments` (0 = indirect requests are not offered).
    pub max_indirect_segments: u16,
}

/// Most indirect segments a request can carry (8 pages of 512 descriptors).
pub const MAX_INDIRECT_SEGMENTS: u16 = (MAX_INDIRECT_PAGES * SEGMENTS_PER_INDIRECT_PAGE) as u16;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decode one segment descriptor (8 bytes) and check it.
fn segment_at(b: &[u8], at: usize, index: usize) -> Result<DataSegment, Reason> {
    let seg = DataSegment {
        gref: u32_at(b, at),
        first_sect: b[at + 4],
        last_sect: b[at + 5],
    };
    if seg.first_sect > seg.last_sect || seg.last_sect >= SECTORS_PER_PAGE {
        return Err(Reason::BadSegment {
            index,
            first: seg.first_sect,
            last: seg.last_sect,
        });
    }
    Ok(seg)
}

fn segments(b: &[u8], at: usize, count: usize) -> Result<Vec<DataSegment>, Reason> {
    (0..count)
        .map(|i| segment_at(b, at + i * SEGMENT_SIZE, i))
        .collect()
}

fn check_sector(sector: u64) -> Result<u64, Reason> {
    match sector.checked_mul(SECTOR_SIZE) {
        Some(_) => Ok(sector),
        None => Err(Reason::SectorOverflow(sector)),
    }
}

/// Decode and check the request in `entry` (one ring slot, copied out of shared memory).
///
/// # Errors
/// [`Rejected`] with the reason; `status` is `EOPNOTSUPP` for operations this backend does
/// not implement (barriers, unknown codes) and `ERROR` for malformed requests.
pub fn parse_request(abi: Abi, entry: &[u8], limits: Limits) -> Result<BlkifRequest, Rejected> {
    let size = abi.request_size();
    if entry.len() < size {
        return Err(Rejected {
            id: 0,
            operation: entry.first().copied().unwrap_or(0),
            status: RSP_ERROR,
            reason: Reason::Short(entry.len()),
        });
    }
    let b = &entry[..size];
    let operation = b[0];
    let id = u64_at(b, abi.id_at());
    let raw_sector = u64_at(b, abi.sector_at());
    let reject = |operation: u8, status: i16, reason: Reason| Rejected {
        id,
        operation,
        status,
        reason,
    };
    let error = |reason| reject(operation, RSP_ERROR, reason);
    let rw_segments = |min: usize| -> Result<Vec<DataSegment>, Rejected> {
        let n = usize::from(b[1]);
        if n < min {
            return Err(error(Reason::NoSegments));
        }
        if n > MAX_SEGMENTS {
            return Err(error(Reason::TooManySegments {
                count: n,
                max: MAX_SEGMENTS,
            }));
        }
        segments(b, abi.body_at(), n).map_err(error)
    };
    let handle = u16_at(b, 2);
    let op = match operation {
        OP_READ | OP_WRITE | OP_FLUSH_DISKCACHE => {
            let min = usize::from(operation != OP_FLUSH_DISKCACHE);
            let segments = rw_segments(min)?;
            // An empty flush has no position: Linux blkfront sends sector (sector_t)-1 in it
            // (seen with xen-blkfront of Linux 6.1 on every attach).
            let sector = if operation == OP_FLUSH_DISKCACHE && segments.is_empty() {
                0
            } else {
                check_sector(raw_sector).map_err(error)?
            };
            match operation {
                OP_READ => BlkifOp::Read { sector, segments },
                OP_WRITE => BlkifOp::Write { sector, segments },
                _ => BlkifOp::Flush { sector, segments },
            }
        }
        OP_DISCARD => BlkifOp::Discard {
            sector: check_sector(raw_sector).map_err(error)?,
            nr_sectors: u64_at(b, abi.body_at()),
            secure: b[1] & 1 != 0,
        },
        OP_INDIRECT => {
            let inner = b[1];
            let write = match inner {
                OP_READ => false,
                OP_WRITE => true,
                other => return Err(error(Reason::BadIndirectOperation(other))),
            };
            let error = |reason| reject(inner, RSP_ERROR, reason);
            if limits.max_indirect_segments == 0 {
                return Err(reject(
                    inner,
                    RSP_EOPNOTSUPP,
                    Reason::UnknownOperation(OP_INDIRECT),
                ));
            }
            let nr_segments = u16_at(b, 2);
            let max = limits.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS);
            if nr_segments == 0 {
                return Err(error(Reason::NoSegments));
            }
            if nr_segments > max {
                return Err(error(Reason::TooManySegments {
                    count: usize::from(nr_segments),
                    max: usize::from(max),
                }));
            }
            let sector = check_sector(raw_sector).map_err(error)?;
            let n_pages = usize::from(nr_segments).div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
            let pages = (0..n_pages)
                .map(|i| u32_at(b, abi.indirect_grefs_at() + 4 * i))
                .collect();
            return Ok(BlkifRequest {
                id,
                handle: u16_at(b, abi.body_at()),
                op: BlkifOp::Indirect {
                    write,
                    sector,
                    nr_segments,
                    pages,
                },
            });
        }
        OP_WRITE_BARRIER => {
            return Err(reject(
                operation,
                RSP_EOPNOTSUPP,
                Reason::UnknownOperation(operation),
            ))
        }
        other => {
            return Err(reject(
                other,
                RSP_EOPNOTSUPP,
                Reason::UnknownOperation(other),
            ))
        }
    };
    Ok(BlkifRequest { id, handle, op })
}

/// Decode and check the `count` segment descriptors of an indirect request from its
/// indirect pages, concatenated in `pages`.
///
/// # Errors
/// [`Reason::Short`] if `pages` does not hold `count` descriptors; [`Reason::BadSegment`].
pub fn parse_indirect_segments(pages: &[u8], count: usize) -> Result<Vec<DataSegment>, Reason> {
    if pages.len() / SEGMENT_SIZE < count {
        return Err(Reason::Short(pages.len()));
    }
    segments(pages, 0, count)
}

/// Encode a request in `abi`'s layout: the inverse of [`parse_request`] for requests it
/// accepts. Simulated frontends and the fuzz target use it.
pub fn encode_request(abi: Abi, req: &BlkifRequest) -> Vec<u8> {
    let mut b = vec![0u8; abi.request_size()];
    b[abi.id_at()..abi.id_at() + 8].copy_from_slice(&req.id.to_le_bytes());
    let put_u16 = |b: &mut [u8], at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put_sector = |b: &mut [u8], v: u64| {
        b[abi.sector_at()..abi.sector_at() + 8].copy_from_slice(&v.to_le_bytes())
    };
    let put_segments = |b: &mut [u8], segs: &[DataSegment]| {
        b[1] = segs.len() as u8;
        for (i, s) in segs.iter().enumerate() {
            let at = abi.body_at() + i * SEGMENT_SIZE;
            b[at..at + 4].copy_from_slice(&s.gref.to_le_bytes());
            b[at + 4] = s.first_sect;
            b[at + 5] = s.last_sect;
        }
    };
    match &req.op {
        BlkifOp::Read { sector, segments }
        | BlkifOp::Write { sector, segments }
        | BlkifOp::Flush { sector, segments } => {
            b[0] = req.response_operation();
            put_u16(&mut b, 2, req.handle);
            put_sector(&mut b, *sector);
            put_segments(&mut b, segments);
        }
        BlkifOp::Discard {
            sector,
            nr_sectors,
            secure,
        } => {
            b[0] = OP_DISCARD;
            b[1] = u8::from(*secure);
            put_u16(&mut b, 2, req.handle);
            put_sector(&mut b, *sector);
            let at = abi.body_at();
            b[at..at + 8].copy_from_slice(&nr_sectors.to_le_bytes());
        }
        BlkifOp::Indirect {
            write,
            sector,
            nr_segments,
            pages,
        } => {
            b[0] = OP_INDIRECT;
            b[1] = if *write { OP_WRITE } else { OP_READ };
            put_u16(&mut b, 2, *nr_segments);
            put_sector(&mut b, *sector);
            put_u16(&mut b, abi.body_at(), req.handle);
            for (i, g) in pages.iter().take(MAX_INDIRECT_PAGES).enumerate() {
                let at = abi.indirect_grefs_at() + 4 * i;
                b[at..at + 4].copy_from_slice(&g.to_le_bytes());
            }
        }
    }
    b
}

/// Encode segment descriptors as they appear in an indirect page.
pub fn encode_segments(segs: &[DataSegment]) -> Vec<u8> {
    let mut out = Vec::with_capacity(segs.len() * SEGMENT_SIZE);
    for s in segs {
        out.extend_from_slice(&s.gref.to_le_bytes());
        out.extend_from_slice(&[s.first_sect, s.last_sect, 0, 0]);
    }
    out
}

/// The bytes of an x86_64 ring entry (the ring code hands out typed copies).
pub fn entry_bytes_64(r: &abi::Request) -> [u8; 112] {
    let mut b = [0u8; 112];
    b[0] = r.operation;
    b[1] = r.nr_segments;
    b[2..4].copy_from_slice(&r.handle.to_le_bytes());
    b[4..8].copy_from_slice(&r.pad.to_le_bytes());
    b[8..16].copy_from_slice(&r.id.to_le_bytes());
    b[16..24].copy_from_slice(&r.sector_number.to_le_bytes());
    put_ring_segments(&mut b[24..], &r.seg);
    b
}

/// The bytes of an x86_32 ring entry.
pub fn entry_bytes_32(r: &abi::Request32) -> [u8; 108] {
    // Fields of a packed struct are copied out by value, never referenced.
    let (operation, nr_segments, handle, id, sector, seg) = (
        r.operation,
        r.nr_segments,
        r.handle,
        r.id,
        r.sector_number,
        r.seg,
    );
    let mut b = [0u8; 108];
    b[0] = operation;
    b[1] = nr_segments;
    b[2..4].copy_from_slice(&handle.to_le_bytes());
    b[4..12].copy_from_slice(&id.to_le_bytes());
    b[12..20].copy_from_slice(&sector.to_le_bytes());
    put_ring_segments(&mut b[20..], &seg);
    b
}

fn put_ring_segments(b: &mut [u8], segs: &[abi::Segment; MAX_SEGMENTS]) {
    for (i, s) in segs.iter().enumerate() {
        let at = i * SEGMENT_SIZE;
        b[at..at + 4].copy_from_slice(&s.gref.to_le_bytes());
        b[at + 4] = s.first_sect;
        b[at + 5] = s.last_sect;
        b[at + 6..at + 8].copy_from_slice(&s.pad.to_le_bytes());
    }
}

fn ring_segments(b: &[u8]) -> [abi::Segment; MAX_SEGMENTS] {
    let mut segs = [abi::Segment::default(); MAX_SEGMENTS];
    for (i, s) in segs.iter_mut().enumerate() {
        let at = i * SEGMENT_SIZE;
        *s = abi::Segment {
            gref: u32_at(b, at),
            first_sect: b[at + 4],
            last_sect: b[at + 5],
            pad: u16_at(b, at + 6),
        };
    }
    segs
}

/// An x86_64 ring entry from its bytes (for frontends writing through the typed ring).
///
/// # Panics
/// If `b` is shorter than 112 bytes.
pub fn entry_from_bytes_64(b: &[u8]) -> abi::Request {
    abi::Request {
        operation: b[0],
        nr_segments: b[1],
        handle: u16_at(b, 2),
        pad: u32_at(b, 4),
        id: u64_at(b, 8),
        sector_number: u64_at(b, 16),
        seg: ring_segments(&b[24..112]),
    }
}

/// An x86_32 ring entry from its bytes.
///
/// # Panics
/// If `b` is shorter than 108 bytes.
pub fn entry_from_bytes_32(b: &[u8]) -> abi::Request32 {
    abi::Request32 {
        operation: b[0],
        nr_segments: b[1],
        handle: u16_at(b, 2),
        id: u64_at(b, 4),
        sector_number: u64_at(b, 12),
        seg: ring_segments(&b[20..108]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_indirect_segments: 256,
    };

    fn seg(gref: u32, first: u8, last: u8) -> DataSegment {
        DataSegment {
            gref,
            first_sect: first,
            last_sect: last,
        }
    }

    fn rw(write: bool, n: usize) -> BlkifRequest {
        let segments = (0..n).map(|i| seg(100 + i as u32, 0, 7)).collect();
        BlkifRequest {
            id: 0xdead_beef_0000_0001,
            handle: 51712,
            op: if write {
                BlkifOp::Write {
                    sector: 1 << 40,
                    segments,
                }
            } else {
                BlkifOp::Read {
                    sector: 8,
                    segments,
                }
            },
        }
    }

    #[test]
    fn both_abis_round_trip_through_the_typed_ring_entries() {
        for req in [
            rw(false, 1),
            rw(true, 11),
            BlkifRequest {
                id: 7,
                handle: 3,
                op: BlkifOp::Discard {
                    sector: 16,
                    nr_sectors: 4096,
                    secure: true,
                },
            },
            BlkifRequest {
                id: 9,
                handle: 3,
                op: BlkifOp::Indirect {
                    write: true,
                    sector: 24,
                    nr_segments: 256,
                    pages: vec![77],
                },
            },
            BlkifRequest {
                id: 10,
                handle: 0,
                op: BlkifOp::Flush {
                    sector: 0,
                    segments: vec![],
                },
            },
        ] {
            let b64 = encode_request(Abi::X86_64, &req);
            assert_eq!(
                entry_bytes_64(&entry_from_bytes_64(&b64)).to_vec(),
                b64,
                "{req:?}"
            );
            assert_eq!(parse_request(Abi::X86_64, &b64, LIMITS).unwrap(), req);
            let b32 = encode_request(Abi::X86_32, &req);
            assert_eq!(entry_bytes_32(&entry_from_bytes_32(&b32)).to_vec(), b32);
            assert_eq!(parse_request(Abi::X86_32, &b32, LIMITS).unwrap(), req);
        }
    }

    #[test]
    fn empty_flush_ignores_linux_blkfronts_sector_minus_one() {
        for abi in [Abi::X86_64, Abi::X86_32] {
            let req = BlkifRequest {
                id: 4,
                handle: 0,
                op: BlkifOp::Flush {
                    sector: 0,
                    segments: vec![],
                },
            };
            let mut b = encode_request(abi, &req);
            let at = if abi == Abi::X86_64 { 16 } else { 12 };
            b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
            assert_eq!(parse_request(abi, &b, LIMITS).unwrap(), req);
            // A read at that sector is still refused.
            let mut r = encode_request(abi, &rw(false, 1));
            r[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
            assert!(parse_request(abi, &r, LIMITS).is_err());
        }
    }

    #[test]
    fn x86_32_fields_sit_four_bytes_earlier() {
        let b = encode_request(Abi::X86_32, &rw(false, 1));
        assert_eq!(
            u64::from_le_bytes(b[4..12].try_into().unwrap()),
            0xdead_beef_0000_0001
        );
        assert_eq!(u64::from_le_bytes(b[12..20].try_into().unwrap()), 8);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 100);
        // The same bytes read as x86_64 are a different request.
        let as64 = parse_request(Abi::X86_64, &[b.clone(), vec![0; 4]].concat(), LIMITS);
        assert_ne!(as64.ok(), parse_request(Abi::X86_32, &b, LIMITS).ok());
    }

    #[test]
    fn malformed_requests_are_rejected_with_their_id() {
        let mut r = rw(true, 1);
        if let BlkifOp::Write { segments, .. } = &mut r.op {
            segments[0] = seg(1, 5, 4);
        }
        let e = parse_request(Abi::X86_64, &encode_request(Abi::X86_64, &r), LIMITS).unwrap_err();
        assert_eq!((e.id, e.operation, e.status), (r.id, OP_WRITE, RSP_ERROR));
        assert!(matches!(
            e.reason,
            Reason::BadSegment {
                first: 5,
                last: 4,
                ..
            }
        ));

        let mut b = encode_request(Abi::X86_64, &rw(false, 1));
        b[29] = 8; // last_sect of segment 0
        assert!(matches!(
            parse_request(Abi::X86_64, &b, LIMITS).unwrap_err().reason,
            Reason::BadSegment { .. }
        ));
        b[29] = 7;
        b[1] = 0;
        assert_eq!(
            parse_request(Abi::X86_64, &b, LIMITS).unwrap_err().reason,
            Reason::NoSegments
        );
        b[1] = 12;
        assert!(matches!(
            parse_request(Abi::X86_64, &b, LIMITS).unwrap_err().reason,
            Reason::TooManySegments { count: 12, .. }
        ));
        b[1] = 1;
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            parse_request(Abi::X86_64, &b, LIMITS).unwrap_err().reason,
            Reason::SectorOverflow(_)
        ));
        b[0] = OP_WRITE_BARRIER;
        assert_eq!(
            parse_request(Abi::X86_64, &b, LIMITS).unwrap_err().status,
            RSP_EOPNOTSUPP
        );
        b[0] = 200;
        assert_eq!(
            parse_request(Abi::X86_64, &b, LIMITS).unwrap_err().status,
            RSP_EOPNOTSUPP
        );
        assert!(matches!(
            parse_request(Abi::X86_64, &b[..50], LIMITS)
                .unwrap_err()
                .reason,
            Reason::Short(50)
        ));
    }

    #[test]
    fn indirect_limits_and_answer_operation() {
        let ind = |n: u16, inner: bool| BlkifRequest {
            id: 1,
            handle: 0,
            op: BlkifOp::Indirect {
                write: inner,
                sector: 0,
                nr_segments: n,
                pages: vec![5; usize::from(n).div_ceil(512).max(1)],
            },
        };
        let ok = parse_request(
            Abi::X86_64,
            &encode_request(Abi::X86_64, &ind(256, true)),
            LIMITS,
        )
        .unwrap();
        assert_eq!(ok.response_operation(), OP_WRITE);
        let e = parse_request(
            Abi::X86_64,
            &encode_request(Abi::X86_64, &ind(257, false)),
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(e.operation, OP_READ, "answered with the inner operation");
        let e = parse_request(
            Abi::X86_64,
            &encode_request(Abi::X86_64, &ind(0, false)),
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(e.reason, Reason::NoSegments);
        let mut b = encode_request(Abi::X86_64, &ind(8, false));
        b[1] = OP_DISCARD;
        assert_eq!(
            parse_request(Abi::X86_64, &b, LIMITS).unwrap_err().reason,
            Reason::BadIndirectOperation(OP_DISCARD)
        );
        let none = Limits {
            max_indirect_segments: 0,
        };
        let e = parse_request(
            Abi::X86_64,
            &encode_request(Abi::X86_64, &ind(8, false)),
            none,
        )
        .unwrap_err();
        assert_eq!(e.status, RSP_EOPNOTSUPP);

        let segs = vec![seg(1, 0, 7), seg(2, 3, 3)];
        let page = encode_segments(&segs);
        assert_eq!(parse_indirect_segments(&page, 2).unwrap(), segs);
        assert!(parse_indirect_segments(&page, 3).is_err());
        assert_eq!(segs[1].offset(), 1536);
        assert_eq!(segs[1].len(), 512);
    }

    proptest! {
        #[test]
        fn parser_never_panics_and_accepted_requests_re_encode(
            bytes in proptest::collection::vec(any::<u8>(), 0..130),
            x86_32 in any::<bool>(),
            max in 0u16..5000,
        ) {
            let abi = if x86_32 { Abi::X86_32 } else { Abi::X86_64 };
            let limits = Limits { max_indirect_segments: max };
            if let Ok(req) = parse_request(abi, &bytes, limits) {
                let again = parse_request(abi, &encode_request(abi, &req), limits).unwrap();
                prop_assert_eq!(again, req);
            }
            let _ = parse_indirect_segments(&bytes, bytes.len() / 8);
        }
    }
}
