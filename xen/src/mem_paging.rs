//! Hypervisor memory paging (xenpaging's mem_paging), optional.
//!
//! Stock Xen since 4.16 is built without it; [`MemPaging::enable`] then fails with the
//! errno that says why (see [`unavailable_reason`]).

use crate::error::Result;
use crate::mapping::Mapping;
use crate::types::{DomId, Gfn, Port};

/// The vm_event ring of a domain with paging enabled.
#[derive(Debug)]
pub struct PagingRing {
    /// One page: the shared ring of [`crate::abi::vm_event::VmEvent`] entries.
    pub ring: Mapping,
    /// The domain's port to bind with [`crate::EventChannelHandle::bind_interdomain`].
    pub remote_port: Port,
}

/// mem_paging capability.
pub trait MemPaging: Send + Sync {
    /// Enable paging for `dom` and map its vm_event ring.
    ///
    /// # Errors
    /// See [`unavailable_reason`] for the errnos that mean paging cannot work here.
    fn enable(&self, dom: DomId) -> Result<PagingRing>;
    /// Disable paging. With pages still out, Xen crashes the guest: page them in first.
    fn disable(&self, dom: DomId) -> Result<()>;
    /// Mark a page as a candidate for eviction. `EBUSY` if it is mapped or special.
    fn nominate(&self, dom: DomId, gfn: Gfn) -> Result<()>;
    /// Drop a nominated page. `EBUSY` if it was mapped or touched since nomination.
    fn evict(&self, dom: DomId, gfn: Gfn) -> Result<()>;
    /// Populate a paged-out page with `page` (4096 bytes).
    fn load(&self, dom: DomId, gfn: Gfn, page: &[u8]) -> Result<()>;
    /// Tell Xen responses are on the ring (after the event channel notify).
    fn resume(&self, dom: DomId) -> Result<()>;
}

/// What an errno from [`MemPaging::enable`] means for an operator.
pub fn unavailable_reason(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::ENOSYS => "the hypervisor was built without CONFIG_MEM_PAGING (stock Xen since 4.16)",
        libc::ENODEV => "the host has no hardware-assisted paging (HAP/EPT/NPT) for this guest",
        libc::EMLINK => "the guest has PCI passthrough devices",
        libc::EXDEV => "the guest uses populate-on-demand (memory < maxmem at boot)",
        libc::EOPNOTSUPP => "dom0 is PVH or the guest is not HVM",
        _ => return None,
    })
}
