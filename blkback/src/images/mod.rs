//! Content-addressed images (issue 8).
//!
//! An image is cut into fixed-size chunks keyed by their BLAKE3 hash; zero chunks are elided.
//! The pieces, each in its own module:
//!
//! - [`chunk`]: the vocabulary every other piece speaks — chunk ids, chunk sizes, the flattened
//!   chunk list of one image version, and the [`chunk::ChunkSource`] trait through which a
//!   template layer or a cache asks for a chunk by hash.
//! - `store`: the on-disk store — sealed arenas in an append-only log, a rebuildable index,
//!   manifests, layers and snapshots, verify and gc.
//! - `cache`, `peer`, `template`: the per-node cooperative chunk cache, the peer protocol and
//!   the `Disk` layer that serves a template from a chunk list.

pub mod bench;
pub mod cache;
pub mod chunk;
pub mod fetch;
pub mod peer;
pub mod template;
pub mod store;
