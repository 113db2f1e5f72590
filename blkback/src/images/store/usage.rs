//! Figures for `du`, `log` and `ls`.

use std::collections::{HashMap, HashSet};

use super::{Store, StoreError, VersionRef};
use crate::images::chunk::ChunkId;

/// One version as `image log` shows it.
#[derive(Debug, Clone)]
pub struct VersionInfo {
    pub version: VersionRef,
    pub created: u64,
    pub parent: Option<VersionRef>,
    pub size: u64,
    pub chunk_size: u32,
    /// Bytes of non-zero pieces in the flattened version.
    pub data_bytes: u64,
    /// Pieces this manifest itself sets (all non-zero pieces for an import, the changed
    /// ones for a layer).
    pub own_chunks: u64,
    /// Bytes of chunks this version added to the store when it was made.
    pub new_bytes: u64,
    pub note: String,
}

/// Space used by one image.
#[derive(Debug, Clone, Default)]
pub struct ImageUsage {
    pub name: String,
    pub versions: u64,
    /// Sum over its versions of their non-zero bytes (what storing each version whole costs).
    pub logical_bytes: u64,
    /// Bytes of the distinct chunks its versions use.
    pub unique_bytes: u64,
    /// Bytes of chunks no other image uses.
    pub exclusive_bytes: u64,
}

/// Space used by the whole store.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub images: Vec<ImageUsage>,
    pub logical_bytes: u64,
    /// Raw bytes of distinct chunks the versions use.
    pub unique_bytes: u64,
    /// Chunk payload bytes as stored (after compression) of every indexed chunk.
    pub stored_bytes: u64,
    /// Size of the arena files (payloads, record headers, footers, garbage).
    pub arena_bytes: u64,
    pub chunks: u64,
    /// Stored bytes of chunks no version uses (what gc would free).
    pub unreferenced_bytes: u64,
}

impl Usage {
    /// Logical bytes per distinct byte stored: how much chunk sharing saves.
    pub fn dedup_ratio(&self) -> f64 {
        if self.unique_bytes == 0 {
            1.0
        } else {
            self.logical_bytes as f64 / self.unique_bytes as f64
        }
    }
}

impl Store {
    pub fn version_info(&self, v: &VersionRef) -> Result<VersionInfo, StoreError> {
        let m = self.manifest(v)?;
        let list = self.chunk_list(v)?;
        let data_bytes = list
            .chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_some())
            .map(|(i, _)| list.len_of(i) as u64)
            .sum();
        Ok(VersionInfo {
            version: v.clone(),
            created: m.created,
            parent: m.parent.clone(),
            size: m.size,
            chunk_size: m.chunk_size.bytes(),
            data_bytes,
            own_chunks: m.entries.len() as u64,
            new_bytes: m.new_bytes,
            note: m.note,
        })
    }

    /// Space figures for the store and each image.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let mut u = Usage::default();
        let mut owners: HashMap<ChunkId, HashSet<usize>> = HashMap::new();
        let mut per_image_chunks: Vec<HashSet<ChunkId>> = Vec::new();
        let mut referenced = HashSet::new();
        for (k, name) in self.images()?.into_iter().enumerate() {
            let mut iu = ImageUsage {
                name: name.clone(),
                ..ImageUsage::default()
            };
            let mut mine = HashSet::new();
            for v in self.versions(&name)? {
                iu.versions += 1;
                let list = self.chunk_list(&v)?;
                for (i, c) in list.chunks.iter().enumerate() {
                    if let Some(id) = c {
                        iu.logical_bytes += list.len_of(i) as u64;
                        mine.insert(*id);
                        owners.entry(*id).or_default().insert(k);
                    }
                }
                if let Ok(m) = self.manifest(&v) {
                    referenced.extend(m.own_chunks().copied());
                }
            }
            u.logical_bytes += iu.logical_bytes;
            u.images.push(iu);
            per_image_chunks.push(mine);
        }
        let raw_len = |id: &ChunkId| self.index.get(id).map_or(0, |l| l.raw_len as u64);
        for (k, mine) in per_image_chunks.iter().enumerate() {
            let iu = &mut u.images[k];
            for id in mine {
                iu.unique_bytes += raw_len(id);
                if owners.get(id).is_some_and(|o| o.len() == 1) {
                    iu.exclusive_bytes += raw_len(id);
                }
            }
        }
        u.unique_bytes = owners.keys().map(raw_len).sum();
        for (id, l) in &self.index {
            u.chunks += 1;
            u.stored_bytes += l.stored_len as u64;
            if !referenced.contains(id) {
                u.unreferenced_bytes += l.stored_len as u64;
            }
        }
        u.arena_bytes = self.arenas.values().map(|a| a.len).sum();
        Ok(u)
    }
}
