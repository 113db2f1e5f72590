//! The memory-server wire protocol (version 1). See `docs/memserver-protocol.md`.
//!
//! - [`frame`]: the fixed 48-byte header and the stream decoder (limits checked first).
//! - [`message`]: each opcode's request and reply payload.
//! - [`control`]: bincode-encoded HELLO and STATS bodies.
//! - [`auth`]: the pre-shared-key challenge-response.

pub mod auth;
pub mod control;
pub mod frame;
pub mod message;

pub use frame::{decode, Frame, FrameError, Header, Opcode, Pool, Status};
pub use message::{Reply, ReplyBody, Request};
