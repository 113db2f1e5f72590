//! An in-memory [`Disk`]: the model the overlay's property tests compare against, and a
//! stand-in template for tests of other layers and frontends.

use parking_lot::RwLock;

use crate::disk::{check_range, Disk, DiskError, Extent, WriteFlags, ZeroFlags};

/// A disk held in a `Vec<u8>`.
#[derive(Debug)]
pub struct MemDisk {
    bytes: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemDisk {
    /// A zero-filled writable disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            bytes: RwLock::new(vec![0; size as usize]),
            read_only: false,
        }
    }

    /// A read-only disk holding `bytes`.
    pub fn read_only(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RwLock::new(bytes),
            read_only: true,
        }
    }

    /// A copy of the whole content.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.read().clone()
    }

    fn fill(&self, offset: u64, len: u64, v: u8) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.size())?;
        self.bytes.write()[offset as usize..(offset + len) as usize].fill(v);
        Ok(())
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.bytes.read().len() as u64
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.size())?;
        let b = self.bytes.read();
        buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _flags: WriteFlags) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size())?;
        self.bytes.write()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.fill(offset, len, 0)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<(), DiskError> {
        self.fill(offset, len, 0)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(vec![Extent {
            len,
            hole: false,
            zero: false,
            depth: 1,
        }])
    }
}
