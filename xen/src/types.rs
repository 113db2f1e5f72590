//! Small value types shared by all capabilities.

use std::fmt;

/// A Xen domain id.
pub type DomId = u32;
/// A guest frame number (guest pseudo-physical page number).
pub type Gfn = u64;
/// A grant reference in a domain's grant table.
pub type GrantRef = u32;
/// An event-channel port.
pub type Port = u32;

/// Xen's page size; every mapping and grant is in units of it.
pub const PAGE_SIZE: usize = 4096;

/// Which backend is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The real hypervisor through the libxen* libraries loaded at run time.
    Real,
    /// The in-process simulated Xen host.
    Sim,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Real => "real",
            BackendKind::Sim => "sim",
        })
    }
}
