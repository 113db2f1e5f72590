//! Foreign memory: map pages of another domain by guest frame number (privileged).

use crate::error::Result;
use crate::mapping::Mapping;
use crate::types::{DomId, Gfn};

/// Foreign-memory capability (`xenforeignmemory_map`).
pub trait ForeignMemory: Send + Sync {
    /// Map `gfns` of `dom` contiguously, read-only or writable.
    ///
    /// # Errors
    /// `ESRCH` no such domain; `EINVAL` a gfn outside the domain; `ENOENT` a paged-out
    /// page (the map starts a page-in; retry later).
    fn map(&self, dom: DomId, gfns: &[Gfn], writable: bool) -> Result<Mapping>;

    /// Map what can be mapped of `gfns` and report a per-page errno (0 = mapped). Pages
    /// with an error must not be accessed. Used to scan a domain's frames.
    ///
    /// # Errors
    /// `ESRCH` no such domain, or the whole call failing.
    fn map_sparse(&self, dom: DomId, gfns: &[Gfn], writable: bool) -> Result<(Mapping, Vec<i32>)>;
}
