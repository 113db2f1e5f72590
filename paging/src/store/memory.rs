//! An in-process page store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use remoca_xen::{DomId, Gfn};

use super::{PageStore, StoreError};

/// Pages in a hash map. [`MemoryStore::set_unavailable`] makes every call fail, as a lost
/// remote store would (for tests of the pager's failure paths).
#[derive(Debug, Default)]
pub struct MemoryStore {
    pages: Mutex<HashMap<(DomId, Gfn), Vec<u8>>>,
    unavailable: AtomicBool,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.pages.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Make the store fail every call (`true`) or work again (`false`).
    pub fn set_unavailable(&self, down: bool) {
        self.unavailable.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                source: "in-memory store switched off".into(),
            });
        }
        Ok(())
    }
}

impl PageStore for MemoryStore {
    fn put_batch(&self, dom: DomId, pages: &[(Gfn, &[u8])]) -> Result<(), StoreError> {
        self.check()?;
        let mut map = self.pages.lock();
        for (gfn, page) in pages {
            map.insert((dom, *gfn), page.to_vec());
        }
        Ok(())
    }

    fn get(&self, dom: DomId, gfn: Gfn) -> Result<Vec<u8>, StoreError> {
        self.check()?;
        self.pages
            .lock()
            .get(&(dom, gfn))
            .cloned()
            .ok_or(StoreError::Missing { dom, gfn })
    }

    fn remove(&self, dom: DomId, gfns: &[Gfn]) -> Result<(), StoreError> {
        self.check()?;
        let mut map = self.pages.lock();
        for g in gfns {
            map.remove(&(dom, *g));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("in-memory store, {} pages", self.len())
    }
}
