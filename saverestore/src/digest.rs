//! The stream digest of format version 3: xxh3-64 of the saved stream with every data page
//! replaced by its 16-byte fingerprint (the page's xxh3-128, little-endian). Every other
//! byte (xl header and config, libxl and libxc records, PAGE_DATA headers and pfn words)
//! goes in as it is.
//!
//! A save already hashes each page with xxh3-128 to find duplicates, so this check costs it
//! almost nothing; the CRC32C of formats 1 and 2 was a second pass over every page byte
//! (5.5 % of a one-thread fast save). Restore fingerprints each page it regenerates, so a
//! wrong byte anywhere in the regenerated stream still fails the check.
//!
//! XXH3 comes from `twox-hash`, which picks its AVX2 path at run time (a baseline x86-64
//! build of `xxhash-rust` hashes with SSE2: about 1.2-1.3x slower per 4 KiB page here). The
//! unit test below checks the digest against `xxhash-rust`, an independent implementation.

use std::sync::OnceLock;

use std::hash::Hasher;

use twox_hash::{XxHash3_128, XxHash3_64};

use crate::stream::format::PAGE_SIZE;

/// Bytes a page contributes to the digest.
pub const FINGERPRINT_LEN: usize = 16;

/// A data page's fingerprint: xxh3-128 of its 4096 bytes.
pub fn fingerprint(page: &[u8]) -> u128 {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    XxHash3_128::oneshot(page)
}

/// The fingerprint of an all-zero page.
pub fn zero_fingerprint() -> u128 {
    static ZERO: OnceLock<u128> = OnceLock::new();
    *ZERO.get_or_init(|| XxHash3_128::oneshot(&[0u8; PAGE_SIZE]))
}

/// Appends the fingerprints of the pages in `run` (a whole number of pages) to `out`.
pub fn push_fingerprints(run: &[u8], out: &mut Vec<u8>) {
    debug_assert_eq!(run.len() % PAGE_SIZE, 0);
    for page in run.chunks_exact(PAGE_SIZE) {
        out.extend_from_slice(&fingerprint(page).to_le_bytes());
    }
}

/// The digest of a stream fed in order: bytes that are not page data through
/// [`StreamDigest::update`], page fingerprints (as produced by [`push_fingerprints`] or
/// `fingerprint(..).to_le_bytes()`) through the same call.
#[derive(Clone)]
pub struct StreamDigest(Box<XxHash3_64>);

impl StreamDigest {
    pub fn new() -> Self {
        StreamDigest(Box::new(XxHash3_64::new()))
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    /// The digest of everything fed so far.
    pub fn value(&self) -> u64 {
        self.0.finish()
    }
}

impl Default for StreamDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for StreamDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamDigest({:#018x})", self.value())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_give_the_digest_of_the_whole() {
        let head = b"PAGE_DATA header and pfns";
        let pages: Vec<u8> = (0..3 * PAGE_SIZE as u32)
            .map(|i| ((i * 7) >> 3) as u8)
            .collect();
        let mut whole = head.to_vec();
        push_fingerprints(&pages, &mut whole);
        assert_eq!(whole.len(), head.len() + 3 * FINGERPRINT_LEN);

        let mut d = StreamDigest::new();
        d.update(head);
        for p in pages.chunks(PAGE_SIZE) {
            d.update(&fingerprint(p).to_le_bytes());
        }
        assert_eq!(d.value(), xxhash_rust::xxh3::xxh3_64(&whole));
        assert_eq!(zero_fingerprint(), fingerprint(&[0; PAGE_SIZE]));

        // One changed byte of one page changes the digest.
        let mut other = pages.clone();
        other[PAGE_SIZE + 9] ^= 1;
        let mut d2 = StreamDigest::new();
        d2.update(head);
        let mut fps = Vec::new();
        push_fingerprints(&other, &mut fps);
        d2.update(&fps);
        assert_ne!(d2.value(), d.value());
    }
}
