//! The swap device's local spill file: where a block goes when the memory servers cannot
//! take it (unreachable, or fewer than the wanted replicas accept it).
//!
//! ```text
//!  offset 0                      header, HEADER_LEN (4096) bytes
//!  ┌────────┬─────────┬────────────┬────────────┬──────────────── zero ──┐
//!  │ magic 8│ version │ block size │ slots u64  │                        │
//!  │RMCSPIL1│ u32 = 1 │ u32 = 4096 │            │                        │
//!  └────────┴─────────┴────────────┴────────────┴────────────────────────┘
//!  offset HEADER_LEN + slot * RECORD_LEN, for slot in 0..slots
//!  ┌──────────┬──────────┬───────────┬──────────────────┬───────────────┐
//!  │ tag u32  │ reserved │ block u64 │ BLAKE3(data)[..16]│ data 4096     │
//!  │ "RSPR"   │ u32 = 0  │           │                  │               │
//!  └──────────┴──────────┴───────────┴──────────────────┴───────────────┘
//! ```
//!
//! All integers little-endian. A record is found through the swap device's index (which
//! lives in the backend process, like the memory-server client's location map); the record
//! header names the block it holds and a hash of its data, so a read of the wrong slot or a
//! torn write is reported as corrupt, never returned as data. Slots are allocated lazily (a
//! counter and a free list), so the file is sparse and memory grows only with what is used.
//!
//! Limits, checked before anything is allocated: `slots <= MAX_SLOTS`, block size exactly
//! [`BLOCK`]; [`decode_header`] and [`decode_record_header`] check that the whole structure
//! is present first. The file is created afresh for each swap device: its contents are
//! meaningful only together with the in-process index (a guest's swap does not outlive it).
//! Spilled blocks are plaintext on the local disk, as a local swap partition would be.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use parking_lot::Mutex;

/// The block size of the swap device and of a spill slot.
pub const BLOCK: usize = 4096;
/// The header's length.
pub const HEADER_LEN: u64 = 4096;
/// Length of a record's header.
pub const RECORD_HEADER_LEN: usize = 32;
/// Length of one record (header and data).
pub const RECORD_LEN: u64 = (RECORD_HEADER_LEN + BLOCK) as u64;
/// Most slots a spill file may have (16 TiB of blocks).
pub const MAX_SLOTS: u64 = 1 << 32;

const MAGIC: &[u8; 8] = b"RMCSPIL1";
const VERSION: u32 = 1;
const RECORD_TAG: &[u8; 4] = b"RSPR";

/// Why the spill file failed.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("spill file I/O")]
    Io(#[from] io::Error),
    #[error("spill file is full ({0} slots)")]
    Full(u64),
    #[error("spill file of {0} slots exceeds the limit of {MAX_SLOTS}")]
    TooLarge(u64),
    #[error("spill file must hold at least one slot")]
    Empty,
    #[error("truncated: {got} bytes, need {need}")]
    Truncated { got: usize, need: usize },
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported version {0}")]
    BadVersion(u32),
    #[error("block size {0}, expected {BLOCK}")]
    BadBlockSize(u32),
    #[error("slot {slot} holds block {found}, expected {expected}")]
    WrongBlock {
        slot: u64,
        found: u64,
        expected: u64,
    },
    #[error("slot {0} failed its checksum")]
    Checksum(u64),
    #[error("slot {0} has no record tag")]
    NoRecord(u64),
}

impl SpillError {
    /// The errno to report to the guest.
    pub fn errno(&self) -> i32 {
        match self {
            SpillError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            SpillError::Full(_) => libc::ENOSPC,
            _ => libc::EIO,
        }
    }
}

/// The decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub slots: u64,
}

/// Encode the header block.
pub fn encode_header(h: &Header) -> [u8; HEADER_LEN as usize] {
    let mut b = [0u8; HEADER_LEN as usize];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    b[16..24].copy_from_slice(&h.slots.to_le_bytes());
    b
}

/// Decode and validate a header.
///
/// # Errors
/// [`SpillError::Truncated`], `BadMagic`, `BadVersion`, `BadBlockSize`, `TooLarge`, `Empty`.
pub fn decode_header(b: &[u8]) -> Result<Header, SpillError> {
    if b.len() < 24 {
        return Err(SpillError::Truncated {
            got: b.len(),
            need: 24,
        });
    }
    if &b[0..8] != MAGIC {
        return Err(SpillError::BadMagic);
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if version != VERSION {
        return Err(SpillError::BadVersion(version));
    }
    let bs = u32_at(12);
    if bs as usize != BLOCK {
        return Err(SpillError::BadBlockSize(bs));
    }
    let slots = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
    check_slots(slots)?;
    Ok(Header { slots })
}

fn check_slots(slots: u64) -> Result<(), SpillError> {
    match slots {
        0 => Err(SpillError::Empty),
        s if s > MAX_SLOTS => Err(SpillError::TooLarge(s)),
        _ => Ok(()),
    }
}

fn digest(data: &[u8]) -> [u8; 16] {
    let h = blake3::hash(data);
    h.as_bytes()[..16].try_into().expect("16 bytes")
}

/// Encode a record header for `block` holding `data`.
pub fn encode_record_header(block: u64, data: &[u8]) -> [u8; RECORD_HEADER_LEN] {
    let mut b = [0u8; RECORD_HEADER_LEN];
    b[0..4].copy_from_slice(RECORD_TAG);
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..32].copy_from_slice(&digest(data));
    b
}

/// Decode a record header: (block, digest).
///
/// # Errors
/// [`SpillError::Truncated`], or `NoRecord(slot)` without the tag.
pub fn decode_record_header(slot: u64, b: &[u8]) -> Result<(u64, [u8; 16]), SpillError> {
    if b.len() < RECORD_HEADER_LEN {
        return Err(SpillError::Truncated {
            got: b.len(),
            need: RECORD_HEADER_LEN,
        });
    }
    if &b[0..4] != RECORD_TAG {
        return Err(SpillError::NoRecord(slot));
    }
    let block = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    Ok((block, b[16..32].try_into().expect("16 bytes")))
}

#[derive(Debug, Default)]
struct Slots {
    next_unused: u64,
    free: Vec<u64>,
    used: u64,
}

/// An open spill file.
#[derive(Debug)]
pub struct SpillFile {
    file: File,
    slots: u64,
    alloc: Mutex<Slots>,
}

impl SpillFile {
    /// Create (or truncate) a spill file of at most `max_bytes` of blocks.
    ///
    /// # Errors
    /// [`SpillError::Empty`] / `TooLarge` for a size out of bounds; I/O errors.
    pub fn create(path: &Path, max_bytes: u64) -> Result<SpillFile, SpillError> {
        let slots = max_bytes / BLOCK as u64;
        check_slots(slots)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.write_all_at(&encode_header(&Header { slots }), 0)?;
        file.sync_all()?;
        Ok(SpillFile {
            file,
            slots,
            alloc: Mutex::new(Slots::default()),
        })
    }

    /// Capacity in slots.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Slots in use.
    pub fn used(&self) -> u64 {
        self.alloc.lock().used
    }

    /// Take a free slot.
    ///
    /// # Errors
    /// [`SpillError::Full`].
    pub fn alloc(&self) -> Result<u64, SpillError> {
        let mut a = self.alloc.lock();
        let s = match a.free.pop() {
            Some(s) => s,
            None if a.next_unused < self.slots => {
                a.next_unused += 1;
                a.next_unused - 1
            }
            None => return Err(SpillError::Full(self.slots)),
        };
        a.used += 1;
        Ok(s)
    }

    /// Give a slot back.
    pub fn free(&self, slot: u64) {
        let mut a = self.alloc.lock();
        a.used -= 1;
        a.free.push(slot);
    }

    fn offset(slot: u64) -> u64 {
        HEADER_LEN + slot * RECORD_LEN
    }

    /// Write `data` (one block) for `block` into `slot`; durable only after [`Self::sync`].
    ///
    /// # Errors
    /// I/O errors.
    pub fn write(&self, slot: u64, block: u64, data: &[u8]) -> Result<(), SpillError> {
        debug_assert_eq!(data.len(), BLOCK);
        let mut rec = Vec::with_capacity(RECORD_LEN as usize);
        rec.extend_from_slice(&encode_record_header(block, data));
        rec.extend_from_slice(data);
        self.file.write_all_at(&rec, Self::offset(slot))?;
        Ok(())
    }

    /// Make every write so far durable.
    ///
    /// # Errors
    /// I/O errors.
    pub fn sync(&self) -> Result<(), SpillError> {
        self.file.sync_data()?;
        Ok(())
    }

    /// Read `block` from `slot` into `out` (one block), checking the record.
    ///
    /// # Errors
    /// `WrongBlock`, `Checksum`, `NoRecord`, I/O errors.
    pub fn read(&self, slot: u64, block: u64, out: &mut [u8]) -> Result<(), SpillError> {
        let mut rec = vec![0u8; RECORD_LEN as usize];
        self.file.read_exact_at(&mut rec, Self::offset(slot))?;
        let (found, sum) = decode_record_header(slot, &rec)?;
        if found != block {
            return Err(SpillError::WrongBlock {
                slot,
                found,
                expected: block,
            });
        }
        let data = &rec[RECORD_HEADER_LEN..];
        if digest(data) != sum {
            return Err(SpillError::Checksum(slot));
        }
        out.copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("spill");
        let s = SpillFile::create(&p, 3 * BLOCK as u64).unwrap();
        let raw = std::fs::read(&p).unwrap();
        assert_eq!(decode_header(&raw).unwrap(), Header { slots: 3 });
        let a = s.alloc().unwrap();
        let b = s.alloc().unwrap();
        let c = s.alloc().unwrap();
        assert!(matches!(s.alloc(), Err(SpillError::Full(3))));
        assert_eq!(s.alloc().unwrap_err().errno(), libc::ENOSPC);
        s.write(a, 10, &[7u8; BLOCK]).unwrap();
        s.write(b, 11, &[8u8; BLOCK]).unwrap();
        s.sync().unwrap();
        let mut out = vec![0u8; BLOCK];
        s.read(a, 10, &mut out).unwrap();
        assert_eq!(out, vec![7u8; BLOCK]);
        assert!(matches!(
            s.read(b, 10, &mut out),
            Err(SpillError::WrongBlock { found: 11, .. })
        ));
        // Never written: the sparse hole has no record tag (or is beyond the end).
        assert!(s.read(c, 12, &mut out).is_err());
        // A flipped data byte is caught.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0], SpillFile::offset(a) + RECORD_LEN - 1)
            .unwrap();
        assert!(matches!(
            s.read(a, 10, &mut out),
            Err(SpillError::Checksum(_))
        ));
        s.free(a);
        assert_eq!(s.used(), 2);
        assert_eq!(s.alloc().unwrap(), a);
    }

    #[test]
    fn bad_sizes_and_headers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("spill");
        assert!(matches!(SpillFile::create(&p, 100), Err(SpillError::Empty)));
        assert!(matches!(
            SpillFile::create(&p, (MAX_SLOTS + 1) * BLOCK as u64),
            Err(SpillError::TooLarge(_))
        ));
        let mut h = encode_header(&Header { slots: 5 });
        assert!(decode_header(&h[..10]).is_err());
        h[13] = 0;
        assert!(matches!(
            decode_header(&h),
            Err(SpillError::BadBlockSize(_))
        ));
        let mut h = encode_header(&Header { slots: 5 });
        h[8] = 9;
        assert!(matches!(decode_header(&h), Err(SpillError::BadVersion(9))));
        h[0] = b'X';
        assert!(matches!(decode_header(&h), Err(SpillError::BadMagic)));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_header(&b);
            let _ = decode_record_header(0, &b);
        }
    }
}
