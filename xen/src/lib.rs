//! The Xen seam: the one place in remoca that knows Xen.
//!
//! Services see small capability traits — [`DomainControl`], [`XenStore`],
//! [`ForeignMemory`], [`GrantTables`], [`EventChannels`], [`MemPaging`] — bundled in a
//! [`Host`] that [`open`] builds from a [`BackendChoice`]:
//!
//! ```text
//!            services (pager, blkback, save, up)
//!                          |
//!                        Host  ---- open(auto | real | sim)
//!              /                      \
//!   real: libxenctrl, libxenforeignmemory,   sim: an in-process Xen host
//!   libxengnttab, libxenevtchn (dlopen'ed),  (domains, xenstore, grants,
//!   xenstore wire protocol                   evtchn, mem_paging, faults)
//! ```
//!
//! Shared rings ([`ring`]) and the `#[repr(C)]` ABI ([`abi`]) are backend-independent.

pub mod abi;
pub mod contract;
pub mod domain;
pub mod error;
pub mod evtchn;
pub mod foreign;
pub mod grant;
pub mod mapping;
pub mod mem_paging;
pub mod real;
pub mod ring;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod types;
pub mod xenstore;

pub use domain::{DomainControl, DomainFlags, DomainInfo, HypervisorInfo};
pub use error::{Error, Result};
pub use evtchn::{EventChannelHandle, EventChannels};
pub use foreign::ForeignMemory;
pub use grant::{GrantCopy, GrantHandle, GrantTables};
pub use mapping::Mapping;
pub use mem_paging::{MemPaging, PagingRing};
pub use types::{BackendKind, DomId, Gfn, GrantRef, Port, PAGE_SIZE};
pub use xenstore::{Perm, Tx, Watch, WatchEvent, XenStore};

use std::str::FromStr;
use std::sync::Arc;

/// Which backend to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// Real where `/dev/xen/privcmd` and the libraries exist, else the simulator.
    #[default]
    Auto,
    Real,
    Sim,
}

impl FromStr for BackendChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "real" => Ok(BackendChoice::Real),
            "sim" => Ok(BackendChoice::Sim),
            other => Err(Error::Invalid(format!(
                "unknown backend {other:?}: expected auto, real or sim"
            ))),
        }
    }
}

/// Every capability of one Xen host.
#[derive(Clone)]
pub struct Host {
    kind: BackendKind,
    /// Why `auto` fell back to the simulator, if it did.
    fallback_reason: Option<String>,
    pub domains: Arc<dyn DomainControl>,
    pub store: Arc<dyn XenStore>,
    pub foreign: Arc<dyn ForeignMemory>,
    pub grants: Arc<dyn GrantTables>,
    pub evtchn: Arc<dyn EventChannels>,
    pub paging: Arc<dyn MemPaging>,
    #[cfg(any(test, feature = "sim"))]
    sim: Option<sim::SimHost>,
    #[cfg(any(test, feature = "sim"))]
    attached: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Open the host's Xen backend.
///
/// # Errors
/// `Absent` when `real` is forced on a host without Xen (the reason names what is
/// missing), or when `auto` finds no Xen and the simulator is not compiled in.
pub fn open(choice: BackendChoice) -> Result<Host> {
    match choice {
        BackendChoice::Real => open_real(),
        BackendChoice::Sim => open_sim(None),
        BackendChoice::Auto => match real::absent_reason() {
            None => open_real(),
            Some(reason) => open_sim(Some(reason)),
        },
    }
}

fn open_real() -> Result<Host> {
    if let Some(reason) = real::absent_reason() {
        return Err(Error::Absent { reason });
    }
    let ctrl = real::XenCtrl::open().map_err(root_hint)?;
    Ok(Host {
        kind: BackendKind::Real,
        fallback_reason: None,
        domains: ctrl.clone(),
        paging: ctrl,
        store: Arc::new(real::RealXenStore::open().map_err(root_hint)?),
        foreign: Arc::new(real::XenForeignMemory::open().map_err(root_hint)?),
        grants: Arc::new(real::XenGnttab::load().map_err(root_hint)?),
        evtchn: Arc::new(real::XenEvtchn::load().map_err(root_hint)?),
        #[cfg(any(test, feature = "sim"))]
        sim: None,
        #[cfg(any(test, feature = "sim"))]
        attached: None,
    })
}

/// Say what to do about a permission error while opening Xen's devices: the usual cause is
/// running as a user other than root in dom0.
fn root_hint(e: Error) -> Error {
    match e {
        Error::Call { op, source }
            if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) =>
        {
            Error::Call {
                op: format!("{op}: permission denied (Xen's devices need root in dom0)"),
                source,
            }
        }
        other => other,
    }
}

#[cfg(any(test, feature = "sim"))]
fn open_sim(fallback_reason: Option<String>) -> Result<Host> {
    // A `remoca up` on the simulated host serves its xenstore; join it so commands in other
    // shells see the same host. Otherwise, a fresh demo host for this process alone.
    let socket = sim::attached::default_socket();
    let mut host = match sim::attached::attach(&socket) {
        Ok(host) => host,
        Err(_) => Host::from_sim(sim::SimHost::demo()?),
    };
    host.fallback_reason = fallback_reason;
    Ok(host)
}

#[cfg(not(any(test, feature = "sim")))]
fn open_sim(fallback_reason: Option<String>) -> Result<Host> {
    Err(Error::Absent {
        reason: format!(
            "{}; and this build has no simulated host (feature `sim`)",
            fallback_reason.unwrap_or_else(|| "the simulator was asked for".into())
        ),
    })
}

impl Host {
    /// A host over an existing simulated host (tests build scenarios on it first).
    #[cfg(any(test, feature = "sim"))]
    pub fn from_sim(sim: sim::SimHost) -> Host {
        let s = Arc::new(sim.clone());
        Host {
            kind: BackendKind::Sim,
            fallback_reason: None,
            domains: s.clone(),
            store: s.clone(),
            foreign: s.clone(),
            grants: s.clone(),
            evtchn: s.clone(),
            paging: s,
            sim: Some(sim),
            attached: None,
        }
    }

    /// The simulated host behind this one, when it is simulated.
    #[cfg(any(test, feature = "sim"))]
    pub fn sim(&self) -> Option<&sim::SimHost> {
        self.sim.as_ref()
    }

    /// Whether this host is the simulated one served by another process (`remoca up`).
    #[cfg(any(test, feature = "sim"))]
    pub fn attached_to(&self) -> Option<&std::path::Path> {
        self.attached.as_deref()
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Record why the simulator is used instead of real Xen (for status output).
    #[must_use]
    pub fn with_fallback_reason(mut self, reason: String) -> Host {
        self.fallback_reason = Some(reason);
        self
    }

    /// Why `auto` chose the simulator, if it did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Every domain, with its name from xenstore.
    ///
    /// # Errors
    /// As [`DomainControl::list`].
    pub fn domains(&self) -> Result<Vec<DomainInfo>> {
        let mut list = self.domains.list()?;
        for d in &mut list {
            d.name = self.name_of(d.domid);
        }
        Ok(list)
    }

    fn name_of(&self, dom: DomId) -> String {
        xenstore::read_string(&*self.store, Tx::NONE, &format!("/local/domain/{dom}/name"))
            .unwrap_or_else(|_| {
                if dom == 0 {
                    "Domain-0".into()
                } else {
                    String::new()
                }
            })
    }

    /// Find a domain by id or name, as `xl` accepts either.
    ///
    /// # Errors
    /// `NoDomain`, or `Invalid` naming the unknown domain name.
    pub fn find_domain(&self, id_or_name: &str) -> Result<DomainInfo> {
        if let Ok(id) = id_or_name.parse::<DomId>() {
            let mut info = self.domains.info(id)?;
            info.name = self.name_of(id);
            return Ok(info);
        }
        self.domains()?
            .into_iter()
            .find(|d| d.name == id_or_name)
            .ok_or_else(|| Error::Invalid(format!("no domain named {id_or_name:?}")))
    }

    /// Set the balloon target (`memory/target`, KiB) the guest's balloon driver follows.
    ///
    /// # Errors
    /// `NoDomain`, or the xenstore error.
    pub fn set_memory_target(&self, dom: DomId, kib: u64) -> Result<()> {
        self.domains.info(dom)?;
        self.store.write(
            Tx::NONE,
            &format!("/local/domain/{dom}/memory/target"),
            kib.to_string().as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_errors_say_to_run_as_root() {
        let e = root_hint(Error::os("opening /dev/xen/privcmd", libc::EACCES));
        assert!(e.is_errno(libc::EACCES));
        assert!(e.to_string().contains("need root in dom0"), "{e}");
        let e = root_hint(Error::os("opening /dev/xen/privcmd", libc::ENOENT));
        assert!(!e.to_string().contains("root"), "{e}");
    }
}
