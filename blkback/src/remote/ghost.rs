//! Admission on second touch: a direct-mapped table of block fingerprints (a ghost of the
//! blocks read recently, without their data).
//!
//! The guest keeps blocks it has just read in its own page cache, so a block read once is
//! usually not read again from the disk soon; caching it remotely would only duplicate the
//! guest's cache. A block read a second time through the backend has left the guest's cache,
//! and is worth keeping. [`Ghost::touch`] records a block and says whether it was seen before.
//!
//! The table is a fixed array of `u32` fingerprints indexed by a hash of the block number:
//! memory is bounded (4 bytes per entry) and a collision only costs one missed or one early
//! admission, never wrong data.

use std::sync::atomic::{AtomicU32, Ordering};

/// Default entries: 64 Ki (256 KiB of memory, the recent history of 256 MiB of blocks).
pub const DEFAULT_GHOST_ENTRIES: usize = 1 << 16;

/// The ghost table.
#[derive(Debug)]
pub struct Ghost {
    slots: Vec<AtomicU32>,
    mask: u64,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Ghost {
    /// A table of `entries` (rounded up to a power of two, at least 64).
    pub fn new(entries: usize) -> Ghost {
        let n = entries.clamp(64, 1 << 28).next_power_of_two();
        Ghost {
            slots: (0..n).map(|_| AtomicU32::new(0)).collect(),
            mask: n as u64 - 1,
        }
    }

    /// Record a touch of `block`; true when the block was already in the table (second
    /// or later touch).
    pub fn touch(&self, block: u64) -> bool {
        let h = mix(block);
        let fp = ((h >> 32) as u32) | 1; // never 0, the empty slot
        self.slots[(h & self.mask) as usize].swap(fp, Ordering::Relaxed) == fp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_touch_admits_and_first_does_not() {
        let g = Ghost::new(1024);
        assert!(!g.touch(7));
        assert!(g.touch(7));
        assert!(g.touch(7));
        assert!(!g.touch(8));
    }
}
