//! A SHARDS-sampled ghost LRU stack: the miss-ratio curve of the pages a guest faults back
//! in, measured in memory *beyond* what the guest has now (REMOCA's ghost buffer).
//!
//! ```text
//!   evict(k)    k left guest memory: push k on top of the ghost stack (not a reference)
//!   refault(k)  k came back: a reference at depth d (1 = the last page evicted); k leaves
//!               the stack (it is resident again)
//!   read(k)     a page-cache miss for disk block k: a reference at depth d if k is in the
//!               stack, else a cold miss; k goes on top (see below)
//!   forget(k)   k holds nothing any more (a freed swap slot): it leaves the stack
//! ```
//!
//! **Why depth = extra memory.** In a guest whose memory of `M` pages is managed by LRU and
//! whose evicted pages are all written out (swap), a page `k` that faults back had, at that
//! moment, the `M` resident pages and every page evicted after it (and not yet back) used
//! more recently than itself. Its LRU stack distance is therefore `M + d`, where `d` is its
//! depth in the ghost stack: with `d` more pages of memory it would have been a hit. The
//! unit tests check this identity against exact stack distances. Depths of sampled keys are
//! scaled by `1/R` as in SHARDS (see [`super::Shards`]).
//!
//! **Disk reads.** A guest drops clean page-cache pages without telling anyone, so a disk
//! block's eviction is not seen; its *read* is pushed instead (standing for the eviction
//! that read causes), and a re-read's depth `d` counts what entered the stack since that
//! read. Those are the evictions since the block's previous read; under LRU the block itself
//! survived up to `M − 1` of them (fewer when pages below it were hit meanwhile), so the
//! extra memory that would have kept it lies between `d − M` and `d`. The curve takes
//! `d − M` (exact for a guest that re-reads in a loop, an under-estimate when a hot set is
//! hit between reads): re-read depths are kept apart and shifted by the guest's memory
//! when the curve is drawn ([`GhostShards::curve`]). First reads are cold misses (no size
//! helps).
//!
//! **Bounded memory.** At most `max_keys` keys are tracked: when more would be, the sampling
//! threshold is lowered to drop the keys of largest hash and what was counted is rescaled
//! (fixed-size SHARDS). The curve carries the `SHARDS_adj` correction.
//!
//! The curve's size axis is extra pages (0 = the guest's current memory); its ratio is the
//! fraction of the observed misses (refaults and disk reads) that would still miss.

use std::collections::BTreeSet;

use super::stack::StackDistance;
use super::{mix, Mrc, MODULUS};

/// The estimator. See the module docs.
#[derive(Debug, Clone)]
pub struct GhostShards {
    threshold: u64,
    max_keys: usize,
    sd: StackDistance,
    /// Tracked keys by hash, so the largest can be dropped when the threshold falls.
    tracked: BTreeSet<(u64, u64)>,
    /// Refault depths (extra pages) and cold misses.
    mrc: Mrc,
    /// Re-read depths, not yet shifted by the guest's memory.
    reread: Mrc,
    /// Every reference (refault or read) seen, sampled or not.
    refs: u64,
}

impl GhostShards {
    /// Sample keys at `rate` (0 < rate ≤ 1), lowered as needed to track at most `max_keys`;
    /// curve resolution `bucket` pages.
    pub fn new(max_keys: usize, rate: f64, bucket: u64) -> Self {
        GhostShards {
            threshold: ((rate.clamp(0.0, 1.0) * MODULUS as f64) as u64).max(1),
            max_keys: max_keys.max(1),
            sd: StackDistance::new(),
            tracked: BTreeSet::new(),
            mrc: Mrc::new(bucket),
            reread: Mrc::new(bucket),
            refs: 0,
        }
    }

    /// The current sampling rate.
    pub fn rate(&self) -> f64 {
        self.threshold as f64 / MODULUS as f64
    }

    /// Keys tracked now (at most `max_keys`).
    pub fn tracked(&self) -> usize {
        self.sd.len()
    }

    /// References (refaults and reads) seen, sampled or not.
    pub fn references(&self) -> u64 {
        self.refs
    }

    /// The key's hash when it is sampled.
    fn sampled(&self, key: u64) -> Option<u64> {
        let h = mix(key) % MODULUS;
        (h < self.threshold).then_some(h)
    }

    /// `key` left guest memory (a swap-out).
    pub fn evict(&mut self, key: u64) {
        if let Some(h) = self.sampled(key) {
            self.push(h, key);
        }
    }

    /// `key` was faulted back in. Returns its depth (sampled keys only, unscaled), or
    /// `None` when it is not sampled or was evicted before observation began (then it
    /// counts as a miss at every size).
    pub fn refault(&mut self, key: u64) -> Option<u64> {
        self.refs += 1;
        self.sampled(key)?;
        let rate = self.rate();
        let depth = if self.is_tracked(key) {
            let d = self.sd.access(key);
            self.untrack(key);
            d
        } else {
            None
        };
        self.mrc.add(depth.map(|d| d as f64 / rate), 1.0);
        depth
    }

    /// A page-cache miss for disk block `key`. Returns its depth when it was in the stack.
    pub fn read(&mut self, key: u64) -> Option<u64> {
        self.refs += 1;
        let h = self.sampled(key)?;
        let rate = self.rate();
        let depth = self.push(h, key);
        match depth {
            Some(d) => self.reread.add(Some(d as f64 / rate), 1.0),
            None => self.mrc.add(None, 1.0),
        }
        depth
    }

    /// `key` holds nothing now (a discarded swap slot).
    pub fn forget(&mut self, key: u64) {
        if self.sampled(key).is_some() {
            self.untrack(key);
        }
    }

    fn is_tracked(&self, key: u64) -> bool {
        self.tracked.contains(&(mix(key) % MODULUS, key))
    }

    /// Put `key` (hash `h`) on top; its previous depth if it was in the stack.
    fn push(&mut self, h: u64, key: u64) -> Option<u64> {
        let depth = self.sd.access(key);
        if depth.is_none() {
            self.tracked.insert((h, key));
            while self.sd.len() > self.max_keys {
                self.lower_threshold();
            }
        }
        depth
    }

    fn untrack(&mut self, key: u64) {
        if self.tracked.remove(&(mix(key) % MODULUS, key)) {
            self.sd.remove(key);
        }
    }

    /// Drop the keys of the largest hash and rescale what was counted at the old rate.
    fn lower_threshold(&mut self) {
        let Some(&(top, _)) = self.tracked.last() else {
            return;
        };
        while let Some(&(h, k)) = self.tracked.last() {
            if h != top {
                break;
            }
            self.tracked.pop_last();
            self.sd.remove(k);
        }
        let factor = top as f64 / self.threshold as f64;
        self.threshold = top.max(1);
        self.mrc.scale(factor);
        self.reread.scale(factor);
    }

    /// The curve over extra pages for a guest of `memory_pages`, with the `SHARDS_adj`
    /// correction: refault depths as they are, re-read depths less `memory_pages` (at least
    /// the first bucket: the block did miss).
    pub fn curve(&self, memory_pages: u64) -> Mrc {
        let mut mrc = self.mrc.clone();
        let shift = (memory_pages / mrc.bucket) as usize;
        for (i, &w) in self.reread.hist.iter().enumerate() {
            let j = i.saturating_sub(shift);
            if j >= mrc.hist.len() {
                mrc.hist.resize(j + 1, 0.0);
            }
            mrc.hist[j] += w;
        }
        mrc.total += self.reread.total;
        mrc.adjust(self.refs as f64 * self.rate());
        mrc
    }

    /// Sampled references counted (after rescaling: an estimate of `references × rate`).
    pub fn samples(&self) -> f64 {
        self.mrc.references() + self.reread.references()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mrc::synthetic::{SplitMix, Zipf};
    use std::collections::{BTreeMap, HashMap};

    /// A guest with `frames` pages of LRU memory that swaps every evicted page: the swap
    /// traffic it causes for `trace`, and each reference's exact LRU stack distance.
    #[derive(Debug)]
    enum Event {
        Out(u64),
        In(u64, Option<u64>),
    }

    fn lru_guest(frames: usize, trace: impl IntoIterator<Item = u64>) -> Vec<Event> {
        let mut exact = StackDistance::new();
        let mut resident: HashMap<u64, u64> = HashMap::new();
        let mut by_time: BTreeMap<u64, u64> = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (t, page) in trace.into_iter().enumerate() {
            let t = t as u64;
            let dist = exact.access(page);
            if let Some(old) = resident.insert(page, t) {
                by_time.remove(&old);
            } else {
                // A page touched before is on swap: this miss reads it back (into a free
                // frame; the reclaim that keeps one free follows).
                if !seen.insert(page) {
                    out.push(Event::In(page, dist));
                }
                if resident.len() > frames {
                    let (_, victim) = by_time.pop_first().expect("memory is full");
                    resident.remove(&victim);
                    out.push(Event::Out(victim));
                }
            }
            by_time.insert(t, page);
        }
        out
    }

    #[test]
    fn depth_plus_memory_is_the_exact_stack_distance() {
        let frames = 200;
        let zipf = Zipf::new(1000, 0.8);
        let mut rng = SplitMix::new(5);
        let trace: Vec<u64> = (0..40_000).map(|_| zipf.sample(&mut rng)).collect();
        let mut g = GhostShards::new(usize::MAX, 1.0, 1);
        let mut refaults = 0;
        for e in lru_guest(frames, trace) {
            match e {
                Event::Out(p) => g.evict(p),
                Event::In(p, exact) => {
                    let depth = g.refault(p).expect("every evicted page is in the ghost");
                    assert_eq!(Some(frames as u64 + depth), exact, "page {p}");
                    refaults += 1;
                }
            }
        }
        assert!(refaults > 1000, "the trace must refault: {refaults}");
        assert_eq!(g.tracked() as u64, 1000 - frames as u64);
    }

    /// A guest cycling over W pages with M < W resident refaults every page at depth
    /// W − M: the curve falls to zero at W − M extra pages, and sampling keeps that.
    #[test]
    fn a_cycling_guest_is_recommended_its_working_set() {
        let (w, m) = (6000u64, 4000usize);
        let trace = (0..20 * w).map(|i| i % w);
        let events = lru_guest(m, trace);
        let mut exact = GhostShards::new(usize::MAX, 1.0, 64);
        let mut sampled = GhostShards::new(256, 0.2, 64);
        for e in &events {
            for g in [&mut exact, &mut sampled] {
                match e {
                    Event::Out(p) => g.evict(*p),
                    Event::In(p, _) => {
                        g.refault(*p);
                    }
                }
            }
        }
        let want = w - m as u64;
        let got = exact.curve(m as u64).recommend(0.05);
        assert!(want <= got && got <= want + 64, "exact: {got} vs {want}");
        assert!(sampled.tracked() <= 256);
        let got = sampled.curve(m as u64).recommend(0.05);
        let err = got.abs_diff(want) as f64 / want as f64;
        eprintln!(
            "cycling guest: extra {want} pages, sampled estimate {got} (rate {:.4})",
            sampled.rate()
        );
        assert!(err < 0.1, "sampled: {got} vs {want}");
        assert!(exact.curve(m as u64).miss_ratio(want / 2) > 0.99);
    }

    /// A page cache of M blocks under a guest re-reading F > M blocks in a loop: every read
    /// misses, the stack distance is F, so F − M more pages make them hits.
    #[test]
    fn a_rereading_guest_is_recommended_its_missing_cache() {
        let (f, m) = (1500u64, 1000u64);
        let mut g = GhostShards::new(usize::MAX, 1.0, 50);
        for i in 0..10 * f {
            g.read(i % f);
        }
        let c = g.curve(m);
        assert_eq!(c.recommend(0.05), f - m, "{:?}", c.ratios());
        // Only the first pass is cold: with enough memory 9 reads in 10 hit.
        assert!((c.asymptote() - 0.1).abs() < 1e-9);
        // Without the shift the re-reads would ask for the whole loop.
        assert_eq!(g.curve(0).recommend(0.05), f);
    }

    #[test]
    fn freed_slots_leave_and_reads_reuse_the_stack() {
        let mut g = GhostShards::new(usize::MAX, 1.0, 1);
        g.evict(1);
        g.evict(2);
        g.forget(2);
        assert_eq!(g.refault(1), Some(1), "slot 2 was freed, so 1 is on top");
        assert_eq!(g.refault(1), None, "1 is resident now");
        assert_eq!(g.read(10), None);
        g.evict(3);
        assert_eq!(g.read(10), Some(2));
        assert_eq!(g.references(), 4);
        // Two of the four references had a depth; the other two miss at every size.
        let c = g.curve(0);
        assert!((c.asymptote() - 0.5).abs() < 1e-9, "{:?}", c.ratios());
    }
}
