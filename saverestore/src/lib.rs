//! Parallel compressed save images of Xen `xl save` streams.
//!
//! * [`stream`]: the `xl save` stream (parser keeping every non-page byte, writer, builder).
//! * [`image`]: remoca's own image format (verbatim records, page index, compressed blocks).
//! * [`codec`]: the block codecs; [`classify`]: zero / single-word / hashed pages;
//!   [`digest`]: the stream check built from the pages' hashes.
//! * [`save`] / [`restore`]: the parallel pipelines between the two; [`mapped`]: a file
//!   mapped for a save that reads its pages in place.

pub mod bench;
pub mod classify;
pub mod codec;
pub mod crc;
pub mod dest;
pub mod digest;
pub mod image;
pub mod inspect;
pub mod mapped;
pub mod nfs;
pub mod nfs_testbed;
pub mod progress;
pub mod restore;
pub mod save;
pub mod stream;
pub mod xl;

pub use codec::{Codec, CodecChoice};
pub use image::{ImageError, ImageReader, ReadAt};
pub use mapped::MappedFile;
pub use restore::{restore_stream, RestoreStats};
pub use save::{save_slice, save_stream, SaveOptions, SaveStats};
