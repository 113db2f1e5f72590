//! remoca memory server: a tokio daemon that lends a spare host's RAM as a store of (usually
//! 4 KiB) pages, and the client every Dom0 service uses to reach a set of such servers.
//!
//! - [`protocol`]: the wire format (fixed little-endian header, batched ops, handshake, auth).
//! - [`store`]: the sharded two-pool page store with capacity and host-memory headroom.
//! - [`server`]: the daemon (`server::run(listener, config, shutdown)`).
//! - [`client`]: encrypting, replicating, pipelining client with a blocking wrapper.
//!
//! The server never sees plaintext: the client seals every page with an AEAD before it leaves
//! the host. See `docs/memserver.md` and `docs/memserver-protocol.md`.

pub mod bench;
pub mod byte_size;
pub mod client;
pub mod protocol;
pub mod server;
pub mod stats_table;
pub mod store;
