//! `xc_domaininfo_t` = `struct xen_domctl_getdomaininfo` of Xen 4.17 (domctl interface
//! version 0x15), as filled by `xc_domain_getinfolist`.

/// 112 bytes on x86_64.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DomainInfoRaw {
    pub domain: u16,
    pub pad1: u16,
    pub flags: u32,
    pub tot_pages: u64,
    pub max_pages: u64,
    pub outstanding_pages: u64,
    pub shr_pages: u64,
    pub paged_pages: u64,
    pub shared_info_frame: u64,
    pub cpu_time: u64,
    pub nr_online_vcpus: u32,
    pub max_vcpu_id: u32,
    pub ssidref: u32,
    pub handle: [u8; 16],
    pub cpupool: u32,
    pub gpaddr_bits: u8,
    pub pad2: [u8; 7],
    /// `struct xen_arch_domainconfig` (x86: emulation_flags, misc_flags).
    pub arch_config: [u32; 2],
}
