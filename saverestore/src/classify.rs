//! Page classification: zero pages and single-word pages become tags; the rest get a 128-bit
//! content hash for duplicate detection (xxh3-128: a false match between two different pages
//! of one guest has probability about n^2 / 2^129, below 10^-28 for a 1 TiB guest).

use crate::stream::format::PAGE_SIZE;

/// What a page's content is, before duplicate detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Zero,
    Word(u64),
    Hashed(u128),
}

/// Classifies one 4096-byte page.
pub fn classify(page: &[u8]) -> Content {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    let first = u64::from_le_bytes(page[..8].try_into().expect("8 bytes"));
    let uniform = page
        .chunks_exact(8)
        .all(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) == first);
    match (uniform, first) {
        (true, 0) => Content::Zero,
        (true, w) => Content::Word(w),
        _ => Content::Hashed(xxhash_rust::xxh3::xxh3_128(page)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(classify(&[0u8; PAGE_SIZE]), Content::Zero);
        let w = 0x0123_4567_89ab_cdefu64.to_le_bytes().repeat(512);
        assert_eq!(classify(&w), Content::Word(0x0123_4567_89ab_cdef));
        let mut p = vec![0u8; PAGE_SIZE];
        p[4095] = 1;
        let mut q = p.clone();
        assert!(matches!(classify(&p), Content::Hashed(_)));
        assert_eq!(classify(&p), classify(&q));
        q[0] = 1;
        assert_ne!(classify(&p), classify(&q));
    }
}
