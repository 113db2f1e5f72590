//! CLOCK (second-chance) eviction for the ephemeral pool.
//!
//! Every insertion appends a slot `(namespace, key, generation)` to a FIFO. The hand pops
//! slots from the front: a slot whose page is gone or was overwritten (generation differs) is
//! dropped; a page whose reference bit is set gets the bit cleared and its slot goes to the
//! back (a second chance); otherwise the page is evicted. Stale slots left by deletes are
//! compacted away once they outnumber live pages, so the FIFO stays proportional to the pool.
//!
//! Lock order: the FIFO mutex may be held while taking a namespace's shard lock, never the
//! reverse (inserts push their slot after releasing the shard).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;

use super::namespace::Namespace;

#[derive(Debug, Clone, Copy)]
struct Slot {
    namespace: u64,
    key: u64,
    generation: u64,
}

/// What one eviction freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    pub namespace: u64,
    pub cost: u64,
}

#[derive(Debug, Default)]
pub struct Clock {
    fifo: Mutex<VecDeque<Slot>>,
}

impl Clock {
    /// Record a freshly inserted page; compact when stale slots dominate.
    pub fn push(
        &self,
        namespace: u64,
        key: u64,
        generation: u64,
        live_pages: u64,
        pool: &DashMap<u64, Arc<Namespace>>,
    ) {
        let mut q = self.fifo.lock();
        q.push_back(Slot {
            namespace,
            key,
            generation,
        });
        if q.len() as u64 > 2 * live_pages + 4096 {
            // Overwrites and deletes left stale slots; drop them here so the FIFO stays
            // proportional to the pool even when nothing is ever evicted. The threshold grows
            // with the pool, so this costs O(1) amortised per insertion.
            q.retain(|s| is_live(pool, s));
        }
    }

    /// Evict one page that has not been referenced since the hand last passed it.
    /// Returns `None` when the pool holds nothing evictable.
    pub fn evict_one(
        &self,
        pool: &DashMap<u64, Arc<Namespace>>,
    ) -> Option<(Evicted, Arc<Namespace>)> {
        let mut q = self.fifo.lock();
        // Every live slot is looked at most twice (once to clear its bit, once to evict).
        let mut budget = 2 * q.len() + 1;
        while let Some(slot) = q.pop_front() {
            budget -= 1;
            let Some(ns) = pool.get(&slot.namespace).map(|r| Arc::clone(&r)) else {
                continue;
            };
            let second_chance = match ns.pages.get(&slot.key) {
                None => continue,
                Some(e) if e.generation != slot.generation => continue,
                Some(e) => e.referenced.swap(false, Relaxed),
            };
            if second_chance {
                q.push_back(slot);
                if budget == 0 {
                    return None;
                }
                continue;
            }
            if let Some((_, e)) = ns
                .pages
                .remove_if(&slot.key, |_, e| e.generation == slot.generation)
            {
                return Some((
                    Evicted {
                        namespace: slot.namespace,
                        cost: e.cost(),
                    },
                    ns,
                ));
            }
            if budget == 0 {
                return None;
            }
        }
        None
    }

    /// Slots currently queued (live or stale).
    pub fn len(&self) -> usize {
        self.fifo.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn is_live(pool: &DashMap<u64, Arc<Namespace>>, s: &Slot) -> bool {
    pool.get(&s.namespace)
        .and_then(|ns| ns.pages.get(&s.key).map(|e| e.generation == s.generation))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::namespace::Entry;

    #[test]
    fn fifo_stays_proportional_under_overwrites_without_eviction() {
        let pool: DashMap<u64, Arc<Namespace>> = DashMap::new();
        let ns = Arc::new(Namespace::default());
        pool.insert(1, Arc::clone(&ns));
        let clock = Clock::default();
        for generation in 0..100_000u64 {
            ns.pages
                .insert(7, Entry::new(bytes::Bytes::new(), generation));
            clock.push(1, 7, generation, 1, &pool);
        }
        assert!(
            clock.len() <= 2 + 4096 + 1,
            "{} slots for one page",
            clock.len()
        );
        // The one live page is still evictable.
        assert!(clock.evict_one(&pool).is_some());
        assert!(ns.pages.is_empty());
    }
}
