//! The `Disk` trait: one interface over every layer of the disk stack.
//!
//! A layer is a `Disk`, and most layers wrap another `Disk` (an overlay wraps its template; a
//! read cache or a failover layer will wrap whatever sits below it). Every frontend — the NBD
//! server today, the Xen blkif ring later — drives the top of the stack through this trait
//! only, so a new layer slots in without touching a frontend.
//!
//! Contract every implementation keeps:
//!
//! - **Synchronous and positioned.** Calls block the calling thread (run them on a worker
//!   thread, never on an async executor) and carry their own offset; there is no cursor.
//! - **`&self` with interior locking.** Many requests run at once from many threads; a layer
//!   serialises only what must be serialised (e.g. copy-on-write of one cluster).
//! - **Callers check ranges.** `offset + len <= size()` is checked by the caller
//!   ([`crate::request`]); layers still return [`DiskError::OutOfRange`] instead of panicking.
//! - **Durability.** When `flush` returns, every write, discard and write-zeroes that returned
//!   before `flush` was called is durable, including any metadata needed to find it.
//!   [`WriteFlags::fua`] makes one write durable before it returns.
//! - **Idempotence.** Applying the same write (or discard, or write-zeroes) twice leaves the
//!   same content as applying it once, so a failover frontend may replay requests.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::sync::Arc;

use crate::request::{Completion, Op, RequestError};

/// Called once with the result of a request started by [`Disk::submit`].
pub type Done = Box<dyn FnOnce(Result<Completion, RequestError>) + Send>;

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The request reaches past the end of the disk.
    #[error("range {offset}+{len} is beyond the disk size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The disk (or this layer) is read-only.
    #[error("disk is read-only")]
    ReadOnly,
    /// The layer cannot do this operation in the way asked (e.g. a fast zero it cannot do
    /// without writing data).
    #[error("operation not supported by this disk")]
    NotSupported,
    /// An I/O error from the device below; the errno is kept.
    #[error("I/O error")]
    Io(#[from] io::Error),
    /// On-disk metadata is inconsistent.
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
}

impl DiskError {
    /// The errno a frontend should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            DiskError::OutOfRange { .. } => libc::EINVAL,
            DiskError::ReadOnly => libc::EPERM,
            DiskError::NotSupported => libc::EOPNOTSUPP,
            DiskError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            DiskError::Corrupt(_) => libc::EIO,
        }
    }
}

/// Flags on a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data (and the metadata to find it) is durable on return.
    pub fua: bool,
}

/// Flags on a write-zeroes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Durable on return, as for [`WriteFlags::fua`].
    pub fua: bool,
    /// Only succeed if zeroing is fast (no data written); else return
    /// [`DiskError::NotSupported`] having changed nothing.
    pub fast_only: bool,
}

/// How one run of bytes is stored, as the NBD `base:allocation` context and
/// `qemu:allocation-depth` see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (never zero).
    pub len: u64,
    /// Not allocated in any layer (reads may still be non-zero only if `zero` is false).
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Which layer holds the bytes: 0 = none, 1 = the top layer, 2 = the one below, ...
    pub depth: u32,
}

impl Extent {
    /// Two extents with the same flags can be merged.
    pub fn same_kind(&self, other: &Extent) -> bool {
        self.hole == other.hole && self.zero == other.zero && self.depth == other.depth
    }
}

/// Append `e` to `out`, merging it with the last extent when both are of the same kind.
pub fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.same_kind(&e) => last.len += e.len,
        _ => out.push(e),
    }
}

/// One virtual disk, or one layer of a disk stack. See the module docs for the contract.
pub trait Disk: Send + Sync + fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;

    /// Fill `buf` from `offset`.
    ///
    /// # Errors
    /// [`DiskError::OutOfRange`] past the end; [`DiskError::Io`] from the device.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;

    /// Write `buf` at `offset`.
    ///
    /// # Errors
    /// [`DiskError::ReadOnly`], [`DiskError::OutOfRange`], [`DiskError::Io`].
    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<(), DiskError>;

    /// Make every completed write durable.
    ///
    /// # Errors
    /// [`DiskError::Io`] from the device's sync.
    fn flush(&self) -> Result<(), DiskError>;

    /// Whether what a completed write left in `offset..offset+len` is already in the storage
    /// as another process opening it now would see it: in the host's page cache, with no
    /// part of it (an overlay's map entry, a cache's dirty block) held only in this
    /// process's memory. Such a write needs no re-applying when this process dies; it can
    /// still be lost with the host before a flush. The failover endpoint asks its drivers
    /// ([`crate::failover`]) so that it keeps only the writes that do need re-applying.
    /// The default, `false`, is always safe.
    fn write_is_stored(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }

    /// The guest no longer needs this range. Layers that keep data for the guest (the
    /// overlay) make it read back as zeroes, so a later read never resurfaces older data.
    ///
    /// # Errors
    /// As for [`Disk::write_at`].
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;

    /// Make the range read back as zeroes.
    ///
    /// # Errors
    /// As for [`Disk::write_at`]; [`DiskError::NotSupported`] when `fast_only` is set and
    /// zeroing would need data writes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), DiskError>;

    /// How the bytes in `offset..offset+len` are stored, as extents that cover the range
    /// exactly, merged where adjacent extents are of the same kind.
    ///
    /// # Errors
    /// [`DiskError::OutOfRange`], [`DiskError::Io`].
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError>;

    /// Start `op` without blocking the caller; `done` runs later, on another thread (or at
    /// once on failure), with what [`crate::request::execute`] would return (`headroom` as
    /// there). For layers that complete requests from their own I/O thread, such as the
    /// failover endpoint. The default hands the request back, and the frontend runs it on a
    /// worker thread.
    ///
    /// A layer may hold taken requests back to send several at once: the caller calls
    /// [`Disk::submit_flush`] before it waits for anything (more requests, a free slot).
    ///
    /// # Errors
    /// The request and `done`, untouched, when this layer does not take it.
    fn submit(&self, op: Op, headroom: usize, done: Done) -> Result<(), (Op, Done)> {
        let _ = headroom;
        Err((op, done))
    }

    /// Start the requests [`Disk::submit`] held back. The default holds none back.
    fn submit_flush(&self) {}

    /// Where a frontend should run the task that writes this disk's replies to a client
    /// socket when the socket does not take them at once; `None` (the default): on the
    /// frontend's own runtime. A disk that gives one also has its large replies (64 KiB or
    /// more) sent through that task at once. The failover endpoint with pinned readers
    /// gives a runtime on a thread kept off the readers' CPU, so a large reply's copy into
    /// the socket runs beside the readers instead of on their CPU.
    fn reply_runtime(&self) -> Option<tokio::runtime::Handle> {
        None
    }
}

/// Output that completions queue up and that is sent once the batch they ran in ends: a
/// frontend's reply socket. See [`defer_to_batch_end`].
pub trait BatchOutput: Send + Sync {
    /// Send what was queued while the batch ran.
    fn end_of_batch(&self);
}

thread_local! {
    /// `Some` on a thread that batches the completions it runs (see
    /// [`batch_completions_on_this_thread`]): the outputs to send at the end of the batch.
    static BATCH: RefCell<Option<Vec<Arc<dyn BatchOutput>>>> = const { RefCell::new(None) };
}

/// Make the calling thread batch what the completions ([`Done`]) it runs send: an I/O thread
/// that completes several requests from one read (the failover endpoint's connection reader)
/// calls this once, runs the callbacks, and calls [`end_completion_batch`] before it blocks
/// again, so a frontend sends all their replies in one write.
pub fn batch_completions_on_this_thread() {
    BATCH.with(|b| {
        let mut b = b.borrow_mut();
        if b.is_none() {
            *b = Some(Vec::new());
        }
    });
}

/// Send everything queued by completions run on this thread since the last call.
pub fn end_completion_batch() {
    let outs = BATCH.with(|b| b.borrow_mut().as_mut().map(std::mem::take));
    for o in outs.into_iter().flatten() {
        o.end_of_batch();
    }
}

/// Called by a completion that queued output on `out`: when the calling thread batches,
/// `out` is sent at the end of the batch and this returns true; otherwise false (send now).
pub fn defer_to_batch_end(out: &Arc<dyn BatchOutput>) -> bool {
    BATCH.with(|b| match b.borrow_mut().as_mut() {
        Some(v) => {
            if !v.iter().any(|o| Arc::ptr_eq(o, out)) {
                v.push(out.clone());
            }
            true
        }
        None => false,
    })
}

/// Return [`DiskError::OutOfRange`] unless `offset..offset+len` lies within `size`.
///
/// # Errors
/// [`DiskError::OutOfRange`].
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_check_rejects_overflow_and_past_end() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(10, 0, 10).is_ok());
        assert!(check_range(5, 6, 10).is_err());
        assert!(check_range(u64::MAX, 2, 10).is_err());
    }

    #[test]
    fn extents_merge_when_same_kind() {
        let mut v = Vec::new();
        let data = Extent {
            len: 4,
            hole: false,
            zero: false,
            depth: 1,
        };
        push_extent(&mut v, data);
        push_extent(&mut v, data);
        push_extent(&mut v, Extent { len: 0, ..data });
        push_extent(
            &mut v,
            Extent {
                len: 2,
                hole: true,
                zero: true,
                depth: 0,
            },
        );
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].len, 8);
        assert_eq!(v[1].len, 2);
    }
}
