//! The shared-ring header of `io/ring.h` (`DEFINE_RING_TYPES`).
//!
//! ```text
//!  0        4          8        12         16     20          64
//!  +--------+----------+--------+----------+------+-----------+----------------------
//!  |req_prod|req_event |rsp_prod|rsp_event | pvt  | pad[44]   | entries (union of
//!  +--------+----------+--------+----------+------+-----------+  request/response)
//! ```

/// The 64-byte header at the start of every shared ring page.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SringHeader {
    pub req_prod: u32,
    pub req_event: u32,
    pub rsp_prod: u32,
    pub rsp_event: u32,
    pub pvt: u32,
    pub pad: [u8; 44],
}

/// Byte offsets of the header fields, used by the ring code's atomic accesses.
pub const REQ_PROD: usize = 0;
pub const REQ_EVENT: usize = 4;
pub const RSP_PROD: usize = 8;
pub const RSP_EVENT: usize = 12;
/// Entries start here.
pub const ENTRIES: usize = 64;

/// `__CONST_RING_SIZE`: entries that fit in `bytes`, rounded down to a power of two.
pub const fn ring_size(bytes: usize, entry: usize) -> u32 {
    if bytes <= ENTRIES || entry == 0 {
        return 0;
    }
    let n = (bytes - ENTRIES) / entry;
    if n == 0 {
        return 0;
    }
    1 << (usize::BITS - 1 - n.leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkif_ring_sizes_match_xen() {
        assert_eq!(ring_size(4096, 112), 32);
        assert_eq!(ring_size(2 * 4096, 112), 64);
        assert_eq!(ring_size(32 * 4096, 112), 1024);
        assert_eq!(ring_size(4096, 400), 8, "vm_event ring has 8 slots");
        assert_eq!(ring_size(64, 8), 0);
    }
}
