//! How a swap block is encoded as a memory-server value (before the client seals it).
//!
//! ```text
//!  ┌────────┬──────────────────────────────────────────────┐
//!  │ tag u8 │ body                                         │
//!  └────────┴──────────────────────────────────────────────┘
//!  tag 0: raw   — body is the 4096-byte block
//!  tag 1: lz4   — body is an LZ4 block that decompresses to exactly 4096 bytes
//! ```
//!
//! A block is stored compressed only when that saves at least an eighth of it (swap pages are
//! often sparse or repetitive; random data is stored raw and costs one byte more). Decoding
//! checks the tag and the body's length before doing anything else and decompresses into a
//! fixed 4096-byte buffer, so a bad value cannot make it allocate more or return a block of
//! another size. (The client's sealing already rejects any value this host did not write;
//! these checks guard against our own bugs.)

use super::spill::BLOCK;

const RAW: u8 = 0;
const LZ4: u8 = 1;
/// Longest encoded value.
pub const MAX_ENCODED: usize = 1 + BLOCK;

/// Why a stored value is not a block.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("empty value")]
    Empty,
    #[error("unknown tag {0}")]
    BadTag(u8),
    #[error("value of {0} bytes is not a {BLOCK}-byte block")]
    BadLength(usize),
    #[error("LZ4 body does not decompress to {BLOCK} bytes")]
    BadLz4,
}

/// Encode one block (exactly [`BLOCK`] bytes).
pub fn encode(block: &[u8]) -> Vec<u8> {
    debug_assert_eq!(block.len(), BLOCK);
    let c = lz4_flex::block::compress(block);
    let mut out = Vec::with_capacity(1 + c.len().min(BLOCK));
    if c.len() <= BLOCK - BLOCK / 8 {
        out.push(LZ4);
        out.extend_from_slice(&c);
    } else {
        out.push(RAW);
        out.extend_from_slice(block);
    }
    out
}

/// Decode a stored value into `out` (exactly [`BLOCK`] bytes).
///
/// # Errors
/// [`CodecError`].
pub fn decode(v: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    let (&tag, body) = v.split_first().ok_or(CodecError::Empty)?;
    if v.len() > MAX_ENCODED {
        return Err(CodecError::BadLength(v.len()));
    }
    match tag {
        RAW if body.len() == BLOCK => {
            out.copy_from_slice(body);
            Ok(())
        }
        RAW => Err(CodecError::BadLength(body.len())),
        LZ4 => match lz4_flex::block::decompress_into(body, out) {
            Ok(n) if n == BLOCK => Ok(()),
            _ => Err(CodecError::BadLz4),
        },
        t => Err(CodecError::BadTag(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compressible_blocks_shrink_and_random_ones_stay_raw() {
        let sparse: Vec<u8> = (0..BLOCK)
            .map(|i| if i % 512 == 0 { 7 } else { 0 })
            .collect();
        let e = encode(&sparse);
        assert_eq!(e[0], LZ4);
        assert!(e.len() < 200, "{}", e.len());
        let mut out = vec![0u8; BLOCK];
        decode(&e, &mut out).unwrap();
        assert_eq!(out, sparse);
        let mut x = 0x1234_5678_u64;
        let random: Vec<u8> = (0..BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let e = encode(&random);
        assert_eq!((e[0], e.len()), (RAW, 1 + BLOCK));
        decode(&e, &mut out).unwrap();
        assert_eq!(out, random);
        assert_eq!(decode(&[], &mut out), Err(CodecError::Empty));
        assert_eq!(decode(&[9, 1], &mut out), Err(CodecError::BadTag(9)));
        assert_eq!(decode(&[0, 1], &mut out), Err(CodecError::BadLength(1)));
        // An LZ4 body that decompresses to fewer bytes than a block.
        let short = lz4_flex::block::compress(&[0u8; 100]);
        let v: Vec<u8> = std::iter::once(LZ4).chain(short).collect();
        assert_eq!(decode(&v, &mut out), Err(CodecError::BadLz4));
    }

    proptest! {
        #[test]
        fn decode_never_panics(v in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let mut out = vec![0u8; BLOCK];
            let _ = decode(&v, &mut out);
        }

        #[test]
        fn round_trip(runs in proptest::collection::vec((any::<u8>(), 1..600usize), 1..40)) {
            let mut b: Vec<u8> = runs.iter().flat_map(|(v, n)| std::iter::repeat_n(*v, *n)).collect();
            b.resize(BLOCK, 0);
            let mut out = vec![0u8; BLOCK];
            decode(&encode(&b), &mut out).unwrap();
            prop_assert_eq!(out, b);
        }
    }
}
