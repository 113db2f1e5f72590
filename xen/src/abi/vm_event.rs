//! `vm_event_request_t` / `vm_event_response_t` (`xen/vm_event.h`), the 400-byte entry of
//! the 8-slot mem_paging ring.

/// `VM_EVENT_INTERFACE_VERSION` of Xen 4.15-4.17. Responses with any other version are
/// dropped by the hypervisor (Xen 4.17's own xenpaging forgets to set it).
pub const INTERFACE_VERSION: u32 = 7;
pub const FLAG_VCPU_PAUSED: u32 = 1 << 0;
pub const REASON_MEM_PAGING: u32 = 3;
/// `MEM_PAGING_DROP_PAGE`: the guest dropped the page; no need to load it.
pub const PAGING_DROP_PAGE: u32 = 1 << 0;
/// `MEM_PAGING_EVICT_FAIL`.
pub const PAGING_EVICT_FAIL: u32 = 1 << 1;
/// `HVM_PARAM_PAGING_RING_PFN`.
pub const HVM_PARAM_PAGING_RING_PFN: i32 = 27;

/// `struct vm_event_paging`, the `u` member for mem_paging events.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Paging {
    pub gfn: u64,
    pub p2mt: u32,
    pub flags: u32,
}

/// `vm_event_request_t` and `vm_event_response_t` (one type in Xen).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmEvent {
    pub version: u32,
    pub flags: u32,
    pub reason: u32,
    pub vcpu_id: u32,
    pub altp2m_idx: u16,
    pub pad: [u16; 3],
    /// The `u` union (32 bytes); for mem_paging it starts with a [`Paging`].
    pub u: [u64; 4],
    /// The `data` union (registers / emulation data), unused by paging.
    pub data: [u64; 43],
}

impl Default for VmEvent {
    fn default() -> Self {
        VmEvent {
            version: INTERFACE_VERSION,
            flags: 0,
            reason: 0,
            vcpu_id: 0,
            altp2m_idx: 0,
            pad: [0; 3],
            u: [0; 4],
            data: [0; 43],
        }
    }
}

impl VmEvent {
    /// A mem_paging event for `gfn`.
    pub fn paging(vcpu_id: u32, flags: u32, p: Paging) -> Self {
        let mut ev = VmEvent {
            reason: REASON_MEM_PAGING,
            vcpu_id,
            flags,
            ..VmEvent::default()
        };
        ev.set_paging(p);
        ev
    }

    /// The `u.mem_paging` member.
    pub fn paging_data(&self) -> Paging {
        Paging {
            gfn: self.u[0],
            p2mt: self.u[1] as u32,
            flags: (self.u[1] >> 32) as u32,
        }
    }

    pub fn set_paging(&mut self, p: Paging) {
        self.u[0] = p.gfn;
        self.u[1] = u64::from(p.p2mt) | (u64::from(p.flags) << 32);
    }

    /// The response a pager sends for this request: same vCPU, flags and gfn, and the
    /// interface version set.
    pub fn response(&self) -> Self {
        VmEvent {
            version: INTERFACE_VERSION,
            ..*self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_paging_member() {
        assert_eq!(core::mem::size_of::<VmEvent>(), 400);
        let ev = VmEvent::paging(
            1,
            FLAG_VCPU_PAUSED,
            Paging {
                gfn: 0x1234,
                p2mt: 9,
                flags: PAGING_DROP_PAGE,
            },
        );
        let p = ev.paging_data();
        assert_eq!((p.gfn, p.p2mt, p.flags), (0x1234, 9, PAGING_DROP_PAGE));
        let mut stale = ev;
        stale.version = 0;
        assert_eq!(stale.response().version, INTERFACE_VERSION);
    }
}
