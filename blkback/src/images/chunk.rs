//! Chunk ids, chunk sizes and chunk lists: the types the store, the node cache, the peer
//! protocol and the template layer share.

use std::fmt;
use std::str::FromStr;

/// Smallest chunk size a store accepts (one guest page).
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk size a store accepts.
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024;
/// Chunk size used when the operator names none.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// The BLAKE3 hash of a chunk's bytes: its name everywhere.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// Whether `data` is the chunk this id names. Every chunk that crosses a trust boundary
    /// (a peer, the origin, a disk that may have rotted) goes through this before use.
    pub fn matches(&self, data: &[u8]) -> bool {
        ChunkId::of(data) == *self
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

/// Why a chunk id could not be parsed from text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a chunk id is 64 hexadecimal digits, got {0:?}")]
pub struct BadChunkId(pub String);

impl FromStr for ChunkId {
    type Err = BadChunkId;

    fn from_str(s: &str) -> Result<ChunkId, BadChunkId> {
        let bad = || BadChunkId(s.to_string());
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(ChunkId(out))
    }
}

/// A validated chunk size: a power of two from 4 KiB to 64 KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkSize(u32);

/// A chunk size outside what the store supports.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("chunk size {0} is not a power of two from 4096 to 65536 bytes")]
pub struct BadChunkSize(pub u64);

impl ChunkSize {
    pub fn new(bytes: u64) -> Result<ChunkSize, BadChunkSize> {
        if (MIN_CHUNK_SIZE as u64..=MAX_CHUNK_SIZE as u64).contains(&bytes)
            && bytes.is_power_of_two()
        {
            Ok(ChunkSize(bytes as u32))
        } else {
            Err(BadChunkSize(bytes))
        }
    }

    pub fn bytes(self) -> u32 {
        self.0
    }
}

impl Default for ChunkSize {
    fn default() -> ChunkSize {
        ChunkSize(DEFAULT_CHUNK_SIZE)
    }
}

/// One image version flattened to what a reader needs: for each chunk-sized piece of the
/// virtual disk, the chunk that holds it, or `None` for a piece of zeroes. The last piece may
/// be shorter than the chunk size when the image size is not a multiple of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkList {
    pub chunk_size: ChunkSize,
    /// Virtual size of the image in bytes.
    pub size: u64,
    pub chunks: Vec<Option<ChunkId>>,
}

impl ChunkList {
    /// Number of pieces an image of `size` bytes has at `chunk_size`.
    pub fn count_for(size: u64, chunk_size: ChunkSize) -> u64 {
        size.div_ceil(chunk_size.bytes() as u64)
    }

    /// Byte length of piece `index` (the last one may be short).
    pub fn len_of(&self, index: usize) -> usize {
        let cs = self.chunk_size.bytes() as u64;
        let start = index as u64 * cs;
        (self.size.saturating_sub(start)).min(cs) as usize
    }

    /// Whether the list is self-consistent: as many pieces as the size needs.
    pub fn is_consistent(&self) -> bool {
        self.chunks.len() as u64 == ChunkList::count_for(self.size, self.chunk_size)
    }
}

/// Why a chunk could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// No source known to this one has the chunk.
    #[error("chunk {0} not found")]
    NotFound(ChunkId),
    /// The bytes received or read do not hash to the id.
    #[error("chunk {id} is corrupt ({source_name} returned bytes that hash to something else)")]
    Corrupt { id: ChunkId, source_name: String },
    /// The source could not be reached or failed mid-transfer.
    #[error("chunk source {source_name} unavailable: {reason}")]
    Unavailable { source_name: String, reason: String },
    #[error("chunk i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Anything that hands out chunks by id: the store, the node cache, a peer, the origin.
///
/// Implementations return bytes that hash to `id` or an error; callers that receive chunks
/// from outside their own trust domain still check with [`ChunkId::matches`].
pub trait ChunkSource: Send + Sync {
    /// The chunk's bytes. `len` is the expected length (from the chunk list), so a source can
    /// refuse a reply of the wrong size before reading it.
    fn fetch(&self, id: &ChunkId, len: usize) -> Result<Vec<u8>, ChunkError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_id_round_trips_through_hex() {
        let id = ChunkId::of(b"remoca");
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<ChunkId>().unwrap(), id);
        assert!(id.matches(b"remoca"));
        assert!(!id.matches(b"remocb"));
    }

    #[test]
    fn bad_chunk_ids_are_refused() {
        for s in ["", "00", &"g".repeat(64), &"0".repeat(63), &"é".repeat(32)] {
            assert!(s.parse::<ChunkId>().is_err(), "{s:?}");
        }
    }

    #[test]
    fn chunk_sizes_are_powers_of_two_in_range() {
        for ok in [4096, 8192, 16384, 32768, 65536] {
            assert_eq!(ChunkSize::new(ok).unwrap().bytes() as u64, ok);
        }
        for bad in [0, 512, 2048, 6144, 131072, u64::MAX] {
            assert!(ChunkSize::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chunk_list_lengths_cover_a_short_tail() {
        let cs = ChunkSize::new(4096).unwrap();
        let list = ChunkList {
            chunk_size: cs,
            size: 10_000,
            chunks: vec![None; 3],
        };
        assert!(list.is_consistent());
        assert_eq!(
            [list.len_of(0), list.len_of(1), list.len_of(2)],
            [4096, 4096, 1808]
        );
        assert_eq!(list.len_of(3), 0);
    }
}
