//! libxengnttab: map and copy pages other domains granted us.
//!
//! Symbols: `xengnttab_open`, `xengnttab_close`, `xengnttab_map_domain_grant_refs`,
//! `xengnttab_unmap`, `xengnttab_grant_copy`.

use std::ffi::{c_int, c_void};
use std::ptr::NonNull;
use std::sync::Arc;

use libloading::Library;

use super::library::{open_first, symbol, XENGNTTAB};
use crate::abi::gnttab::{
    CopyPtr, ForeignRef, GrantCopySegment, GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF,
};
use crate::error::{Error, Result};
use crate::grant::{GrantCopy, GrantHandle, GrantTables};
use crate::mapping::Mapping;
use crate::types::{DomId, GrantRef, PAGE_SIZE};

type Handle = *mut c_void;

#[derive(Clone, Copy)]
struct Fns {
    open: unsafe extern "C" fn(*mut c_void, u32) -> Handle,
    close: unsafe extern "C" fn(Handle) -> c_int,
    map_refs: unsafe extern "C" fn(Handle, u32, u32, *mut u32, c_int) -> *mut c_void,
    unmap: unsafe extern "C" fn(Handle, *mut c_void, u32) -> c_int,
    copy: unsafe extern "C" fn(Handle, u32, *mut GrantCopySegment) -> c_int,
}

/// The loaded library; each [`GrantTables::open`] opens a new gntdev handle.
pub struct XenGnttab {
    fns: Fns,
    lib: Arc<Library>,
}

impl std::fmt::Debug for XenGnttab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XenGnttab")
    }
}

impl XenGnttab {
    /// # Errors
    /// `Absent` without the library or a symbol.
    // One SAFETY argument covers the whole symbol table: every lookup is the same kind of
    // operation with the prototype written beside it.
    #[allow(clippy::multiple_unsafe_ops_per_block)]
    pub fn load() -> Result<Self> {
        let lib = open_first(XENGNTTAB)?;
        // SAFETY: prototypes from xengnttab.h; the library is kept alive by an Arc in every
        // handle that uses these pointers.
        let fns = unsafe {
            Fns {
                open: symbol(&lib, "xengnttab_open")?,
                close: symbol(&lib, "xengnttab_close")?,
                map_refs: symbol(&lib, "xengnttab_map_domain_grant_refs")?,
                unmap: symbol(&lib, "xengnttab_unmap")?,
                copy: symbol(&lib, "xengnttab_grant_copy")?,
            }
        };
        Ok(XenGnttab {
            fns,
            lib: Arc::new(lib),
        })
    }
}

struct Open {
    fns: Fns,
    handle: Handle,
    _lib: Arc<Library>,
}

// SAFETY: gntdev handles are ioctl-based; libxengnttab keeps no thread-affine state.
unsafe impl Send for Open {}
// SAFETY: as above.
unsafe impl Sync for Open {}

impl Drop for Open {
    fn drop(&mut self) {
        // SAFETY: opened by xengnttab_open, closed once; mappings hold an Arc<Open>.
        unsafe { (self.fns.close)(self.handle) };
    }
}

struct RealGrantHandle(Arc<Open>);

impl GrantTables for XenGnttab {
    fn open(&self) -> Result<Box<dyn GrantHandle>> {
        // SAFETY: NULL logger, flags 0.
        let handle = unsafe { (self.fns.open)(std::ptr::null_mut(), 0) };
        if handle.is_null() {
            return Err(Error::last_os("xengnttab_open"));
        }
        Ok(Box::new(RealGrantHandle(Arc::new(Open {
            fns: self.fns,
            handle,
            _lib: self.lib.clone(),
        }))))
    }
}

impl GrantHandle for RealGrantHandle {
    fn map(&self, dom: DomId, refs: &[GrantRef], writable: bool) -> Result<Mapping> {
        if refs.is_empty() {
            return Err(Error::os("mapping zero grants", libc::EINVAL));
        }
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        let mut refs_copy = refs.to_vec();
        let o = &self.0;
        // SAFETY: `refs_copy` holds `refs.len()` grant refs and outlives the call.
        let p = unsafe {
            (o.fns.map_refs)(
                o.handle,
                refs.len() as u32,
                dom,
                refs_copy.as_mut_ptr(),
                prot,
            )
        };
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            return Err(Error::last_os(format!(
                "mapping {} grants of domain {dom}",
                refs.len()
            )));
        };
        let owner = o.clone();
        let release = Box::new(move |p: *mut u8, n: usize| {
            // SAFETY: p/n are the region xengnttab_map_domain_grant_refs returned.
            unsafe { (owner.fns.unmap)(owner.handle, p.cast(), (n / PAGE_SIZE) as u32) };
        });
        // SAFETY: refs.len() pages are mapped at ptr until `release` unmaps them.
        Ok(unsafe { Mapping::from_raw(ptr, refs.len() * PAGE_SIZE, release) })
    }

    fn copy(&self, ops: &mut [GrantCopy<'_>]) -> Result<()> {
        let mut segs = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter_mut().enumerate() {
            if !op.in_page() {
                return Err(Error::os(
                    format!("grant copy segment {i} crosses a page"),
                    libc::EINVAL,
                ));
            }
            let len = op.len() as u16;
            let seg = match op {
                GrantCopy::FromGuest {
                    dom,
                    gref,
                    offset,
                    buf,
                } => GrantCopySegment {
                    source: CopyPtr {
                        foreign: ForeignRef {
                            gref: *gref,
                            offset: *offset,
                            domid: *dom as u16,
                        },
                    },
                    dest: CopyPtr {
                        virt: buf.as_mut_ptr().cast(),
                    },
                    len,
                    flags: GNTCOPY_SOURCE_GREF,
                    status: 0,
                    pad: 0,
                },
                GrantCopy::ToGuest {
                    dom,
                    gref,
                    offset,
                    buf,
                } => GrantCopySegment {
                    source: CopyPtr {
                        virt: buf.as_ptr() as *mut c_void,
                    },
                    dest: CopyPtr {
                        foreign: ForeignRef {
                            gref: *gref,
                            offset: *offset,
                            domid: *dom as u16,
                        },
                    },
                    len,
                    flags: GNTCOPY_DEST_GREF,
                    status: 0,
                    pad: 0,
                },
            };
            segs.push(seg);
        }
        let o = &self.0;
        // SAFETY: every segment's local pointer refers to a buffer borrowed from `ops` for
        // the duration of this call, with `len` bytes in bounds; `segs` outlives the call.
        let rc = unsafe { (o.fns.copy)(o.handle, segs.len() as u32, segs.as_mut_ptr()) };
        if rc < 0 {
            return Err(Error::last_os(format!(
                "xengnttab_grant_copy of {} segments",
                segs.len()
            )));
        }
        if let Some((i, s)) = segs.iter().enumerate().find(|(_, s)| s.status != 0) {
            // GNTST_* codes: -1 general, -4 bad gntref, -8 permission denied, -12 eagain.
            let errno = match s.status {
                -4 => libc::EINVAL,
                -8 => libc::EPERM,
                -12 => libc::EAGAIN,
                _ => libc::EIO,
            };
            return Err(Error::os(
                format!("grant copy segment {i} (GNTST {})", s.status),
                errno,
            ));
        }
        Ok(())
    }
}
