//! The overlay file header (format version 1). `docs/overlay-format.md` is the long form.
//!
//! ```text
//! offset size field                 (all integers little-endian)
//! 0      8    magic                 "RMCOVLY\0"
//! 8      4    version               1
//! 12     4    header_size           4096
//! 16     4    cluster_bits          12..=21 (cluster size 4 KiB .. 2 MiB)
//! 20     4    flags                 0 (readers refuse unknown bits)
//! 24     8    virtual_size          bytes; equals the template's size
//! 32     8    cluster_count         ceil(virtual_size / cluster_size)
//! 40     8    map_offset            4096
//! 48     8    map_len               ceil(cluster_count / 4), rounded up to 4096
//! 56     8    data_offset           map_offset + map_len, rounded up to cluster_size
//! 64     8    template_size         the template's size when the overlay was made
//! 72     32   template_fingerprint  BLAKE3 fingerprint of the template (see fingerprint.rs)
//! 104    2    template_path_len     <= 1024
//! 106    n    template_path         UTF-8, a hint for humans and `remoca image inspect`
//! ...         zero padding
//! 4088   8    checksum              first 8 bytes of BLAKE3(bytes 0..4088)
//! ```
//!
//! The header is written once, when the overlay is created, and never rewritten, so it can
//! not be torn by a crash during normal operation. Limits are checked before anything is
//! allocated: `map_len` is at most [`MAX_MAP_LEN`] (256 MiB of map = 2^30 clusters).

use std::io;

/// The first 8 bytes of every overlay file.
pub const MAGIC: [u8; 8] = *b"RMCOVLY\0";
/// The only format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Size of the header block; the cluster map starts here.
pub const HEADER_SIZE: u64 = 4096;
/// Smallest and largest cluster: 4 KiB and 2 MiB.
pub const MIN_CLUSTER_BITS: u32 = 12;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Default cluster size: 4 KiB, the guests' block size, so that a guest's 4 KiB write to
/// a cluster still on the template is one 4 KiB write and never a copy-up (a 64 KiB cluster
/// made that write read 60 KiB of template and write 64 KiB). The map costs 2 bits per
/// 4 KiB of disk (64 MiB per TiB, in memory); [`MAX_MAP_LEN`] caps such disks at 4 TiB.
pub const DEFAULT_CLUSTER_BITS: u32 = 12;
/// Largest cluster map accepted, in bytes.
pub const MAX_MAP_LEN: u64 = 256 << 20;
/// Longest template path stored as a hint.
pub const MAX_PATH_LEN: usize = 1024;
const CHECKSUM_AT: usize = 4088;

/// Why a header could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("not a remoca overlay (wrong magic)")]
    BadMagic,
    #[error("overlay format version {0} is not supported (this build reads version {VERSION})")]
    BadVersion(u32),
    #[error("header checksum mismatch (header corrupt)")]
    BadChecksum,
    #[error("invalid header: {0}")]
    Invalid(&'static str),
    #[error("file too short for an overlay header")]
    Short,
    #[error("I/O error on overlay header")]
    Io(#[from] io::Error),
}

/// A decoded, validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cluster_bits: u32,
    pub virtual_size: u64,
    pub cluster_count: u64,
    pub map_offset: u64,
    pub map_len: u64,
    pub data_offset: u64,
    pub template_size: u64,
    pub template_fingerprint: [u8; 32],
    pub template_path: String,
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

impl Header {
    /// Lay out a new overlay for a template of `virtual_size` bytes.
    ///
    /// # Errors
    /// [`HeaderError::Invalid`] for a cluster size out of range, an empty disk, a too-long
    /// path or a map beyond [`MAX_MAP_LEN`].
    pub fn new(
        cluster_bits: u32,
        virtual_size: u64,
        template_fingerprint: [u8; 32],
        template_path: String,
    ) -> Result<Self, HeaderError> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(HeaderError::Invalid(
                "cluster size must be a power of two, 4 KiB..2 MiB",
            ));
        }
        if virtual_size == 0 {
            return Err(HeaderError::Invalid("template is empty"));
        }
        if template_path.len() > MAX_PATH_LEN {
            return Err(HeaderError::Invalid("template path longer than 1024 bytes"));
        }
        let cluster_size = 1u64 << cluster_bits;
        let cluster_count = virtual_size.div_ceil(cluster_size);
        let map_len = round_up(cluster_count.div_ceil(4), 4096);
        if map_len > MAX_MAP_LEN {
            return Err(HeaderError::Invalid("disk too large for this cluster size"));
        }
        let data_offset = round_up(HEADER_SIZE + map_len, cluster_size);
        Ok(Self {
            cluster_bits,
            virtual_size,
            cluster_count,
            map_offset: HEADER_SIZE,
            map_len,
            data_offset,
            template_size: virtual_size,
            template_fingerprint,
            template_path,
        })
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Encode into the 4096-byte header block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        b[16..20].copy_from_slice(&self.cluster_bits.to_le_bytes());
        b[20..24].copy_from_slice(&0u32.to_le_bytes());
        b[24..32].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.cluster_count.to_le_bytes());
        b[40..48].copy_from_slice(&self.map_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.map_len.to_le_bytes());
        b[56..64].copy_from_slice(&self.data_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.template_size.to_le_bytes());
        b[72..104].copy_from_slice(&self.template_fingerprint);
        let path = self.template_path.as_bytes();
        b[104..106].copy_from_slice(&(path.len() as u16).to_le_bytes());
        b[106..106 + path.len()].copy_from_slice(path);
        let sum = blake3::hash(&b[..CHECKSUM_AT]);
        b[CHECKSUM_AT..].copy_from_slice(&sum.as_bytes()[..8]);
        b
    }

    /// Decode and validate a header block. `file_len` is the overlay file's length, so that
    /// offsets pointing past the end are rejected before anything is allocated.
    ///
    /// # Errors
    /// [`HeaderError`] naming the first problem found.
    pub fn decode(b: &[u8], file_len: u64) -> Result<Self, HeaderError> {
        if b.len() < HEADER_SIZE as usize {
            return Err(HeaderError::Short);
        }
        if b[0..8] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(HeaderError::BadVersion(version));
        }
        let sum = blake3::hash(&b[..CHECKSUM_AT]);
        if b[CHECKSUM_AT..HEADER_SIZE as usize] != sum.as_bytes()[..8] {
            return Err(HeaderError::BadChecksum);
        }
        if u64::from(u32_at(12)) != HEADER_SIZE {
            return Err(HeaderError::Invalid("header_size is not 4096"));
        }
        if u32_at(20) != 0 {
            return Err(HeaderError::Invalid("unknown flags"));
        }
        let path_len = usize::from(u16::from_le_bytes([b[104], b[105]]));
        if path_len > MAX_PATH_LEN {
            return Err(HeaderError::Invalid("template path too long"));
        }
        let template_path = String::from_utf8(b[106..106 + path_len].to_vec())
            .map_err(|_| HeaderError::Invalid("template path is not UTF-8"))?;
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(&b[72..104]);
        // Rebuild the layout from the independent fields and require the stored one to match:
        // this checks every derived offset and length in one place.
        let expect = Header::new(u32_at(16), u64_at(24), fingerprint, template_path)?;
        let stored = Header {
            cluster_count: u64_at(32),
            map_offset: u64_at(40),
            map_len: u64_at(48),
            data_offset: u64_at(56),
            template_size: u64_at(64),
            ..expect.clone()
        };
        if stored != expect {
            return Err(HeaderError::Invalid("layout fields are inconsistent"));
        }
        if file_len < stored.data_offset {
            return Err(HeaderError::Invalid("file is shorter than its cluster map"));
        }
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header::new(16, 10 << 20, [7; 32], "/images/base.raw".into()).unwrap()
    }

    #[test]
    fn roundtrip() {
        let h = sample();
        let b = h.encode();
        assert_eq!(Header::decode(&b, h.data_offset).unwrap(), h);
    }

    #[test]
    fn rejects_wrong_magic_version_checksum_and_short_file() {
        let h = sample();
        let mut b = h.encode();
        b[0] = b'X';
        assert!(matches!(
            Header::decode(&b, u64::MAX),
            Err(HeaderError::BadMagic)
        ));
        let mut b = h.encode();
        b[8] = 2;
        assert!(matches!(
            Header::decode(&b, u64::MAX),
            Err(HeaderError::BadVersion(2))
        ));
        let mut b = h.encode();
        b[30] ^= 1;
        assert!(matches!(
            Header::decode(&b, u64::MAX),
            Err(HeaderError::BadChecksum)
        ));
        assert!(matches!(
            Header::decode(&h.encode(), 10),
            Err(HeaderError::Invalid(_))
        ));
        assert!(matches!(
            Header::decode(&[0; 10], 10),
            Err(HeaderError::Short)
        ));
    }

    #[test]
    fn limits() {
        assert!(Header::new(11, 1 << 20, [0; 32], String::new()).is_err());
        assert!(Header::new(22, 1 << 20, [0; 32], String::new()).is_err());
        assert!(Header::new(12, 0, [0; 32], String::new()).is_err());
        assert!(Header::new(12, 1 << 50, [0; 32], String::new()).is_err());
        assert!(Header::new(12, 4096, [0; 32], "x".repeat(1025)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..5000)) {
            let _ = Header::decode(&bytes, u64::MAX);
        }
    }
}
