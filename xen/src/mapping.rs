//! [`Mapping`]: guest memory mapped into this process (foreign map, grant map, or the
//! simulator's shared pages), released when dropped.
//!
//! The memory is shared with another domain that may change it at any time, so no Rust
//! reference to it is ever handed out. Bytes are copied in and out with bounds-checked
//! [`Mapping::read`] / [`Mapping::write`]; ring code uses [`Mapping::as_ptr`] with atomics.

use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::types::PAGE_SIZE;

type Release = Box<dyn FnOnce(*mut u8, usize) + Send + Sync>;

/// A mapping of `len` bytes of shared memory.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    release: Option<Release>,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: the mapping is plain shared memory; it is only accessed through raw-pointer
// copies and atomics, never through references, so moving or sharing the owner between
// threads cannot create aliasing references.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only allows raw copies and atomic accesses.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Take ownership of a mapping.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes, page aligned, and stay valid
    /// until `release(ptr, len)` runs; nothing else may unmap it.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize, release: Release) -> Self {
        Mapping {
            ptr,
            len,
            release: Some(release),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of whole pages mapped.
    pub fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }

    /// Base address, for ring code that accesses the header with atomics. Valid while
    /// `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, n: usize) -> Result<()> {
        match offset.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::Invalid(format!(
                "access of {n} bytes at {offset} outside a {}-byte mapping",
                self.len
            ))),
        }
    }

    /// Copy bytes out of the mapping.
    ///
    /// # Errors
    /// `Invalid` if the range is outside the mapping.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: the range is inside the mapping (checked above), which is valid while
        // `self` lives; `buf` is a distinct local buffer, so the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().wrapping_add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }

    /// Copy bytes into the mapping.
    ///
    /// # Errors
    /// `Invalid` if the range is outside the mapping.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: in bounds (checked above) of a live, writable mapping; `data` is a
        // separate buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.ptr.as_ptr().wrapping_add(offset),
                data.len(),
            );
        }
        Ok(())
    }

    /// Fill a range with zeroes.
    ///
    /// # Errors
    /// `Invalid` if the range is outside the mapping.
    pub fn zero(&self, offset: usize, n: usize) -> Result<()> {
        self.check(offset, n)?;
        // SAFETY: in bounds (checked above) of a live, writable mapping.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().wrapping_add(offset), 0, n) };
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release(self.ptr.as_ptr(), self.len);
        }
    }
}
