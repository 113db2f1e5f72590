//! The real backend: Xen's libraries loaded at run time, and xenstore over its wire
//! protocol. Nothing here is linked at build time, so `remoca` builds and starts on hosts
//! without Xen and says so when asked to use it.

mod evtchn;
mod foreignmemory;
mod gnttab;
mod library;
mod xenctrl;
mod xenstore;

pub use evtchn::XenEvtchn;
pub use foreignmemory::XenForeignMemory;
pub use gnttab::XenGnttab;
pub use xenctrl::XenCtrl;
pub use xenstore::RealXenStore;

use std::path::Path;

use crate::error::Error;

/// The device every dom0 (or privileged driver domain) has.
pub const PRIVCMD: &str = "/dev/xen/privcmd";

/// Why the real backend cannot be used here, if it cannot.
pub fn absent_reason() -> Option<String> {
    if !Path::new("/proc/xen").exists() && !Path::new(PRIVCMD).exists() {
        return Some(format!(
            "{PRIVCMD} does not exist: this machine is not running as a Xen domain"
        ));
    }
    if !Path::new(PRIVCMD).exists() {
        return Some(format!(
            "{PRIVCMD} does not exist: load xen-privcmd and mount xenfs, or run in dom0"
        ));
    }
    if let Err(Error::Absent { reason }) = library::open_first(library::XENCTRL) {
        return Some(format!(
            "the Xen libraries are not installed ({reason}); install xen-utils or libxenmisc"
        ));
    }
    None
}
