//! Garbage collection: drop versions by a retention policy, then free the chunks no kept
//! manifest references by copying the live records of every arena that holds garbage into
//! new arenas and deleting the old ones.
//!
//! Order (each step durable before the next): the arena being appended to is sealed; live
//! records are copied (not re-encoded, but re-hashed: a corrupt chunk stops gc rather than
//! spread); the new arena is synced and the index saved pointing at the copies; only then are
//! the old arenas deleted. A crash in between leaves two valid copies of some chunks, and the
//! copy the index does not point at is garbage for the next gc: a record is live only if a
//! kept manifest names its id *and* the index points at that very record.
//!
//! A remote store (S3) follows the same order with whole objects: the copies fill a new
//! staging arena, which is sealed and put (`If-None-Match`) as a new arena object; then the
//! index object is put; then the old arena objects are deleted. A crash before the index
//! put leaves an extra arena object the index does not cover (the next open reads its
//! footer; its records duplicate live ones); after it, old objects the index no longer
//! covers (read from their footers on open, freed by the next gc). Every kept version
//! reads at every point.

use std::collections::{BTreeSet, HashSet};

use super::arena::Location;
use super::{log, Store, StoreError, VersionRef};
use crate::images::chunk::ChunkId;

/// What gc may drop besides garbage chunks.
#[derive(Debug, Clone, Copy, Default)]
pub struct GcOptions {
    /// Keep only the newest N versions of each image (versions other kept versions are
    /// layered on are kept too). `None`: keep every version.
    pub keep_last: Option<usize>,
    /// Report what would be done, change nothing.
    pub dry_run: bool,
}

/// What gc did (or, dry, would do).
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    pub versions_removed: Vec<VersionRef>,
    pub chunks_before: u64,
    pub chunks_after: u64,
    pub chunks_freed: u64,
    /// Stored (payload) bytes of every indexed chunk before and after.
    pub stored_before: u64,
    pub stored_after: u64,
    /// Arena file bytes before and after.
    pub arena_bytes_before: u64,
    pub arena_bytes_after: u64,
    pub arenas_rewritten: Vec<u32>,
    pub bytes_copied: u64,
}

impl Store {
    /// Versions a `keep_last` policy would remove.
    pub fn retention(&self, keep_last: usize) -> Result<Vec<VersionRef>, StoreError> {
        let mut keep = BTreeSet::new();
        let mut all = Vec::new();
        for i in self.images()? {
            let vs = self.versions(&i)?;
            let n = vs.len();
            for (k, v) in vs.into_iter().enumerate() {
                if k + keep_last >= n {
                    keep.insert(v.clone());
                }
                all.push(v);
            }
        }
        // Bases of kept layers are kept.
        for v in keep.clone() {
            for (c, _) in self.chain(&v)? {
                keep.insert(c);
            }
        }
        Ok(all.into_iter().filter(|v| !keep.contains(v)).collect())
    }

    /// Collect garbage. `progress` is told the bytes copied so far.
    ///
    /// # Errors
    /// A manifest that does not decode (gc cannot know what it references: run verify), a
    /// corrupt live chunk, I/O errors.
    pub fn gc(
        &mut self,
        opts: GcOptions,
        progress: &mut dyn FnMut(u64),
    ) -> Result<GcReport, StoreError> {
        let mut r = GcReport {
            chunks_before: self.index.len() as u64,
            stored_before: self.index.values().map(|l| l.stored_len as u64).sum(),
            arena_bytes_before: self.arenas.values().map(|a| a.len).sum(),
            ..GcReport::default()
        };
        if let Some(k) = opts.keep_last {
            r.versions_removed = self.retention(k)?;
            if !opts.dry_run {
                // Newest first, so a layer goes before its base.
                for v in r.versions_removed.iter().rev() {
                    self.remove(v)?;
                }
            }
        }
        let dropped: HashSet<_> = r.versions_removed.iter().cloned().collect();
        let mut live: HashSet<ChunkId> = HashSet::new();
        for v in self.all_versions()? {
            if opts.dry_run && dropped.contains(&v) {
                continue;
            }
            let m = self.manifest(&v)?;
            live.extend(m.own_chunks().copied());
        }
        // Arenas holding anything but live, indexed records.
        let mut plan: Vec<(u32, Vec<(ChunkId, Location)>)> = Vec::new();
        let numbers: Vec<u32> = self.arenas.keys().copied().collect();
        let active = self.writer.as_ref().map(|w| w.number);
        for n in numbers {
            let file = self.reader(n)?;
            let records = if Some(n) == active {
                self.writer.as_ref().expect("active").table.clone()
            } else {
                log::scan_arena(&file, n, false)?.records
            };
            let mut keep = Vec::new();
            let mut garbage = false;
            for (id, l) in records {
                let indexed_here = self.index.get(&id) == Some(&l);
                if indexed_here && live.contains(&id) {
                    keep.push((id, l));
                } else {
                    garbage = true;
                }
            }
            let unsealed_leftover = !self.arenas[&n].sealed && Some(n) != active;
            if garbage || unsealed_leftover {
                plan.push((n, keep));
            }
        }
        let freed: Vec<ChunkId> = self
            .index
            .keys()
            .filter(|id| !live.contains(*id))
            .copied()
            .collect();
        r.chunks_freed = freed.len() as u64;
        r.arenas_rewritten = plan.iter().map(|p| p.0).collect();
        if opts.dry_run {
            r.chunks_after = r.chunks_before - r.chunks_freed;
            r.stored_after = r.stored_before
                - freed
                    .iter()
                    .map(|id| self.index[id].stored_len as u64)
                    .sum::<u64>();
            r.arena_bytes_after = r.arena_bytes_before;
            return Ok(r);
        }
        if plan.is_empty() {
            for id in &freed {
                // Unreachable in practice: an indexed dead chunk sits in an arena with
                // garbage. Kept for safety.
                self.index.remove(id);
            }
        } else {
            // Copies go to fresh arenas, never into one being rewritten.
            if plan.iter().any(|p| Some(p.0) == active) {
                self.seal_writer()?;
            } else if active.is_some() {
                // Keep appending to the active arena: it is not rewritten.
            }
            for (n, keep) in &plan {
                let file = self.reader(*n)?;
                for (id, l) in keep {
                    let payload = log::read_payload(&file, l)
                        .map_err(|e| super::io_at(log::arena_path(&self.dir, *n), e))?;
                    let h = super::arena::RecordHeader {
                        kind: super::arena::KIND_CHUNK,
                        codec: l.codec,
                        raw_len: l.raw_len,
                        stored_len: l.stored_len,
                        id: *id,
                    };
                    super::arena::decode_payload(&h, &payload)?;
                    let new = self.append_encoded(*id, l.codec, l.raw_len, &payload)?;
                    debug_assert_eq!(self.index[id], new);
                    r.bytes_copied += l.stored_len as u64;
                    progress(r.bytes_copied);
                }
            }
            // A remote store: the copies' arena is sealed and put (conditionally) before
            // the index that points at it.
            self.send_arenas()?;
            for id in &freed {
                self.index.remove(id);
            }
            // Index entries left in rewritten arenas are dead (their ids are not live).
            let gone: HashSet<u32> = plan.iter().map(|p| p.0).collect();
            self.index.retain(|_, l| !gone.contains(&l.arena));
            for n in &gone {
                self.arenas.remove(n);
            }
            self.save_index()?;
            for n in &gone {
                self.readers.lock().remove(n);
                let p = log::arena_path(&self.dir, *n);
                if let Some(b) = self.backend() {
                    // Last: a crash before this leaves old objects the index no longer
                    // covers; the next open reads their footers, the next gc frees them.
                    b.delete(&format!("arenas/{n:08}.arena"))?;
                    // A staging copy, if this process made the arena.
                    let _ = std::fs::remove_file(&p);
                } else {
                    std::fs::remove_file(&p).map_err(|e| super::io_at(&p, e))?;
                }
            }
            log::sync_dir(&self.dir.join("arenas"))?;
        }
        r.chunks_after = self.index.len() as u64;
        r.stored_after = self.index.values().map(|l| l.stored_len as u64).sum();
        r.arena_bytes_after = self.arenas.values().map(|a| a.len).sum();
        Ok(r)
    }
}
