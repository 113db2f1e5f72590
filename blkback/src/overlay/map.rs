//! The overlay's cluster map: two bits per cluster, packed four to a byte, and which 4 KiB
//! pages of it changed since the last flush.
//!
//! ```text
//! byte i/4, bits 2*(i%4)..2*(i%4)+1 = state of cluster i
//!   00 Template   never written here: read the template
//!   01 Data       the cluster's bytes are in this overlay's data area
//!   10 Zero       discarded or zeroed: reads as zeroes, never falls through to the template
//!   11            invalid (the overlay is refused as corrupt)
//! ```
//! Bits past the last cluster must be zero.

/// Size of a map page: the unit written back at flush.
pub const MAP_PAGE: usize = 4096;

/// State of one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    Template = 0,
    Data = 1,
    Zero = 2,
}

/// Why a stored map was refused.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("cluster {0} has the invalid state 3")]
    InvalidState(u64),
    #[error("bits set past the last cluster")]
    TrailingBits,
    #[error("map is {got} bytes, expected {want}")]
    WrongLength { got: usize, want: usize },
}

/// The in-memory map. Callers serialise access (the overlay keeps it behind a mutex).
#[derive(Debug)]
pub struct ClusterMap {
    bytes: Vec<u8>,
    clusters: u64,
    /// Per map page: changed since the last [`ClusterMap::take_dirty`].
    dirty: Vec<bool>,
    /// Per map page: the file's copy is older than this one (changed and not yet written
    /// back by a completed [`ClusterMap::written`]).
    unwritten: Vec<bool>,
}

impl ClusterMap {
    /// An all-`Template` map of `map_len` bytes for `clusters` clusters.
    pub fn new(clusters: u64, map_len: usize) -> Self {
        Self {
            bytes: vec![0; map_len],
            clusters,
            dirty: vec![false; map_len.div_ceil(MAP_PAGE)],
            unwritten: vec![false; map_len.div_ceil(MAP_PAGE)],
        }
    }

    /// Adopt a map read from disk, refusing invalid states.
    ///
    /// # Errors
    /// [`MapError`] for a wrong length, a state of 3, or bits past the last cluster.
    pub fn from_bytes(bytes: Vec<u8>, clusters: u64, map_len: usize) -> Result<Self, MapError> {
        if bytes.len() != map_len || (map_len as u64) < clusters.div_ceil(4) {
            return Err(MapError::WrongLength {
                got: bytes.len(),
                want: map_len,
            });
        }
        let map = Self {
            dirty: vec![false; map_len.div_ceil(MAP_PAGE)],
            unwritten: vec![false; map_len.div_ceil(MAP_PAGE)],
            bytes,
            clusters,
        };
        for (i, &b) in map.bytes.iter().enumerate() {
            for k in 0..4u64 {
                let c = i as u64 * 4 + k;
                let s = (b >> (2 * k)) & 3;
                if c >= clusters && s != 0 {
                    return Err(MapError::TrailingBits);
                }
                if s == 3 {
                    return Err(MapError::InvalidState(c));
                }
            }
        }
        Ok(map)
    }

    /// Number of clusters.
    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    /// State of cluster `c`.
    pub fn get(&self, c: u64) -> ClusterState {
        match (self.bytes[(c / 4) as usize] >> (2 * (c % 4))) & 3 {
            0 => ClusterState::Template,
            1 => ClusterState::Data,
            _ => ClusterState::Zero,
        }
    }

    /// Set cluster `c` to `s`, marking its page dirty if it changed.
    pub fn set(&mut self, c: u64, s: ClusterState) {
        let i = (c / 4) as usize;
        let shift = 2 * (c % 4);
        let new = (self.bytes[i] & !(3 << shift)) | ((s as u8) << shift);
        if new != self.bytes[i] {
            self.bytes[i] = new;
            self.touch(i);
        }
    }

    /// Byte `i` of the map changed.
    fn touch(&mut self, i: usize) {
        self.dirty[i / MAP_PAGE] = true;
        self.unwritten[i / MAP_PAGE] = true;
    }

    /// The state of cluster `c` and the first cluster in `c + 1..end` in another state (or
    /// `end`). Whole bytes and 8-byte words of one state are skipped at once, so a scan over
    /// a large map costs about one step per 32 clusters, not one per cluster.
    pub fn run_from(&self, c: u64, end: u64) -> (ClusterState, u64) {
        let st = self.get(c);
        let fill = byte_of(st);
        let mut i = c + 1;
        while i < end {
            let b = (i / 4) as usize;
            if i % 32 == 0 && i + 32 <= end && self.bytes[b..b + 8].iter().all(|&x| x == fill) {
                i += 32;
            } else if i % 4 == 0 && i + 4 <= end && self.bytes[b] == fill {
                i += 4;
            } else if self.get(i) == st {
                i += 1;
            } else {
                break;
            }
        }
        (st, i)
    }

    /// Set clusters `first..=last` to `s` (whole bytes at once), marking changed pages
    /// dirty. Returns whether any of them was `Data` before.
    pub fn set_range(&mut self, first: u64, last: u64, s: ClusterState) -> bool {
        let mut had_data = false;
        let mut c = first;
        while c <= last {
            let b = (c / 4) as usize;
            if c % 4 == 0 && c + 3 <= last {
                let old = self.bytes[b];
                had_data |= (0..4).any(|k| (old >> (2 * k)) & 3 == ClusterState::Data as u8);
                if old != byte_of(s) {
                    self.bytes[b] = byte_of(s);
                    self.touch(b);
                }
                c += 4;
            } else {
                had_data |= self.get(c) == ClusterState::Data;
                self.set(c, s);
                c += 1;
            }
        }
        had_data
    }

    /// Count clusters per state: (template, data, zero).
    pub fn counts(&self) -> (u64, u64, u64) {
        let mut n = [0u64; 3];
        for c in 0..self.clusters {
            n[self.get(c) as usize] += 1;
        }
        (n[0], n[1], n[2])
    }

    /// Take the dirty pages as (byte offset in the map, content), clearing their dirty bits.
    pub fn take_dirty(&mut self) -> Vec<(usize, Vec<u8>)> {
        let mut out = Vec::new();
        for (p, d) in self.dirty.iter_mut().enumerate() {
            if *d {
                *d = false;
                let start = p * MAP_PAGE;
                let end = (start + MAP_PAGE).min(self.bytes.len());
                out.push((start, self.bytes[start..end].to_vec()));
            }
        }
        out
    }

    /// Mark pages dirty again after a failed write-back.
    pub fn redirty(&mut self, pages: &[(usize, Vec<u8>)]) {
        for (start, _) in pages {
            self.dirty[start / MAP_PAGE] = true;
        }
    }

    /// The pages taken by [`ClusterMap::take_dirty`] are in the file now. A page changed
    /// again since it was taken stays unwritten.
    pub fn written(&mut self, pages: &[(usize, Vec<u8>)]) {
        for (start, _) in pages {
            let p = start / MAP_PAGE;
            if !self.dirty[p] {
                self.unwritten[p] = false;
            }
        }
    }

    /// Whether clusters `first..=last` are all `Data` in the file's copy of the map as well
    /// as in this one: a process opening the overlay now finds them mapped.
    pub fn stored(&self, first: u64, last: u64) -> bool {
        let page_of = |c: u64| (c / 4) as usize / MAP_PAGE;
        (page_of(first)..=page_of(last)).all(|p| !self.unwritten[p])
            && self.run_from(first, last + 1) == (ClusterState::Data, last + 1)
    }
}

/// A map byte holding four clusters in state `s`.
fn byte_of(s: ClusterState) -> u8 {
    (s as u8) * 0b0101_0101
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(v: u8) -> ClusterState {
        [
            ClusterState::Template,
            ClusterState::Data,
            ClusterState::Zero,
        ][usize::from(v % 3)]
    }

    proptest::proptest! {
        /// `run_from` and `set_range` agree with cluster-by-cluster `get`/`set`.
        #[test]
        fn fast_scans_match_naive(
            ops in proptest::collection::vec((0u64..600, 0u64..80, 0u8..3), 0..40),
            probes in proptest::collection::vec((0u64..600, 0u64..700), 1..40),
        ) {
            let n = 600;
            let mut fast = ClusterMap::new(n, 4096);
            let mut naive = ClusterMap::new(n, 4096);
            for (a, l, v) in ops {
                let last = (a + l).min(n - 1);
                let had = (a..=last).any(|c| naive.get(c) == ClusterState::Data);
                for c in a..=last {
                    naive.set(c, state(v));
                }
                proptest::prop_assert_eq!(fast.set_range(a, last, state(v)), had);
            }
            proptest::prop_assert_eq!(&fast.bytes, &naive.bytes);
            proptest::prop_assert_eq!(&fast.dirty, &naive.dirty);
            for (c, e) in probes {
                let (c, e) = (c, e.clamp(c + 1, n));
                let st = naive.get(c);
                let want = (c + 1..e).find(|&i| naive.get(i) != st).unwrap_or(e);
                proptest::prop_assert_eq!(fast.run_from(c, e), (st, want));
            }
        }
    }

    #[test]
    fn set_get_and_dirty_pages() {
        let mut m = ClusterMap::new(20000, 8192);
        assert_eq!(m.get(19999), ClusterState::Template);
        m.set(19999, ClusterState::Zero);
        m.set(5, ClusterState::Data);
        m.set(5, ClusterState::Data);
        assert_eq!(m.get(19999), ClusterState::Zero);
        assert_eq!(m.get(5), ClusterState::Data);
        assert_eq!(m.get(4), ClusterState::Template);
        let d = m.take_dirty();
        assert_eq!(d.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 4096]);
        assert!(m.take_dirty().is_empty());
        assert_eq!(m.counts(), (19998, 1, 1));
    }

    #[test]
    fn from_bytes_validates() {
        let mut b = vec![0u8; 4096];
        b[0] = 0b11;
        assert!(matches!(
            ClusterMap::from_bytes(b, 8, 4096),
            Err(MapError::InvalidState(0))
        ));
        let mut b = vec![0u8; 4096];
        b[3] = 1;
        assert!(matches!(
            ClusterMap::from_bytes(b, 8, 4096),
            Err(MapError::TrailingBits)
        ));
        assert!(ClusterMap::from_bytes(vec![0; 10], 8, 4096).is_err());
        let mut b = vec![0u8; 4096];
        b[1] = 0b1001;
        let m = ClusterMap::from_bytes(b, 8, 4096).unwrap();
        assert_eq!(m.get(4), ClusterState::Data);
        assert_eq!(m.get(5), ClusterState::Zero);
    }
}
