//! A read cache in remote memory over any [`Disk`].
//!
//! ```text
//!  read ─▶ RemoteCache ── hit ──▶ memory servers, ephemeral pool (sealed, one copy)
//!              │ miss
//!              ▼
//!          lower Disk ──▶ on a second touch (ghost table), put the block in the pool
//!  write / discard / write-zeroes ─▶ lower Disk, then delete the blocks from the pool
//! ```
//!
//! Cached blocks are whole 4 KiB blocks of the lower disk, keyed by block number in the
//! cache's namespace. The ephemeral pool may drop any of them at any time; a miss simply
//! reads the lower disk. The cache never fails a read that the lower disk can serve: remote
//! errors (down server, integrity failure) count as misses.
//!
//! **Never stale.** Every change (write, discard, write-zeroes) holds its blocks' stripe
//! locks exclusively while it changes the lower disk and deletes the blocks from the pool
//! (the client forgets a deleted block's location at once, even when its server is down, so
//! it is never read again). A read holds the stripes shared from its lookup until it has put
//! what it read from the lower disk, so it cannot put data older than a concurrent write.
//! Every put follows a state where the pool holds either nothing or the current data for
//! that block, and the client's versioned sealing rejects an old copy a server might replay.
//!
//! **Admission.** A block read for the first time is not cached: the guest keeps it in its
//! own page cache. A block read again (it left the guest's cache) is admitted. See
//! [`super::ghost`].
//!
//! **Observation.** With an [`AccessObserver`] attached ([`RemoteCache::observe`]), every
//! successful read reports its blocks (hits and misses alike: both missed the guest's own
//! page cache) for working-set estimation.
//!
//! Blocks only partly inside the disk (the last one of a disk whose size is not a multiple
//! of 4096) are never cached.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use remoca_memserver::protocol::Pool;

use super::client::RemoteClient;
use super::ghost::{Ghost, DEFAULT_GHOST_ENTRIES};
use super::observe::{Access, AccessObserver, ObserverSlot, Source};
use super::spill::BLOCK;
use super::stripes::Stripes;
use crate::disk::{check_range, Disk, DiskError, Extent, WriteFlags, ZeroFlags};

const B: u64 = BLOCK as u64;
/// Most block numbers handed to the client in one invalidation call.
const INVALIDATE_CHUNK: u64 = 1 << 16;

/// How to build a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// The memory-server namespace of this disk's cache (unique per disk and client).
    pub namespace: u64,
    /// Entries of the admission (ghost) table.
    pub ghost_entries: usize,
}

impl CacheConfig {
    /// Default admission table for `namespace`.
    pub fn new(namespace: u64) -> CacheConfig {
        CacheConfig {
            namespace,
            ghost_entries: DEFAULT_GHOST_ENTRIES,
        }
    }
}

/// Counters of one cached disk (blocks, not requests).
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Missed blocks put into the pool (second touch).
    pub admitted: AtomicU64,
    /// Missed blocks not admitted (first touch).
    pub first_touch: AtomicU64,
    /// Blocks deleted from the pool by writes, discards and write-zeroes.
    pub invalidated: AtomicU64,
    /// Remote calls that failed (reads then went to the lower disk).
    pub remote_errors: AtomicU64,
}

/// A point-in-time copy of [`CacheStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub admitted: u64,
    pub first_touch: u64,
    pub invalidated: u64,
    pub remote_errors: u64,
}

/// The cache layer. See the module docs.
#[derive(Debug)]
pub struct RemoteCache {
    lower: Arc<dyn Disk>,
    client: Arc<RemoteClient>,
    namespace: u64,
    ghost: Ghost,
    stripes: Stripes,
    stats: CacheStats,
    observer: ObserverSlot,
}

impl RemoteCache {
    /// Put a cache over `lower`. Whatever the namespace held before is dropped first, so a
    /// restarted backend never sees another run's blocks.
    pub fn new(lower: Arc<dyn Disk>, client: Arc<RemoteClient>, config: CacheConfig) -> Self {
        if let Err(e) = client.drop_namespace(config.namespace) {
            let ns = config.namespace;
            tracing::debug!(ns, error = %e, "could not drop the cache namespace");
        }
        RemoteCache {
            lower,
            client,
            namespace: config.namespace,
            ghost: Ghost::new(config.ghost_entries),
            stripes: Stripes::default(),
            stats: CacheStats::default(),
            observer: ObserverSlot::default(),
        }
    }

    /// The disk below.
    pub fn lower(&self) -> &Arc<dyn Disk> {
        &self.lower
    }

    /// Report the guest's reads of this disk to `observer` as `source`.
    pub fn observe(&self, source: Source, observer: Arc<dyn AccessObserver>) {
        self.observer.attach(source, observer);
    }

    /// Counters.
    pub fn stats(&self) -> CacheSnapshot {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let s = &self.stats;
        CacheSnapshot {
            hits: g(&s.hits),
            misses: g(&s.misses),
            admitted: g(&s.admitted),
            first_touch: g(&s.first_touch),
            invalidated: g(&s.invalidated),
            remote_errors: g(&s.remote_errors),
        }
    }

    /// Delete blocks `first..end` from the pool. Stripes must be held exclusively.
    fn invalidate(&self, first: u64, end: u64) {
        // In bounded chunks: a discard of a whole large disk must not build a huge key list.
        let mut s = first;
        while s < end {
            let e = end.min(s + INVALIDATE_CHUNK);
            let keys: Vec<u64> = (s..e).collect();
            if let Err(err) = self
                .client
                .delete_batch(Pool::Ephemeral, self.namespace, &keys)
            {
                self.stats.remote_errors.fetch_add(1, Relaxed);
                tracing::debug!(error = %err, "cache invalidation failed");
            }
            s = e;
        }
        self.stats.invalidated.fetch_add(end - first, Relaxed);
    }

    /// Run a change of `offset..offset+len` on the lower disk, then invalidate its blocks.
    fn change(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&dyn Disk) -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        if len == 0 {
            return f(self.lower.as_ref());
        }
        let first = offset / B;
        let end = offset.saturating_add(len).div_ceil(B);
        let _g = self.stripes.exclusive(first, end);
        let r = f(self.lower.as_ref());
        // Invalidate even on failure: the lower disk's content is then unknown.
        self.invalidate(first, end);
        r
    }
}

impl Disk for RemoteCache {
    fn size(&self) -> u64 {
        self.lower.size()
    }

    fn is_read_only(&self) -> bool {
        self.lower.is_read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let size = self.lower.size();
        let len = buf.len() as u64;
        check_range(offset, len, size)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first = offset / B;
        let last = end.div_ceil(B);
        let _g = self.stripes.shared(first, last);
        // Blocks wholly inside the disk can be cached.
        let whole_end = last.min(size / B);
        let keys: Vec<u64> = (first..whole_end.max(first)).collect();
        let cached = match self
            .client
            .get_batch(Pool::Ephemeral, self.namespace, &keys)
        {
            Ok(v) => v,
            Err(e) => {
                self.stats.remote_errors.fetch_add(1, Relaxed);
                tracing::debug!(error = %e, "cache lookup failed");
                vec![None; keys.len()]
            }
        };
        // Copy block `b`'s bytes (`data` = the whole block from its start) into `buf`.
        let mut place = |b: u64, data: &[u8]| {
            let s = offset.max(b * B);
            let e = end.min(b * B + data.len() as u64);
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&data[(s - b * B) as usize..(e - b * B) as usize]);
        };
        let mut hit = vec![false; (last - first) as usize];
        for (i, c) in cached.into_iter().enumerate() {
            if let Some(p) = c {
                if p.len() == BLOCK {
                    place(first + i as u64, &p);
                    hit[i] = true;
                }
            }
        }
        let hits = hit.iter().filter(|h| **h).count() as u64;
        self.stats.hits.fetch_add(hits, Relaxed);
        self.stats
            .misses
            .fetch_add(keys.len() as u64 - hits, Relaxed);
        // Missed runs from the lower disk, whole blocks (clipped to the disk's end).
        let mut admit: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut i = 0usize;
        while i < hit.len() {
            if hit[i] {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < hit.len() && !hit[j] {
                j += 1;
            }
            let rs = (first + i as u64) * B;
            let re = ((first + j as u64) * B).min(size);
            let mut tmp = vec![0u8; (re - rs) as usize];
            self.lower.read_at(&mut tmp, rs)?;
            for (k, chunk) in tmp.chunks(BLOCK).enumerate() {
                let b = first + (i + k) as u64;
                place(b, chunk);
                if chunk.len() == BLOCK {
                    if self.ghost.touch(b) {
                        admit.push((b, chunk.to_vec()));
                    } else {
                        self.stats.first_touch.fetch_add(1, Relaxed);
                    }
                }
            }
            i = j;
        }
        if !admit.is_empty() {
            let pages: Vec<(u64, &[u8])> = admit.iter().map(|(b, p)| (*b, &p[..])).collect();
            match self
                .client
                .put_batch(Pool::Ephemeral, self.namespace, &pages)
            {
                Ok(()) => {
                    self.stats.admitted.fetch_add(pages.len() as u64, Relaxed);
                }
                Err(e) => {
                    self.stats.remote_errors.fetch_add(1, Relaxed);
                    tracing::debug!(error = %e, "cache admission failed");
                }
            }
        }
        self.observer.emit(Access::Read, first..last);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.lower.size())?;
        self.change(offset, buf.len() as u64, |d| d.write_at(buf, offset, flags))
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.lower.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        check_range(offset, len, self.lower.size())?;
        self.change(offset, len, |d| d.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), DiskError> {
        check_range(offset, len, self.lower.size())?;
        self.change(offset, len, |d| d.write_zeroes(offset, len, flags))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        self.lower.block_status(offset, len)
    }
}
