//! The simulated Xen host: a stateful, in-process stand-in for the hypervisor, xenstored
//! and the gntdev/evtchn/privcmd devices, so every service runs and is tested without Xen.
//!
//! What it models: domains with real page contents (memfd-backed, so foreign and grant maps
//! alias the same memory as on Xen) and per-page p2m state; a xenstore with permissions,
//! transactions and watches; grant tables (read-only grants, bad refs); event channels with
//! masking and pending bits, signalled through a real eventfd; mem_paging (nominate fails on
//! mapped pages, evict fails if the page was touched since nomination, a guest touching a
//! paged-out page posts a request on the 8-slot vm_event ring and blocks until the pager
//! loads the page and resumes with a correctly versioned response); and fault injection.
//! See `docs/xen-interface.md` for what it does not model.

pub mod attached;
mod evtchn;
pub mod faults;
mod grants;
mod memory;
mod paging;
pub mod server;
mod xenstore;

pub use faults::Fault;
pub use server::StoreServer;
pub use xenstore::{SimStoreConn, SimXenstore};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::domain::{DomainControl, DomainFlags, DomainInfo, HypervisorInfo};
use crate::error::{Error, Result};
use crate::foreign::ForeignMemory;
use crate::mapping::Mapping;
use crate::types::{DomId, Gfn, GrantRef, Port, PAGE_SIZE};
use crate::xenstore::{Access, Perm, Tx, XenStore};

use memory::GuestMemory;

/// The p2m state of one guest page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    Ram,
    /// Nominated for eviction; `touched` once mapped or accessed since.
    Nominated {
        touched: bool,
    },
    PagedOut,
    /// Paged out, and a vCPU is waiting for it.
    PagingIn,
}

/// How a simulated domain is created.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    pub name: String,
    pub pages: u64,
    pub hvm: bool,
    pub hap: bool,
    pub vcpus: u32,
}

impl DomainSpec {
    /// A PV guest of `pages` pages.
    pub fn pv(name: &str, pages: u64) -> Self {
        DomainSpec {
            name: name.into(),
            pages,
            hvm: false,
            hap: false,
            vcpus: 1,
        }
    }

    /// An HVM guest with HAP, the kind mem_paging needs.
    pub fn hvm(name: &str, pages: u64) -> Self {
        DomainSpec {
            hvm: true,
            hap: true,
            ..Self::pv(name, pages)
        }
    }
}

#[derive(Debug)]
struct GrantEntry {
    to: DomId,
    gfn: Gfn,
    readonly: bool,
}

#[derive(Debug)]
struct SimDomain {
    spec: DomainSpec,
    memory: GuestMemory,
    p2m: Vec<PageState>,
    map_count: Vec<u32>,
    pause_count: u32,
    max_pages: u64,
    paged_pages: u64,
    crashed: bool,
    grants: HashMap<GrantRef, GrantEntry>,
    next_gref: GrantRef,
    paging: Option<paging::PagingState>,
    created: std::time::Instant,
}

impl SimDomain {
    fn info(&self, domid: DomId) -> DomainInfo {
        let pages = self.spec.pages;
        DomainInfo {
            domid,
            name: self.spec.name.clone(),
            flags: DomainFlags {
                dying: false,
                hvm: self.spec.hvm,
                shutdown: self.crashed,
                paused: self.pause_count > 0,
                blocked: self.pause_count == 0 && !self.crashed,
                running: false,
                hap: self.spec.hap,
            },
            tot_pages: pages - self.paged_pages,
            max_pages: self.max_pages,
            paged_pages: self.paged_pages,
            online_vcpus: self.spec.vcpus,
            cpu_time_ns: self.created.elapsed().as_nanos() as u64 / 100,
            handle: [domid as u8; 16],
        }
    }
}

#[derive(Debug, Default)]
struct HostState {
    domains: BTreeMap<DomId, SimDomain>,
    next_domid: DomId,
    ports: evtchn::PortTable,
}

impl HostState {
    fn domain(&self, dom: DomId) -> Result<&SimDomain> {
        self.domains.get(&dom).ok_or(Error::NoDomain(dom))
    }

    fn domain_mut(&mut self, dom: DomId) -> Result<&mut SimDomain> {
        self.domains.get_mut(&dom).ok_or(Error::NoDomain(dom))
    }
}

#[derive(Debug)]
struct Inner {
    state: Mutex<HostState>,
    /// Signalled on every page-state, paging-response and guest-event change.
    changed: Condvar,
    store: SimXenstore,
    faults: faults::FaultPlan,
}

/// A simulated Xen host. Cheap to clone; clones share the host.
#[derive(Debug, Clone)]
pub struct SimHost {
    inner: Arc<Inner>,
    /// The domain whose grant mappings and event channels this view makes (0 but for
    /// [`SimHost::acting_as`]).
    me: DomId,
}

impl Default for SimHost {
    fn default() -> Self {
        Self::new()
    }
}

impl SimHost {
    /// A host with only dom0 (`Domain-0`, 4096 pages).
    pub fn new() -> Self {
        let host = SimHost {
            inner: Arc::new(Inner {
                state: Mutex::new(HostState::default()),
                changed: Condvar::new(),
                store: SimXenstore::new(),
                faults: faults::FaultPlan::default(),
            }),
            me: 0,
        };
        host.create_domain(DomainSpec::pv("Domain-0", 4096))
            .expect("creating the simulated dom0");
        host
    }

    /// The demo host `remoca up` and the CLI use on a machine without Xen: dom0 and one PV
    /// guest, `demo`, of 64 MiB.
    ///
    /// # Errors
    /// Memory allocation failure.
    pub fn demo() -> Result<Self> {
        let host = SimHost::new();
        host.create_domain(DomainSpec::pv("demo", 16384))?;
        Ok(host)
    }

    /// One page of shared memory outside any domain (ring tests, vm_event rings).
    ///
    /// # Errors
    /// Allocation failure.
    pub fn anonymous_shared_pages(pages: u64) -> Result<Mapping> {
        let mem = GuestMemory::new(pages)?;
        let gfns: Vec<u64> = (0..pages).collect();
        mem.map(&gfns, true)
    }

    /// Arm a fault; see [`faults::OPS`] for operation names.
    ///
    /// # Errors
    /// `Invalid` for an unknown operation.
    pub fn inject(&self, op: &str, fault: Fault) -> Result<()> {
        self.inner.faults.inject(op, fault)
    }

    /// Disarm all faults.
    pub fn clear_faults(&self) {
        self.inner.faults.clear();
    }

    /// The xenstore daemon; [`SimXenstore::connect`] gives a connection as any domain.
    pub fn xenstore(&self) -> &SimXenstore {
        &self.inner.store
    }

    /// Create a domain and its xenstore home, as the toolstack does.
    ///
    /// # Errors
    /// Memory allocation failure.
    pub fn create_domain(&self, spec: DomainSpec) -> Result<DomId> {
        let memory = GuestMemory::new(spec.pages)?;
        let pages = spec.pages as usize;
        let domid = {
            let mut st = self.inner.state.lock();
            let domid = st.next_domid;
            st.next_domid += 1;
            st.domains.insert(
                domid,
                SimDomain {
                    max_pages: spec.pages,
                    spec: spec.clone(),
                    memory,
                    p2m: vec![PageState::Ram; pages],
                    map_count: vec![0; pages],
                    pause_count: 0,
                    paged_pages: 0,
                    crashed: false,
                    grants: HashMap::new(),
                    next_gref: 8,
                    paging: None,
                    created: std::time::Instant::now(),
                },
            );
            domid
        };
        let xs = self.inner.store.connect(0);
        let home = format!("/local/domain/{domid}");
        let kib = spec.pages * (PAGE_SIZE as u64 / 1024);
        for (k, v) in [
            ("name", spec.name.clone()),
            ("domid", domid.to_string()),
            ("memory/target", kib.to_string()),
            ("memory/static-max", kib.to_string()),
        ] {
            xs.write(Tx::NONE, &format!("{home}/{k}"), v.as_bytes())?;
        }
        xs.mkdir(Tx::NONE, &format!("{home}/device"))?;
        xs.set_perms(Tx::NONE, &home, &[Perm::new(domid, Access::None)])?;
        for k in ["name", "domid", "memory", "device"] {
            xs.set_perms(
                Tx::NONE,
                &format!("{home}/{k}"),
                &[Perm::new(domid, Access::None)],
            )?;
        }
        self.inner.store.fire_special("@introduceDomain");
        Ok(domid)
    }

    /// Destroy a domain: its channels become unbound for their peers, grants vanish, its
    /// xenstore home is removed and `@releaseDomain` fires.
    ///
    /// # Errors
    /// `NoDomain`.
    pub fn destroy_domain(&self, dom: DomId) -> Result<()> {
        {
            let mut st = self.inner.state.lock();
            st.domains.remove(&dom).ok_or(Error::NoDomain(dom))?;
            st.ports.domain_gone(dom);
        }
        self.inner.changed.notify_all();
        let _ = self
            .inner
            .store
            .connect(0)
            .rm(Tx::NONE, &format!("/local/domain/{dom}"));
        self.inner.store.fire_special("@releaseDomain");
        Ok(())
    }

    /// The p2m state of a page.
    ///
    /// # Errors
    /// `NoDomain`, `EINVAL` for a gfn outside the domain.
    pub fn page_state(&self, dom: DomId, gfn: Gfn) -> Result<PageState> {
        let st = self.inner.state.lock();
        let d = st.domain(dom)?;
        d.p2m
            .get(gfn as usize)
            .copied()
            .ok_or_else(|| Error::os(format!("gfn {gfn:#x} of domain {dom}"), libc::EINVAL))
    }

    /// Is the domain crashed (e.g. its pager went away with pages out)?
    pub fn is_crashed(&self, dom: DomId) -> Result<bool> {
        Ok(self.inner.state.lock().domain(dom)?.crashed)
    }

    /// The same host seen from a driver domain `dom`: grants are resolved, and event channels
    /// bound, notified and unbound, as that domain (a guest must grant to it and allocate its
    /// port for it). Xenstore and domain control stay dom0's. A driver domain's backend runs
    /// on `Host::from_sim(sim.acting_as(dom))`.
    pub fn acting_as(&self, dom: DomId) -> SimHost {
        SimHost {
            inner: self.inner.clone(),
            me: dom,
        }
    }

    /// The guest grants `gfn` to `to`, like gnttab_grant_foreign_access.
    ///
    /// # Errors
    /// `NoDomain`, `EINVAL` for a gfn outside the domain.
    pub fn grant_access(
        &self,
        dom: DomId,
        to: DomId,
        gfn: Gfn,
        readonly: bool,
    ) -> Result<GrantRef> {
        let mut st = self.inner.state.lock();
        let d = st.domain_mut(dom)?;
        if gfn >= d.spec.pages {
            return Err(Error::os(format!("granting gfn {gfn:#x}"), libc::EINVAL));
        }
        let gref = d.next_gref;
        d.next_gref += 1;
        d.grants.insert(gref, GrantEntry { to, gfn, readonly });
        Ok(gref)
    }

    /// The guest revokes a grant.
    ///
    /// # Errors
    /// `NoDomain`; `EINVAL` unknown grant; `EBUSY` still mapped.
    pub fn revoke_grant(&self, dom: DomId, gref: GrantRef) -> Result<()> {
        let mut st = self.inner.state.lock();
        let d = st.domain_mut(dom)?;
        let e = d
            .grants
            .get(&gref)
            .ok_or_else(|| Error::os(format!("revoking grant {gref}"), libc::EINVAL))?;
        if d.map_count[e.gfn as usize] > 0 {
            return Err(Error::os(
                format!("revoking mapped grant {gref}"),
                libc::EBUSY,
            ));
        }
        d.grants.remove(&gref);
        Ok(())
    }

    /// The guest writes into one of its pages (faulting it in first if paged out).
    ///
    /// # Errors
    /// `NoDomain`, `EINVAL` out of range, `ETIMEDOUT` if no pager brings the page back.
    pub fn guest_write(&self, dom: DomId, gfn: Gfn, offset: usize, data: &[u8]) -> Result<()> {
        let st = self.guest_touch(dom, gfn)?;
        st.domain(dom)?.memory.write_page(gfn, offset, data)
    }

    /// The guest reads one of its pages (faulting it in first if paged out).
    ///
    /// # Errors
    /// As [`SimHost::guest_write`].
    pub fn guest_read(&self, dom: DomId, gfn: Gfn) -> Result<Vec<u8>> {
        let st = self.guest_touch(dom, gfn)?;
        let mut page = vec![0u8; PAGE_SIZE];
        st.domain(dom)?.memory.read_page(gfn, &mut page)?;
        Ok(page)
    }

    /// Guest side of event channels: allocate a port that `remote` may bind.
    ///
    /// # Errors
    /// `NoDomain`.
    pub fn evtchn_alloc_unbound(&self, dom: DomId, remote: DomId) -> Result<Port> {
        let mut st = self.inner.state.lock();
        st.domain(dom)?;
        Ok(st.ports.alloc_unbound(dom, remote))
    }

    /// Guest side: notify the peer of one of the guest's ports.
    ///
    /// # Errors
    /// `EINVAL` for a port that is not bound.
    pub fn evtchn_guest_notify(&self, dom: DomId, port: Port) -> Result<()> {
        let mut st = self.inner.state.lock();
        st.ports.send(dom, port)?;
        drop(st);
        self.inner.changed.notify_all();
        Ok(())
    }

    /// Guest side: wait until one of the guest's ports is pending, clearing it.
    pub fn evtchn_guest_wait(&self, dom: DomId, port: Port, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.inner.state.lock();
        loop {
            if st.ports.take_guest_pending(dom, port) {
                return true;
            }
            if self.inner.changed.wait_until(&mut st, deadline).timed_out() {
                return st.ports.take_guest_pending(dom, port);
            }
        }
    }

    fn check(&self, op: &'static str) -> Result<faults::Verdict> {
        self.inner.faults.check(op)
    }
}

impl DomainControl for SimHost {
    fn hypervisor(&self) -> Result<HypervisorInfo> {
        Ok(HypervisorInfo {
            major: 4,
            minor: 17,
            extra: ".0-remoca-sim".into(),
            capabilities: "xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_64 (simulated)".into(),
            vm_event_version: crate::abi::vm_event::INTERFACE_VERSION,
        })
    }

    fn list(&self) -> Result<Vec<DomainInfo>> {
        self.check("domain.list")?;
        let st = self.inner.state.lock();
        Ok(st.domains.iter().map(|(id, d)| d.info(*id)).collect())
    }

    fn info(&self, dom: DomId) -> Result<DomainInfo> {
        self.check("domain.info")?;
        let st = self.inner.state.lock();
        Ok(st.domain(dom)?.info(dom))
    }

    fn pause(&self, dom: DomId) -> Result<()> {
        self.check("domain.pause")?;
        let mut st = self.inner.state.lock();
        if dom == 0 {
            return Err(Error::os("pausing dom0", libc::EINVAL));
        }
        st.domain_mut(dom)?.pause_count += 1;
        Ok(())
    }

    fn unpause(&self, dom: DomId) -> Result<()> {
        self.check("domain.unpause")?;
        let mut st = self.inner.state.lock();
        let d = st.domain_mut(dom)?;
        d.pause_count = d.pause_count.saturating_sub(1);
        Ok(())
    }

    fn set_max_memory(&self, dom: DomId, kib: u64) -> Result<()> {
        self.check("domain.set_max_memory")?;
        let mut st = self.inner.state.lock();
        st.domain_mut(dom)?.max_pages = kib / (PAGE_SIZE as u64 / 1024);
        Ok(())
    }
}

impl ForeignMemory for SimHost {
    fn map(&self, dom: DomId, gfns: &[Gfn], writable: bool) -> Result<Mapping> {
        self.check("foreign.map")?;
        let mut st = self.inner.state.lock();
        let d = st.domain_mut(dom)?;
        for g in gfns {
            match d.p2m.get(*g as usize) {
                None => {
                    return Err(Error::os(
                        format!("mapping gfn {g:#x} of domain {dom}"),
                        libc::EINVAL,
                    ))
                }
                Some(PageState::PagedOut | PageState::PagingIn) => {
                    return Err(Error::os(
                        format!("mapping paged-out gfn {g:#x} of domain {dom}"),
                        libc::ENOENT,
                    ))
                }
                Some(_) => {}
            }
        }
        let map = d.memory.map(gfns, writable)?;
        drop(st);
        self.track_map(dom, gfns.to_vec(), map)
    }

    fn map_sparse(&self, dom: DomId, gfns: &[Gfn], writable: bool) -> Result<(Mapping, Vec<i32>)> {
        self.check("foreign.map")?;
        let (map, errs, mapped) = {
            let st = self.inner.state.lock();
            let d = st.domain(dom)?;
            let errs: Vec<i32> = gfns
                .iter()
                .map(|g| match d.p2m.get(*g as usize) {
                    None => libc::EINVAL,
                    Some(PageState::PagedOut | PageState::PagingIn) => libc::ENOENT,
                    Some(_) => 0,
                })
                .collect();
            let skip: Vec<usize> = (0..gfns.len()).filter(|i| errs[*i] != 0).collect();
            let mapped: Vec<Gfn> = gfns
                .iter()
                .zip(&errs)
                .filter(|(_, e)| **e == 0)
                .map(|(g, _)| *g)
                .collect();
            (d.memory.map_sparse(gfns, writable, &skip)?, errs, mapped)
        };
        Ok((self.track_map(dom, mapped, map)?, errs))
    }
}

impl SimHost {
    /// Count the pages of `map` as mapped until it is dropped (nominate/evict see it).
    fn track_map(&self, dom: DomId, gfns: Vec<Gfn>, map: Mapping) -> Result<Mapping> {
        {
            let mut st = self.inner.state.lock();
            let d = st.domain_mut(dom)?;
            for g in &gfns {
                // A mapped page cannot be evicted (evict checks the count), but mapping a
                // nominated page is how a pager reads it before evicting: like Xen, that does
                // not count as the guest touching it.
                d.map_count[*g as usize] += 1;
            }
        }
        let weak = Arc::downgrade(&self.inner);
        let len = map.len();
        let ptr = std::ptr::NonNull::new(map.as_ptr()).expect("mapping is non-null");
        let release = Box::new(move |_p: *mut u8, _n: usize| {
            drop(map);
            if let Some(inner) = weak.upgrade() {
                let mut st = inner.state.lock();
                if let Some(d) = st.domains.get_mut(&dom) {
                    for g in &gfns {
                        d.map_count[*g as usize] = d.map_count[*g as usize].saturating_sub(1);
                    }
                }
            }
        });
        // SAFETY: `ptr`/`len` describe the inner mapping, which the release closure owns and
        // drops (unmapping it) only when the returned Mapping is dropped.
        Ok(unsafe { Mapping::from_raw(ptr, len, release) })
    }
}

impl XenStore for SimHost {
    fn read(&self, tx: Tx, path: &str) -> Result<Vec<u8>> {
        self.inner.store.connect(0).read(tx, path)
    }
    fn write(&self, tx: Tx, path: &str, value: &[u8]) -> Result<()> {
        self.inner.store.connect(0).write(tx, path, value)
    }
    fn mkdir(&self, tx: Tx, path: &str) -> Result<()> {
        self.inner.store.connect(0).mkdir(tx, path)
    }
    fn rm(&self, tx: Tx, path: &str) -> Result<()> {
        self.inner.store.connect(0).rm(tx, path)
    }
    fn directory(&self, tx: Tx, path: &str) -> Result<Vec<String>> {
        self.inner.store.connect(0).directory(tx, path)
    }
    fn get_perms(&self, tx: Tx, path: &str) -> Result<Vec<Perm>> {
        self.inner.store.connect(0).get_perms(tx, path)
    }
    fn set_perms(&self, tx: Tx, path: &str, perms: &[Perm]) -> Result<()> {
        self.inner.store.connect(0).set_perms(tx, path, perms)
    }
    fn transaction_start(&self) -> Result<Tx> {
        self.inner.store.connect(0).transaction_start()
    }
    fn transaction_end(&self, tx: Tx, commit: bool) -> Result<()> {
        self.inner.store.connect(0).transaction_end(tx, commit)
    }
    fn watch(&self, path: &str, token: &str) -> Result<crate::xenstore::Watch> {
        self.inner.store.connect(0).watch(path, token)
    }
}

#[cfg(test)]
mod tests;
