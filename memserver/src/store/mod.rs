//! The page store: two pools of dashmap-sharded namespaces, bounded by a byte capacity and by
//! a free-host-memory headroom.
//!
//! Invariants:
//! - `used` (values plus [`namespace::ENTRY_OVERHEAD`] per page) never exceeds the current
//!   `limit`; room is reserved with a compare-and-swap before a page is inserted.
//! - `limit = min(capacity, used + MemAvailable - headroom)`, recomputed from
//!   [`HostMemory`] every 100 ms or after 32 MiB of growth; when the host shrinks below the
//!   headroom, ephemeral pages are evicted to get back under.
//! - The persistent pool never loses a page to eviction: a PUT that does not fit (after
//!   evicting every evictable ephemeral page) fails with [`PutError::PersistentFull`].
//! - The ephemeral pool evicts with CLOCK ([`clock`]); its PUT fails with
//!   [`PutError::NoSpace`] only when persistent pages fill the whole limit.
//! - Each page is charged and released exactly once: removal (delete, evict, drop, overwrite)
//!   goes through an atomic map removal and releases what it removed.

pub mod clock;
pub mod counters;
pub mod host_memory;
pub mod namespace;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use thiserror::Error;

use crate::protocol::control::{NamespaceStats, StatsSnapshot, MAX_STATS_NAMESPACES};
use crate::protocol::Pool;
use clock::Clock;
use counters::Counters;
pub use host_memory::{HostMemory, ProcMeminfo};
use namespace::{cost_of, Entry, Namespace};

const RESAMPLE_EVERY: Duration = Duration::from_millis(100);
const RESAMPLE_GROWTH: u64 = 32 << 20;

/// Validated store settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    /// Most bytes the store may hold.
    pub capacity: u64,
    /// Keep at least this many bytes of host memory available (`MemAvailable`).
    pub headroom: u64,
}

/// Why a PUT was refused.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum PutError {
    #[error("persistent pool is full")]
    PersistentFull,
    #[error("no room for an ephemeral page")]
    NoSpace,
}

#[derive(Debug, Default)]
struct PoolState {
    namespaces: DashMap<u64, Arc<Namespace>>,
    counters: Counters,
}

#[derive(Debug)]
struct Sample {
    at: Instant,
    used: u64,
}

/// The shared page store. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Store {
    config: StoreConfig,
    host: Arc<dyn HostMemory>,
    used: AtomicU64,
    peak: AtomicU64,
    limit: AtomicU64,
    host_available: AtomicU64,
    sample: Mutex<Sample>,
    /// Lock-free copies of `sample` for the hot path: nanoseconds since `started`, and used.
    sampled_at: AtomicU64,
    sampled_used: AtomicU64,
    generation: AtomicU64,
    pools: [PoolState; 2],
    clock: Clock,
    started: Instant,
    connections: AtomicU64,
}

impl Store {
    /// A store bounded by `config`, reading free memory from `host`.
    pub fn new(config: StoreConfig, host: Arc<dyn HostMemory>) -> Store {
        let s = Store {
            config,
            host,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            limit: AtomicU64::new(0),
            host_available: AtomicU64::new(0),
            sample: Mutex::new(Sample {
                at: Instant::now(),
                used: 0,
            }),
            sampled_at: AtomicU64::new(0),
            sampled_used: AtomicU64::new(0),
            generation: AtomicU64::new(1),
            pools: Default::default(),
            clock: Clock::default(),
            started: Instant::now(),
            connections: AtomicU64::new(0),
        };
        s.resample();
        s
    }

    /// A store that reads `/proc/meminfo`.
    pub fn with_proc_meminfo(config: StoreConfig) -> Store {
        Store::new(config, Arc::new(ProcMeminfo))
    }

    pub fn config(&self) -> StoreConfig {
        self.config
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// The most bytes ever held at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Relaxed)
    }

    /// The current ceiling (capacity or what the headroom allows, whichever is lower).
    pub fn limit(&self) -> u64 {
        self.limit.load(Relaxed)
    }

    /// Recompute `limit` from the host's free memory.
    fn resample(&self) {
        let Some(mut s) = self.sample.try_lock() else {
            return; // another thread is sampling
        };
        let used = self.used.load(Relaxed);
        let limit = match self.host.available() {
            Ok(avail) => {
                self.host_available.store(avail, Relaxed);
                (used + avail).saturating_sub(self.config.headroom)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read host free memory; keeping the last limit");
                return;
            }
        };
        self.limit.store(limit.min(self.config.capacity), Relaxed);
        s.at = Instant::now();
        s.used = used;
        self.sampled_at
            .store(self.started.elapsed().as_nanos() as u64, Relaxed);
        self.sampled_used.store(used, Relaxed);
        drop(s);
        // The host shrank under us: give back ephemeral pages until under the limit again.
        while self.used.load(Relaxed) > self.limit.load(Relaxed) {
            if !self.evict_one() {
                break;
            }
        }
    }

    fn maybe_resample(&self) {
        let now = self.started.elapsed().as_nanos() as u64;
        let due = now.saturating_sub(self.sampled_at.load(Relaxed))
            >= RESAMPLE_EVERY.as_nanos() as u64
            || self
                .used
                .load(Relaxed)
                .abs_diff(self.sampled_used.load(Relaxed))
                >= RESAMPLE_GROWTH;
        if due {
            self.resample();
        }
    }

    fn release(&self, cost: u64) {
        self.used.fetch_sub(cost, Relaxed);
    }

    /// Reserve `n` bytes, evicting ephemeral pages as needed. `false` if impossible.
    fn reserve(&self, n: u64) -> bool {
        self.maybe_resample();
        loop {
            let used = self.used.load(Relaxed);
            let limit = self.limit.load(Relaxed);
            if used + n <= limit {
                if self
                    .used
                    .compare_exchange_weak(used, used + n, Relaxed, Relaxed)
                    .is_ok()
                {
                    self.peak.fetch_max(used + n, Relaxed);
                    return true;
                }
                continue;
            }
            if !self.evict_one() {
                return false;
            }
        }
    }

    /// Evict one ephemeral page. `false` when nothing is evictable.
    fn evict_one(&self) -> bool {
        let pool = &self.pools[Pool::Ephemeral.index()];
        match self.clock.evict_one(&pool.namespaces) {
            Some((ev, ns)) => {
                self.release(ev.cost);
                ns.counters.remove_page(ev.cost);
                Counters::bump(&ns.counters.evictions);
                pool.counters.remove_page(ev.cost);
                Counters::bump(&pool.counters.evictions);
                true
            }
            None => false,
        }
    }

    fn namespace(&self, pool: Pool, namespace: u64) -> Arc<Namespace> {
        let map = &self.pools[pool.index()].namespaces;
        if let Some(ns) = map.get(&namespace) {
            return Arc::clone(&ns);
        }
        Arc::clone(&map.entry(namespace).or_default())
    }

    fn existing(&self, pool: Pool, namespace: u64) -> Option<Arc<Namespace>> {
        self.pools[pool.index()]
            .namespaces
            .get(&namespace)
            .map(|n| Arc::clone(&n))
    }

    /// Store `value` under (pool, namespace, key), replacing any previous value.
    ///
    /// # Errors
    /// [`PutError::PersistentFull`] or [`PutError::NoSpace`] when it does not fit.
    pub fn put(&self, pool: Pool, namespace: u64, key: u64, value: Bytes) -> Result<(), PutError> {
        let ps = &self.pools[pool.index()];
        Counters::bump(&ps.counters.puts);
        let ns = self.namespace(pool, namespace);
        Counters::bump(&ns.counters.puts);
        let cost = cost_of(value.len());
        // Charge only the growth over the page being replaced, so rewriting a page in a full
        // persistent pool still succeeds.
        let guess = ns.pages.get(&key).map_or(0, |e| e.cost());
        let reserved = cost.saturating_sub(guess);
        if reserved > 0 && !self.reserve(reserved) {
            Counters::bump(&ps.counters.refused);
            Counters::bump(&ns.counters.refused);
            return Err(match pool {
                Pool::Persistent => PutError::PersistentFull,
                Pool::Ephemeral => PutError::NoSpace,
            });
        }
        let generation = self.generation.fetch_add(1, Relaxed);
        let old = ns.pages.insert(key, Entry::new(value, generation));
        let old_cost = old.as_ref().map_or(0, Entry::cost);
        // used += (cost - reserved) - old_cost, so in total used grew by cost - old_cost.
        let fix = (cost - reserved) as i64 - old_cost as i64;
        if fix >= 0 {
            self.used.fetch_add(fix as u64, Relaxed);
        } else {
            self.release((-fix) as u64);
        }
        if old.is_some() {
            ns.counters.remove_page(old_cost);
            ps.counters.remove_page(old_cost);
        }
        ns.counters.add_page(cost);
        ps.counters.add_page(cost);
        if pool == Pool::Ephemeral {
            let live = ps.counters.pages.load(Relaxed);
            self.clock
                .push(namespace, key, generation, live, &ps.namespaces);
        }
        if ns.dropped.load(Relaxed) {
            // Raced with DROP-NAMESPACE: the namespace is gone, so is this page.
            if let Some((_, e)) = ns.pages.remove_if(&key, |_, e| e.generation == generation) {
                self.release(e.cost());
                ps.counters.remove_page(e.cost());
            }
        }
        Ok(())
    }

    /// Fetch a page, marking it referenced for CLOCK.
    pub fn get(&self, pool: Pool, namespace: u64, key: u64) -> Option<Bytes> {
        let ps = &self.pools[pool.index()];
        let found = self.existing(pool, namespace).and_then(|ns| {
            let v = ns.pages.get(&key).map(|e| {
                e.touch();
                e.value.clone()
            });
            Counters::bump(if v.is_some() {
                &ns.counters.hits
            } else {
                &ns.counters.misses
            });
            v
        });
        Counters::bump(if found.is_some() {
            &ps.counters.hits
        } else {
            &ps.counters.misses
        });
        found
    }

    /// Delete a page; `true` if it existed.
    pub fn delete(&self, pool: Pool, namespace: u64, key: u64) -> bool {
        let ps = &self.pools[pool.index()];
        let Some(ns) = self.existing(pool, namespace) else {
            return false;
        };
        match ns.pages.remove(&key) {
            Some((_, e)) => {
                let c = e.cost();
                self.release(c);
                ns.counters.remove_page(c);
                Counters::bump(&ns.counters.deletes);
                ps.counters.remove_page(c);
                Counters::bump(&ps.counters.deletes);
                true
            }
            None => false,
        }
    }

    /// Free every page of `namespace` in both pools. Returns (pages, bytes) freed.
    pub fn drop_namespace(&self, namespace: u64) -> (u64, u64) {
        let (mut pages, mut bytes) = (0, 0);
        for pool in Pool::ALL {
            let ps = &self.pools[pool.index()];
            let Some((_, ns)) = ps.namespaces.remove(&namespace) else {
                continue;
            };
            ns.dropped.store(true, Relaxed);
            let keys: Vec<u64> = ns.pages.iter().map(|e| *e.key()).collect();
            for k in keys {
                if let Some((_, e)) = ns.pages.remove(&k) {
                    let c = e.cost();
                    self.release(c);
                    ps.counters.remove_page(c);
                    pages += 1;
                    bytes += c;
                }
            }
        }
        (pages, bytes)
    }

    /// Called by the server as connections come and go.
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    /// Counters per pool and per namespace (largest namespaces first).
    pub fn stats(&self) -> StatsSnapshot {
        self.resample();
        let mut by_ns: std::collections::HashMap<u64, NamespaceStats> = Default::default();
        for pool in Pool::ALL {
            for e in self.pools[pool.index()].namespaces.iter() {
                let s = by_ns.entry(*e.key()).or_insert_with(|| NamespaceStats {
                    namespace: *e.key(),
                    ..Default::default()
                });
                s.pools[pool.index()] = e.value().counters.snapshot();
            }
        }
        let mut namespaces: Vec<NamespaceStats> = by_ns.into_values().collect();
        namespaces.sort_by_key(|n| {
            (
                std::cmp::Reverse(n.pools[0].bytes + n.pools[1].bytes),
                n.namespace,
            )
        });
        let omitted = namespaces.len().saturating_sub(MAX_STATS_NAMESPACES) as u64;
        namespaces.truncate(MAX_STATS_NAMESPACES);
        StatsSnapshot {
            capacity: self.config.capacity,
            headroom: self.config.headroom,
            limit: self.limit(),
            used: self.used(),
            host_available: self.host_available.load(Relaxed),
            connections: self.connections.load(Relaxed),
            uptime_secs: self.started.elapsed().as_secs(),
            pools: [
                self.pools[0].counters.snapshot(),
                self.pools[1].counters.snapshot(),
            ],
            namespaces,
            namespaces_omitted: omitted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{OnceLock, Weak};

    /// A host with `total` bytes whose only consumer is the store itself.
    #[derive(Debug)]
    struct SmallHost {
        total: u64,
        store: OnceLock<Weak<Store>>,
    }

    impl HostMemory for SmallHost {
        fn available(&self) -> std::io::Result<u64> {
            let used = self
                .store
                .get()
                .and_then(Weak::upgrade)
                .map_or(0, |s| s.used());
            Ok(self.total - used)
        }
    }

    fn store(capacity: u64) -> Store {
        Store::new(
            StoreConfig {
                capacity,
                headroom: 0,
            },
            Arc::new(SmallHost {
                total: u64::MAX / 4,
                store: OnceLock::new(),
            }),
        )
    }

    fn page(b: u8) -> Bytes {
        Bytes::from(vec![b; 4096])
    }

    const PAGE_COST: u64 = 4096 + namespace::ENTRY_OVERHEAD;

    #[test]
    fn put_get_delete_and_overwrite() {
        let s = store(1 << 20);
        s.put(Pool::Ephemeral, 1, 10, page(1)).unwrap();
        assert_eq!(s.get(Pool::Ephemeral, 1, 10), Some(page(1)));
        assert_eq!(s.get(Pool::Persistent, 1, 10), None, "pools never mix");
        s.put(Pool::Ephemeral, 1, 10, page(2)).unwrap();
        assert_eq!(s.get(Pool::Ephemeral, 1, 10), Some(page(2)));
        assert_eq!(s.used(), PAGE_COST);
        assert!(s.delete(Pool::Ephemeral, 1, 10));
        assert!(!s.delete(Pool::Ephemeral, 1, 10));
        assert_eq!(s.used(), 0);
        let st = s.stats();
        assert_eq!(st.pools[0].hits, 2);
        assert_eq!(st.pools[0].misses, 0);
        assert_eq!(st.pools[1].misses, 1);
    }

    #[test]
    fn ephemeral_evicts_with_second_chance() {
        let s = store(4 * PAGE_COST);
        for k in 0..4 {
            s.put(Pool::Ephemeral, 1, k, page(k as u8)).unwrap();
        }
        // Key 0 is hot: it must survive the next insertion; key 1 is the victim.
        assert!(s.get(Pool::Ephemeral, 1, 0).is_some());
        s.put(Pool::Ephemeral, 1, 4, page(4)).unwrap();
        assert!(s.get(Pool::Ephemeral, 1, 0).is_some());
        assert!(s.get(Pool::Ephemeral, 1, 1).is_none());
        assert_eq!(s.stats().pools[0].evictions, 1);
        assert!(s.used() <= 4 * PAGE_COST);
    }

    #[test]
    fn persistent_never_evicts_and_refuses_when_full() {
        let s = store(4 * PAGE_COST);
        for k in 0..4 {
            s.put(Pool::Persistent, 1, k, page(1)).unwrap();
        }
        assert_eq!(
            s.put(Pool::Persistent, 1, 99, page(1)),
            Err(PutError::PersistentFull)
        );
        // Rewriting an existing page in a full pool still works.
        s.put(Pool::Persistent, 1, 3, page(9)).unwrap();
        assert_eq!(s.get(Pool::Persistent, 1, 3), Some(page(9)));
        assert_eq!(
            s.put(Pool::Ephemeral, 1, 5, page(1)),
            Err(PutError::NoSpace)
        );
        let st = s.stats();
        assert_eq!(st.pools[1].pages, 4);
        assert_eq!(st.pools[1].refused, 1);
        assert_eq!(st.pools[0].refused, 1);
    }

    #[test]
    fn persistent_displaces_ephemeral() {
        let s = store(4 * PAGE_COST);
        for k in 0..4 {
            s.put(Pool::Ephemeral, 1, k, page(1)).unwrap();
        }
        for k in 0..4 {
            s.put(Pool::Persistent, 1, k, page(2)).unwrap();
        }
        assert_eq!(s.stats().pools[0].pages, 0);
        assert_eq!(s.stats().pools[1].pages, 4);
    }

    #[test]
    fn drop_namespace_frees_both_pools() {
        let s = store(1 << 24);
        for k in 0..10 {
            s.put(Pool::Ephemeral, 7, k, page(1)).unwrap();
            s.put(Pool::Persistent, 7, k, page(1)).unwrap();
            s.put(Pool::Persistent, 8, k, page(1)).unwrap();
        }
        assert_eq!(s.drop_namespace(7), (20, 20 * PAGE_COST));
        assert_eq!(s.used(), 10 * PAGE_COST);
        assert!(s.get(Pool::Persistent, 7, 1).is_none());
        assert!(s.get(Pool::Persistent, 8, 1).is_some());
        assert_eq!(s.stats().pools[0].pages, 0);
        assert_eq!(s.drop_namespace(7), (0, 0));
    }

    #[test]
    fn twice_oversubscribed_never_exceeds_capacity_or_headroom() {
        // Host of 64 MiB, keep 24 MiB free => at most 40 MiB, although capacity says 1 GiB.
        let host = Arc::new(SmallHost {
            total: 64 << 20,
            store: OnceLock::new(),
        });
        let s = Arc::new(Store::new(
            StoreConfig {
                capacity: 1 << 30,
                headroom: 24 << 20,
            },
            host.clone(),
        ));
        host.store.set(Arc::downgrade(&s)).unwrap();
        s.resample();
        let ceiling = 40 << 20;
        let pages = 2 * ceiling / PAGE_COST; // 2x oversubscribed
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    let (mut ok, mut full) = (0u64, 0u64);
                    for k in (t..pages).step_by(4) {
                        // Two thirds persistent: that pool alone is oversubscribed 4/3.
                        let pool = if k % 3 == 0 {
                            Pool::Ephemeral
                        } else {
                            Pool::Persistent
                        };
                        match s.put(pool, t, k, page(k as u8)) {
                            Ok(()) => ok += 1,
                            Err(PutError::PersistentFull) => full += 1,
                            Err(PutError::NoSpace) => full += 1,
                        }
                        let _ = s.get(Pool::Ephemeral, t, k / 2);
                    }
                    (ok, full)
                })
            })
            .collect();
        let (mut ok, mut full) = (0, 0);
        for t in threads {
            let (o, f) = t.join().unwrap();
            ok += o;
            full += f;
        }
        assert!(s.peak() <= ceiling, "peak {} > {}", s.peak(), ceiling);
        assert!(ok + full == pages && ok > 0);
        let st = s.stats();
        assert!(st.pools[0].evictions > 0, "ephemeral pages were evicted");
        assert!(
            st.pools[1].refused > 0,
            "persistent admission refused when full"
        );
        // Accounting adds up: pool bytes equal what the store holds.
        assert_eq!(st.pools[0].bytes + st.pools[1].bytes, s.used());
        // Persistent pages never evicted: every accepted one is still there.
        assert_eq!(st.pools[1].evictions, 0);
    }

    #[test]
    fn small_host_bounds_ephemeral() {
        let host = Arc::new(SmallHost {
            total: 8 << 20,
            store: OnceLock::new(),
        });
        let s = Arc::new(Store::new(
            StoreConfig {
                capacity: 1 << 30,
                headroom: 0,
            },
            host.clone(),
        ));
        host.store.set(Arc::downgrade(&s)).unwrap();
        for k in 0..1000 {
            s.put(Pool::Ephemeral, 1, k, page(1)).unwrap();
        }
        assert!(s.used() <= 8 << 20);
    }
}
