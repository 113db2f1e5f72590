//! The chunk index: chunk id -> where its record is, persisted in `index` so opening a store
//! does not read every arena, and rebuildable from the arenas alone.
//!
//! ```text
//! index := "RMCINDX1" u64:arenas (u32:number u64:length)*arenas
//!          u64:entries (id[32] u32:arena u64:offset u32:raw_len u32:stored_len u8:codec)*entries
//!          [32]:BLAKE3 of everything before
//! ```
//!
//! The arena list records how many bytes of each arena the entries cover. On open, an arena
//! whose length on disk is the covered length keeps its entries; any other arena (grown after
//! a crash, unknown, replaced) is re-read from its footer or by a scan, and entries of arenas
//! that are gone are dropped. A missing or corrupt index file is the same as an empty one: the
//! whole index is rebuilt from the log.

use std::collections::{BTreeMap, HashMap};

use super::arena::{Location, CODEC_MAX, MAX_RAW};
use super::StoreError;
use crate::images::chunk::ChunkId;

pub const INDEX_MAGIC: &[u8; 8] = b"RMCINDX1";
const ENTRY_LEN: usize = 53;

/// A decoded index file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IndexFile {
    /// Arena number -> bytes of it the entries cover.
    pub covered: BTreeMap<u32, u64>,
    pub entries: HashMap<ChunkId, Location>,
}

impl IndexFile {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(48 + self.covered.len() * 12 + self.entries.len() * 53);
        b.extend_from_slice(INDEX_MAGIC);
        b.extend_from_slice(&(self.covered.len() as u64).to_le_bytes());
        for (a, len) in &self.covered {
            b.extend_from_slice(&a.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
        }
        b.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        let mut sorted: Vec<_> = self.entries.iter().collect();
        sorted.sort_by_key(|(_, l)| (l.arena, l.offset));
        for (id, l) in sorted {
            b.extend_from_slice(id.as_bytes());
            b.extend_from_slice(&l.arena.to_le_bytes());
            b.extend_from_slice(&l.offset.to_le_bytes());
            b.extend_from_slice(&l.raw_len.to_le_bytes());
            b.extend_from_slice(&l.stored_len.to_le_bytes());
            b.push(l.codec);
        }
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<IndexFile, StoreError> {
        let bad = |why: &str| StoreError::Format(format!("bad index: {why}"));
        if b.len() < 8 + 8 + 8 + 32 || &b[..8] != INDEX_MAGIC {
            return Err(bad("bad magic or too short"));
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(bad("checksum mismatch"));
        }
        let mut pos = 8;
        let u64_at = |pos: usize| -> Result<u64, StoreError> {
            body.get(pos..pos + 8)
                .map(|s| u64::from_le_bytes(s.try_into().expect("8")))
                .ok_or_else(|| bad("truncated"))
        };
        let arenas = u64_at(pos)?;
        pos += 8;
        if arenas > (body.len() - pos) as u64 / 12 {
            return Err(bad("arena count larger than the file"));
        }
        let mut covered = BTreeMap::new();
        for _ in 0..arenas {
            let a = u32::from_le_bytes(body[pos..pos + 4].try_into().expect("4"));
            let len = u64::from_le_bytes(body[pos + 4..pos + 12].try_into().expect("8"));
            covered.insert(a, len);
            pos += 12;
        }
        let count = u64_at(pos)?;
        pos += 8;
        if count != (body.len() - pos) as u64 / ENTRY_LEN as u64
            || (body.len() - pos) % ENTRY_LEN != 0
        {
            return Err(bad("entry count does not match the file"));
        }
        let mut entries = HashMap::with_capacity(count as usize);
        for e in body[pos..].chunks_exact(ENTRY_LEN) {
            let id = ChunkId(e[..32].try_into().expect("32"));
            let arena = u32::from_le_bytes(e[32..36].try_into().expect("4"));
            let offset = u64::from_le_bytes(e[36..44].try_into().expect("8"));
            let raw_len = u32::from_le_bytes(e[44..48].try_into().expect("4"));
            let stored_len = u32::from_le_bytes(e[48..52].try_into().expect("4"));
            let codec = e[52];
            let end = offset.checked_add(stored_len as u64);
            let ok = raw_len > 0
                && raw_len <= MAX_RAW
                && stored_len > 0
                && stored_len <= MAX_RAW
                && codec <= CODEC_MAX
                && covered
                    .get(&arena)
                    .is_some_and(|&len| end.is_some_and(|end| end <= len));
            if !ok {
                return Err(bad("entry out of range"));
            }
            entries.insert(
                id,
                Location {
                    arena,
                    offset,
                    raw_len,
                    stored_len,
                    codec,
                },
            );
        }
        Ok(IndexFile { covered, entries })
    }
}
