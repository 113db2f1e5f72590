//! LRU stack distances (Mattson) in O(log n) per reference.
//!
//! Each key's most recent access time carries a mark in a Fenwick tree over time; the stack
//! distance of a re-reference is the number of marks after the key's previous time, plus
//! one (the key itself). Times are renumbered densely when the tree fills, so memory stays
//! proportional to the number of live keys, not the trace length.

use std::collections::HashMap;

const MIN_CAPACITY: usize = 1024;

/// A Fenwick (binary indexed) tree of counts.
#[derive(Debug, Clone)]
struct Fenwick {
    tree: Vec<i32>,
}

impl Fenwick {
    fn new(n: usize) -> Self {
        Fenwick {
            tree: vec![0; n + 1],
        }
    }

    fn len(&self) -> usize {
        self.tree.len() - 1
    }

    fn add(&mut self, i: usize, delta: i32) {
        let mut i = i + 1;
        while i < self.tree.len() {
            self.tree[i] += delta;
            i += i & i.wrapping_neg();
        }
    }

    /// Sum of `0..=i`.
    fn prefix(&self, i: usize) -> i64 {
        let mut i = i + 1;
        let mut s = 0i64;
        while i > 0 {
            s += i64::from(self.tree[i]);
            i -= i & i.wrapping_neg();
        }
        s
    }
}

/// Stack-distance tracker over keys.
#[derive(Debug, Clone)]
pub struct StackDistance {
    last: HashMap<u64, usize>,
    marks: Fenwick,
    now: usize,
}

impl Default for StackDistance {
    fn default() -> Self {
        Self::new()
    }
}

impl StackDistance {
    pub fn new() -> Self {
        StackDistance {
            last: HashMap::new(),
            marks: Fenwick::new(MIN_CAPACITY),
            now: 0,
        }
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// Reference `key`: its LRU stack distance (1 = most recently used), or `None` on the
    /// first reference.
    pub fn access(&mut self, key: u64) -> Option<u64> {
        if self.now == self.marks.len() {
            self.renumber();
        }
        let t = self.now;
        self.now += 1;
        let dist = self.last.insert(key, t).map(|p| {
            // Every live key has one mark; those after `p` are the keys used since.
            let after = self.last.len() as i64 - self.marks.prefix(p);
            self.marks.add(p, -1);
            after as u64 + 1
        });
        self.marks.add(t, 1);
        dist
    }

    /// Stop tracking `key` (fixed-size SHARDS drops keys above the new threshold).
    pub fn remove(&mut self, key: u64) {
        if let Some(p) = self.last.remove(&key) {
            self.marks.add(p, -1);
        }
    }

    fn renumber(&mut self) {
        let mut live: Vec<(usize, u64)> = self.last.iter().map(|(k, t)| (*t, *k)).collect();
        live.sort_unstable();
        let cap = (4 * live.len()).max(MIN_CAPACITY);
        self.marks = Fenwick::new(cap);
        for (i, (_, k)) in live.iter().enumerate() {
            self.last.insert(*k, i);
            self.marks.add(i, 1);
        }
        self.now = live.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distances against a naive LRU stack, across renumberings.
    #[test]
    fn matches_a_naive_lru_stack() {
        let mut sd = StackDistance::new();
        let mut stack: Vec<u64> = Vec::new();
        let mut x = 12345u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = x % 300;
            let naive = stack.iter().rposition(|k| *k == key).map(|i| {
                let d = (stack.len() - i) as u64;
                stack.remove(i);
                d
            });
            stack.push(key);
            assert_eq!(sd.access(key), naive);
        }
        sd.remove(stack[stack.len() - 1]);
        assert_eq!(sd.len(), 299);
    }
}
