//! libxenforeignmemory: map another domain's pages by gfn.
//!
//! Symbols: `xenforeignmemory_open`, `xenforeignmemory_close`, `xenforeignmemory_map`,
//! `xenforeignmemory_unmap`.

use std::ffi::{c_int, c_void};
use std::ptr::NonNull;
use std::sync::Arc;

use libloading::Library;

use super::library::{open_first, symbol, XENFOREIGNMEMORY};
use crate::error::{Error, Result};
use crate::foreign::ForeignMemory;
use crate::mapping::Mapping;
use crate::types::{DomId, Gfn, PAGE_SIZE};

type Handle = *mut c_void;

struct Fns {
    close: unsafe extern "C" fn(Handle) -> c_int,
    map: unsafe extern "C" fn(Handle, u32, c_int, usize, *const u64, *mut c_int) -> *mut c_void,
    unmap: unsafe extern "C" fn(Handle, *mut c_void, usize) -> c_int,
}

struct Lib {
    fns: Fns,
    handle: Handle,
    _lib: Library,
}

// SAFETY: xenforeignmemory handles may be used from several threads (each map is an
// independent ioctl on the privcmd fd).
unsafe impl Send for Lib {}
// SAFETY: as above.
unsafe impl Sync for Lib {}

impl Drop for Lib {
    fn drop(&mut self) {
        // SAFETY: the handle came from xenforeignmemory_open; closed once. Mappings hold an
        // Arc<Lib>, so none outlive it.
        unsafe { (self.fns.close)(self.handle) };
    }
}

/// An open foreign-memory handle.
#[derive(Clone)]
pub struct XenForeignMemory(Arc<Lib>);

impl std::fmt::Debug for XenForeignMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XenForeignMemory")
    }
}

impl XenForeignMemory {
    /// # Errors
    /// `Absent` without the library; the errno of a failed open.
    // One SAFETY argument covers the whole symbol table: every lookup is the same kind of
    // operation with the prototype written beside it.
    #[allow(clippy::multiple_unsafe_ops_per_block)]
    pub fn open() -> Result<Self> {
        let lib = open_first(XENFOREIGNMEMORY)?;
        // SAFETY: prototypes from xenforeignmemory.h; pointers stored beside `lib`.
        let (open, fns) = unsafe {
            let open: unsafe extern "C" fn(*mut c_void, u32) -> Handle =
                symbol(&lib, "xenforeignmemory_open")?;
            let fns = Fns {
                close: symbol(&lib, "xenforeignmemory_close")?,
                map: symbol(&lib, "xenforeignmemory_map")?,
                unmap: symbol(&lib, "xenforeignmemory_unmap")?,
            };
            (open, fns)
        };
        // SAFETY: NULL logger selects the default; flags 0.
        let handle = unsafe { open(std::ptr::null_mut(), 0) };
        if handle.is_null() {
            return Err(Error::last_os("xenforeignmemory_open"));
        }
        Ok(XenForeignMemory(Arc::new(Lib {
            fns,
            handle,
            _lib: lib,
        })))
    }
}

impl ForeignMemory for XenForeignMemory {
    fn map(&self, dom: DomId, gfns: &[Gfn], writable: bool) -> Result<Mapping> {
        let (mapping, errs) = self.map_sparse(dom, gfns, writable)?;
        if let Some((i, e)) = errs.iter().enumerate().find(|(_, e)| **e != 0) {
            return Err(Error::os(
                format!("mapping gfn {:#x} of domain {dom}", gfns[i]),
                *e,
            ));
        }
        Ok(mapping)
    }

    fn map_sparse(&self, dom: DomId, gfns: &[Gfn], writable: bool) -> Result<(Mapping, Vec<i32>)> {
        if gfns.is_empty() {
            return Err(Error::os("mapping zero pages", libc::EINVAL));
        }
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        let mut errs = vec![0 as c_int; gfns.len()];
        let lib = &self.0;
        // SAFETY: `gfns` and `errs` both hold `gfns.len()` elements and outlive the call.
        let p = unsafe {
            (lib.fns.map)(
                lib.handle,
                dom,
                prot,
                gfns.len(),
                gfns.as_ptr(),
                errs.as_mut_ptr(),
            )
        };
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            return Err(Error::last_os(format!(
                "xenforeignmemory_map of {} pages of domain {dom}",
                gfns.len()
            )));
        };
        let owner = lib.clone();
        let release = Box::new(move |p: *mut u8, n: usize| {
            // SAFETY: p/n describe the region returned by xenforeignmemory_map above.
            unsafe { (owner.fns.unmap)(owner.handle, p.cast(), n / PAGE_SIZE) };
        });
        // SAFETY: the region of gfns.len() pages stays mapped until `release` runs.
        let mapping = unsafe { Mapping::from_raw(ptr, gfns.len() * PAGE_SIZE, release) };
        // Per-page errors are negative errnos (ENOENT: paged out).
        Ok((mapping, errs.iter().map(|e| e.abs()).collect()))
    }
}
