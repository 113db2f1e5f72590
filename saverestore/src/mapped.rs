//! A regular file mapped read-only, so that a save reads the stream's pages where they are
//! instead of copying them through a reader ([`crate::save_slice`]).
//!
//! # A file that changes under the save
//!
//! Nothing stops another process from writing or truncating the file while it is mapped.
//! The choice made here:
//!
//! * Every value the parser checks and then relies on (record headers, lengths, pfn
//!   arrays, verbatim records) is copied out of the mapping before it is checked, so the
//!   slices handed out are sized by those copies, never by a second read of the mapping.
//!   Page bytes are only ever read as data (classification, CRC32C, the codecs): a byte
//!   changing between two reads changes what is written, never where anything reads or
//!   writes. So no safe code can observe a changing file as anything but changing data.
//! * A write during the save would still leave an image of a mix of old and new bytes that
//!   is consistent with itself (the stream checksum is computed over what was read). To
//!   refuse that, [`MappedFile::check_unchanged`] compares the file's size and modification
//!   time with those seen when it was mapped; the save command calls it before it commits
//!   the image, so a file written to during the save gives an error and nothing under the
//!   final name. (A write through another process's shared mapping may update the
//!   modification time late; such a writer is not a case `xl save` files meet.)
//! * A truncation below the mapped length makes a later access to the lost pages fault
//!   (SIGBUS, the process stops): a crash, not wrong data.
//!
//! Pipes, FIFOs (`--domain`) and stdin keep the copying reader.
//!
//! Restore, extract and inspect map a local image file the same way
//! ([`crate::dest::open_source`]): its frames are checksummed and decoded where they lie.
//! An image changed during a restore gives a frame checksum or stream CRC error, or decodes
//! to bytes that the stream CRC then rejects (the codecs are safe against any input); an
//! image truncated meanwhile faults as above.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::SystemTime;

/// A read-only private mapping of a whole regular file.
#[derive(Debug)]
pub struct MappedFile {
    ptr: *mut libc::c_void,
    len: usize,
    file: File,
    stamp: (u64, Option<SystemTime>),
}

// SAFETY: the mapping is read-only and owned by this value (unmapped only in Drop); sharing
// `&[u8]` views of it between threads is what a `&[u8]` of any memory allows.
unsafe impl Send for MappedFile {}
// SAFETY: as for Send: `&MappedFile` only hands out shared read-only slices.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps `file` if it is a regular, non-empty file; `Ok(None)` for anything else (a
    /// pipe, a FIFO, a character device, an empty file), which the caller reads instead.
    ///
    /// # Errors
    /// `fstat` or `mmap` failing on a regular file.
    pub fn map(file: File) -> io::Result<Option<MappedFile>> {
        let meta = file.metadata()?;
        if !meta.is_file() || meta.len() == 0 {
            return Ok(None);
        }
        let len = usize::try_from(meta.len()).map_err(io::Error::other)?;
        // SAFETY: a fresh read-only private mapping of an open file descriptor, at an address
        // the kernel chooses; nothing aliases it mutably (PROT_READ), and it is unmapped only
        // in Drop, after every borrow of `bytes()` has ended.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(MappedFile {
            ptr,
            len,
            file,
            stamp: (meta.len(), meta.modified().ok()),
        }))
    }

    /// The file's bytes as mapped.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is a live PROT_READ mapping of `len` bytes (see `map`), valid until
        // Drop, which cannot run while `&self` is borrowed; see the module doc for a file
        // changed by others meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }

    /// Fails if the file's size or modification time differ from when it was mapped.
    ///
    /// # Errors
    /// The file changed (an `io::Error` saying so), or `fstat` failed.
    pub fn check_unchanged(&self) -> io::Result<()> {
        let meta = self.file.metadata()?;
        if (meta.len(), meta.modified().ok()) != self.stamp {
            return Err(io::Error::other(
                "the input file changed while it was being saved",
            ));
        }
        Ok(())
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no borrow of it outlives `self`.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_regular_files_only_and_sees_changes() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let m = MappedFile::map(f.reopen().unwrap()).unwrap();
        assert!(m.is_none(), "an empty file is read, not mapped");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        let m = MappedFile::map(f.reopen().unwrap()).unwrap().unwrap();
        assert!(m.bytes() == &data[..]);
        m.check_unchanged().unwrap();
        f.write_all(b"more").unwrap();
        f.flush().unwrap();
        let e = m.check_unchanged().unwrap_err();
        assert!(e.to_string().contains("changed"), "{e}");
        let (r, _w) = io::pipe().unwrap();
        let r = File::from(std::os::fd::OwnedFd::from(r));
        assert!(MappedFile::map(r).unwrap().is_none(), "a pipe is read");
    }
}
