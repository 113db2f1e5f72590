//! Disk layers whose blocks live in remote memory (the memory servers of
//! `remoca-memserver`), reached through one shared [`RemoteClient`].
//!
//! - [`swap::SwapDisk`]: a guest's swap device in the **persistent** pool, two replicas,
//!   with a local [`spill`] file when the servers cannot take a block. The only copy of
//!   evicted guest pages: a write is acknowledged only when it is durable.
//! - [`cache::RemoteCache`]: a read cache over any disk in the **ephemeral** pool, admitting
//!   blocks on their second touch ([`ghost`]); the servers may drop its blocks at any time.
//! - [`observe`]: a hook reporting swap-outs, swap-ins and reads per guest to a
//!   working-set estimator.
//! - [`exports`]: how a backend opens exports with these layers beside plain ones.
//!
//! The two pools are never mixed (each layer uses one), and every page is sealed by the
//! client before it leaves the host. See `docs/remote-memory.md`.

pub mod cache;
pub mod client;
pub mod exports;
pub mod ghost;
pub mod observe;
pub mod page_codec;
pub mod spill;
pub mod stripes;
pub mod swap;

pub use cache::{CacheConfig, CacheSnapshot, RemoteCache};
pub use client::RemoteClient;
pub use exports::{
    namespace_for, open_exports, CacheExport, OpenedExports, RemoteExportError, SwapExport,
};
pub use observe::{Access, AccessObserver, Source};
pub use swap::{SwapConfig, SwapDisk, SwapOpenError, SwapSnapshot};
