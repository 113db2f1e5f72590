//! Where a store's objects live when it is not (only) a local directory: the [`Backend`]
//! trait, its local-directory implementation [`DirBackend`], and [`ArenaRead`], the one
//! read primitive chunk reads need (a ranged read of an arena).
//!
//! A store with a backend ("a remote store", `Store::open_remote`) keeps the same object
//! names as the directory layout:
//!
//! ```text
//! arenas/00000001.arena      sealed arenas only (immutable once written)
//! images/NAME/3.manifest     one object per version, written whole
//! images/NAME/2.removed      tombstones (empty objects)
//! index                      the index, replaced whole; a cache of the arenas' footers
//! ```
//!
//! The only operations are whole-object put / get / delete, a listing, and ranged gets; an
//! object store offers exactly these, and each put replaces an object atomically (a reader
//! sees the old object or the new one, never part of one). Nothing is appended in place:
//! the arena a writer fills stays in a local staging directory until it is sealed, and is
//! then put whole. See docs/image-store.md ("S3 backend") for the crash-safety argument.

use std::fmt::Debug;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{io_at, StoreError};

/// Ranged reads of one arena: a local file, or an object read with ranged GETs.
pub trait ArenaRead: Send + Sync + Debug {
    /// Fill `buf` from `offset`; a short object is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The arena's length in bytes.
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

impl ArenaRead for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl<T: ArenaRead + ?Sized> ArenaRead for Arc<T> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
}

/// The objects of a store, by name (`arenas/00000001.arena`, `images/os/3.manifest`,
/// `index`). Implementations must make [`Backend::put`] atomic: a concurrent or later
/// reader sees the whole new object or the old one.
pub trait Backend: Send + Sync + Debug {
    /// The whole object, or `None` if there is none by that name.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// `len` bytes from `offset` (one ranged GET on S3): a chunk read never fetches more
    /// than the chunk's record.
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError>;
    /// Create or replace `key` with `bytes`, atomically.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError>;
    /// Create `key` with `bytes` only if there is no object by that name (S3: a PUT with
    /// `If-None-Match: *`), atomically. `Ok(false)`: it existed, nothing was written. Arenas
    /// and manifests are put this way, so a second writer that picked the same number
    /// fails instead of replacing the first writer's object.
    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool, StoreError>;
    /// Delete `key`; deleting what is not there is not an error.
    fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Every object whose name starts with `prefix` (a "directory" ending in `/`), with its
    /// size, in any order; names are whole keys.
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError>;
    /// For messages: `s3://bucket/prefix`, or the directory.
    fn describe(&self) -> String;
}

/// A backend in a local (or mounted) directory: each object a file, put atomically through
/// a temporary file, fsync and rename.
#[derive(Debug, Clone)]
pub struct DirBackend {
    root: PathBuf,
}

impl DirBackend {
    /// Objects under `root` (created on the first put).
    pub fn new(root: impl Into<PathBuf>) -> DirBackend {
        DirBackend { root: root.into() }
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// `bytes` written and synced to a temporary name (`.<name>.<pid>.<suffix>`) beside
    /// `key`'s file: (temporary, final path, directory), for a rename or link to publish.
    fn write_temp(
        &self,
        key: &str,
        bytes: &[u8],
        suffix: &str,
    ) -> Result<(PathBuf, PathBuf, PathBuf), StoreError> {
        let p = self.path(key)?;
        let dir = p.parent().unwrap_or(&self.root).to_owned();
        std::fs::create_dir_all(&dir).map_err(|e| io_at(&dir, e))?;
        let tmp = dir.join(format!(
            ".{}.{}.{suffix}",
            p.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let mut f = File::create(&tmp).map_err(|e| io_at(&tmp, e))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| io_at(&tmp, e))?;
        Ok((tmp, p, dir))
    }
}

/// Keys are relative, `/`-separated, without empty, `.` or `..` parts.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..");
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("bad object name {key:?}")))
    }
}

impl Backend for DirBackend {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let p = self.path(key)?;
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_at(&p, e)),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let p = self.path(key)?;
        let f = File::open(&p).map_err(|e| io_at(&p, e))?;
        let mut buf =
            vec![0u8; usize::try_from(len).map_err(|_| StoreError::Invalid("range".into()))?];
        FileExt::read_exact_at(&f, &mut buf, offset).map_err(|e| io_at(&p, e))?;
        Ok(buf)
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let (tmp, p, dir) = self.write_temp(key, bytes, "tmp")?;
        std::fs::rename(&tmp, &p).map_err(|e| io_at(&p, e))?;
        super::log::sync_dir(&dir)
    }

    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        let (tmp, p, dir) = self.write_temp(key, bytes, "new")?;
        // link(2) never replaces: it fails if the name exists.
        let r = std::fs::hard_link(&tmp, &p);
        let _ = std::fs::remove_file(&tmp);
        match r {
            Ok(()) => super::log::sync_dir(&dir).map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_at(&p, e)),
        }
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let p = self.path(key)?;
        match std::fs::remove_file(&p) {
            Ok(()) => super::log::sync_dir(p.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_at(&p, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> Result<(), StoreError> {
            let rd = match std::fs::read_dir(dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_at(dir, e)),
            };
            for e in rd {
                let e = e.map_err(|e| io_at(dir, e))?;
                let m = e.metadata().map_err(|err| io_at(e.path(), err))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue; // a put in progress
                }
                if m.is_dir() {
                    walk(root, &e.path(), out)?;
                } else if let Ok(rel) = e.path().strip_prefix(root) {
                    out.push((rel.to_string_lossy().into_owned(), m.len()));
                }
            }
            Ok(())
        }
        let start = match prefix.rsplit_once('/') {
            Some((dir, _)) => self.root.join(dir),
            None => self.root.clone(),
        };
        let mut out = Vec::new();
        walk(&self.root, &start, &mut out)?;
        out.retain(|(k, _)| k.starts_with(prefix));
        Ok(out)
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// One sealed arena in a backend, read with ranged gets.
#[derive(Debug)]
pub struct RemoteArena {
    pub backend: Arc<dyn Backend>,
    pub key: String,
    pub len: u64,
}

impl ArenaRead for RemoteArena {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} is {} bytes long", self.key, self.len),
            ));
        }
        let b = self
            .backend
            .get_range(&self.key, offset, buf.len() as u64)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if b.len() != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: short ranged read", self.key),
            ));
        }
        buf.copy_from_slice(&b);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
}
