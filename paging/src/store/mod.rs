//! Where evicted pages live: the [`PageStore`] trait and its implementations.
//!
//! - [`MemoryStore`]: a map in this process (tests, and a pager without a memory server).
//! - [`MemserverStore`]: the persistent pool of a set of memory servers through the
//!   replicating client, one namespace per domain.
//!
//! A store holds the only copy of an evicted page, so `put_batch` returns only when the
//! pages are safely stored (for the memory server: on every replica) and fails otherwise.

mod memory;
mod memserver;

pub use memory::MemoryStore;
pub use memserver::MemserverStore;

use remoca_xen::{DomId, Gfn};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store has no copy of the page.
    #[error("page {gfn:#x} of domain {dom} is not in the store")]
    Missing { dom: DomId, gfn: Gfn },
    /// The store (or every replica of this page) cannot be reached.
    #[error("page store unavailable")]
    Unavailable {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A store of 4 KiB guest pages keyed by (domain, gfn).
pub trait PageStore: Send + Sync + std::fmt::Debug {
    /// Store pages; returns once every page is safely stored.
    ///
    /// # Errors
    /// `Unavailable` when the pages could not all be stored (none should be evicted).
    fn put_batch(&self, dom: DomId, pages: &[(Gfn, &[u8])]) -> Result<(), StoreError>;
    /// Fetch one page.
    ///
    /// # Errors
    /// `Missing`, or `Unavailable` when no copy can be reached.
    fn get(&self, dom: DomId, gfn: Gfn) -> Result<Vec<u8>, StoreError>;
    /// Forget pages that are back in the guest (best effort).
    ///
    /// # Errors
    /// `Unavailable`.
    fn remove(&self, dom: DomId, gfns: &[Gfn]) -> Result<(), StoreError>;
    /// One line for status output.
    fn describe(&self) -> String;
}
