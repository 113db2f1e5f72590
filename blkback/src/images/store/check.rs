//! `verify`: every indexed chunk re-read and re-hashed, every manifest decoded, its parent
//! present and every chunk its flattened version needs present; what is wrong is named with
//! the versions it hurts.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::{Store, StoreError, VersionRef};
use crate::images::chunk::ChunkId;

/// One chunk that failed its check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadChunk {
    pub id: ChunkId,
    pub arena: u32,
    pub offset: u64,
    pub why: String,
    /// Versions whose flattened image contains the chunk.
    pub used_by: Vec<VersionRef>,
}

/// What `verify` found.
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub versions_checked: u64,
    pub bad_chunks: Vec<BadChunk>,
    /// A version and a chunk it needs that the store does not have.
    pub missing: Vec<(VersionRef, ChunkId)>,
    /// Manifests that do not decode, or whose layer chain is broken.
    pub bad_versions: Vec<(VersionRef, String)>,
    /// Chunks no version references (harmless; gc frees them).
    pub unreferenced_chunks: u64,
    pub unreferenced_bytes: u64,
    /// What opening the store had to re-read (not errors: crash recovery).
    pub notes: Vec<String>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.bad_chunks.is_empty() && self.missing.is_empty() && self.bad_versions.is_empty()
    }
}

impl Store {
    /// Check the whole store. `progress` is told the chunk bytes checked so far.
    ///
    /// # Errors
    /// Only I/O errors that stop the walk itself (listing directories); what is wrong with
    /// chunks and manifests goes into the report.
    pub fn verify(&self, progress: &mut dyn FnMut(u64)) -> Result<VerifyReport, StoreError> {
        let mut r = VerifyReport::default();
        let o = self.open_report();
        if o.index_missing {
            r.notes
                .push("index file missing or unreadable: rebuilt from the arenas".into());
        }
        for n in &o.rescanned {
            r.notes
                .push(format!("arena {n}: not covered by the index, re-read"));
        }
        for (n, why) in &o.torn {
            r.notes
                .push(format!("arena {n}: torn tail ignored ({why})"));
        }
        // Versions: manifests, chains, chunk presence; who uses what.
        let mut users: BTreeMap<ChunkId, BTreeSet<VersionRef>> = BTreeMap::new();
        let mut referenced = HashSet::new();
        for v in self.all_versions()? {
            r.versions_checked += 1;
            let list = match self.chunk_list(&v) {
                Ok(l) => l,
                Err(e) => {
                    r.bad_versions.push((v, e.to_string()));
                    continue;
                }
            };
            if let Ok(m) = self.manifest(&v) {
                referenced.extend(m.own_chunks().copied());
            }
            let mut reported: HashSet<ChunkId> = o.corrupt.iter().map(|(id, _)| *id).collect();
            for (i, id) in list.chunks.iter().enumerate() {
                let Some(id) = id else { continue };
                users.entry(*id).or_default().insert(v.clone());
                match self.index.get(id) {
                    None => {
                        if reported.insert(*id) {
                            r.missing.push((v.clone(), *id));
                        }
                    }
                    Some(l) if l.raw_len as usize != list.len_of(i) => {
                        r.bad_versions.push((
                            v.clone(),
                            format!(
                                "piece {i} is {} bytes, chunk {id} is {}",
                                list.len_of(i),
                                l.raw_len
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        // Records open found rotten and left out of the index.
        for (id, l) in &o.corrupt {
            if self.index.contains_key(id) {
                continue; // another, good copy serves it
            }
            r.bad_chunks.push(BadChunk {
                id: *id,
                arena: l.arena,
                offset: l.offset,
                why: "its bytes do not hash to its id (found re-reading the arena)".into(),
                used_by: users
                    .get(id)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
            });
        }
        // Chunks, in file order.
        let mut all: Vec<_> = self.index.iter().collect();
        all.sort_by_key(|(_, l)| (l.arena, l.offset));
        for (id, l) in all {
            r.chunks_checked += 1;
            r.bytes_checked += l.raw_len as u64;
            if !referenced.contains(id) {
                r.unreferenced_chunks += 1;
                r.unreferenced_bytes += l.stored_len as u64;
            }
            if let Err(e) = self.read_at(id, l) {
                r.bad_chunks.push(BadChunk {
                    id: *id,
                    arena: l.arena,
                    offset: l.offset,
                    why: e.to_string(),
                    used_by: users
                        .get(id)
                        .map(|s| s.iter().cloned().collect())
                        .unwrap_or_default(),
                });
            }
            progress(r.bytes_checked);
        }
        Ok(r)
    }
}
