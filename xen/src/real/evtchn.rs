//! libxenevtchn: event channels through `/dev/xen/evtchn`.
//!
//! Symbols: `xenevtchn_open`, `xenevtchn_close`, `xenevtchn_fd`, `xenevtchn_notify`,
//! `xenevtchn_bind_interdomain`, `xenevtchn_unbind`, `xenevtchn_pending`,
//! `xenevtchn_unmask`.

use std::ffi::{c_int, c_void};
use std::os::fd::RawFd;
use std::sync::Arc;

use libloading::Library;

use super::library::{open_first, symbol, XENEVTCHN};
use crate::error::{Error, Result};
use crate::evtchn::{EventChannelHandle, EventChannels};
use crate::types::{DomId, Port};

type Handle = *mut c_void;

#[derive(Clone, Copy)]
struct Fns {
    open: unsafe extern "C" fn(*mut c_void, u32) -> Handle,
    close: unsafe extern "C" fn(Handle) -> c_int,
    fd: unsafe extern "C" fn(Handle) -> c_int,
    notify: unsafe extern "C" fn(Handle, u32) -> c_int,
    bind_interdomain: unsafe extern "C" fn(Handle, u32, u32) -> c_int,
    unbind: unsafe extern "C" fn(Handle, u32) -> c_int,
    pending: unsafe extern "C" fn(Handle) -> c_int,
    unmask: unsafe extern "C" fn(Handle, u32) -> c_int,
}

/// The loaded library; each [`EventChannels::open`] opens a new evtchn handle.
pub struct XenEvtchn {
    fns: Fns,
    lib: Arc<Library>,
}

impl std::fmt::Debug for XenEvtchn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XenEvtchn")
    }
}

impl XenEvtchn {
    /// # Errors
    /// `Absent` without the library or a symbol.
    // One SAFETY argument covers the whole symbol table: every lookup is the same kind of
    // operation with the prototype written beside it.
    #[allow(clippy::multiple_unsafe_ops_per_block)]
    pub fn load() -> Result<Self> {
        let lib = open_first(XENEVTCHN)?;
        // SAFETY: prototypes from xenevtchn.h (evtchn_port_t is u32, the
        // port-or-error type is int); the library outlives every handle through an Arc.
        let fns = unsafe {
            Fns {
                open: symbol(&lib, "xenevtchn_open")?,
                close: symbol(&lib, "xenevtchn_close")?,
                fd: symbol(&lib, "xenevtchn_fd")?,
                notify: symbol(&lib, "xenevtchn_notify")?,
                bind_interdomain: symbol(&lib, "xenevtchn_bind_interdomain")?,
                unbind: symbol(&lib, "xenevtchn_unbind")?,
                pending: symbol(&lib, "xenevtchn_pending")?,
                unmask: symbol(&lib, "xenevtchn_unmask")?,
            }
        };
        Ok(XenEvtchn {
            fns,
            lib: Arc::new(lib),
        })
    }
}

struct RealEvtchnHandle {
    fns: Fns,
    handle: Handle,
    fd: RawFd,
    _lib: Arc<Library>,
}

// SAFETY: the handle wraps a file descriptor; libxenevtchn's calls are independent
// ioctls/reads on it.
unsafe impl Send for RealEvtchnHandle {}
// SAFETY: as above.
unsafe impl Sync for RealEvtchnHandle {}

impl EventChannels for XenEvtchn {
    fn open(&self) -> Result<Box<dyn EventChannelHandle>> {
        // SAFETY: NULL logger, flags 0.
        let handle = unsafe { (self.fns.open)(std::ptr::null_mut(), 0) };
        if handle.is_null() {
            return Err(Error::last_os("xenevtchn_open"));
        }
        // SAFETY: live handle.
        let fd = unsafe { (self.fns.fd)(handle) };
        // Non-blocking, so `pending` never sleeps; readiness comes from poll on the fd.
        // SAFETY: fcntl on a descriptor the library owns for the handle's lifetime.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
        Ok(Box::new(RealEvtchnHandle {
            fns: self.fns,
            handle,
            fd,
            _lib: self.lib.clone(),
        }))
    }
}

impl RealEvtchnHandle {
    fn rc(&self, op: impl FnOnce() -> String, rc: c_int) -> Result<u32> {
        if rc < 0 {
            Err(Error::last_os(op()))
        } else {
            Ok(rc as u32)
        }
    }
}

impl EventChannelHandle for RealEvtchnHandle {
    fn fd(&self) -> RawFd {
        self.fd
    }

    fn bind_interdomain(&self, dom: DomId, remote_port: Port) -> Result<Port> {
        // SAFETY: integer arguments on a live handle.
        let rc = unsafe { (self.fns.bind_interdomain)(self.handle, dom, remote_port) };
        self.rc(|| format!("binding port {remote_port} of domain {dom}"), rc)
    }

    fn unbind(&self, port: Port) -> Result<()> {
        // SAFETY: integer arguments on a live handle.
        let rc = unsafe { (self.fns.unbind)(self.handle, port) };
        self.rc(|| format!("unbinding port {port}"), rc).map(drop)
    }

    fn notify(&self, port: Port) -> Result<()> {
        // SAFETY: integer arguments on a live handle.
        let rc = unsafe { (self.fns.notify)(self.handle, port) };
        self.rc(|| format!("notifying port {port}"), rc).map(drop)
    }

    fn pending(&self) -> Result<Option<Port>> {
        // SAFETY: live handle; the fd is non-blocking so this returns at once.
        let rc = unsafe { (self.fns.pending)(self.handle) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(None);
            }
            return Err(Error::Call {
                op: "xenevtchn_pending".into(),
                source: err,
            });
        }
        Ok(Some(rc as u32))
    }

    fn unmask(&self, port: Port) -> Result<()> {
        // SAFETY: integer arguments on a live handle.
        let rc = unsafe { (self.fns.unmask)(self.handle, port) };
        self.rc(|| format!("unmasking port {port}"), rc).map(drop)
    }
}

impl Drop for RealEvtchnHandle {
    fn drop(&mut self) {
        // SAFETY: opened by xenevtchn_open, closed once; this unbinds its ports.
        unsafe { (self.fns.close)(self.handle) };
    }
}
