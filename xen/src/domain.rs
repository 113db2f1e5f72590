//! Domain control: what services need to know and do about domains.

use crate::error::Result;
use crate::types::DomId;

/// What `remoca xen info` shows about the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HypervisorInfo {
    pub major: u32,
    pub minor: u32,
    pub extra: String,
    pub capabilities: String,
    /// vm_event interface version responses must carry (7 on Xen 4.17).
    pub vm_event_version: u32,
}

/// Run state of a domain, from the `XEN_DOMINF_*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DomainFlags {
    pub dying: bool,
    pub hvm: bool,
    pub shutdown: bool,
    pub paused: bool,
    pub blocked: bool,
    pub running: bool,
    pub hap: bool,
}

impl DomainFlags {
    /// Decode `xen_domctl_getdomaininfo.flags`.
    pub fn from_raw(flags: u32) -> Self {
        let bit = |n: u32| flags & (1 << n) != 0;
        DomainFlags {
            dying: bit(0),
            hvm: bit(1),
            shutdown: bit(2),
            paused: bit(3),
            blocked: bit(4),
            running: bit(5),
            hap: bit(8),
        }
    }

    /// The state column of `xl list`: r b p s c d.
    pub fn xl_state(&self) -> String {
        let mut s = String::with_capacity(6);
        for (set, c) in [
            (self.running, 'r'),
            (self.blocked, 'b'),
            (self.paused, 'p'),
            (self.shutdown, 's'),
            (false, 'c'),
            (self.dying, 'd'),
        ] {
            s.push(if set { c } else { '-' });
        }
        s
    }
}

/// One domain as the hypervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub domid: DomId,
    /// From xenstore `/local/domain/<id>/name`; empty when unknown.
    pub name: String,
    pub flags: DomainFlags,
    pub tot_pages: u64,
    pub max_pages: u64,
    pub paged_pages: u64,
    pub online_vcpus: u32,
    pub cpu_time_ns: u64,
    pub handle: [u8; 16],
}

/// Domain control capability.
pub trait DomainControl: Send + Sync {
    /// The hypervisor's version and capabilities.
    fn hypervisor(&self) -> Result<HypervisorInfo>;
    /// Every domain, in id order. Names are filled in by [`crate::Host::domains`].
    fn list(&self) -> Result<Vec<DomainInfo>>;
    /// One domain. `Error::NoDomain` if it does not exist.
    fn info(&self, dom: DomId) -> Result<DomainInfo>;
    /// Pause all vCPUs of a domain (nesting, like `xl pause`).
    fn pause(&self, dom: DomId) -> Result<()>;
    /// Undo one pause.
    fn unpause(&self, dom: DomId) -> Result<()>;
    /// Raise or lower the domain's maximum memory (KiB), as `xl mem-max` does.
    fn set_max_memory(&self, dom: DomId, kib: u64) -> Result<()>;
}
