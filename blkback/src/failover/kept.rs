//! The acknowledged writes the endpoint keeps until a flush covers them, to re-apply them
//! on the next driver after a failover, and the byte ranges they cover.
//!
//! A write the driver reports as stored ([`super::wire::KIND_REPLY_STORED`]) is not kept,
//! unless it overlaps a kept one: re-applying that older write after a failover would
//! otherwise put its bytes back over the stored, newer ones. Kept together, they are
//! re-applied in the order they completed and the newer one lands last.

use std::collections::BTreeMap;

/// Kept writes by completion number, with an index of their ranges.
#[derive(Debug)]
pub(super) struct Kept<T> {
    /// Completion number → (offset, length, bytes held, write).
    by_completion: BTreeMap<u64, (u64, u64, u64, T)>,
    /// (offset, completion number) → end of the range, for overlap queries.
    ranges: BTreeMap<(u64, u64), u64>,
    /// Longest range in `ranges` (0 when empty): a range that overlaps `offset..` starts
    /// at or after `offset - max_len`.
    max_len: u64,
    bytes: u64,
}

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Kept {
            by_completion: BTreeMap::new(),
            ranges: BTreeMap::new(),
            max_len: 0,
            bytes: 0,
        }
    }
}

impl<T> Kept<T> {
    /// Keep `item`, completion number `n`, covering `offset..offset+len` and holding
    /// `bytes` of data.
    pub fn insert(&mut self, n: u64, offset: u64, len: u64, bytes: u64, item: T) {
        if len > 0 {
            self.ranges.insert((offset, n), offset.saturating_add(len));
            self.max_len = self.max_len.max(len);
        }
        self.bytes += bytes;
        let old = self.by_completion.insert(n, (offset, len, bytes, item));
        debug_assert!(old.is_none(), "completion numbers are unique");
    }

    /// A flush covered every write up to completion number `mark`: drop them.
    pub fn release_through(&mut self, mark: u64) {
        let kept = self.by_completion.split_off(&mark.saturating_add(1));
        let released = std::mem::replace(&mut self.by_completion, kept);
        for (n, (offset, len, bytes, _)) in released {
            self.bytes -= bytes;
            if len > 0 {
                self.ranges.remove(&(offset, n));
            }
        }
        if self.ranges.is_empty() {
            self.max_len = 0;
        }
    }

    /// Whether `offset..offset+len` shares a byte with a kept write.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        if len == 0 || self.ranges.is_empty() {
            return false;
        }
        let end = offset.saturating_add(len);
        let from = (offset.saturating_sub(self.max_len), 0);
        self.ranges
            .range(from..(end, 0))
            .any(|(_, &range_end)| range_end > offset)
    }

    pub fn len(&self) -> usize {
        self.by_completion.len()
    }

    /// Bytes of data held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The kept writes in completion order.
    pub fn items(&self) -> impl Iterator<Item = &T> {
        self.by_completion.values().map(|(_, _, _, t)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_are_found_and_released_writes_forgotten() {
        let mut k = Kept::default();
        k.insert(1, 4096, 4096, 4096, "a");
        k.insert(2, 1 << 20, 256 << 10, 256 << 10, "b");
        k.insert(3, 100, 0, 0, "flush-like, no range");
        assert_eq!(k.len(), 3);
        assert_eq!(k.bytes(), 4096 + (256 << 10));
        assert_eq!(
            k.items().copied().collect::<Vec<_>>(),
            ["a", "b", "flush-like, no range"]
        );

        assert!(k.overlaps(4096, 1));
        assert!(k.overlaps(0, 4097));
        assert!(!k.overlaps(0, 4096), "ends where a starts");
        assert!(!k.overlaps(8192, 4096), "starts where a ends");
        // Found although it starts far before the query (the long range of b).
        assert!(k.overlaps((1 << 20) + (200 << 10), 512));
        assert!(!k.overlaps((1 << 20) + (256 << 10), 512));
        assert!(!k.overlaps(4096, 0));
        assert!(!k.overlaps(u64::MAX - 1, 10));

        k.release_through(1);
        assert!(!k.overlaps(4096, 4096));
        assert!(k.overlaps(1 << 20, 1));
        assert_eq!(k.bytes(), 256 << 10);
        k.release_through(3);
        assert_eq!((k.len(), k.bytes()), (0, 0));
        assert!(!k.overlaps(0, u64::MAX));
    }

    #[test]
    fn overlap_matches_a_plain_scan() {
        // A small deterministic random walk against the obvious quadratic check.
        let mut k = Kept::default();
        let mut all: Vec<(u64, u64, u64)> = Vec::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for n in 1..=400u64 {
            let (off, len) = (next() % 100_000, next() % 9000);
            if next() % 7 == 0 {
                let mark = n - 1 - next() % 5;
                k.release_through(mark);
                all.retain(|&(m, _, _)| m > mark);
            }
            k.insert(n, off, len, len, ());
            all.push((n, off, len));
            let (qo, ql) = (next() % 100_000, next() % 9000);
            let want = ql > 0
                && all
                    .iter()
                    .any(|&(_, o, l)| l > 0 && o < qo + ql && qo < o + l);
            assert_eq!(k.overlaps(qo, ql), want, "query {qo}+{ql} after {n}");
        }
    }
}
