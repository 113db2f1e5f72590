//! Content-addressed images (issue 8).
//!
//! An image is cut into fixed-size chunks keyed by their BLAKE3 hash; zero chunks are elided.
//! The pieces, each in its own module:
//!
//! - [`chunk`]: the vocabulary every other piece speaks — chunk ids, chunk sizes, the flattened
//!   chunk list of one image version, and the [`chunk::ChunkSource`] trait through which a
//!   template layer or a cache asks for a chunk by hash.
//! - [`store`]: the on-disk store — sealed arenas in an append-only log, a rebuildable index,
//!   manifests, layers and snapshots, verify and gc (`docs/image-store.md`).
//! - [`cache`]: the node's persistent, bounded, hash-checked chunk cache with layer-aware
//!   eviction; [`peer`]: the peer protocol (wire, server, client, node); [`fetch`]: the
//!   multi-path fetcher (peers first, then the origin); [`template`]: the read-only `Disk` that
//!   serves an image version from a chunk list (`docs/image-cache.md`); [`export`]: an NBD
//!   export whose template is an image version, through the node cache or from a store.
//! - [`bench`]: `remoca bench images`, the deployment test bed.

pub mod bench;
pub mod cache;
pub mod chunk;
pub mod export;
pub mod fetch;
pub mod peer;
pub mod store;
pub mod template;
pub mod testbed;
