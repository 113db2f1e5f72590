//! Errors of reading and writing remoca images.

use std::io;

use crate::codec::CodecError;
use crate::stream::StreamError;

/// What went wrong with an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image I/O")]
    Io(#[source] io::Error),
    #[error("writing the output")]
    Output(#[source] io::Error),
    #[error("not a remoca save image: bad magic")]
    BadMagic,
    #[error("image format version {0} is not supported (this remoca reads versions 1 to 3)")]
    UnsupportedVersion(u32),
    #[error("image has unknown flags {0:#x}")]
    UnknownFlags(u32),
    #[error("image is truncated or was never finished: {0}")]
    Truncated(String),
    #[error("corrupted image at byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
    #[error("corrupted block {block} at byte {offset}: checksum mismatch")]
    BlockChecksum { block: u64, offset: u64 },
    #[error("corrupted block {block}: cannot decompress")]
    Decompress {
        block: u64,
        #[source]
        source: CodecError,
    },
    #[error("compressing a block")]
    Compress(#[source] CodecError),
    #[error("bad index: {0}")]
    BadIndex(String),
    #[error("input stream")]
    Stream(#[source] StreamError),
    #[error("pfn {0:#x} is not in the image")]
    PfnNotFound(u64),
    #[error("pfn {pfn:#x} has no data in the image (page type {kind})")]
    PfnHasNoData { pfn: u64, kind: &'static str },
    #[error("regenerated stream does not match the saved one ({what})")]
    StreamMismatch { what: String },
    #[error("thread pool")]
    ThreadPool(#[source] rayon::ThreadPoolBuildError),
}

impl From<StreamError> for ImageError {
    fn from(e: StreamError) -> Self {
        ImageError::Stream(e)
    }
}
