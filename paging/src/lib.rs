//! remoca remote paging: a mem_paging pager that keeps a guest at a memory target by
//! moving its cold pages to a [`store::PageStore`] (a memory server's persistent pool), and
//! working-set estimation by miss-ratio curves.
//!
//! - [`pager`]: xenpaging's protocol on the `remoca_xen::Host` traits, CLOCK victims,
//!   batched evictions, faults first, a write-ahead [`journal`] so a restart finds every
//!   page, and a shutdown that pages everything back.
//! - [`store`]: the page-store trait, in-memory and memory-server implementations.
//! - [`victim`]: the CLOCK victim policy.
//! - [`mrc`]: SHARDS-sampled and exact LRU miss-ratio curves, their error, a recommended
//!   size and a terminal plot.
//! - [`service`]: `run`-style entry points for the CLI (`remoca pager`, `remoca mrc`) and
//!   the status line `remoca up` shows.
//!
//! See `docs/paging.md`.

pub mod bench;
pub mod journal;
pub mod mrc;
pub mod pager;
pub mod service;
pub mod store;
pub mod victim;

pub use pager::{Pager, PagerConfig, PagerError, PagerStats, ShutdownReport, Target};
pub use store::{MemoryStore, MemserverStore, PageStore, StoreError};
