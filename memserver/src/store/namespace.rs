//! One namespace (one VM) within one pool: its pages and counters.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use bytes::Bytes;
use dashmap::DashMap;

use super::counters::Counters;

/// Bytes charged per stored page on top of its value: map slot, `Bytes` header, CLOCK slot.
pub const ENTRY_OVERHEAD: u64 = 96;

/// A stored page.
#[derive(Debug)]
pub struct Entry {
    pub value: Bytes,
    /// Insertion generation: tells a CLOCK slot whether it still names this entry.
    pub generation: u64,
    /// CLOCK reference bit, set on every hit.
    pub referenced: AtomicBool,
}

impl Entry {
    pub fn new(value: Bytes, generation: u64) -> Entry {
        Entry {
            value,
            generation,
            referenced: AtomicBool::new(false),
        }
    }

    /// What this entry counts against the capacity.
    pub fn cost(&self) -> u64 {
        cost_of(self.value.len())
    }

    pub fn touch(&self) {
        if !self.referenced.load(Relaxed) {
            self.referenced.store(true, Relaxed);
        }
    }
}

pub fn cost_of(len: usize) -> u64 {
    len as u64 + ENTRY_OVERHEAD
}

/// The pages of one namespace in one pool.
#[derive(Debug, Default)]
pub struct Namespace {
    pub pages: DashMap<u64, Entry>,
    pub counters: Counters,
    /// Set once DROP-NAMESPACE has taken this namespace out of its pool; a PUT that raced
    /// with the drop sees it and takes its page back out.
    pub dropped: AtomicBool,
}
