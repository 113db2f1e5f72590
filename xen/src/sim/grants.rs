//! Simulated grant tables: map and copy pages a guest granted, with Xen's checks.

use std::sync::Arc;

use super::{Inner, PageState, SimHost};
use crate::error::{Error, Result};
use crate::grant::{GrantCopy, GrantHandle, GrantTables};
use crate::mapping::Mapping;
use crate::types::{DomId, Gfn, GrantRef};

#[derive(Debug)]
struct SimGrantHandle {
    host: SimHost,
    _inner: Arc<Inner>,
}

impl GrantTables for SimHost {
    fn open(&self) -> Result<Box<dyn GrantHandle>> {
        Ok(Box::new(SimGrantHandle {
            host: self.clone(),
            _inner: self.inner.clone(),
        }))
    }
}

impl SimHost {
    /// Resolve a grant for this view's domain (dom0 unless [`SimHost::acting_as`]): the frame
    /// behind it, after Xen's checks.
    fn resolve_grant(&self, dom: DomId, gref: GrantRef, writable: bool) -> Result<Gfn> {
        let st = self.inner.state.lock();
        let d = st.domain(dom)?;
        let e = d
            .grants
            .get(&gref)
            .filter(|e| e.to == self.me)
            .ok_or_else(|| {
                Error::os(
                    format!("grant {gref} of domain {dom}: bad grant reference"),
                    libc::EINVAL,
                )
            })?;
        if writable && e.readonly {
            return Err(Error::os(
                format!("writable use of read-only grant {gref} of domain {dom}"),
                libc::EPERM,
            ));
        }
        if matches!(
            d.p2m[e.gfn as usize],
            PageState::PagedOut | PageState::PagingIn
        ) {
            return Err(Error::os(
                format!("grant {gref} of domain {dom}: page is paged out"),
                libc::EAGAIN,
            ));
        }
        Ok(e.gfn)
    }
}

impl GrantHandle for SimGrantHandle {
    fn map(&self, dom: DomId, refs: &[GrantRef], writable: bool) -> Result<Mapping> {
        self.host.check("gnttab.map")?;
        let gfns = refs
            .iter()
            .map(|r| self.host.resolve_grant(dom, *r, writable))
            .collect::<Result<Vec<_>>>()?;
        let map = {
            let st = self.host.inner.state.lock();
            st.domain(dom)?.memory.map(&gfns, writable)?
        };
        self.host.track_map(dom, gfns, map)
    }

    fn copy(&self, ops: &mut [GrantCopy<'_>]) -> Result<()> {
        self.host.check("gnttab.copy")?;
        for (i, op) in ops.iter_mut().enumerate() {
            if !op.in_page() {
                return Err(Error::os(
                    format!("grant copy segment {i} crosses a page"),
                    libc::EINVAL,
                ));
            }
            match op {
                GrantCopy::FromGuest {
                    dom,
                    gref,
                    offset,
                    buf,
                } => {
                    let gfn = self.host.resolve_grant(*dom, *gref, false)?;
                    let st = self.host.inner.state.lock();
                    let mut page = vec![0u8; crate::types::PAGE_SIZE];
                    st.domain(*dom)?.memory.read_page(gfn, &mut page)?;
                    let o = usize::from(*offset);
                    buf.copy_from_slice(&page[o..o + buf.len()]);
                }
                GrantCopy::ToGuest {
                    dom,
                    gref,
                    offset,
                    buf,
                } => {
                    let gfn = self.host.resolve_grant(*dom, *gref, true)?;
                    let mut st = self.host.inner.state.lock();
                    let d = st.domain_mut(*dom)?;
                    if let PageState::Nominated { touched } = &mut d.p2m[gfn as usize] {
                        *touched = true;
                    }
                    d.memory.write_page(gfn, usize::from(*offset), buf)?;
                }
            }
        }
        Ok(())
    }
}
