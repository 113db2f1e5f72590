//! A swap device whose blocks live in remote memory.
//!
//! ```text
//!  guest swap I/O ─▶ SwapDisk ─┬─▶ memory servers, persistent pool, 2 replicas (sealed)
//!                              ├─▶ spill file (local; when servers cannot take a block)
//!                              └─▶ nothing: an all-zero or discarded block
//! ```
//!
//! Each 4 KiB block is in exactly one place, recorded in an in-process index (block →
//! remote | spill slot; absent = zeroes). A block's key on the servers is its block number in
//! the device's namespace; the client seals every page (bound to namespace, key and version)
//! and remembers which servers hold the current version. Blocks are LZ4-compressed when
//! that saves an eighth or more ([`super::page_codec`]); all-zero blocks are not stored.
//!
//! **Durability rule.** A write returns only when its blocks are stored on every replica
//! (the client's `put_batch` acknowledges only then) or written to the spill file and
//! `fdatasync`ed. When fewer servers are up than the replica count, or a put fails, the whole
//! request goes to the spill file, and any remote copies it may have left are deleted.
//! Rewriting a block moves it (a spilled block goes back to remote memory when the servers
//! take it again); discard and write-zeroes free the remote pages or spill slots.
//!
//! **Reads** take each block from where the index says; the client falls back from a lost
//! server to the replica. A block that no replica can return is an I/O error (EIO), never
//! zeroes or stale data.
//!
//! **Observation.** With an [`AccessObserver`] attached ([`SwapDisk::observe`]), every
//! successful guest write reports its blocks as swap-outs, every guest read as swap-ins and
//! every discard / write-zeroes as freed slots (the working-set estimator's input).
//!
//! **Alignment.** Swap I/O is 4 KiB aligned; other requests work by read-modify-write of the
//! edge blocks (under the same block locks, so they are atomic with respect to other
//! requests on those blocks).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;
use remoca_memserver::protocol::Pool;

use super::client::RemoteClient;
use super::observe::{Access, AccessObserver, ObserverSlot, Source};
use super::page_codec;
use super::spill::{SpillError, SpillFile, BLOCK};
use super::stripes::Stripes;
use crate::disk::{check_range, push_extent, Disk, DiskError, Extent, WriteFlags, ZeroFlags};

const B: u64 = BLOCK as u64;

/// How to build a swap device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapConfig {
    /// Size in bytes (a non-zero multiple of 4096).
    pub size: u64,
    /// The memory-server namespace of this device (one per VM disk; unique per client).
    pub namespace: u64,
    /// The local spill file (created, or truncated, at open).
    pub spill_path: PathBuf,
    /// Most bytes of blocks the spill file may hold (at least 4096). Usually `size`, so a
    /// total loss of the servers still leaves room for every block written afterwards.
    pub spill_max: u64,
}

/// Why a swap device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SwapOpenError {
    #[error("swap size {0} is not a non-zero multiple of 4096")]
    BadSize(u64),
    #[error("spill file {path}")]
    Spill {
        path: PathBuf,
        #[source]
        source: SpillError,
    },
}

/// Where one block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    Remote,
    Spill(u64),
}

/// Counters of one swap device (blocks, not requests).
#[derive(Debug, Default)]
pub struct SwapStats {
    pub remote_writes: AtomicU64,
    /// Bytes of encoded (possibly compressed) blocks stored remotely, per copy.
    pub remote_bytes: AtomicU64,
    pub spill_writes: AtomicU64,
    pub zero_writes: AtomicU64,
    pub remote_reads: AtomicU64,
    pub spill_reads: AtomicU64,
    pub zero_reads: AtomicU64,
    pub freed: AtomicU64,
    /// Requests that wanted remote memory and fell back to the spill file.
    pub fallbacks: AtomicU64,
    pub read_errors: AtomicU64,
    /// Writes that neither remote memory nor the spill file took.
    pub write_errors: AtomicU64,
}

/// A point-in-time copy of [`SwapStats`] plus where blocks are now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwapSnapshot {
    pub remote_writes: u64,
    pub remote_bytes: u64,
    pub spill_writes: u64,
    pub zero_writes: u64,
    pub remote_reads: u64,
    pub spill_reads: u64,
    pub zero_reads: u64,
    pub freed: u64,
    pub fallbacks: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    /// Blocks held remotely now.
    pub remote_blocks: u64,
    /// Blocks held in the spill file now.
    pub spilled_blocks: u64,
}

/// The swap device. See the module docs.
#[derive(Debug)]
pub struct SwapDisk {
    client: Arc<RemoteClient>,
    namespace: u64,
    size: u64,
    spill: SpillFile,
    spill_path: PathBuf,
    index: Mutex<HashMap<u64, Loc>>,
    stripes: Stripes,
    degraded: AtomicBool,
    stats: SwapStats,
    observer: ObserverSlot,
}

fn io_err(errno: i32) -> DiskError {
    DiskError::Io(std::io::Error::from_raw_os_error(errno))
}

fn spill_err(e: SpillError) -> DiskError {
    match e {
        SpillError::Io(e) => DiskError::Io(e),
        e @ (SpillError::WrongBlock { .. } | SpillError::Checksum(_) | SpillError::NoRecord(_)) => {
            DiskError::Corrupt(e.to_string())
        }
        e => io_err(e.errno()),
    }
}

impl SwapDisk {
    /// Open a swap device: create its spill file. The device starts all zeroes.
    ///
    /// # Errors
    /// [`SwapOpenError`].
    pub fn open(client: Arc<RemoteClient>, config: SwapConfig) -> Result<SwapDisk, SwapOpenError> {
        if config.size == 0 || config.size % B != 0 {
            return Err(SwapOpenError::BadSize(config.size));
        }
        let spill = SpillFile::create(&config.spill_path, config.spill_max).map_err(|source| {
            SwapOpenError::Spill {
                path: config.spill_path.clone(),
                source,
            }
        })?;
        if client.replicas() < 2 {
            tracing::warn!(
                namespace = config.namespace,
                "swap blocks get one remote copy only (fewer than two memory servers): \
                 losing that server loses guest memory"
            );
        }
        Ok(SwapDisk {
            client,
            namespace: config.namespace,
            size: config.size,
            spill,
            spill_path: config.spill_path,
            index: Mutex::new(HashMap::new()),
            stripes: Stripes::default(),
            degraded: AtomicBool::new(false),
            stats: SwapStats::default(),
            observer: ObserverSlot::default(),
        })
    }

    /// A one-line description for export listings.
    pub fn describe(&self) -> String {
        format!(
            "remote swap, {} MiB, namespace {}, spill {}",
            self.size >> 20,
            self.namespace,
            self.spill_path.display()
        )
    }

    /// Report the guest's swap traffic on this device to `observer` as `source`.
    pub fn observe(&self, source: Source, observer: Arc<dyn AccessObserver>) {
        self.observer.attach(source, observer);
    }

    /// Counters and where blocks are now.
    pub fn stats(&self) -> SwapSnapshot {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let s = &self.stats;
        let (remote_blocks, spilled_blocks) = {
            let idx = self.index.lock();
            let spilled = idx.values().filter(|l| matches!(l, Loc::Spill(_))).count() as u64;
            (idx.len() as u64 - spilled, spilled)
        };
        SwapSnapshot {
            remote_writes: g(&s.remote_writes),
            remote_bytes: g(&s.remote_bytes),
            spill_writes: g(&s.spill_writes),
            zero_writes: g(&s.zero_writes),
            remote_reads: g(&s.remote_reads),
            spill_reads: g(&s.spill_reads),
            zero_reads: g(&s.zero_reads),
            freed: g(&s.freed),
            fallbacks: g(&s.fallbacks),
            read_errors: g(&s.read_errors),
            write_errors: g(&s.write_errors),
            remote_blocks,
            spilled_blocks,
        }
    }

    /// Count an error; true when it should be logged (the 1st, 2nd, 4th, 8th, ...: a guest
    /// must not be able to flood the log).
    fn count_error(&self, c: &AtomicU64) -> bool {
        (c.fetch_add(1, Relaxed) + 1).is_power_of_two()
    }

    /// Blocks `first..end` covering `offset..offset+len`.
    fn blocks(offset: u64, len: u64) -> (u64, u64) {
        (offset / B, (offset + len).div_ceil(B))
    }

    /// Read whole blocks `first..first + out.len()/B` into `out`. Stripes must be held.
    fn read_blocks(&self, first: u64, out: &mut [u8]) -> Result<(), DiskError> {
        let n = (out.len() / BLOCK) as u64;
        let locs: Vec<Option<Loc>> = {
            let idx = self.index.lock();
            (first..first + n).map(|b| idx.get(&b).copied()).collect()
        };
        let mut remote = Vec::new();
        for (i, l) in locs.iter().enumerate() {
            let b = first + i as u64;
            let dst = &mut out[i * BLOCK..(i + 1) * BLOCK];
            match l {
                None => {
                    dst.fill(0);
                    self.stats.zero_reads.fetch_add(1, Relaxed);
                }
                Some(Loc::Spill(s)) => {
                    self.spill.read(*s, b, dst).map_err(|e| {
                        if self.count_error(&self.stats.read_errors) {
                            tracing::error!(block = b, error = %e, "spilled block unreadable");
                        }
                        spill_err(e)
                    })?;
                    self.stats.spill_reads.fetch_add(1, Relaxed);
                }
                Some(Loc::Remote) => remote.push(i),
            }
        }
        if remote.is_empty() {
            return Ok(());
        }
        let keys: Vec<u64> = remote.iter().map(|&i| first + i as u64).collect();
        let pages = self
            .client
            .get_batch(Pool::Persistent, self.namespace, &keys)
            .map_err(|e| {
                if self.count_error(&self.stats.read_errors) {
                    let n = keys.len();
                    tracing::error!(first = keys[0], n, error = %e, "no replica answered");
                }
                io_err(libc::EIO)
            })?;
        for (&i, p) in remote.iter().zip(pages) {
            let b = first + i as u64;
            let r = match p {
                Some(v) => page_codec::decode(&v, &mut out[i * BLOCK..(i + 1) * BLOCK])
                    .map_err(|e| e.to_string()),
                None => Err("missing".to_owned()),
            };
            if let Err(why) = r {
                if self.count_error(&self.stats.read_errors) {
                    tracing::error!(block = b, why, "remote block unreadable");
                }
                return Err(io_err(libc::EIO));
            }
        }
        self.stats
            .remote_reads
            .fetch_add(remote.len() as u64, Relaxed);
        Ok(())
    }

    /// Store whole blocks `first..` from `data`, durably. Stripes must be held exclusively.
    fn store_blocks(&self, first: u64, data: &[u8]) -> Result<(), DiskError> {
        let mut zero = Vec::new();
        let mut pages: Vec<(u64, &[u8])> = Vec::new();
        for (i, chunk) in data.chunks(BLOCK).enumerate() {
            let b = first + i as u64;
            if chunk.iter().all(|&x| x == 0) {
                zero.push(b);
            } else {
                pages.push((b, chunk));
            }
        }
        if !pages.is_empty() {
            if self.put_remote(&pages) {
                let mut idx = self.index.lock();
                for (b, _) in &pages {
                    if let Some(Loc::Spill(s)) = idx.insert(*b, Loc::Remote) {
                        self.spill.free(s);
                    }
                }
                self.stats
                    .remote_writes
                    .fetch_add(pages.len() as u64, Relaxed);
            } else {
                self.put_spill(&pages)?;
            }
        }
        self.stats.zero_writes.fetch_add(zero.len() as u64, Relaxed);
        self.forget(&zero);
        Ok(())
    }

    /// Try to store `pages` on their replicas; true when every page is acknowledged.
    fn put_remote(&self, pages: &[(u64, &[u8])]) -> bool {
        let c = &self.client;
        if c.servers_up() < c.replicas() {
            return false;
        }
        let encoded: Vec<Vec<u8>> = pages.iter().map(|(_, p)| page_codec::encode(p)).collect();
        let values: Vec<(u64, &[u8])> = pages
            .iter()
            .zip(&encoded)
            .map(|((b, _), e)| (*b, &e[..]))
            .collect();
        match c.put_batch(Pool::Persistent, self.namespace, &values) {
            Ok(()) => {
                let bytes: usize = encoded.iter().map(Vec::len).sum();
                self.stats.remote_bytes.fetch_add(bytes as u64, Relaxed);
                if self.degraded.swap(false, Relaxed) {
                    tracing::info!(
                        namespace = self.namespace,
                        "swap writes go to remote memory again"
                    );
                }
                true
            }
            Err(e) => {
                if !self.degraded.swap(true, Relaxed) {
                    let ns = self.namespace;
                    tracing::warn!(ns, error = %e, "remote memory refused blocks; spilling");
                }
                false
            }
        }
    }

    /// Write `pages` to the spill file and sync; then point the index at them and delete
    /// any remote copies.
    fn put_spill(&self, pages: &[(u64, &[u8])]) -> Result<(), DiskError> {
        self.stats.fallbacks.fetch_add(1, Relaxed);
        let current: Vec<Option<Loc>> = {
            let idx = self.index.lock();
            pages.iter().map(|(b, _)| idx.get(b).copied()).collect()
        };
        let mut slots = Vec::with_capacity(pages.len());
        let mut fresh = Vec::new();
        let mut result = Ok(());
        for ((b, p), cur) in pages.iter().zip(&current) {
            let slot = match cur {
                Some(Loc::Spill(s)) => *s,
                _ => match self.spill.alloc() {
                    Ok(s) => {
                        fresh.push(s);
                        s
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                },
            };
            if let Err(e) = self.spill.write(slot, *b, p) {
                result = Err(e);
                break;
            }
            slots.push(slot);
        }
        let result = result.and_then(|()| self.spill.sync());
        if let Err(e) = result {
            for s in fresh {
                self.spill.free(s);
            }
            if self.count_error(&self.stats.write_errors) {
                tracing::error!(error = %e, "swap write failed: no room remotely or in the spill file");
            }
            return Err(spill_err(e));
        }
        {
            let mut idx = self.index.lock();
            for ((b, _), s) in pages.iter().zip(slots) {
                idx.insert(*b, Loc::Spill(s));
            }
        }
        // Remote copies a failed put may have left, and older versions, go too (the index no
        // longer points at them; the client forgets their location at once).
        let stray: Vec<u64> = pages.iter().map(|(b, _)| *b).collect();
        let _ = self
            .client
            .delete_batch(Pool::Persistent, self.namespace, &stray);
        self.stats
            .spill_writes
            .fetch_add(pages.len() as u64, Relaxed);
        Ok(())
    }

    /// Make `blocks` read as zeroes: free their remote pages and spill slots.
    fn forget(&self, blocks: &[u64]) {
        if blocks.is_empty() {
            return;
        }
        let mut remote = Vec::new();
        {
            let mut idx = self.index.lock();
            for b in blocks {
                match idx.remove(b) {
                    Some(Loc::Remote) => remote.push(*b),
                    Some(Loc::Spill(s)) => self.spill.free(s),
                    None => continue,
                }
                self.stats.freed.fetch_add(1, Relaxed);
            }
        }
        if !remote.is_empty() {
            let _ = self
                .client
                .delete_batch(Pool::Persistent, self.namespace, &remote);
        }
    }

    /// Zero `offset..offset+len`: whole blocks are freed, partial edge blocks rewritten.
    fn zero_range(&self, offset: u64, len: u64, fast_only: bool) -> Result<(), DiskError> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let (first, last) = Self::blocks(offset, len);
        if fast_only && (offset % B != 0 || end % B != 0) {
            return Err(DiskError::NotSupported);
        }
        let _g = self.stripes.exclusive(first, last);
        let whole_first = offset.div_ceil(B);
        let whole_end = end / B;
        let whole: Vec<u64> = (whole_first..whole_end.max(whole_first)).collect();
        // Edge blocks partly inside the range.
        let mut edges = Vec::new();
        if offset % B != 0 {
            edges.push(first);
        }
        if end % B != 0 && !edges.contains(&(last - 1)) {
            edges.push(last - 1);
        }
        for b in edges {
            let mut blk = vec![0u8; BLOCK];
            self.read_blocks(b, &mut blk)?;
            let s = offset.max(b * B) - b * B;
            let e = end.min((b + 1) * B) - b * B;
            blk[s as usize..e as usize].fill(0);
            self.store_blocks(b, &blk)?;
        }
        self.forget(&whole);
        self.observer
            .emit(Access::Free, whole_first..whole_end.max(whole_first));
        Ok(())
    }
}

impl Disk for SwapDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let len = buf.len() as u64;
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let (first, last) = Self::blocks(offset, len);
        let _g = self.stripes.shared(first, last);
        if offset % B == 0 && len % B == 0 {
            self.read_blocks(first, buf)?;
        } else {
            let mut tmp = vec![0u8; ((last - first) * B) as usize];
            self.read_blocks(first, &mut tmp)?;
            let s = (offset - first * B) as usize;
            buf.copy_from_slice(&tmp[s..s + buf.len()]);
        }
        self.observer.emit(Access::SwapIn, first..last);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _flags: WriteFlags) -> Result<(), DiskError> {
        let len = buf.len() as u64;
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let (first, last) = Self::blocks(offset, len);
        let _g = self.stripes.exclusive(first, last);
        if offset % B == 0 && len % B == 0 {
            self.store_blocks(first, buf)?;
            self.observer.emit(Access::SwapOut, first..last);
            return Ok(());
        }
        // Read-modify-write of the edge blocks.
        let mut tmp = vec![0u8; ((last - first) * B) as usize];
        self.read_blocks(first, &mut tmp[..BLOCK])?;
        if last - first > 1 {
            let n = tmp.len();
            self.read_blocks(last - 1, &mut tmp[n - BLOCK..])?;
        }
        let s = (offset - first * B) as usize;
        tmp[s..s + buf.len()].copy_from_slice(buf);
        self.store_blocks(first, &tmp)?;
        self.observer.emit(Access::SwapOut, first..last);
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        // Every write was durable when it returned (replicas acknowledged or spill synced).
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.zero_range(offset, len, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), DiskError> {
        self.zero_range(offset, len, flags.fast_only)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        check_range(offset, len, self.size)?;
        let mut out = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let end = offset + len;
        let (first, last) = Self::blocks(offset, len);
        let idx = self.index.lock();
        for b in first..last {
            let s = offset.max(b * B);
            let e = end.min((b + 1) * B);
            let present = idx.contains_key(&b);
            push_extent(
                &mut out,
                Extent {
                    len: e - s,
                    hole: !present,
                    zero: !present,
                    depth: u32::from(present),
                },
            );
        }
        Ok(out)
    }
}
