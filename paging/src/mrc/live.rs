//! Live working-set estimation: one [`GhostShards`] per guest, fed by the remote-memory disk
//! layers as the guest uses them, and the recommendation drawn from its curve.
//!
//! ```text
//!  SwapDisk ───── swap-out / swap-in / free ──┐
//!  RemoteCache ── read ───────────────────────┼─▶ WorkingSets ─▶ GhostShards per domain
//!                 (blkback AccessObserver)    │        │
//!                                             │        └─▶ Estimate ─▶ xenstore (published)
//! ```
//!
//! **Why here.** `remoca-paging` already depends on `remoca-blkback`, so the estimator
//! lives beside the miss-ratio-curve code it reuses and implements blkback's small
//! [`AccessObserver`] hook; blkback stays ignorant of estimation.
//!
//! **Keys.** A swap slot and a disk block are different pages, and two disks of one guest
//! reuse block numbers, so a key is `kind << 63 | device << 47 | block` (block numbers below
//! 2^47, i.e. disks under 512 PiB).
//!
//! **Recommendation** (sizes in KiB; `current` is the guest's memory now, the curve's
//! size 0 is `current`):
//! - `balloon_target` = `current` + the smallest extra size at which the curve is within
//!   `tolerance` (default 0.05) of its asymptote: past it, more memory removes less than
//!   5 % of the guest's misses (the knee).
//! - `wss` = `current` + the extra size at which the curve is within 0.01 of its asymptote:
//!   nearly every miss that memory can avoid is avoided. A guest that does not refault is
//!   estimated at `current` (only misses are visible, so idle memory cannot be measured).
//! - `remote_share` = `balloon_target − current`: what should live in remote memory (the
//!   swap device and read cache on the memory servers) while the guest stays at `current`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;
use remoca_blkback::remote::observe::{Access, AccessObserver, Source};
use remoca_xen::DomId;

use super::ghost::GhostShards;
use super::Mrc;
use crate::pager::PAGE_KIB;

/// Most points of a published curve (the rest are merged into wider buckets).
pub const MAX_POINTS: usize = 33;
/// The `wss` rule's tolerance (see the module docs).
pub const WSS_TOLERANCE: f64 = 0.01;

/// Estimator settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveConfig {
    /// Starting SHARDS rate (1.0: every page until `max_samples` are tracked).
    pub rate: f64,
    /// Most pages tracked per guest (bounds memory: about 100 bytes each).
    pub max_samples: usize,
    /// Curve resolution in pages.
    pub bucket_pages: u64,
    /// The balloon-target rule's tolerance.
    pub tolerance: f64,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            rate: 1.0,
            max_samples: 16384,
            bucket_pages: 64,
            tolerance: 0.05,
        }
    }
}

/// Events seen for one guest (blocks).
#[derive(Debug, Default)]
pub struct Counts {
    pub swap_outs: AtomicU64,
    pub swap_ins: AtomicU64,
    pub frees: AtomicU64,
    pub reads: AtomicU64,
}

#[derive(Debug)]
struct Vm {
    ghost: Mutex<GhostShards>,
    counts: Counts,
}

/// Every guest's estimator; attach it to the disk layers as their [`AccessObserver`].
#[derive(Debug)]
pub struct WorkingSets {
    cfg: LiveConfig,
    vms: Mutex<BTreeMap<DomId, Arc<Vm>>>,
}

/// The key of `block` of `device` for `access`.
pub fn key(device: u16, access: Access, block: u64) -> u64 {
    let kind = u64::from(access != Access::Read);
    kind << 63 | u64::from(device) << 47 | (block & ((1 << 47) - 1))
}

/// What the curve of one guest says now.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    /// The guest's memory now (the curve's first size).
    pub current_kib: u64,
    /// Distance between the curve's points.
    pub bucket_kib: u64,
    /// Miss ratio at `current_kib + i · bucket_kib`; the last is the asymptote.
    pub ratios: Vec<f64>,
    pub wss_kib: u64,
    pub balloon_target_kib: u64,
    pub remote_share_kib: u64,
    /// Sampled references behind the curve.
    pub samples: u64,
    /// Swap-ins (refaults) and disk reads seen.
    pub swap_ins: u64,
    pub reads: u64,
    /// Sampling rate now.
    pub rate: f64,
    /// Unix time of the estimate, seconds.
    pub updated: u64,
}

impl Estimate {
    /// Draw the recommendation from `curve` (over extra pages) for a guest of `current_kib`.
    pub fn from_curve(curve: &Mrc, current_kib: u64, tolerance: f64) -> Estimate {
        let extra_kib = |tol: f64| curve.recommend(tol) * PAGE_KIB;
        let target = current_kib + extra_kib(tolerance);
        let wss = (current_kib + extra_kib(WSS_TOLERANCE.min(tolerance))).max(target);
        let all = curve.ratios();
        // Wider buckets so at most MAX_POINTS points are published.
        let stride = (all.len() - 1).div_ceil(MAX_POINTS - 1).max(1);
        let points = (all.len() - 1).div_ceil(stride) + 1;
        let ratios = (0..points)
            .map(|i| all[(i * stride).min(all.len() - 1)])
            .collect();
        Estimate {
            current_kib,
            bucket_kib: curve.bucket() * stride as u64 * PAGE_KIB,
            ratios,
            wss_kib: wss,
            balloon_target_kib: target,
            remote_share_kib: target - current_kib,
            samples: curve.references().round() as u64,
            swap_ins: 0,
            reads: 0,
            rate: 1.0,
            updated: 0,
        }
    }

    /// The published curve as an [`Mrc`] over extra pages (for plotting).
    pub fn curve(&self) -> Mrc {
        Mrc::from_ratios((self.bucket_kib / PAGE_KIB).max(1), &self.ratios)
    }
}

impl WorkingSets {
    pub fn new(cfg: LiveConfig) -> WorkingSets {
        WorkingSets {
            cfg,
            vms: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn config(&self) -> &LiveConfig {
        &self.cfg
    }

    /// Start estimating `dom` (it is also added by its first event).
    pub fn track(&self, dom: DomId) {
        self.vm(dom);
    }

    /// Domains estimated.
    pub fn domains(&self) -> Vec<DomId> {
        self.vms.lock().keys().copied().collect()
    }

    fn vm(&self, dom: DomId) -> Arc<Vm> {
        self.vms
            .lock()
            .entry(dom)
            .or_insert_with(|| {
                let c = &self.cfg;
                Arc::new(Vm {
                    ghost: Mutex::new(GhostShards::new(c.max_samples, c.rate, c.bucket_pages)),
                    counts: Counts::default(),
                })
            })
            .clone()
    }

    /// The estimate for `dom` at `current_kib` of memory (`updated` left 0), if tracked.
    pub fn estimate(&self, dom: DomId, current_kib: u64) -> Option<Estimate> {
        let vm = self.vms.lock().get(&dom)?.clone();
        let (curve, rate) = {
            let g = vm.ghost.lock();
            (g.curve(current_kib / PAGE_KIB), g.rate())
        };
        let mut e = Estimate::from_curve(&curve, current_kib, self.cfg.tolerance);
        e.swap_ins = vm.counts.swap_ins.load(Relaxed);
        e.reads = vm.counts.reads.load(Relaxed);
        e.rate = rate;
        Some(e)
    }
}

impl AccessObserver for WorkingSets {
    fn observe(&self, source: Source, access: Access, blocks: std::ops::Range<u64>) {
        let vm = self.vm(source.dom);
        let n = blocks.end - blocks.start;
        let counter = match access {
            Access::SwapOut => &vm.counts.swap_outs,
            Access::SwapIn => &vm.counts.swap_ins,
            Access::Free => &vm.counts.frees,
            Access::Read => &vm.counts.reads,
        };
        counter.fetch_add(n, Relaxed);
        let mut g = vm.ghost.lock();
        for b in blocks {
            let k = key(source.device, access, b);
            match access {
                Access::SwapOut => g.evict(k),
                Access::SwapIn => {
                    g.refault(k);
                }
                Access::Free => g.forget(k),
                Access::Read => {
                    g.read(k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_kinds_and_devices_apart() {
        let a = key(1, Access::SwapOut, 5);
        assert_eq!(a, key(1, Access::SwapIn, 5));
        assert_eq!(a, key(1, Access::Free, 5));
        assert_ne!(a, key(1, Access::Read, 5));
        assert_ne!(a, key(2, Access::SwapOut, 5));
    }

    /// A guest cycling over 1500 swap slots while holding 1000 of them resident: refaults at
    /// depth 500 pages, so the target is current + 2000 KiB (rounded to a 256 KiB bucket).
    #[test]
    fn swap_traffic_becomes_a_recommendation() {
        let sets = WorkingSets::new(LiveConfig::default());
        let src = Source { dom: 7, device: 0 };
        let (w, m) = (1500u64, 1000u64);
        // Warm-up: pages 0..m are resident, m..w on swap (m evicted first).
        sets.observe(src, Access::SwapOut, m..w);
        // Every access of the loop misses: p comes back, the LRU page p - m goes out.
        for i in 0..10 * w {
            let p = (m + i) % w;
            sets.observe(src, Access::SwapIn, p..p + 1);
            let victim = (p + w - m) % w;
            sets.observe(src, Access::SwapOut, victim..victim + 1);
        }
        let e = sets.estimate(7, 32768).unwrap();
        assert_eq!(e.current_kib, 32768);
        let extra = e.balloon_target_kib - 32768;
        assert!((2000..=2256).contains(&extra), "{e:?}");
        assert_eq!(e.remote_share_kib, extra);
        assert!(e.wss_kib >= e.balloon_target_kib);
        assert!(e.ratios.len() <= MAX_POINTS && e.ratios[0] > 0.99, "{e:?}");
        assert_eq!(e.swap_ins, 10 * w);
        assert!(sets.estimate(8, 1).is_none());
    }

    #[test]
    fn a_long_curve_is_published_in_wider_buckets() {
        // Binary fractions, so the sums behind the curve are exact.
        let ratios: Vec<f64> = (0..=64).map(|i| f64::from(64 - i) / 64.0).collect();
        let mrc = Mrc::from_ratios(1, &ratios);
        let e = Estimate::from_curve(&mrc, 1000, 4.0 / 64.0);
        assert!(e.ratios.len() <= MAX_POINTS, "{}", e.ratios.len());
        assert_eq!(e.bucket_kib, 2 * PAGE_KIB);
        assert_eq!(*e.ratios.last().unwrap(), 0.0);
        // All but 4/64 of the misses are gone at 60 extra pages, all at 64.
        assert_eq!(e.balloon_target_kib, 1000 + 60 * PAGE_KIB);
        assert_eq!(e.wss_kib, 1000 + 64 * PAGE_KIB);
        assert_eq!(e.remote_share_kib, 60 * PAGE_KIB);
    }
}
