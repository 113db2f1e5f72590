//! Attaching to a simulated host that another process (`remoca up`) runs.
//!
//! That process serves its xenstore on a unix socket ([`super::StoreServer`]); here
//! [`attach`] connects to it, so `remoca xen store ...` and `remoca xen list` in a second
//! shell see and change the same host. Domains are read from the xenstore tree
//! (`/local/domain/<id>/name`, `memory/target`), the way a toolstack without hypercalls
//! would see them; pause/unpause and memory limits need the owning process. Foreign memory,
//! grants, event channels and mem_paging of the other process are not reachable: those
//! capabilities come from an empty local simulated host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::SimHost;
use crate::domain::{DomainControl, DomainFlags, DomainInfo, HypervisorInfo};
use crate::error::{Error, Result};
use crate::real::RealXenStore;
use crate::xenstore::{read_string, Tx, XenStore};
use crate::{BackendKind, DomId, Host, PAGE_SIZE};

/// Where `remoca up` serves its simulated xenstore: `$REMOCA_SIM_XENSTORE`, else
/// `$XDG_RUNTIME_DIR/remoca/sim-xenstored.socket`, else `/tmp/remoca-<uid>/sim-xenstored.socket`.
pub fn default_socket() -> PathBuf {
    match std::env::var_os("REMOCA_SIM_XENSTORE") {
        Some(p) => PathBuf::from(p),
        None => runtime_dir().join("sim-xenstored.socket"),
    }
}

/// This user's remoca runtime directory: `$XDG_RUNTIME_DIR/remoca`, else
/// `/tmp/remoca-<uid>`. `remoca up` keeps its state there too.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("remoca"),
        None => {
            use std::os::unix::fs::MetadataExt;
            let uid = std::fs::metadata("/proc/self")
                .map(|m| m.uid())
                .unwrap_or(0);
            PathBuf::from(format!("/tmp/remoca-{uid}"))
        }
    }
}

/// A host whose xenstore and domain list are those of the simulated host serving `socket`.
///
/// # Errors
/// The connect error when nothing serves there.
pub fn attach(socket: &Path) -> Result<Host> {
    let store: Arc<dyn XenStore> = Arc::new(RealXenStore::connect(socket)?);
    let mut host = Host::from_sim(SimHost::new());
    host.domains = Arc::new(StoreDomains {
        store: store.clone(),
        socket: socket.to_path_buf(),
    });
    host.store = store;
    host.attached = Some(socket.to_path_buf());
    debug_assert_eq!(host.kind(), BackendKind::Sim);
    Ok(host)
}

/// Domain control derived from the xenstore tree of a simulated host in another process.
struct StoreDomains {
    store: Arc<dyn XenStore>,
    socket: PathBuf,
}

impl DomainControl for StoreDomains {
    fn hypervisor(&self) -> Result<HypervisorInfo> {
        let mut info = SimHost::new().hypervisor()?;
        info.extra = format!("{} (attached to {})", info.extra, self.socket.display());
        Ok(info)
    }

    fn list(&self) -> Result<Vec<DomainInfo>> {
        let mut ids: Vec<DomId> = self
            .store
            .directory(Tx::NONE, "/local/domain")?
            .iter()
            .filter_map(|d| d.parse().ok())
            .collect();
        ids.sort_unstable();
        ids.into_iter().map(|d| self.info(d)).collect()
    }

    fn info(&self, dom: DomId) -> Result<DomainInfo> {
        let home = format!("/local/domain/{dom}");
        let name = match read_string(&*self.store, Tx::NONE, &format!("{home}/name")) {
            Ok(n) => n,
            Err(e) if e.is_errno(libc::ENOENT) => return Err(Error::NoDomain(dom)),
            Err(e) => return Err(e),
        };
        let kib: u64 = read_string(&*self.store, Tx::NONE, &format!("{home}/memory/target"))
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let pages = kib / (PAGE_SIZE as u64 / 1024);
        Ok(DomainInfo {
            domid: dom,
            name,
            flags: DomainFlags {
                running: true,
                ..DomainFlags::default()
            },
            tot_pages: pages,
            max_pages: pages,
            paged_pages: 0,
            online_vcpus: 1,
            cpu_time_ns: 0,
            handle: [0; 16],
        })
    }

    fn pause(&self, _: DomId) -> Result<()> {
        Err(self.owner_only("pause"))
    }

    fn unpause(&self, _: DomId) -> Result<()> {
        Err(self.owner_only("unpause"))
    }

    fn set_max_memory(&self, _: DomId, _: u64) -> Result<()> {
        Err(self.owner_only("set-max-memory"))
    }
}

impl StoreDomains {
    fn owner_only(&self, what: &'static str) -> Error {
        let _ = what;
        Error::Unsupported {
            what,
            backend: "attached simulated (only the `remoca up` process owning the host can)",
        }
    }
}
