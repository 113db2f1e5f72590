//! libxenctrl: domain control, hypervisor version, and mem_paging.
//!
//! Symbols loaded (all exported by libxenctrl 4.16-4.20): `xc_interface_open`,
//! `xc_interface_close`, `xc_version`, `xc_domain_getinfolist`, `xc_domain_pause`,
//! `xc_domain_unpause`, `xc_domain_setmaxmem`, `xc_vm_event_enable`,
//! `xc_mem_paging_disable`, `xc_mem_paging_nominate`, `xc_mem_paging_evict`,
//! `xc_mem_paging_load`, `xc_mem_paging_resume`.

use std::ffi::{c_int, c_uint, c_void};
use std::ptr::NonNull;
use std::sync::Arc;

use libloading::Library;
use parking_lot::Mutex;

use super::library::{open_first, symbol, XENCTRL};
use crate::abi::domctl::DomainInfoRaw;
use crate::abi::vm_event::HVM_PARAM_PAGING_RING_PFN;
use crate::domain::{DomainControl, DomainFlags, DomainInfo, HypervisorInfo};
use crate::error::{Error, Result};
use crate::mapping::Mapping;
use crate::mem_paging::{MemPaging, PagingRing};
use crate::types::{DomId, Gfn, PAGE_SIZE};

const XENVER_VERSION: c_int = 0;
const XENVER_EXTRAVERSION: c_int = 1;
const XENVER_CAPABILITIES: c_int = 3;

type Xch = *mut c_void;

struct Fns {
    close: unsafe extern "C" fn(Xch) -> c_int,
    version: unsafe extern "C" fn(Xch, c_int, *mut c_void) -> c_int,
    getinfolist: unsafe extern "C" fn(Xch, u32, c_uint, *mut DomainInfoRaw) -> c_int,
    pause: unsafe extern "C" fn(Xch, u32) -> c_int,
    unpause: unsafe extern "C" fn(Xch, u32) -> c_int,
    setmaxmem: unsafe extern "C" fn(Xch, u32, u64) -> c_int,
    vm_event_get_version: unsafe extern "C" fn(Xch) -> c_int,
    vm_event_enable: unsafe extern "C" fn(Xch, u32, c_int, *mut u32) -> *mut c_void,
    paging_disable: unsafe extern "C" fn(Xch, u32) -> c_int,
    paging_nominate: unsafe extern "C" fn(Xch, u32, u64) -> c_int,
    paging_evict: unsafe extern "C" fn(Xch, u32, u64) -> c_int,
    paging_load: unsafe extern "C" fn(Xch, u32, u64, *mut c_void) -> c_int,
    paging_resume: unsafe extern "C" fn(Xch, u32) -> c_int,
}

/// An open `xc_interface`. Calls are serialised: libxenctrl's hypercall buffers are
/// per handle.
pub struct XenCtrl {
    fns: Fns,
    xch: Mutex<Xch>,
    _lib: Library,
}

impl std::fmt::Debug for XenCtrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenCtrl").finish_non_exhaustive()
    }
}

// SAFETY: the raw handle is only used under the `xch` mutex, one call at a time.
unsafe impl Send for XenCtrl {}
// SAFETY: as above.
unsafe impl Sync for XenCtrl {}

impl XenCtrl {
    /// Load libxenctrl and open the hypervisor interface.
    ///
    /// # Errors
    /// `Absent` when the library or a symbol is missing; the errno of a failed open
    /// (`EACCES` when not root, `ENOENT` without `/dev/xen/privcmd`).
    // One SAFETY argument covers the whole symbol table: every lookup is the same kind of
    // operation with the prototype written beside it.
    #[allow(clippy::multiple_unsafe_ops_per_block)]
    pub fn open() -> Result<Arc<Self>> {
        let lib = open_first(XENCTRL)?;
        // SAFETY: each type below is the C prototype of the symbol in xenctrl.h (4.17), and
        // the pointers live in `Fns`, stored beside `lib` and dropped with it.
        let (open, fns) = unsafe {
            let open: unsafe extern "C" fn(*mut c_void, *mut c_void, c_uint) -> Xch =
                symbol(&lib, "xc_interface_open")?;
            let fns = Fns {
                close: symbol(&lib, "xc_interface_close")?,
                version: symbol(&lib, "xc_version")?,
                getinfolist: symbol(&lib, "xc_domain_getinfolist")?,
                pause: symbol(&lib, "xc_domain_pause")?,
                unpause: symbol(&lib, "xc_domain_unpause")?,
                setmaxmem: symbol(&lib, "xc_domain_setmaxmem")?,
                vm_event_get_version: symbol(&lib, "xc_vm_event_get_version")?,
                vm_event_enable: symbol(&lib, "xc_vm_event_enable")?,
                paging_disable: symbol(&lib, "xc_mem_paging_disable")?,
                paging_nominate: symbol(&lib, "xc_mem_paging_nominate")?,
                paging_evict: symbol(&lib, "xc_mem_paging_evict")?,
                paging_load: symbol(&lib, "xc_mem_paging_load")?,
                paging_resume: symbol(&lib, "xc_mem_paging_resume")?,
            };
            (open, fns)
        };
        // SAFETY: NULL loggers select libxenctrl's default stderr logger; flags 0.
        let xch = unsafe { open(std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        if xch.is_null() {
            return Err(Error::last_os("xc_interface_open"));
        }
        Ok(Arc::new(XenCtrl {
            fns,
            xch: Mutex::new(xch),
            _lib: lib,
        }))
    }

    fn rc(&self, op: impl FnOnce() -> String, rc: c_int) -> Result<c_int> {
        if rc < 0 {
            Err(Error::last_os(op()))
        } else {
            Ok(rc)
        }
    }

    fn version_string(&self, cmd: c_int, len: usize) -> String {
        let mut buf = vec![0u8; len];
        let xch = self.xch.lock();
        // SAFETY: xc_version writes at most `len` bytes (xen_extraversion_t is 16,
        // xen_capabilities_info_t 1024) into our buffer of that size.
        let rc = unsafe { (self.fns.version)(*xch, cmd, buf.as_mut_ptr().cast()) };
        if rc < 0 {
            return String::new();
        }
        let end = buf.iter().position(|b| *b == 0).unwrap_or(len);
        String::from_utf8_lossy(&buf[..end]).into_owned()
    }

    fn raw_info(&self, first: DomId, max: usize) -> Result<Vec<DomainInfoRaw>> {
        let mut out = vec![DomainInfoRaw::default(); max];
        let xch = self.xch.lock();
        // SAFETY: `out` holds `max` initialised entries of the exact C layout (checked by
        // the ABI test); libxenctrl fills at most `max` of them.
        let n = unsafe { (self.fns.getinfolist)(*xch, first, max as c_uint, out.as_mut_ptr()) };
        drop(xch);
        let n = self.rc(|| "xc_domain_getinfolist".into(), n)? as usize;
        out.truncate(n);
        Ok(out)
    }
}

fn convert(raw: &DomainInfoRaw) -> DomainInfo {
    DomainInfo {
        domid: u32::from(raw.domain),
        name: String::new(),
        flags: DomainFlags::from_raw(raw.flags),
        tot_pages: raw.tot_pages,
        max_pages: raw.max_pages,
        paged_pages: raw.paged_pages,
        online_vcpus: raw.nr_online_vcpus,
        cpu_time_ns: raw.cpu_time,
        handle: raw.handle,
    }
}

impl Drop for XenCtrl {
    fn drop(&mut self) {
        let xch = *self.xch.lock();
        // SAFETY: the handle came from xc_interface_open and is closed exactly once here.
        unsafe { (self.fns.close)(xch) };
    }
}

impl DomainControl for XenCtrl {
    fn hypervisor(&self) -> Result<HypervisorInfo> {
        let v = {
            let xch = self.xch.lock();
            // SAFETY: XENVER_version takes no argument buffer.
            unsafe { (self.fns.version)(*xch, XENVER_VERSION, std::ptr::null_mut()) }
        };
        let v = self.rc(|| "xc_version".into(), v)?;
        // SAFETY: takes only the handle.
        let ev = unsafe { (self.fns.vm_event_get_version)(*self.xch.lock()) };
        Ok(HypervisorInfo {
            major: (v as u32) >> 16,
            minor: (v as u32) & 0xffff,
            extra: self.version_string(XENVER_EXTRAVERSION, 16),
            capabilities: self.version_string(XENVER_CAPABILITIES, 1024),
            vm_event_version: ev.max(0) as u32,
        })
    }

    fn list(&self) -> Result<Vec<DomainInfo>> {
        let mut all = Vec::new();
        let mut next = 0;
        loop {
            let batch = self.raw_info(next, 256)?;
            let Some(last) = batch.last() else { break };
            next = u32::from(last.domain) + 1;
            let full = batch.len() == 256;
            all.extend(batch.iter().map(convert));
            if !full {
                break;
            }
        }
        Ok(all)
    }

    fn info(&self, dom: DomId) -> Result<DomainInfo> {
        let batch = self.raw_info(dom, 1)?;
        match batch.first() {
            Some(raw) if u32::from(raw.domain) == dom => Ok(convert(raw)),
            _ => Err(Error::NoDomain(dom)),
        }
    }

    fn pause(&self, dom: DomId) -> Result<()> {
        // SAFETY: plain integer arguments on a live handle.
        let rc = unsafe { (self.fns.pause)(*self.xch.lock(), dom) };
        self.rc(|| format!("xc_domain_pause({dom})"), rc).map(drop)
    }

    fn unpause(&self, dom: DomId) -> Result<()> {
        // SAFETY: plain integer arguments on a live handle.
        let rc = unsafe { (self.fns.unpause)(*self.xch.lock(), dom) };
        self.rc(|| format!("xc_domain_unpause({dom})"), rc)
            .map(drop)
    }

    fn set_max_memory(&self, dom: DomId, kib: u64) -> Result<()> {
        // SAFETY: plain integer arguments on a live handle.
        let rc = unsafe { (self.fns.setmaxmem)(*self.xch.lock(), dom, kib) };
        self.rc(|| format!("xc_domain_setmaxmem({dom}, {kib} KiB)"), rc)
            .map(drop)
    }
}

impl MemPaging for XenCtrl {
    fn enable(&self, dom: DomId) -> Result<PagingRing> {
        let mut port = 0u32;
        // SAFETY: `port` is a valid out-pointer; on success the library returns one mapped
        // ring page that we own and release with munmap, as xenpaging does.
        let page = unsafe {
            (self.fns.vm_event_enable)(*self.xch.lock(), dom, HVM_PARAM_PAGING_RING_PFN, &mut port)
        };
        let Some(ptr) = NonNull::new(page.cast::<u8>()) else {
            return Err(Error::last_os(format!(
                "enabling mem_paging for domain {dom}"
            )));
        };
        let release = Box::new(|p: *mut u8, n: usize| {
            // SAFETY: `p`/`n` are the ring page mapped by xc_vm_event_enable.
            unsafe { libc::munmap(p.cast(), n) };
        });
        // SAFETY: one page is mapped at `ptr` until `release` unmaps it.
        let ring = unsafe { Mapping::from_raw(ptr, PAGE_SIZE, release) };
        Ok(PagingRing {
            ring,
            remote_port: port,
        })
    }

    fn disable(&self, dom: DomId) -> Result<()> {
        // SAFETY: plain integer arguments on a live handle.
        let rc = unsafe { (self.fns.paging_disable)(*self.xch.lock(), dom) };
        self.rc(|| format!("xc_mem_paging_disable({dom})"), rc)
            .map(drop)
    }

    fn nominate(&self, dom: DomId, gfn: Gfn) -> Result<()> {
        // SAFETY: plain integer arguments on a live handle.
        let rc = unsafe { (self.fns.paging_nominate)(*self.xch.lock(), dom, gfn) };
        self.rc(|| format!("xc_mem_paging_nominate({dom}, {gfn:#x})"), rc)
            .map(drop)
    }

    fn evict(&self, dom: DomId, gfn: Gfn) -> Result<()> {
        // SAFETY: plain integer arguments on a live handle.
        let rc = unsafe { (self.fns.paging_evict)(*self.xch.lock(), dom, gfn) };
        self.rc(|| format!("xc_mem_paging_evict({dom}, {gfn:#x})"), rc)
            .map(drop)
    }

    fn load(&self, dom: DomId, gfn: Gfn, page: &[u8]) -> Result<()> {
        if page.len() != PAGE_SIZE {
            return Err(Error::Invalid(format!(
                "load of {} bytes; a page is {PAGE_SIZE}",
                page.len()
            )));
        }
        let mut copy = page.to_vec();
        // SAFETY: libxenctrl reads exactly one page from the buffer, which holds PAGE_SIZE
        // bytes and outlives the call.
        let rc =
            unsafe { (self.fns.paging_load)(*self.xch.lock(), dom, gfn, copy.as_mut_ptr().cast()) };
        self.rc(|| format!("xc_mem_paging_load({dom}, {gfn:#x})"), rc)
            .map(drop)
    }

    fn resume(&self, dom: DomId) -> Result<()> {
        // SAFETY: plain integer arguments on a live handle.
        let rc = unsafe { (self.fns.paging_resume)(*self.xch.lock(), dom) };
        self.rc(|| format!("xc_mem_paging_resume({dom})"), rc)
            .map(drop)
    }
}
