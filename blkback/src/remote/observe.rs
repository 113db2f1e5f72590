//! A hook through which the remote layers report the page traffic a guest causes, for
//! working-set estimation (`remoca_paging::mrc::live`).
//!
//! ```text
//!  SwapDisk ── write ─▶ SwapOut(blocks)   a guest page left guest memory
//!           ── read  ─▶ SwapIn(blocks)    it came back (a refault)
//!           ── discard / write-zeroes ─▶ Free(blocks)   the guest dropped it
//!  RemoteCache ── read ─▶ Read(blocks)    the guest's page cache missed these blocks
//! ```
//!
//! The layers only report; what the events mean is the observer's business. This crate
//! cannot depend on `remoca-paging` (that crate depends on this one), so the estimator
//! implements [`AccessObserver`] there and is attached here with the domain id whose guest
//! uses the disk. An observer is called on the I/O path after the request succeeded, with
//! the request's whole-block numbers; it must be cheap and must not block on I/O.

use std::sync::Arc;

use parking_lot::RwLock;
use remoca_xen::DomId;

/// What a guest did with some blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Blocks written to a swap device: pages evicted from guest memory.
    SwapOut,
    /// Blocks read from a swap device: evicted pages faulted back in.
    SwapIn,
    /// Blocks discarded or zeroed on a swap device: the swap slots hold nothing now.
    Free,
    /// Blocks read from a (cached) disk: misses of the guest's page cache.
    Read,
}

/// Who reported the blocks: the guest's domain and a device number the attacher chose
/// (distinct per disk of one domain, so two disks' block numbers are not confused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source {
    pub dom: DomId,
    pub device: u16,
}

/// Receives a layer's events. See the module docs.
pub trait AccessObserver: Send + Sync + std::fmt::Debug {
    /// `blocks` (4 KiB block numbers of the device) were accessed as `access`.
    fn observe(&self, source: Source, access: Access, blocks: std::ops::Range<u64>);
}

/// The observer attached to one layer, if any.
#[derive(Debug, Default)]
pub struct ObserverSlot {
    attached: RwLock<Option<(Source, Arc<dyn AccessObserver>)>>,
}

impl ObserverSlot {
    /// Report this layer's events to `observer` as coming from `source` (replacing any
    /// observer attached before).
    pub fn attach(&self, source: Source, observer: Arc<dyn AccessObserver>) {
        *self.attached.write() = Some((source, observer));
    }

    /// Stop reporting.
    pub fn detach(&self) {
        *self.attached.write() = None;
    }

    /// Report `blocks` as `access` (nothing when no observer is attached or the range is
    /// empty).
    pub fn emit(&self, access: Access, blocks: std::ops::Range<u64>) {
        if blocks.is_empty() {
            return;
        }
        if let Some((source, obs)) = &*self.attached.read() {
            obs.observe(*source, access, blocks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[derive(Debug, Default)]
    struct Log(Mutex<Vec<(Source, Access, std::ops::Range<u64>)>>);

    impl AccessObserver for Log {
        fn observe(&self, source: Source, access: Access, blocks: std::ops::Range<u64>) {
            self.0.lock().push((source, access, blocks));
        }
    }

    #[test]
    fn events_reach_the_attached_observer_only() {
        let slot = ObserverSlot::default();
        slot.emit(Access::Read, 0..1);
        let log = Arc::new(Log::default());
        let src = Source { dom: 3, device: 1 };
        slot.attach(src, log.clone());
        slot.emit(Access::SwapOut, 4..6);
        slot.emit(Access::SwapIn, 7..7);
        slot.detach();
        slot.emit(Access::SwapIn, 4..5);
        assert_eq!(*log.0.lock(), vec![(src, Access::SwapOut, 4..6)]);
    }
}
