//! Victim selection: CLOCK (second chance) over the feedback a pager gets from Xen.
//!
//! A pager cannot read the guest's accessed bits, but it learns about use three ways: a
//! page faulted back in was just used; `nominate` answering `EBUSY` means the page is mapped
//! (by a backend or the guest's grant) and `evict` answering `EBUSY` means the guest
//! touched it between nomination and eviction. Each sets the page's reference bit. The hand
//! sweeps resident pages; a page with its bit set gets a second chance (bit cleared), a page
//! without is a victim. Pages that fail nomination for good (`EINVAL`: special or shared
//! pages) are excluded. xenpaging's linear sweep (or random pick) evicts the page a guest is
//! about to touch as readily as a cold one; CLOCK keeps recently faulted pages in.

use std::collections::HashSet;

use remoca_xen::Gfn;

const REFERENCED: u8 = 1;
const OUT: u8 = 2;
const EXCLUDED: u8 = 4;

/// CLOCK state over gfns `0..pages`.
#[derive(Debug, Clone)]
pub struct Clock {
    flags: Vec<u8>,
    hand: usize,
}

impl Clock {
    /// All pages resident, unreferenced.
    pub fn new(pages: u64) -> Self {
        Clock {
            flags: vec![0; pages as usize],
            hand: 0,
        }
    }

    pub fn pages(&self) -> u64 {
        self.flags.len() as u64
    }

    fn get(&mut self, gfn: Gfn) -> Option<&mut u8> {
        self.flags.get_mut(gfn as usize)
    }

    /// The page was used (faulted in, or busy at nominate/evict).
    pub fn referenced(&mut self, gfn: Gfn) {
        if let Some(f) = self.get(gfn) {
            *f |= REFERENCED;
        }
    }

    /// The page is out (not a candidate until it comes back).
    pub fn paged_out(&mut self, gfn: Gfn) {
        if let Some(f) = self.get(gfn) {
            *f = (*f | OUT) & !REFERENCED;
        }
    }

    /// The page is resident again, and was just used.
    pub fn paged_in(&mut self, gfn: Gfn) {
        if let Some(f) = self.get(gfn) {
            *f = (*f & !OUT) | REFERENCED;
        }
    }

    /// Never pick this page again (it cannot be paged).
    pub fn exclude(&mut self, gfn: Gfn) {
        if let Some(f) = self.get(gfn) {
            *f |= EXCLUDED;
        }
    }

    /// Up to `n` victims. At most two sweeps, so a fully referenced set still yields
    /// victims (their bits were cleared on the first pass) and the call is bounded.
    pub fn pick(&mut self, n: usize) -> Vec<Gfn> {
        let len = self.flags.len();
        let mut out = Vec::with_capacity(n);
        if len == 0 {
            return out;
        }
        let mut picked = HashSet::new();
        for _ in 0..2 * len {
            if out.len() == n {
                break;
            }
            let i = self.hand;
            self.hand = (self.hand + 1) % len;
            let f = &mut self.flags[i];
            if *f & (OUT | EXCLUDED) != 0 {
                continue;
            }
            if *f & REFERENCED != 0 {
                *f &= !REFERENCED;
                continue;
            }
            if picked.insert(i) {
                out.push(i as Gfn);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn referenced_pages_get_a_second_chance() {
        let mut c = Clock::new(8);
        for g in [0, 1, 2, 3] {
            c.referenced(g);
        }
        assert_eq!(c.pick(2), vec![4, 5]);
        c.paged_out(4);
        c.paged_out(5);
        // 6, 7 next; then the hand wraps and 0..3 lost their bits on the first pass.
        assert_eq!(c.pick(3), vec![6, 7, 0]);
        c.paged_in(4);
        c.exclude(1);
        let v = c.pick(8);
        assert!(!v.contains(&5), "paged-out pages are not candidates");
        assert!(!v.contains(&1), "excluded pages are not candidates");
        assert!(
            v.contains(&4),
            "a paged-in page loses its bit after one sweep"
        );
    }
}
