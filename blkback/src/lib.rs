//! remoca's block backend: a stack of disk layers behind one [`Disk`] trait, and the
//! frontends that serve it to guests.
//!
//! ```text
//!  NBD clients ─▶ nbd::server ─┐                      ┌─▶ Overlay (per VM, slow device)
//!  blkif rings (Xen) ─────────┼─▶ request::execute ─▶│        │ clusters never written
//!                              │   (worker threads)   │        ▼
//!                              │                      └─▶ RawFile template (read-only)
//! ```
//!
//! - [`disk`]: the `Disk` trait every layer implements (sync, positioned, `&self`).
//! - [`raw`]: a raw image file — the read-only template, or a plain writable disk.
//! - [`overlay`]: the per-VM copy-on-write overlay and its file format.
//! - [`request`]: a frontend-agnostic request type and its execution against a `Disk`; the
//!   NBD server uses it and the blkif ring loop will too.
//! - [`export`]: validated export configuration, opened disks and per-export counters.
//! - [`nbd`]: the NBD server (fixed newstyle, structured replies, block status).
//! - [`commit`]: fold an overlay into a new template.
//! - [`memory`]: an in-memory `Disk` for tests.
//! - [`iobuf`]: reply data on its way to a socket (owned, or lent from a driver's shared
//!   memory) and the vectored write that sends it.
//! - [`workers`]: the pool of threads that run blocking disk requests for the frontends.
//! - [`blkif`]: the Xen blkif backend (xenbus handshake, ring loop) over `remoca-xen`.
//! - [`remote`]: layers in remote memory: a swap device (persistent pool, spill file) and a
//!   read cache (ephemeral pool).

pub mod bench;
pub mod blkif;
pub mod commit;
pub mod disk;
pub mod export;
pub mod failover;
pub mod images;
pub mod iobuf;
pub mod memory;
pub mod nbd;
pub mod overlay;
pub mod raw;
pub mod remote;
pub mod request;
pub mod workers;

pub use disk::{Disk, DiskError, Extent, WriteFlags, ZeroFlags};
pub use export::{ExportConfig, ExportStats, Exports};
