//! Page classification: zero pages and single-word pages become tags; the rest get a 128-bit
//! content hash for duplicate detection (xxh3-128: a false match between two different pages
//! of one guest has probability about n^2 / 2^129, below 10^-28 for a 1 TiB guest). Every
//! page also gets its fingerprint for the stream digest ([`crate::digest`]): the same hash,
//! which zero and single-word pages get too.

use crate::digest::{fingerprint, zero_fingerprint};
use crate::stream::format::PAGE_SIZE;

/// What a page's content is, before duplicate detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Zero,
    Word(u64),
    Hashed(u128),
}

/// Classifies one 4096-byte page; also returns its fingerprint ([`crate::digest::fingerprint`]).
pub fn classify(page: &[u8]) -> (Content, u128) {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    let first = u64::from_le_bytes(page[..8].try_into().expect("8 bytes"));
    let uniform = page
        .chunks_exact(8)
        .all(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) == first);
    match (uniform, first) {
        (true, 0) => (Content::Zero, zero_fingerprint()),
        (true, w) => (Content::Word(w), fingerprint(page)),
        _ => {
            let h = fingerprint(page);
            (Content::Hashed(h), h)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let zero = [0u8; PAGE_SIZE];
        assert_eq!(classify(&zero), (Content::Zero, fingerprint(&zero)));
        let w = 0x0123_4567_89ab_cdefu64.to_le_bytes().repeat(512);
        assert_eq!(
            classify(&w),
            (Content::Word(0x0123_4567_89ab_cdef), fingerprint(&w))
        );
        let mut p = vec![0u8; PAGE_SIZE];
        p[4095] = 1;
        let mut q = p.clone();
        assert_eq!(
            classify(&p),
            (Content::Hashed(fingerprint(&p)), fingerprint(&p))
        );
        assert_eq!(classify(&p), classify(&q));
        q[0] = 1;
        assert_ne!(classify(&p), classify(&q));
    }
}
