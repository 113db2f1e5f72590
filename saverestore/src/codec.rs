//! Block codecs: a closed set, so an enum. Each thread keeps its own compressor context.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::str::FromStr;

/// A block codec with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Snappy (raw format): the speed codec.
    Snap,
    /// zstd at a level: the ratio codec.
    Zstd(i32),
    /// The C LZ4 (block format) at an acceleration (1..=64; higher is faster, less ratio).
    /// Decoding does not depend on the acceleration.
    Lz4(i32),
}

/// The `--codec` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecChoice {
    /// One codec for every block.
    Fixed(Codec),
    /// Switch per window between `Lz4(FAST_LZ4_ACCEL)` and `Zstd(RATIO_ZSTD_LEVEL)` by the measured output
    /// bandwidth: when the writer waits for the compressor, go faster; when the compressor
    /// waits for the writer, go for ratio.
    Auto,
}

/// zstd level of the ratio mode and of `auto`'s ratio side. On ram-work, level -1 on 64 KiB
/// blocks keeps a ratio of 3.08 (plain `zstd -3` on 1 MiB chunks: 3.03) at the speed of plain
/// `zstd -1`; level 1 gives 3.29 at about 0.85x of it (`zstd:1` remains a choice).
pub const RATIO_ZSTD_LEVEL: i32 = -1;

/// Largest block we decompress (a block is at most 256 pages).
pub const MAX_BLOCK_RAW: usize = 256 * 4096;

/// Codec ids as stored in image frames.
pub const CODEC_ID_SNAP: u8 = 1;
pub const CODEC_ID_ZSTD: u8 = 2;
/// LZ4 block format (no size prefix); format version 2 and later.
pub const CODEC_ID_LZ4: u8 = 3;

/// Acceleration of `--codec lz4` (and `fast`) without an explicit `lz4:N`. On ram-work, 4 is
/// the fastest that keeps the image's ratio at 2.4 or more (2.409; 3 gives 2.447 at about 5 %
/// less speed, 5 gives 2.37): see docs/saverestore.md.
pub const FAST_LZ4_ACCEL: i32 = 4;
/// Highest acceleration `lz4:N` accepts.
pub const MAX_LZ4_ACCEL: i32 = 64;

/// Errors of a codec.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unknown codec id {0}")]
    UnknownId(u8),
    #[error("snappy")]
    Snap(#[source] snap::Error),
    #[error("zstd")]
    Zstd(#[source] io::Error),
    #[error("lz4")]
    Lz4(#[source] io::Error),
    #[error("decompressed {got} bytes, expected {want}")]
    Length { got: usize, want: usize },
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static SNAP_C: RefCell<snap::raw::Encoder> = RefCell::new(snap::raw::Encoder::new());
    static ZSTD_C: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static ZSTD_D: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

impl Codec {
    /// Id stored in frames.
    pub fn id(self) -> u8 {
        match self {
            Codec::Snap => CODEC_ID_SNAP,
            Codec::Zstd(_) => CODEC_ID_ZSTD,
            Codec::Lz4(_) => CODEC_ID_LZ4,
        }
    }

    /// Most bytes [`Codec::compress_to`] may write for `len` input bytes.
    pub fn bound(self, len: usize) -> usize {
        match self {
            Codec::Snap => snap::raw::max_compress_len(len),
            Codec::Zstd(_) => zstd::zstd_safe::compress_bound(len),
            // LZ4_COMPRESSBOUND: len + len / 255 + 16.
            Codec::Lz4(_) => len + len / 255 + 16,
        }
    }

    /// Compresses `src` into the start of `dst`, which must hold at least
    /// [`Codec::bound`]`(src.len())` bytes; returns the compressed length.
    ///
    /// # Errors
    /// Codec errors (none expected for valid levels and a large enough `dst`).
    pub fn compress_to(self, src: &[u8], dst: &mut [u8]) -> Result<usize, CodecError> {
        match self {
            Codec::Snap => SNAP_C
                .with(|e| e.borrow_mut().compress(src, dst))
                .map_err(CodecError::Snap),
            Codec::Zstd(level) => ZSTD_C.with(|c| {
                let mut c = c.borrow_mut();
                if c.as_ref().map(|(l, _)| *l) != Some(level) {
                    *c = Some((
                        level,
                        zstd::bulk::Compressor::new(level).map_err(CodecError::Zstd)?,
                    ));
                }
                let (_, comp) = c.as_mut().expect("set above");
                comp.compress_to_buffer(src, dst).map_err(CodecError::Zstd)
            }),
            Codec::Lz4(accel) => lz4::block::compress_to_buffer(
                src,
                Some(lz4::block::CompressionMode::FAST(accel)),
                false,
                dst,
            )
            .map_err(CodecError::Lz4),
        }
    }

    /// Appends the compressed form of `src` to `dst`.
    ///
    /// # Errors
    /// Codec errors (none expected for valid levels).
    pub fn compress(self, src: &[u8], dst: &mut Vec<u8>) -> Result<(), CodecError> {
        // Compress into a per-thread scratch buffer (zeroed once) and copy the result, rather
        // than zeroing a worst-case-sized tail of `dst` for every block.
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let bound = self.bound(src.len());
            if scratch.len() < bound {
                scratch.resize(bound, 0);
            }
            let n = self.compress_to(src, &mut scratch[..bound])?;
            dst.extend_from_slice(&scratch[..n]);
            Ok(())
        })
    }
}

/// Decompresses a block of codec `id` into `dst`, which must be exactly the raw length.
///
/// # Errors
/// Unknown codec id, corrupt data, or a length other than `dst.len()`.
pub fn decompress(id: u8, src: &[u8], dst: &mut [u8]) -> Result<(), CodecError> {
    let want = dst.len();
    let got = match id {
        CODEC_ID_SNAP => {
            let n = snap::raw::decompress_len(src).map_err(CodecError::Snap)?;
            if n != want {
                return Err(CodecError::Length { got: n, want });
            }
            snap::raw::Decoder::new()
                .decompress(src, dst)
                .map_err(CodecError::Snap)?
        }
        CODEC_ID_ZSTD => ZSTD_D.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new().map_err(CodecError::Zstd)?);
            }
            d.as_mut()
                .expect("set above")
                .decompress_to_buffer(src, dst)
                .map_err(CodecError::Zstd)
        })?,
        CODEC_ID_LZ4 => {
            // LZ4_decompress_safe never writes past `dst` and rejects malformed input.
            let want_i32 = i32::try_from(want).map_err(|_| CodecError::Length { got: 0, want })?;
            lz4::block::decompress_to_buffer(src, Some(want_i32), dst).map_err(CodecError::Lz4)?
        }
        other => return Err(CodecError::UnknownId(other)),
    };
    if got != want {
        return Err(CodecError::Length { got, want });
    }
    Ok(())
}

/// Human name of a codec id.
pub fn codec_name(id: u8) -> &'static str {
    match id {
        CODEC_ID_SNAP => "snap",
        CODEC_ID_ZSTD => "zstd",
        CODEC_ID_LZ4 => "lz4",
        _ => "unknown",
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::Snap => f.write_str("snap"),
            Codec::Zstd(l) => write!(f, "zstd:{l}"),
            Codec::Lz4(a) => write!(f, "lz4:{a}"),
        }
    }
}

impl fmt::Display for CodecChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecChoice::Fixed(c) => c.fmt(f),
            CodecChoice::Auto => f.write_str("auto"),
        }
    }
}

impl FromStr for CodecChoice {
    type Err = String;
    /// `auto`, `snap`, `lz4` (alias `fast`, acceleration [`FAST_LZ4_ACCEL`]), `lz4:ACCEL`,
    /// `zstd` (alias `ratio`, level [`RATIO_ZSTD_LEVEL`]) or `zstd:LEVEL`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "unknown codec {s:?}: use auto, fast, ratio, snap, lz4, lz4:ACCEL (1..={MAX_LZ4_ACCEL}), zstd or zstd:LEVEL (-7..=22)"
            )
        };
        Ok(match s {
            "auto" => CodecChoice::Auto,
            "snap" => CodecChoice::Fixed(Codec::Snap),
            "lz4" | "fast" => CodecChoice::Fixed(Codec::Lz4(FAST_LZ4_ACCEL)),
            "zstd" | "ratio" => CodecChoice::Fixed(Codec::Zstd(RATIO_ZSTD_LEVEL)),
            _ => {
                if let Some(l) = s.strip_prefix("zstd:") {
                    match l.parse::<i32>() {
                        Ok(l) if (-7..=22).contains(&l) => CodecChoice::Fixed(Codec::Zstd(l)),
                        _ => return Err(bad()),
                    }
                } else if let Some(a) = s.strip_prefix("lz4:") {
                    match a.parse::<i32>() {
                        Ok(a) if (1..=MAX_LZ4_ACCEL).contains(&a) => {
                            CodecChoice::Fixed(Codec::Lz4(a))
                        }
                        _ => return Err(bad()),
                    }
                } else {
                    return Err(bad());
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_codecs_round_trip() {
        let src: Vec<u8> = (0..65536u32)
            .map(|i| (i % 97) as u8 ^ (i / 4096) as u8)
            .collect();
        for c in [
            Codec::Snap,
            Codec::Zstd(1),
            Codec::Zstd(3),
            Codec::Lz4(1),
            Codec::Lz4(FAST_LZ4_ACCEL),
        ] {
            let mut z = vec![1, 2, 3];
            c.compress(&src, &mut z).unwrap();
            assert!(z.len() < src.len() / 2);
            let mut back = vec![0; src.len()];
            decompress(c.id(), &z[3..], &mut back).unwrap();
            assert_eq!(back, src);
            let mut short = vec![0; src.len() - 1];
            assert!(decompress(c.id(), &z[3..], &mut short).is_err());
            // Cut short or garbage: an error, never a panic or a write past `back`.
            assert!(decompress(c.id(), &z[3..z.len() / 2], &mut back).is_err());
            let junk: Vec<u8> = (0..z.len() as u32).map(|i| (i * 7 + 3) as u8).collect();
            assert!(decompress(c.id(), &junk, &mut back).is_err(), "{c}");
        }
    }

    #[test]
    fn bounds_hold_for_incompressible_input() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let src: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for len in [0usize, 1, 4096, 65536] {
            assert_eq!(
                Codec::Lz4(1).bound(len),
                lz4::block::compress_bound(len).unwrap()
            );
        }
        for c in [Codec::Snap, Codec::Zstd(1), Codec::Lz4(1), Codec::Lz4(64)] {
            let mut dst = vec![0u8; c.bound(src.len())];
            let n = c.compress_to(&src, &mut dst).unwrap();
            let mut back = vec![0u8; src.len()];
            decompress(c.id(), &dst[..n], &mut back).unwrap();
            assert!(back == src, "{c}");
        }
    }

    #[test]
    fn parses_choices() {
        assert_eq!("auto".parse::<CodecChoice>().unwrap(), CodecChoice::Auto);
        assert_eq!(
            "snap".parse::<CodecChoice>().unwrap(),
            CodecChoice::Fixed(Codec::Snap)
        );
        assert_eq!(
            "fast".parse::<CodecChoice>().unwrap(),
            CodecChoice::Fixed(Codec::Lz4(FAST_LZ4_ACCEL))
        );
        assert_eq!(
            "lz4:2".parse::<CodecChoice>().unwrap(),
            CodecChoice::Fixed(Codec::Lz4(2))
        );
        assert!("lz4:0".parse::<CodecChoice>().is_err());
        assert!("lz4:65".parse::<CodecChoice>().is_err());
        assert_eq!(
            "zstd:5".parse::<CodecChoice>().unwrap(),
            CodecChoice::Fixed(Codec::Zstd(5))
        );
        assert!("lzma".parse::<CodecChoice>().is_err());
        assert!("zstd:99".parse::<CodecChoice>().is_err());
        assert!(decompress(9, &[], &mut []).is_err());
    }
}
