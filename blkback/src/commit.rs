//! Fold a disk stack (normally an overlay over its template) into a new raw template.
//!
//! The new file is written next to its final name, synced, then renamed into place, so a
//! crash never leaves a half-written template under the final name. Zero runs stay holes.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::disk::{Disk, DiskError};

const CHUNK: u64 = 1 << 20;

/// Why a commit failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("{0} already exists; refusing to overwrite a template")]
    Exists(PathBuf),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the source disk")]
    Read(#[source] DiskError),
}

/// Write every byte of `disk` to a new raw file `to`. Returns the bytes of data written
/// (zero runs are left as holes).
///
/// # Errors
/// [`CommitError`].
pub fn commit(disk: &dyn Disk, to: &Path) -> Result<u64, CommitError> {
    if to.exists() {
        return Err(CommitError::Exists(to.to_owned()));
    }
    let mut tmp = to.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let werr = |source| CommitError::Write {
        path: to.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(werr)?;
    let size = disk.size();
    file.set_len(size).map_err(werr)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut written = 0;
    let mut pos = 0;
    while pos < size {
        let n = CHUNK.min(size - pos) as usize;
        disk.read_at(&mut buf[..n], pos)
            .map_err(CommitError::Read)?;
        if buf[..n].iter().any(|&b| b != 0) {
            file.write_all_at(&buf[..n], pos).map_err(werr)?;
            written += n as u64;
        }
        pos += n as u64;
    }
    file.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, to).map_err(werr)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::WriteFlags;
    use crate::memory::MemDisk;

    #[test]
    fn commit_copies_content_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let d = MemDisk::new(3 << 20);
        d.write_at(b"abc", (2 << 20) + 5, WriteFlags::default())
            .unwrap();
        let to = dir.path().join("new.raw");
        assert_eq!(commit(&d, &to).unwrap(), 1 << 20);
        let got = std::fs::read(&to).unwrap();
        assert_eq!(got, d.contents());
        assert!(matches!(commit(&d, &to), Err(CommitError::Exists(_))));
    }
}
