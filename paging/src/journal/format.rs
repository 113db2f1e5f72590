//! The pager journal's on-disk format: a header and a sequence of checksummed records.
//!
//! ```text
//!  header (16 bytes)
//!  +----------------+-------------+-------------+
//!  | magic (8)      | version u32 | domid u32   |     magic = "RMCPAGEJ", version = 1
//!  +----------------+-------------+-------------+
//!  record (4 + len + 4 bytes)
//!  +---------+------+----------+-----------------+-------------+
//!  | len u16 | kind | reserved | payload [len]   | crc32c u32  |   crc over len..payload
//!  +---------+------+----------+-----------------+-------------+
//!  kind 1 OUT: gfn u64 | hash u64     the page is in the store with this xxh3-64 hash
//!  kind 2 IN:  gfn u64                the page is back in the guest
//! ```
//!
//! All integers little-endian. `len` is at most [`MAX_PAYLOAD`], checked before anything is
//! allocated; unknown kinds, payloads of the wrong size and a non-zero reserved byte are
//! errors, so every record has exactly one encoding. A record cut short
//! at the end of the file (a crash mid-append) decodes as [`Decoded::Incomplete`] so the
//! reader can truncate the torn tail; a checksum mismatch is [`FormatError::Checksum`].

use remoca_xen::{DomId, Gfn};

pub const MAGIC: &[u8; 8] = b"RMCPAGEJ";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 16;
/// Largest payload a record may claim.
pub const MAX_PAYLOAD: usize = 64;
const KIND_OUT: u8 = 1;
const KIND_IN: u8 = 2;

/// One journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// The page was stored (before eviction) with this content hash.
    Out { gfn: Gfn, hash: u64 },
    /// The page is resident again (loaded, or eviction did not happen).
    In { gfn: Gfn },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a pager journal (bad magic)")]
    Magic,
    #[error("journal version {0}; this build reads version {VERSION}")]
    Version(u32),
    #[error("journal of domain {found}, expected domain {expected}")]
    Domain { found: DomId, expected: DomId },
    #[error("record claims {0} payload bytes; at most {MAX_PAYLOAD}")]
    TooLong(usize),
    #[error("record of unknown kind {0}")]
    Kind(u8),
    #[error("record of kind {kind} with {len} payload bytes")]
    Size { kind: u8, len: usize },
    #[error("record checksum mismatch")]
    Checksum,
    #[error("record with reserved byte {0:#x} (must be zero)")]
    Reserved(u8),
}

/// Encode the file header.
pub fn encode_header(dom: DomId) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&dom.to_le_bytes());
    h
}

/// Check a header for domain `dom`.
///
/// # Errors
/// `Magic` (also for a short header), `Version`, `Domain`.
pub fn check_header(buf: &[u8], dom: DomId) -> Result<(), FormatError> {
    if buf.len() < HEADER_LEN || &buf[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    let version = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(FormatError::Version(version));
    }
    let found = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes"));
    if found != dom {
        return Err(FormatError::Domain {
            found,
            expected: dom,
        });
    }
    Ok(())
}

/// Append the encoding of `rec` to `out`.
pub fn encode_record(rec: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    let (kind, len) = match rec {
        Record::Out { .. } => (KIND_OUT, 16u16),
        Record::In { .. } => (KIND_IN, 8u16),
    };
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind);
    out.push(0);
    match *rec {
        Record::Out { gfn, hash } => {
            out.extend_from_slice(&gfn.to_le_bytes());
            out.extend_from_slice(&hash.to_le_bytes());
        }
        Record::In { gfn } => out.extend_from_slice(&gfn.to_le_bytes()),
    }
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Result of decoding at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A record and the bytes it used.
    Record(Record, usize),
    /// The buffer ends inside a record (or is empty).
    Incomplete,
}

/// Decode one record from the front of `buf`.
///
/// # Errors
/// `TooLong`, `Kind`, `Size`, `Checksum`.
pub fn decode_record(buf: &[u8]) -> Result<Decoded, FormatError> {
    if buf.len() < 4 {
        return Ok(Decoded::Incomplete);
    }
    let len = usize::from(u16::from_le_bytes([buf[0], buf[1]]));
    if len > MAX_PAYLOAD {
        return Err(FormatError::TooLong(len));
    }
    let kind = buf[2];
    let total = 4 + len + 4;
    if buf.len() < total {
        return Ok(Decoded::Incomplete);
    }
    let crc = u32::from_le_bytes(buf[4 + len..total].try_into().expect("4 bytes"));
    if crc32c::crc32c(&buf[..4 + len]) != crc {
        return Err(FormatError::Checksum);
    }
    if buf[3] != 0 {
        return Err(FormatError::Reserved(buf[3]));
    }
    let p = &buf[4..4 + len];
    let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().expect("8 bytes"));
    let rec = match (kind, len) {
        (KIND_OUT, 16) => Record::Out {
            gfn: u64_at(0),
            hash: u64_at(8),
        },
        (KIND_IN, 8) => Record::In { gfn: u64_at(0) },
        (KIND_OUT | KIND_IN, _) => return Err(FormatError::Size { kind, len }),
        _ => return Err(FormatError::Kind(kind)),
    };
    Ok(Decoded::Record(rec, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (any::<u64>(), any::<u64>()).prop_map(|(gfn, hash)| Record::Out { gfn, hash }),
            any::<u64>().prop_map(|gfn| Record::In { gfn }),
        ]
    }

    proptest! {
        #[test]
        fn records_round_trip_and_truncation_is_incomplete(
            recs in proptest::collection::vec(record(), 1..20),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut buf = Vec::new();
            for r in &recs {
                encode_record(r, &mut buf);
            }
            let mut at = 0;
            for r in &recs {
                match decode_record(&buf[at..]).unwrap() {
                    Decoded::Record(got, n) => { prop_assert_eq!(&got, r); at += n; }
                    Decoded::Incomplete => prop_assert!(false, "complete record reported short"),
                }
            }
            prop_assert_eq!(decode_record(&buf[at..]).unwrap(), Decoded::Incomplete);
            // Any prefix that ends inside the first record is incomplete, never garbage.
            let first_len = match decode_record(&buf).unwrap() { Decoded::Record(_, n) => n, _ => 0 };
            let c = cut.index(first_len);
            prop_assert_eq!(decode_record(&buf[..c]).unwrap(), Decoded::Incomplete);
        }

        /// Arbitrary bytes never panic and never decode past the buffer.
        #[test]
        fn arbitrary_bytes_are_rejected_or_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Decoded::Record(_, n)) = decode_record(&bytes) {
                prop_assert!(n <= bytes.len());
            }
        }
    }

    #[test]
    fn flipped_bit_is_a_checksum_error_and_long_length_is_refused() {
        let mut buf = Vec::new();
        encode_record(&Record::Out { gfn: 7, hash: 9 }, &mut buf);
        buf[6] ^= 1;
        assert_eq!(decode_record(&buf), Err(FormatError::Checksum));
        let huge = [0xff, 0xff, 1, 0];
        assert_eq!(decode_record(&huge), Err(FormatError::TooLong(0xffff)));
        let mut reserved = Vec::new();
        encode_record(&Record::In { gfn: 1 }, &mut reserved);
        reserved[3] = 1;
        let crc = crc32c::crc32c(&reserved[..12]);
        reserved[12..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_record(&reserved), Err(FormatError::Reserved(1)));
    }

    #[test]
    fn header_checks_magic_version_and_domain() {
        let h = encode_header(5);
        assert_eq!(check_header(&h, 5), Ok(()));
        assert_eq!(
            check_header(&h, 6),
            Err(FormatError::Domain {
                found: 5,
                expected: 6
            })
        );
        let mut bad = h;
        bad[8] = 2;
        assert_eq!(check_header(&bad, 5), Err(FormatError::Version(2)));
        assert_eq!(check_header(&h[..10], 5), Err(FormatError::Magic));
    }
}
