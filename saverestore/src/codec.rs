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
}

/// The `--codec` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecChoice {
    /// One codec for every block.
    Fixed(Codec),
    /// Switch per window between `Snap` and `Zstd(AUTO_ZSTD_LEVEL)` by the measured output
    /// bandwidth: when the writer waits for the compressor, go faster; when the compressor
    /// waits for the writer, go for ratio.
    Auto,
}

/// zstd level of the ratio mode and of `auto`'s ratio side.
pub const RATIO_ZSTD_LEVEL: i32 = 1;

/// Largest block we decompress (a block is at most 256 pages).
pub const MAX_BLOCK_RAW: usize = 256 * 4096;

/// Codec ids as stored in image frames.
pub const CODEC_ID_SNAP: u8 = 1;
pub const CODEC_ID_ZSTD: u8 = 2;

/// Errors of a codec.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unknown codec id {0}")]
    UnknownId(u8),
    #[error("snappy")]
    Snap(#[source] snap::Error),
    #[error("zstd")]
    Zstd(#[source] io::Error),
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
            let n = match self {
                Codec::Snap => {
                    let bound = snap::raw::max_compress_len(src.len());
                    if scratch.len() < bound {
                        scratch.resize(bound, 0);
                    }
                    SNAP_C
                        .with(|e| e.borrow_mut().compress(src, &mut scratch[..]))
                        .map_err(CodecError::Snap)?
                }
                Codec::Zstd(level) => ZSTD_C.with(|c| {
                    let mut c = c.borrow_mut();
                    if c.as_ref().map(|(l, _)| *l) != Some(level) {
                        *c = Some((
                            level,
                            zstd::bulk::Compressor::new(level).map_err(CodecError::Zstd)?,
                        ));
                    }
                    let (_, comp) = c.as_mut().expect("set above");
                    let bound = zstd::zstd_safe::compress_bound(src.len());
                    if scratch.len() < bound {
                        scratch.resize(bound, 0);
                    }
                    comp.compress_to_buffer(src, &mut scratch[..])
                        .map_err(CodecError::Zstd)
                })?,
            };
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
        _ => "unknown",
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::Snap => f.write_str("snap"),
            Codec::Zstd(l) => write!(f, "zstd:{l}"),
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
    /// `auto`, `snap` (alias `fast`), `zstd` (alias `ratio`, level 1) or `zstd:LEVEL`.
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => CodecChoice::Auto,
            "snap" | "fast" => CodecChoice::Fixed(Codec::Snap),
            "zstd" | "ratio" => CodecChoice::Fixed(Codec::Zstd(RATIO_ZSTD_LEVEL)),
            _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
                Some(Ok(l)) if (-7..=22).contains(&l) => CodecChoice::Fixed(Codec::Zstd(l)),
                _ => {
                    return Err(format!(
                        "unknown codec {s:?}: use auto, snap, zstd or zstd:LEVEL (-7..=22)"
                    ))
                }
            },
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
        for c in [Codec::Snap, Codec::Zstd(1), Codec::Zstd(3)] {
            let mut z = vec![1, 2, 3];
            c.compress(&src, &mut z).unwrap();
            assert!(z.len() < src.len() / 2);
            let mut back = vec![0; src.len()];
            decompress(c.id(), &z[3..], &mut back).unwrap();
            assert_eq!(back, src);
            let mut short = vec![0; src.len() - 1];
            assert!(decompress(c.id(), &z[3..], &mut short).is_err());
        }
    }

    #[test]
    fn parses_choices() {
        assert_eq!("auto".parse::<CodecChoice>().unwrap(), CodecChoice::Auto);
        assert_eq!(
            "fast".parse::<CodecChoice>().unwrap(),
            CodecChoice::Fixed(Codec::Snap)
        );
        assert_eq!(
            "zstd:5".parse::<CodecChoice>().unwrap(),
            CodecChoice::Fixed(Codec::Zstd(5))
        );
        assert!("lzma".parse::<CodecChoice>().is_err());
        assert!("zstd:99".parse::<CodecChoice>().is_err());
        assert!(decompress(9, &[], &mut []).is_err());
    }
}
