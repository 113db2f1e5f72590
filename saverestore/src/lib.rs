//! Parallel compressed save images of Xen `xl save` streams.
//!
//! * [`stream`]: the `xl save` stream (parser keeping every non-page byte, writer, builder).
//! * [`image`]: remoca's own image format (verbatim records, page index, compressed blocks).
//! * [`codec`]: the block codecs.
//! * [`save`] / [`restore`]: the parallel pipelines between the two.

pub mod stream;
