//! The demo guest's workload on the simulated host: a thread that plays the guest's vCPU,
//! touching its pages with a skewed (zipf-like) pattern while the pager holds the domain
//! below its size, and checking that every page reads back what it last wrote.
//!
//! Each page carries a stamp `(gfn, version)` in its first 16 bytes; a write bumps the
//! version, a read compares with the version this thread remembers. A mismatch means the
//! paging path lost or mixed up a page, and is counted, never hidden.
//!
//! With the demo disks ([`GuestDisks`]) it also plays the guest kernel's swap and page
//! cache, so the remote swap device, the read cache and the working-set estimator see a
//! guest's traffic:
//! - **anonymous memory**: [`ANON_PAGES`] pages of which [`ANON_RESIDENT`] fit, touched in
//!   a loop (every 16th step); an LRU miss reads the page back from the swap device
//!   (checking its stamp) and writes the least recently used one out. The estimator should
//!   find that about `ANON_PAGES − ANON_RESIDENT` more pages would stop the refaults.
//! - **page cache**: reads of [`FILE_BLOCKS`] blocks of the demo disk, uniformly, through
//!   an LRU cache of [`FILE_CACHED`] blocks (every 16th step).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::Rng;
use remoca_blkback::disk::{Disk, WriteFlags};
use remoca_xen::sim::SimHost;
use remoca_xen::DomId;

/// Anonymous pages of the demo guest's swap model, and how many of them fit in memory.
pub const ANON_PAGES: u64 = 1536;
pub const ANON_RESIDENT: usize = 1024;
/// Disk blocks the guest reads, and how many its page cache holds.
pub const FILE_BLOCKS: u64 = 1024;
pub const FILE_CACHED: usize = 768;
const PAGE: usize = 4096;

/// The demo guest's disks (absent when no memory server backs them).
#[derive(Debug, Default, Clone)]
pub struct GuestDisks {
    pub swap: Option<Arc<dyn Disk>>,
    pub disk: Option<Arc<dyn Disk>>,
}

/// Counters the status line shows.
#[derive(Debug, Default)]
pub struct WorkloadStats {
    pub accesses: AtomicU64,
    pub wrong: AtomicU64,
    pub errors: AtomicU64,
    /// Swap-ins and disk reads (page-cache misses) of the kernel model.
    pub swap_ins: AtomicU64,
    pub disk_reads: AtomicU64,
}

/// A running workload; stopped and joined by [`Workload::stop`].
#[derive(Debug)]
pub struct Workload {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<WorkloadStats>,
}

impl Workload {
    pub fn start(
        sim: SimHost,
        dom: DomId,
        pages: u64,
        disks: GuestDisks,
    ) -> std::io::Result<Workload> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(WorkloadStats::default());
        let (s, st) = (stop.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name(format!("demo-guest-{dom}"))
            .spawn(move || run(&sim, dom, pages, &disks, &s, &st))?;
        Ok(Workload {
            stop,
            thread: Some(thread),
            stats,
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Least-recently-used order of the keys present (a kernel's LRU list, simply).
#[derive(Debug, Default)]
struct Lru {
    at: HashMap<u64, u64>,
    by_time: BTreeMap<u64, u64>,
    now: u64,
}

impl Lru {
    /// Touch `key`; true when it was present.
    fn touch(&mut self, key: u64) -> bool {
        self.now += 1;
        let hit = match self.at.insert(key, self.now) {
            Some(t) => {
                self.by_time.remove(&t);
                true
            }
            None => false,
        };
        self.by_time.insert(self.now, key);
        hit
    }

    /// Remove and return the least recently used key when more than `cap` are present.
    fn evict_over(&mut self, cap: usize) -> Option<u64> {
        if self.at.len() <= cap {
            return None;
        }
        let (_, key) = self.by_time.pop_first()?;
        self.at.remove(&key);
        Some(key)
    }
}

/// The guest kernel's swap and page cache over the demo disks.
struct Kernel<'a> {
    disks: &'a GuestDisks,
    anon: Lru,
    anon_versions: Vec<u64>,
    on_swap: Vec<bool>,
    cursor: u64,
    cache: Lru,
    buf: Vec<u8>,
}

impl Kernel<'_> {
    fn stamp(buf: &mut [u8], page: u64, version: u64) {
        buf.fill(0);
        buf[..8].copy_from_slice(&page.to_le_bytes());
        buf[8..16].copy_from_slice(&version.to_le_bytes());
    }

    /// Touch the next anonymous page of the loop, writing it now and then.
    fn anon_step(&mut self, swap: &dyn Disk, write: bool, stats: &WorkloadStats) {
        let page = self.cursor;
        self.cursor = (self.cursor + 1) % ANON_PAGES;
        let off = page * PAGE as u64;
        if !self.anon.touch(page) && self.on_swap[page as usize] {
            match swap.read_at(&mut self.buf, off) {
                Ok(()) => {
                    let mut want = vec![0u8; PAGE];
                    Self::stamp(&mut want, page, self.anon_versions[page as usize]);
                    if self.buf[..16] != want[..16] {
                        stats.wrong.fetch_add(1, Ordering::Relaxed);
                    }
                    stats.swap_ins.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(page, error = %e, "demo guest swap-in failed");
                }
            }
        }
        if write {
            self.anon_versions[page as usize] += 1;
        }
        if let Some(victim) = self.anon.evict_over(ANON_RESIDENT) {
            Self::stamp(&mut self.buf, victim, self.anon_versions[victim as usize]);
            match swap.write_at(&self.buf, victim * PAGE as u64, WriteFlags::default()) {
                Ok(()) => self.on_swap[victim as usize] = true,
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(victim, error = %e, "demo guest swap-out failed");
                }
            }
        }
    }

    /// Read a random block of the file through the page cache.
    fn file_step(&mut self, disk: &dyn Disk, block: u64, stats: &WorkloadStats) {
        if !self.cache.touch(block) {
            match disk.read_at(&mut self.buf, block * PAGE as u64) {
                Ok(()) => {
                    stats.disk_reads.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(block, error = %e, "demo guest disk read failed");
                }
            }
        }
        // A clean page leaves the cache silently.
        self.cache.evict_over(FILE_CACHED);
    }
}

fn run(
    sim: &SimHost,
    dom: DomId,
    pages: u64,
    disks: &GuestDisks,
    stop: &AtomicBool,
    stats: &WorkloadStats,
) {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(dom));
    let mut versions = vec![0u64; pages as usize];
    let mut kernel = Kernel {
        disks,
        anon: Lru::default(),
        anon_versions: vec![0; ANON_PAGES as usize],
        on_swap: vec![false; ANON_PAGES as usize],
        cursor: 0,
        cache: Lru::default(),
        buf: vec![0u8; PAGE],
    };
    let file_blocks = disks
        .disk
        .as_ref()
        .map_or(0, |d| FILE_BLOCKS.min(d.size() / PAGE as u64));
    let mut step = 0u64;
    while !stop.load(Ordering::Relaxed) {
        step += 1;
        if let Some(swap) = kernel.disks.swap.clone() {
            if step % 16 == 0 && swap.size() >= ANON_PAGES * PAGE as u64 {
                let write = rng.gen_bool(0.3);
                kernel.anon_step(swap.as_ref(), write, stats);
            }
        }
        if let Some(disk) = kernel.disks.disk.clone() {
            if step % 16 == 8 && file_blocks > 0 {
                let block = rng.gen_range(0..file_blocks);
                kernel.file_step(disk.as_ref(), block, stats);
            }
        }
        // Skewed: a quarter of the pages get most accesses, the rest are touched now and then.
        let hot = rng.gen_bool(0.8);
        let gfn = if hot {
            rng.gen_range(0..pages / 4)
        } else {
            rng.gen_range(0..pages)
        };
        let v = &mut versions[gfn as usize];
        let result = if rng.gen_bool(0.3) {
            *v += 1;
            let mut stamp = [0u8; 16];
            stamp[..8].copy_from_slice(&gfn.to_le_bytes());
            stamp[8..].copy_from_slice(&v.to_le_bytes());
            sim.guest_write(dom, gfn, 0, &stamp)
        } else {
            sim.guest_read(dom, gfn).map(|page| {
                let want = if *v == 0 {
                    [0u8; 16]
                } else {
                    let mut s = [0u8; 16];
                    s[..8].copy_from_slice(&gfn.to_le_bytes());
                    s[8..].copy_from_slice(&v.to_le_bytes());
                    s
                };
                if page[..16] != want {
                    stats.wrong.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        match result {
            Ok(()) => {
                stats.accesses.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(dom, gfn, error = %e, "demo guest access failed");
            }
        }
        // A guest does other things between page touches; keep the demo light on CPU.
        if stats.accesses.load(Ordering::Relaxed) % 64 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    // The guest's processes end: their swap slots are freed (a discard), so the memory
    // servers hold nothing of this guest when `up` stops them.
    if let Some(swap) = &disks.swap {
        let used = ANON_PAGES * PAGE as u64;
        if swap.size() >= used {
            if let Err(e) = swap.discard(0, used) {
                tracing::warn!(dom, error = %e, "demo guest could not free its swap");
            }
        }
    }
}
