//! Simulated event channels: per-domain port tables with Xen's binding rules, and dom0
//! handles whose readiness is a real eventfd, as `/dev/xen/evtchn` is pollable.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::{Inner, SimHost};
use crate::error::{Error, Result};
use crate::evtchn::{EventChannelHandle, EventChannels};
use crate::types::{DomId, Port};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChanState {
    /// Allocated by `dom` for `remote` to bind.
    Unbound {
        remote: DomId,
    },
    Interdomain {
        rdom: DomId,
        rport: Port,
    },
}

#[derive(Debug)]
struct Chan {
    state: ChanState,
    /// The dom0 handle that owns the port, if bound through one.
    handle: Option<u64>,
    pending: bool,
    masked: bool,
}

/// Queue and doorbell of one open handle.
#[derive(Debug)]
pub(super) struct HandleQueue {
    queue: VecDeque<Port>,
    bell: Arc<OwnedFd>,
}

#[derive(Debug, Default)]
pub(super) struct PortTable {
    chans: HashMap<(DomId, Port), Chan>,
    next_port: HashMap<DomId, Port>,
    handles: HashMap<u64, HandleQueue>,
    next_handle: u64,
}

fn ring_bell(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a valid u64 to our own eventfd.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

fn drain_bell(fd: &OwnedFd) {
    let mut v: u64 = 0;
    // SAFETY: reading 8 bytes into a valid u64 from our own non-blocking eventfd.
    unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

impl PortTable {
    fn alloc_port(&mut self, dom: DomId) -> Port {
        let next = self.next_port.entry(dom).or_insert(1);
        let p = *next;
        *next += 1;
        p
    }

    pub(super) fn alloc_unbound(&mut self, dom: DomId, remote: DomId) -> Port {
        let port = self.alloc_port(dom);
        self.chans.insert(
            (dom, port),
            Chan {
                state: ChanState::Unbound { remote },
                handle: None,
                pending: false,
                masked: false,
            },
        );
        port
    }

    fn open_handle(&mut self) -> Result<u64> {
        // SAFETY: plain eventfd creation with valid flags.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::last_os("eventfd for a simulated evtchn handle"));
        }
        // SAFETY: eventfd returned a fresh descriptor we now own.
        let bell = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let id = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(
            id,
            HandleQueue {
                queue: VecDeque::new(),
                bell,
            },
        );
        Ok(id)
    }

    fn bind(&mut self, handle: u64, me: DomId, rdom: DomId, rport: Port) -> Result<Port> {
        let op = format!("binding port {rport} of domain {rdom}");
        match self.chans.get(&(rdom, rport)).map(|c| c.state) {
            Some(ChanState::Unbound { remote }) if remote == me => {}
            _ => return Err(Error::os(op, libc::EINVAL)),
        }
        let port = self.alloc_port(me);
        self.chans.insert(
            (me, port),
            Chan {
                state: ChanState::Interdomain { rdom, rport },
                handle: Some(handle),
                pending: false,
                masked: false,
            },
        );
        if let Some(c) = self.chans.get_mut(&(rdom, rport)) {
            c.state = ChanState::Interdomain {
                rdom: me,
                rport: port,
            };
        }
        Ok(port)
    }

    /// Closing our end leaves the peer's port unbound for us, so a restarted backend in
    /// the same domain can bind it again (what failover tier 1 relies on).
    fn unbind(&mut self, me: DomId, port: Port) -> Result<()> {
        let chan = self
            .chans
            .remove(&(me, port))
            .ok_or_else(|| Error::os(format!("unbinding port {port}"), libc::EINVAL))?;
        if let ChanState::Interdomain { rdom, rport } = chan.state {
            if let Some(peer) = self.chans.get_mut(&(rdom, rport)) {
                peer.state = ChanState::Unbound { remote: me };
            }
        }
        Ok(())
    }

    /// `dom` signals its `port`: the peer's port becomes pending.
    pub(super) fn send(&mut self, dom: DomId, port: Port) -> Result<()> {
        let state = self
            .chans
            .get(&(dom, port))
            .map(|c| c.state)
            .ok_or_else(|| {
                Error::os(
                    format!("notify on port {port} of domain {dom}"),
                    libc::EINVAL,
                )
            })?;
        let ChanState::Interdomain { rdom, rport } = state else {
            return Ok(()); // Xen drops sends on an unbound port.
        };
        self.deliver(rdom, rport);
        Ok(())
    }

    fn deliver(&mut self, dom: DomId, port: Port) {
        let Some(chan) = self.chans.get_mut(&(dom, port)) else {
            return;
        };
        let Some(h) = chan.handle else {
            chan.pending = true; // a simulated guest polls it
            return;
        };
        if chan.masked {
            chan.pending = true;
            return;
        }
        chan.masked = true; // the evtchn device masks a port as it delivers it
        if let Some(q) = self.handles.get_mut(&h) {
            q.queue.push_back(port);
            ring_bell(&q.bell);
        }
    }

    fn unmask(&mut self, me: DomId, port: Port) -> Result<()> {
        let chan = self
            .chans
            .get_mut(&(me, port))
            .ok_or_else(|| Error::os(format!("unmasking port {port}"), libc::EINVAL))?;
        chan.masked = false;
        if chan.pending {
            chan.pending = false;
            self.deliver(me, port);
        }
        Ok(())
    }

    pub(super) fn take_guest_pending(&mut self, dom: DomId, port: Port) -> bool {
        match self.chans.get_mut(&(dom, port)) {
            Some(c) if c.pending => {
                c.pending = false;
                true
            }
            _ => false,
        }
    }

    pub(super) fn domain_gone(&mut self, dom: DomId) {
        let ports: Vec<Port> = self
            .chans
            .keys()
            .filter(|(d, _)| *d == dom)
            .map(|(_, p)| *p)
            .collect();
        for p in ports {
            let _ = self.unbind(dom, p);
        }
    }

    fn close_handle(&mut self, handle: u64) {
        let mine: Vec<(DomId, Port)> = self
            .chans
            .iter()
            .filter(|(_, c)| c.handle == Some(handle))
            .map(|(k, _)| *k)
            .collect();
        for (d, p) in mine {
            let _ = self.unbind(d, p);
        }
        self.handles.remove(&handle);
    }
}

/// An event-channel handle on the simulated host, of dom0 or of [`SimHost::acting_as`]'s domain.
#[derive(Debug)]
struct SimEvtchnHandle {
    inner: Arc<Inner>,
    host: SimHost,
    id: u64,
    bell: Arc<OwnedFd>,
}

impl EventChannels for SimHost {
    fn open(&self) -> Result<Box<dyn EventChannelHandle>> {
        let mut st = self.inner.state.lock();
        let id = st.ports.open_handle()?;
        let bell = st.ports.handles[&id].bell.clone();
        Ok(Box::new(SimEvtchnHandle {
            inner: self.inner.clone(),
            host: self.clone(),
            id,
            bell,
        }))
    }
}

impl EventChannelHandle for SimEvtchnHandle {
    fn fd(&self) -> RawFd {
        self.bell.as_raw_fd()
    }

    fn bind_interdomain(&self, dom: DomId, remote_port: Port) -> Result<Port> {
        self.host.check("evtchn.bind")?;
        let mut st = self.inner.state.lock();
        st.domain(dom)?;
        st.ports.bind(self.id, self.host.me, dom, remote_port)
    }

    fn unbind(&self, port: Port) -> Result<()> {
        self.inner.state.lock().ports.unbind(self.host.me, port)
    }

    fn notify(&self, port: Port) -> Result<()> {
        if self.host.check("evtchn.notify")? == super::faults::Verdict::Drop {
            return Ok(());
        }
        self.inner.state.lock().ports.send(self.host.me, port)?;
        self.inner.changed.notify_all();
        Ok(())
    }

    fn pending(&self) -> Result<Option<Port>> {
        let mut st = self.inner.state.lock();
        let q = st
            .ports
            .handles
            .get_mut(&self.id)
            .ok_or_else(|| Error::os("evtchn handle", libc::EBADF))?;
        let p = q.queue.pop_front();
        if q.queue.is_empty() {
            drain_bell(&q.bell);
        }
        Ok(p)
    }

    fn unmask(&self, port: Port) -> Result<()> {
        self.inner.state.lock().ports.unmask(self.host.me, port)
    }
}

impl Drop for SimEvtchnHandle {
    fn drop(&mut self) {
        self.inner.state.lock().ports.close_handle(self.id);
    }
}
