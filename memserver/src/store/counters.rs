//! Lock-free counters kept per pool and per namespace.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::protocol::control::PoolCounters;

/// The live form of [`PoolCounters`].
#[derive(Debug, Default)]
pub struct Counters {
    pub pages: AtomicU64,
    pub bytes: AtomicU64,
    pub puts: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub deletes: AtomicU64,
    pub evictions: AtomicU64,
    pub refused: AtomicU64,
}

impl Counters {
    pub fn add_page(&self, bytes: u64) {
        self.pages.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }

    pub fn remove_page(&self, bytes: u64) {
        self.pages.fetch_sub(1, Relaxed);
        self.bytes.fetch_sub(bytes, Relaxed);
    }

    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> PoolCounters {
        PoolCounters {
            pages: self.pages.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            puts: self.puts.load(Relaxed),
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            deletes: self.deletes.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            refused: self.refused.load(Relaxed),
        }
    }
}
