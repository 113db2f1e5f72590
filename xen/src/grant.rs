//! Grant tables: pages a guest granted to us, mapped or copied.

use crate::error::Result;
use crate::mapping::Mapping;
use crate::types::{DomId, GrantRef};

/// One grant copy. Data crosses between a local buffer and a granted page.
#[derive(Debug)]
pub enum GrantCopy<'a> {
    /// Copy `buf.len()` bytes from the guest's granted page at `offset` into `buf`.
    FromGuest {
        dom: DomId,
        gref: GrantRef,
        offset: u16,
        buf: &'a mut [u8],
    },
    /// Copy `buf` into the guest's granted page at `offset`.
    ToGuest {
        dom: DomId,
        gref: GrantRef,
        offset: u16,
        buf: &'a [u8],
    },
}

impl GrantCopy<'_> {
    pub fn len(&self) -> usize {
        match self {
            GrantCopy::FromGuest { buf, .. } => buf.len(),
            GrantCopy::ToGuest { buf, .. } => buf.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where in the page the copy lands, checked against the page size.
    pub fn in_page(&self) -> bool {
        let off = match self {
            GrantCopy::FromGuest { offset, .. } | GrantCopy::ToGuest { offset, .. } => *offset,
        };
        usize::from(off) + self.len() <= crate::types::PAGE_SIZE
    }
}

/// An open grant-table device (`/dev/xen/gntdev`); closed on drop.
pub trait GrantHandle: Send + Sync {
    /// Map granted pages of `dom` contiguously.
    ///
    /// # Errors
    /// `EINVAL` bad or foreign grant reference; `EPERM` a writable map of a read-only grant;
    /// `EAGAIN` the granted page is paged out.
    fn map(&self, dom: DomId, refs: &[GrantRef], writable: bool) -> Result<Mapping>;

    /// Perform grant copies; all succeed or the first failure is returned.
    ///
    /// # Errors
    /// As [`GrantHandle::map`], plus `EINVAL` for a copy crossing a page boundary.
    fn copy(&self, ops: &mut [GrantCopy<'_>]) -> Result<()>;
}

/// Grant-table capability.
pub trait GrantTables: Send + Sync {
    fn open(&self) -> Result<Box<dyn GrantHandle>>;
}
