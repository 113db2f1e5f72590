//! A raw image file as a [`Disk`]: byte `n` of the disk is byte `n` of the file.
//!
//! Opened read-only it is the **template** layer, shared by many VMs on the fast device; opened
//! read-write it is a plain exported disk (what `qemu-nbd` serves for a raw file). Holes in a
//! sparse file are reported through `SEEK_DATA`/`SEEK_HOLE` as zero extents.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::disk::{check_range, push_extent, Disk, DiskError, Extent, WriteFlags, ZeroFlags};

/// Why a raw image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RawOpenError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
}

/// A raw file or block device.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
    read_only: bool,
    path: PathBuf,
}

impl RawFile {
    /// Open `path` read-only (a template).
    ///
    /// # Errors
    /// [`RawOpenError`] when the file is missing or not a regular file.
    pub fn open_read_only(path: &Path) -> Result<Self, RawOpenError> {
        Self::open(path, true, 0)
    }

    /// Open `path` for reading and writing (a plain exported disk).
    ///
    /// # Errors
    /// [`RawOpenError`] when the file is missing or not a regular file.
    pub fn open_read_write(path: &Path) -> Result<Self, RawOpenError> {
        Self::open(path, false, 0)
    }

    /// Open `path` for reading and writing with `O_DSYNC`: a write returns only once it is on
    /// the storage below, not just in this kernel's page cache. For a backend in a driver
    /// domain, whose page cache dies with it (docs/failover.md, "Tier 2").
    ///
    /// # Errors
    /// [`RawOpenError`] when the file is missing or not a regular file.
    pub fn open_write_through(path: &Path) -> Result<Self, RawOpenError> {
        Self::open(path, false, libc::O_DSYNC)
    }

    fn open(path: &Path, read_only: bool, flags: libc::c_int) -> Result<Self, RawOpenError> {
        use std::os::unix::fs::OpenOptionsExt;
        let open_err = |source| RawOpenError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let size = if meta.is_file() {
            meta.len()
        } else {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_block_device() {
                return Err(RawOpenError::NotAFile {
                    path: path.to_owned(),
                });
            }
            // Block devices report length 0 in metadata; seek to the end instead.
            // SAFETY: lseek on a valid owned fd has no memory-safety preconditions.
            let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(open_err(io::Error::last_os_error()));
            }
            end as u64
        };
        Ok(Self {
            file,
            size,
            read_only,
            path: path.to_owned(),
        })
    }

    /// The path this image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, for layers that fingerprint their template.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn writable(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    /// `lseek(fd, offset, whence)` for SEEK_DATA / SEEK_HOLE; `None` on ENXIO (no more data).
    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek on a valid owned fd has no memory-safety preconditions; concurrent
        // calls only race on the file position, which positioned I/O never uses.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

/// `fallocate(2)` on `file`.
pub(crate) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid owned fd has no memory-safety preconditions.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Start writeback of `offset..offset+len` of `file` without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): no durability, only an earlier start.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: sync_file_range on a valid owned fd has no memory-safety preconditions.
    let r = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Drop `file`'s clean pages from the page cache (`posix_fadvise(DONTNEED)`); dirty pages
/// stay, so write the file back first if all of it must go.
pub(crate) fn drop_cached_pages(file: &File) -> io::Result<()> {
    // SAFETY: posix_fadvise on a valid owned fd has no memory-safety preconditions.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        Err(io::Error::from_raw_os_error(r))
    } else {
        Ok(())
    }
}

/// Write `len` zero bytes at `offset` with ordinary writes.
pub(crate) fn write_zero_bytes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        file.write_all_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl Disk for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file.read_exact_at(buf, offset)?;
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<(), DiskError> {
        self.writable(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)?;
        if flags.fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_is_stored(&self, offset: u64, len: u64) -> bool {
        // No state of ours: a write that returned is in the page cache.
        !self.read_only && check_range(offset, len, self.size).is_ok()
    }

    fn flush(&self) -> Result<(), DiskError> {
        if !self.read_only {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.writable(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(()),
            // Discard is advisory: a file system that cannot punch holes keeps the data.
            Err(e) if unsupported(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), DiskError> {
        self.writable(offset, len)?;
        if len > 0 {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            match fallocate(&self.file, mode, offset, len)
                .or_else(|_| fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE, offset, len))
            {
                Ok(()) => {}
                Err(e) if unsupported(&e) => {
                    if flags.fast_only {
                        return Err(DiskError::NotSupported);
                    }
                    write_zero_bytes(&self.file, offset, len)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if flags.fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        check_range(offset, len, self.size)?;
        let end = offset + len;
        let data = |len| Extent {
            len,
            hole: false,
            zero: false,
            depth: 1,
        };
        let hole = |len| Extent {
            len,
            hole: true,
            zero: true,
            depth: 0,
        };
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let next_data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d.min(end),
                Ok(None) => end,
                // No SEEK_DATA support (or a block device): everything is data.
                Err(_) => {
                    push_extent(&mut out, data(end - pos));
                    break;
                }
            };
            if next_data > pos {
                push_extent(&mut out, hole(next_data - pos));
                pos = next_data;
                continue;
            }
            let next_hole = match self.seek(pos, libc::SEEK_HOLE) {
                Ok(Some(h)) => h.min(end),
                _ => end,
            };
            let next_hole = next_hole.max(pos + 1).min(end);
            push_extent(&mut out, data(next_hole - pos));
            pos = next_hole;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_image(bytes: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().write_all_at(bytes, 0).unwrap();
        f
    }

    #[test]
    fn read_only_refuses_writes_and_reads_content() {
        let img = temp_image(b"hello world");
        let d = RawFile::open_read_only(img.path()).unwrap();
        assert_eq!(d.size(), 11);
        let mut buf = [0u8; 5];
        d.read_at(&mut buf, 6).unwrap();
        assert_eq!(&buf, b"world");
        assert!(matches!(
            d.write_at(b"x", 0, WriteFlags::default()),
            Err(DiskError::ReadOnly)
        ));
        assert!(matches!(
            d.read_at(&mut buf, 7),
            Err(DiskError::OutOfRange { .. })
        ));
    }

    #[test]
    fn write_zeroes_reads_back_zero_and_reports_hole() {
        let img = temp_image(&vec![0xaa; 1 << 20]);
        let d = RawFile::open_read_write(img.path()).unwrap();
        d.write_zeroes(65536, 131072, ZeroFlags::default()).unwrap();
        let mut buf = vec![1u8; 131072];
        d.read_at(&mut buf, 65536).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let ext = d.block_status(0, 1 << 20).unwrap();
        let total: u64 = ext.iter().map(|e| e.len).sum();
        assert_eq!(total, 1 << 20);
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let e = RawFile::open_read_only(Path::new("/nonexistent/remoca.img")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/remoca.img"));
    }
}
