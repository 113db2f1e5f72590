//! Simulated mem_paging: Xen's side of xenpaging's protocol.
//!
//! The simulator plays the hypervisor: it is the *front* of the vm_event ring (it produces
//! requests when a guest touches a paged-out page and consumes the pager's responses on
//! [`MemPaging::resume`]); the pager is the back. Responses whose `version` is not
//! [`INTERFACE_VERSION`] are dropped, as Xen 4.17 drops them, and the vCPU stays blocked.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::memory::GuestMemory;
use super::{HostState, PageState, SimHost};
use crate::abi::vm_event::{Paging, VmEvent, FLAG_VCPU_PAUSED, INTERFACE_VERSION};
use crate::error::{Error, Result};
use crate::mem_paging::{MemPaging, PagingRing};
use crate::ring::FrontRing;
use crate::types::{DomId, Gfn, Port, PAGE_SIZE};
use parking_lot::MutexGuard;

/// How long a simulated vCPU waits for its page before the access fails.
const PAGE_IN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(super) struct PagingState {
    front: FrontRing<VmEvent, VmEvent>,
    _ring_memory: GuestMemory,
    xen_port: Port,
    /// Pages loaded and answered: their vCPU may run again.
    resumed: HashSet<Gfn>,
    /// Responses Xen threw away for a wrong interface version.
    pub(super) dropped_responses: u64,
}

impl SimHost {
    /// Responses dropped for carrying the wrong vm_event version.
    pub fn dropped_paging_responses(&self, dom: DomId) -> Result<u64> {
        let st = self.inner.state.lock();
        Ok(st
            .domain(dom)?
            .paging
            .as_ref()
            .map_or(0, |p| p.dropped_responses))
    }

    /// A guest access: returns once the page is present, paging it in through the pager,
    /// with the host lock still held so the access itself cannot race an eviction.
    pub(super) fn guest_touch(&self, dom: DomId, gfn: Gfn) -> Result<MutexGuard<'_, HostState>> {
        let deadline = Instant::now() + PAGE_IN_TIMEOUT;
        let mut st = self.inner.state.lock();
        // Once the vCPU blocked on this page it runs again only when the pager's response
        // for it was resumed, not merely when the page is back.
        let mut blocked = false;
        loop {
            let d = st.domain_mut(dom)?;
            if d.crashed {
                return Err(Error::os(
                    format!("access to gfn {gfn:#x} of crashed domain {dom}"),
                    libc::ESRCH,
                ));
            }
            let state = *d
                .p2m
                .get(gfn as usize)
                .ok_or_else(|| Error::os(format!("guest access to gfn {gfn:#x}"), libc::EINVAL))?;
            match state {
                PageState::Ram if !blocked => return Ok(st),
                PageState::Ram => {
                    let answered = d.paging.as_mut().is_none_or(|p| p.resumed.remove(&gfn));
                    if answered {
                        return Ok(st);
                    }
                }
                PageState::Nominated { .. } => {
                    d.p2m[gfn as usize] = PageState::Nominated { touched: true };
                    return Ok(st);
                }
                PageState::PagedOut => {
                    let Some(p) = d.paging.as_mut() else {
                        return Err(Error::os(
                            format!("gfn {gfn:#x} is paged out and no pager runs"),
                            libc::EIO,
                        ));
                    };
                    blocked = true;
                    if p.front.free_slots() > 0 {
                        let req = VmEvent::paging(
                            0,
                            FLAG_VCPU_PAUSED,
                            Paging {
                                gfn,
                                p2mt: 0,
                                flags: 0,
                            },
                        );
                        p.front.push_request(req);
                        p.front.publish();
                        let port = p.xen_port;
                        d.p2m[gfn as usize] = PageState::PagingIn;
                        let _ = st.ports.send(dom, port);
                    }
                }
                PageState::PagingIn => blocked = true,
            }
            if self.inner.changed.wait_until(&mut st, deadline).timed_out() {
                return Err(Error::os(
                    format!("waiting for gfn {gfn:#x} of domain {dom} to page in"),
                    libc::ETIMEDOUT,
                ));
            }
        }
    }
}

impl MemPaging for SimHost {
    fn enable(&self, dom: DomId) -> Result<PagingRing> {
        self.check("paging.enable")?;
        let mut st = self.inner.state.lock();
        let d = st.domain(dom)?;
        if !d.spec.hvm {
            return Err(Error::os(
                format!("enabling paging for PV domain {dom}"),
                libc::EOPNOTSUPP,
            ));
        }
        if !d.spec.hap {
            return Err(Error::os(
                format!("enabling paging for domain {dom}"),
                libc::ENODEV,
            ));
        }
        if d.paging.is_some() {
            return Err(Error::os(
                format!("enabling paging for domain {dom} twice"),
                libc::EBUSY,
            ));
        }
        let memory = GuestMemory::new(1)?;
        let xen_side = Arc::new(memory.map(&[0], true)?);
        let front = FrontRing::init(xen_side).map_err(|e| Error::Invalid(e.to_string()))?;
        let ring = memory.map(&[0], true)?;
        let xen_port = st.ports.alloc_unbound(dom, 0);
        st.domain_mut(dom)?.paging = Some(PagingState {
            front,
            _ring_memory: memory,
            xen_port,
            resumed: HashSet::new(),
            dropped_responses: 0,
        });
        Ok(PagingRing {
            ring,
            remote_port: xen_port,
        })
    }

    fn disable(&self, dom: DomId) -> Result<()> {
        let mut st = self.inner.state.lock();
        let d = st.domain_mut(dom)?;
        if d.paging.take().is_none() {
            return Err(Error::os(
                format!("disabling paging of domain {dom}: not enabled"),
                libc::EINVAL,
            ));
        }
        if d.paged_pages > 0 {
            // Xen cannot run a guest whose pages are gone.
            d.crashed = true;
            tracing::warn!(
                dom,
                paged = d.paged_pages,
                "paging disabled with pages out: domain crashed"
            );
        }
        drop(st);
        self.inner.changed.notify_all();
        Ok(())
    }

    fn nominate(&self, dom: DomId, gfn: Gfn) -> Result<()> {
        self.check("paging.nominate")?;
        let mut st = self.inner.state.lock();
        let d = st.domain_mut(dom)?;
        if d.paging.is_none() {
            return Err(Error::os(
                format!("nominate in domain {dom}: paging not enabled"),
                libc::EINVAL,
            ));
        }
        let i = gfn as usize;
        match d.p2m.get(i) {
            None => Err(Error::os(format!("nominate gfn {gfn:#x}"), libc::EINVAL)),
            Some(PageState::Ram) if d.map_count[i] == 0 => {
                d.p2m[i] = PageState::Nominated { touched: false };
                Ok(())
            }
            Some(_) => Err(Error::os(
                format!("nominate gfn {gfn:#x} of domain {dom}"),
                libc::EBUSY,
            )),
        }
    }

    fn evict(&self, dom: DomId, gfn: Gfn) -> Result<()> {
        self.check("paging.evict")?;
        let mut st = self.inner.state.lock();
        let d = st.domain_mut(dom)?;
        let i = gfn as usize;
        match d.p2m.get(i) {
            Some(PageState::Nominated { touched: false }) if d.map_count[i] == 0 => {
                d.memory.discard_page(gfn)?;
                d.p2m[i] = PageState::PagedOut;
                d.paged_pages += 1;
                Ok(())
            }
            Some(PageState::Nominated { .. }) => {
                d.p2m[i] = PageState::Ram;
                Err(Error::os(
                    format!("evict gfn {gfn:#x} of domain {dom}: touched since nominate"),
                    libc::EBUSY,
                ))
            }
            _ => Err(Error::os(
                format!("evict gfn {gfn:#x} of domain {dom}: not nominated"),
                libc::EINVAL,
            )),
        }
    }

    fn load(&self, dom: DomId, gfn: Gfn, page: &[u8]) -> Result<()> {
        self.check("paging.load")?;
        if page.len() != PAGE_SIZE {
            return Err(Error::Invalid(format!(
                "load of {} bytes; a page is {PAGE_SIZE}",
                page.len()
            )));
        }
        let mut st = self.inner.state.lock();
        let d = st.domain_mut(dom)?;
        let i = gfn as usize;
        match d.p2m.get(i) {
            Some(PageState::PagedOut | PageState::PagingIn) => {
                d.memory.write_page(gfn, 0, page)?;
                d.p2m[i] = PageState::Ram;
                d.paged_pages -= 1;
                Ok(())
            }
            _ => Err(Error::os(
                format!("load gfn {gfn:#x} of domain {dom}: not paged out"),
                libc::EINVAL,
            )),
        }
    }

    fn resume(&self, dom: DomId) -> Result<()> {
        self.check("paging.resume")?;
        let mut st = self.inner.state.lock();
        let d = st.domain_mut(dom)?;
        let p = d.paging.as_mut().ok_or_else(|| {
            Error::os(
                format!("resume of domain {dom}: paging not enabled"),
                libc::EINVAL,
            )
        })?;
        while let Some(rsp) = p.front.next_response() {
            if rsp.version != INTERFACE_VERSION {
                p.dropped_responses += 1;
                tracing::warn!(
                    dom,
                    version = rsp.version,
                    "vm_event interface version mismatch: response dropped"
                );
                continue;
            }
            p.resumed.insert(rsp.paging_data().gfn);
        }
        drop(st);
        self.inner.changed.notify_all();
        Ok(())
    }
}
