//! The in-house NBD server (fixed newstyle, structured replies, `base:allocation` and
//! `qemu:allocation-depth` block status). `docs/nbd.md` lists what is supported.
//!
//! - [`wire`]: byte layouts and parsers (fuzzed).
//! - [`handshake`]: the option phase.
//! - [`transmission`]: the request loop of one connection.
//! - [`server`]: listeners, connection limit, shutdown.
//! - [`client`]: a minimal blocking client for tests and tools.

pub mod client;
pub mod handshake;
pub mod server;
pub mod shutdown;
pub mod transmission;
pub mod wire;

pub use server::{run, serve_stream, Listener, ServerError};
