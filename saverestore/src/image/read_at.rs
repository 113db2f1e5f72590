//! Positioned reads, the one thing the random-access reader needs from its storage
//! (a local file, an NFS file, a mapped file, or memory).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Storage read at an offset.
pub trait ReadAt {
    /// Fills `buf` from `offset`; `UnexpectedEof` if the storage ends first.
    ///
    /// # Errors
    /// The storage's error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Current size of the storage.
    ///
    /// # Errors
    /// The storage's error.
    fn size(&self) -> io::Result<u64>;
    /// The whole storage as one slice, where it already is in memory (a buffer, a mapped
    /// file): readers then borrow frames instead of copying them.
    fn as_bytes(&self) -> Option<&[u8]> {
        None
    }
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for [u8] {
    fn as_bytes(&self) -> Option<&[u8]> {
        Some(self)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&e| e <= self.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn as_bytes(&self) -> Option<&[u8]> {
        Some(self)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn as_bytes(&self) -> Option<&[u8]> {
        (**self).as_bytes()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Box<T> {
    fn as_bytes(&self) -> Option<&[u8]> {
        (**self).as_bytes()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
}

impl ReadAt for crate::MappedFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.bytes().read_exact_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.bytes().len() as u64)
    }
    fn as_bytes(&self) -> Option<&[u8]> {
        Some(self.bytes())
    }
}
