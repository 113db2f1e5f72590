//! Lock stripes over block numbers: a request locks the stripes of the blocks it touches
//! (shared to read, exclusive to change), always in ascending stripe order so two requests
//! never deadlock. Requests on different blocks mostly take different stripes and run in
//! parallel; two requests on the same block are serialised.

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Number of stripes (a power of two).
pub const STRIPES: usize = 256;

/// The stripe locks of one disk.
#[derive(Debug)]
pub struct Stripes {
    locks: Vec<RwLock<()>>,
}

/// Held stripes; released on drop.
#[derive(Debug)]
pub enum StripeGuard<'a> {
    Shared(Vec<RwLockReadGuard<'a, ()>>),
    Exclusive(Vec<RwLockWriteGuard<'a, ()>>),
}

impl Default for Stripes {
    fn default() -> Self {
        Stripes {
            locks: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }
}

impl Stripes {
    /// The sorted, distinct stripes of blocks `first..end`.
    fn indices(first: u64, end: u64) -> Vec<usize> {
        let n = end.saturating_sub(first);
        if n >= STRIPES as u64 {
            return (0..STRIPES).collect();
        }
        let mut v: Vec<usize> = (first..end)
            .map(|b| (b % STRIPES as u64) as usize)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Lock blocks `first..end` for reading.
    pub fn shared(&self, first: u64, end: u64) -> StripeGuard<'_> {
        StripeGuard::Shared(
            Self::indices(first, end)
                .into_iter()
                .map(|i| self.locks[i].read())
                .collect(),
        )
    }

    /// Lock blocks `first..end` for changing.
    pub fn exclusive(&self, first: u64, end: u64) -> StripeGuard<'_> {
        StripeGuard::Exclusive(
            Self::indices(first, end)
                .into_iter()
                .map(|i| self.locks[i].write())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_sorted_distinct_and_cover_wraparound() {
        assert_eq!(Stripes::indices(254, 258), vec![0, 1, 254, 255]);
        assert_eq!(Stripes::indices(3, 3), Vec::<usize>::new());
        assert_eq!(Stripes::indices(0, 10_000).len(), STRIPES);
        let s = Stripes::default();
        let _a = s.shared(0, 4);
        let _b = s.shared(2, 6); // shared locks coexist
    }
}
