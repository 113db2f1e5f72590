//! The peer protocol between nodes (and between a node and the origin).
//!
//! - [`wire`]: frames, parsing and encoding (no I/O; fuzzed).
//! - [`server`]: serves the chunks a node holds (and, on a pull request, fetches them from
//!   the origin first); the origin is the same server over any [`super::chunk::ChunkSource`].
//! - [`client`]: a blocking client with connect/read/write timeouts and a small pool of
//!   connections, used by the fetcher.
//! - [`node`]: one node put together (cache, fetcher, server) and a deployment of an image.
//!
//! Who has what is decided by rendezvous hashing, not by a tracker: see [`super::fetch`].

pub mod client;
pub mod node;
pub mod server;
pub mod wire;
