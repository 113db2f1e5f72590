//! Frontend-agnostic block requests and their execution against a [`Disk`].
//!
//! A frontend (the NBD connection handler today, the blkif ring loop later) decodes its wire
//! request into an [`Op`], hands it to a worker thread, and calls [`execute`] there. A failed
//! request comes back inside [`RequestError`] with its buffer, so a frontend that retries or
//! fails over does not need a copy (STYLE rule 7).

use crate::disk::{check_range, Disk, DiskError, Extent, WriteFlags, ZeroFlags};
use crate::iobuf::Lent;

/// One block operation.
#[derive(Debug)]
pub enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        fast_only: bool,
    },
    BlockStatus {
        offset: u64,
        len: u64,
    },
}

/// What a successful operation returns.
#[derive(Debug)]
pub enum Completion {
    /// Data read; the first `headroom` bytes are left for the frontend's reply header.
    Read { buf: Vec<u8>, headroom: usize },
    /// Data read, lent out of memory shared with a storage driver (the failover endpoint's
    /// data area): the frontend sends it from there and drops it once sent.
    Lent(Lent),
    /// A write, flush, discard or write-zeroes that completed.
    Done,
    /// Extents covering the requested range.
    Extents(Vec<Extent>),
}

/// A failed request, with the request handed back.
#[derive(Debug, thiserror::Error)]
#[error("block request failed")]
pub struct RequestError {
    pub op: Op,
    #[source]
    pub error: DiskError,
}

impl Op {
    /// Whether the operation changes the disk.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Op::Write { .. } | Op::Discard { .. } | Op::WriteZeroes { .. }
        )
    }

    /// Bytes the operation covers (0 for flush).
    pub fn len(&self) -> u64 {
        match self {
            Op::Read { len, .. } => u64::from(*len),
            Op::Write { data, .. } => data.len() as u64,
            Op::Flush => 0,
            Op::Discard { len, .. } | Op::WriteZeroes { len, .. } | Op::BlockStatus { len, .. } => {
                *len
            }
        }
    }

    /// Whether the operation covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn offset(&self) -> u64 {
        match self {
            Op::Read { offset, .. }
            | Op::Write { offset, .. }
            | Op::Discard { offset, .. }
            | Op::WriteZeroes { offset, .. }
            | Op::BlockStatus { offset, .. } => *offset,
            Op::Flush => 0,
        }
    }

    /// Check the operation against the disk without doing it: read-only disks refuse writes,
    /// and the range must lie within the disk.
    ///
    /// # Errors
    /// [`DiskError::ReadOnly`] or [`DiskError::OutOfRange`].
    pub fn validate(&self, disk: &dyn Disk) -> Result<(), DiskError> {
        if self.is_write() && disk.is_read_only() {
            return Err(DiskError::ReadOnly);
        }
        check_range(self.offset(), self.len(), disk.size())
    }
}

/// Run `op` against `disk` on the calling (worker) thread. Reads leave `headroom` bytes at
/// the front of the returned buffer for the frontend's reply header.
///
/// # Errors
/// [`RequestError`] carrying the op and the [`DiskError`].
pub fn execute(disk: &dyn Disk, op: Op, headroom: usize) -> Result<Completion, RequestError> {
    if let Err(error) = op.validate(disk) {
        return Err(RequestError { op, error });
    }
    let result = match &op {
        Op::Read { offset, len } => {
            let mut buf = vec![0u8; headroom + *len as usize];
            match disk.read_at(&mut buf[headroom..], *offset) {
                Ok(()) => return Ok(Completion::Read { buf, headroom }),
                Err(e) => Err(e),
            }
        }
        Op::Write { offset, data, fua } => disk.write_at(data, *offset, WriteFlags { fua: *fua }),
        Op::Flush => disk.flush(),
        Op::Discard { offset, len, fua } => {
            disk.discard(*offset, *len)
                .and_then(|()| if *fua { disk.flush() } else { Ok(()) })
        }
        Op::WriteZeroes {
            offset,
            len,
            fua,
            fast_only,
        } => disk.write_zeroes(
            *offset,
            *len,
            ZeroFlags {
                fua: *fua,
                fast_only: *fast_only,
            },
        ),
        Op::BlockStatus { offset, len } => match disk.block_status(*offset, *len) {
            Ok(e) => return Ok(Completion::Extents(e)),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => Ok(Completion::Done),
        Err(error) => Err(RequestError { op, error }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemDisk;

    #[test]
    fn failed_write_hands_back_its_data() {
        let d = MemDisk::read_only(vec![0; 4096]);
        let e = execute(
            &d,
            Op::Write {
                offset: 0,
                data: vec![5; 10],
                fua: false,
            },
            0,
        )
        .unwrap_err();
        assert!(matches!(e.error, DiskError::ReadOnly));
        assert!(matches!(e.op, Op::Write { ref data, .. } if data == &vec![5; 10]));
    }

    #[test]
    fn read_leaves_headroom_and_checks_range() {
        let d = MemDisk::new(4096);
        d.write_at(&[7; 4], 100, WriteFlags::default()).unwrap();
        match execute(
            &d,
            Op::Read {
                offset: 100,
                len: 4,
            },
            16,
        )
        .unwrap()
        {
            Completion::Read { buf, headroom } => assert_eq!(&buf[headroom..], &[7; 4]),
            other => panic!("unexpected {other:?}"),
        }
        let e = execute(
            &d,
            Op::Read {
                offset: 4095,
                len: 2,
            },
            0,
        )
        .unwrap_err();
        assert!(matches!(e.error, DiskError::OutOfRange { .. }));
    }
}
