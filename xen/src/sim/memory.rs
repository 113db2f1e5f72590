//! Guest memory of simulated domains: one memfd per domain, so the simulator's foreign and
//! grant maps are real shared mappings of the same pages, as they are on Xen.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::mapping::Mapping;
use crate::types::PAGE_SIZE;

/// A domain's pseudo-physical memory.
#[derive(Debug)]
pub struct GuestMemory {
    fd: OwnedFd,
    pages: u64,
}

impl GuestMemory {
    /// Allocate `pages` zeroed pages (sparse until touched).
    ///
    /// # Errors
    /// The memfd or its sizing failed.
    pub fn new(pages: u64) -> Result<Self> {
        // SAFETY: the name is a NUL-terminated literal; flags are valid.
        let raw = unsafe { libc::memfd_create(c"remoca-sim-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::last_os("memfd_create for simulated guest memory"));
        }
        // SAFETY: memfd_create returned a fresh descriptor that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let bytes = pages
            .checked_mul(PAGE_SIZE as u64)
            .ok_or_else(|| Error::Invalid(format!("{pages} pages overflow")))?;
        // SAFETY: fd is a valid memfd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), bytes as libc::off_t) } != 0 {
            return Err(Error::last_os("sizing simulated guest memory"));
        }
        Ok(GuestMemory { fd, pages })
    }

    /// Map the given frames contiguously (they need not be contiguous in the guest).
    ///
    /// # Errors
    /// `EINVAL` for a frame outside the domain; mmap failures.
    pub fn map(&self, gfns: &[u64], writable: bool) -> Result<Mapping> {
        if let Some(bad) = gfns.iter().find(|g| **g >= self.pages) {
            return Err(Error::os(
                format!("gfn {bad:#x} outside a {}-page domain", self.pages),
                libc::EINVAL,
            ));
        }
        self.map_sparse(gfns, writable, &[])
    }

    /// Map `gfns`, leaving inaccessible the ones outside the domain and those listed in
    /// `skip` (by index).
    ///
    /// # Errors
    /// mmap failures; `EINVAL` for an empty list.
    pub fn map_sparse(&self, gfns: &[u64], writable: bool, skip: &[usize]) -> Result<Mapping> {
        if gfns.is_empty() {
            return Err(Error::os("mapping zero pages", libc::EINVAL));
        }
        let len = gfns.len() * PAGE_SIZE;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: an anonymous PROT_NONE reservation; the kernel picks the address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::last_os(
                "reserving address space for a simulated map",
            ));
        }
        for (i, gfn) in gfns.iter().enumerate() {
            if *gfn >= self.pages || skip.contains(&i) {
                continue;
            }
            // SAFETY: the target lies inside the reservation made above, which we own;
            // MAP_FIXED replaces exactly that page with the shared memfd page.
            let p = unsafe {
                libc::mmap(
                    base.cast::<u8>().wrapping_add(i * PAGE_SIZE).cast(),
                    PAGE_SIZE,
                    prot,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    self.fd.as_raw_fd(),
                    (*gfn as usize * PAGE_SIZE) as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                let err = Error::last_os("mapping a simulated guest page");
                // SAFETY: unmapping our own reservation.
                unsafe { libc::munmap(base, len) };
                return Err(err);
            }
        }
        let ptr = NonNull::new(base.cast::<u8>())
            .ok_or_else(|| Error::os("mmap returned null", libc::ENOMEM))?;
        let release = Box::new(|p: *mut u8, n: usize| {
            // SAFETY: p/n are exactly the region mapped above, released once by Mapping::drop.
            unsafe { libc::munmap(p.cast(), n) };
        });
        // SAFETY: the region is mapped for `len` bytes until `release` unmaps it.
        Ok(unsafe { Mapping::from_raw(ptr, len, release) })
    }

    /// Copy a page out.
    pub fn read_page(&self, gfn: u64, buf: &mut [u8]) -> Result<()> {
        self.pread_exact(gfn, buf)
    }

    /// Overwrite a page.
    pub fn write_page(&self, gfn: u64, offset: usize, data: &[u8]) -> Result<()> {
        if gfn >= self.pages || offset + data.len() > PAGE_SIZE {
            return Err(Error::os(format!("write to gfn {gfn:#x}"), libc::EINVAL));
        }
        let pos = gfn as usize * PAGE_SIZE + offset;
        // SAFETY: data is a valid buffer of data.len() bytes; fd is our memfd.
        let n = unsafe {
            libc::pwrite(
                self.fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                pos as libc::off_t,
            )
        };
        if n != data.len() as isize {
            return Err(Error::last_os("writing simulated guest memory"));
        }
        Ok(())
    }

    /// Drop a page's contents (eviction): it reads as zeroes afterwards.
    pub fn discard_page(&self, gfn: u64) -> Result<()> {
        self.write_page(gfn, 0, &[0u8; PAGE_SIZE])
    }

    fn pread_exact(&self, gfn: u64, buf: &mut [u8]) -> Result<()> {
        if gfn >= self.pages || buf.len() > PAGE_SIZE {
            return Err(Error::os(format!("read of gfn {gfn:#x}"), libc::EINVAL));
        }
        let pos = gfn as usize * PAGE_SIZE;
        // SAFETY: buf is a valid writable buffer of buf.len() bytes; fd is our memfd.
        let n = unsafe {
            libc::pread(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                pos as libc::off_t,
            )
        };
        if n != buf.len() as isize {
            return Err(Error::last_os("reading simulated guest memory"));
        }
        Ok(())
    }
}
