//! `xengnttab_grant_copy_segment_t` (`xengnttab.h`).

/// `GNTCOPY_source_gref`: the source is a grant reference, not a local address.
pub const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
/// `GNTCOPY_dest_gref`.
pub const GNTCOPY_DEST_GREF: u16 = 1 << 1;

/// `{ grant_ref_t ref; uint16_t offset; uint16_t domid; }`, the foreign half of the union.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ForeignRef {
    pub gref: u32,
    pub offset: u16,
    pub domid: u16,
}

/// One side of a copy: a local virtual address or a foreign grant.
#[repr(C)]
#[derive(Clone, Copy)]
pub union CopyPtr {
    pub virt: *mut core::ffi::c_void,
    pub foreign: ForeignRef,
}

impl core::fmt::Debug for CopyPtr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("CopyPtr")
    }
}

/// 24 bytes on x86_64.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GrantCopySegment {
    pub source: CopyPtr,
    pub dest: CopyPtr,
    pub len: u16,
    pub flags: u16,
    pub status: i16,
    pub pad: u16,
}
