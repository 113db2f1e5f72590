//! The content-addressed image store: one directory holding every chunk once, and every
//! version of every image as a manifest of chunk ids.
//!
//! ```text
//! STORE/
//!   lock                     flock: shared for readers, exclusive for a writer
//!   arenas/00000001.arena    append-only chunk records; sealed (footer + trailer) when full
//!   arenas/00000002.arena    ... the highest unsealed one is the one being appended to
//!   index                    chunk id -> (arena, offset, lengths); rebuildable from arenas/
//!   images/NAME/3.manifest   one version (snapshot or layer) of image NAME
//!   images/NAME/2.removed    tombstone of a removed version (numbers are never reused)
//!   tmp/                     manifests and conversions being written
//! ```
//!
//! The modules follow the layers of that layout:
//!
//! - [`arena`]: the arena file format (header, chunk record, footer, trailer) and its parsers.
//! - [`log`]: reading chunks and whole arenas back; the writer that appends and seals.
//! - [`index`]: the persisted index and its format.
//! - [`manifest`]: the manifest format, image names and `NAME@VERSION` references.
//! - [`ingest`]: import from a raw stream, export, and commit of an overlay as a layer.
//! - [`check`]: `verify` (every chunk re-hashed, every manifest's chunks present).
//! - [`gc`]: removal of versions, and rewriting of arenas that hold unreferenced chunks.
//! - [`usage`]: `du`, `log` and `ls` figures.
//! - [`disk`]: a read-only [`crate::Disk`] over one version, used to open an overlay whose
//!   template is a store version.
//!
//! Crash safety rests on one ordering: chunk records are appended and synced *before* the
//! manifest that names them is written (to `tmp/`, synced, renamed into `images/NAME/`, the
//! directory synced). A version is visible exactly when its manifest is, and a visible
//! manifest's chunks are on disk. The index is only a cache of what the arenas say; an arena
//! longer than the index knows (the writer died after appending) is re-read, and its
//! unsynced tail re-hashed and cut back to the last good record. See docs/image-store.md.

pub mod arena;
pub mod backend;
pub mod check;
pub mod disk;
pub mod gc;
pub mod index;
pub mod ingest;
pub mod log;
pub mod manifest;
pub mod s3;
pub mod usage;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::images::chunk::{ChunkError, ChunkId, ChunkList, ChunkSource};
use arena::Location;
use backend::{ArenaRead, Backend};
use index::IndexFile;
pub use manifest::{Manifest, VersionRef};

/// Arena size at which the writer seals an arena and starts the next.
pub const DEFAULT_ARENA_LIMIT: u64 = 256 << 20;
/// Longest chain of layers a version may sit on.
pub const MAX_LAYER_DEPTH: usize = 256;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Format(String),
    #[error("chunk {0} is corrupt (its bytes do not hash to its id)")]
    Corrupt(ChunkId),
    #[error("chunk {0} is not in the store")]
    Missing(ChunkId),
    #[error("{0}")]
    BadName(String),
    #[error("no image {0:?} in the store")]
    NoSuchImage(String),
    #[error("no version {0} in the store")]
    NoSuchVersion(VersionRef),
    #[error("{version} is the base of {by:?}; remove those first")]
    InUse {
        version: VersionRef,
        by: Vec<VersionRef>,
    },
    #[error("{} is not an image store (no arenas/ directory)", .0.display())]
    NotAStore(PathBuf),
    #[error("the store is open read-only")]
    ReadOnly,
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io_at(path: impl AsRef<Path>, source: io::Error) -> StoreError {
    StoreError::Io {
        path: path.as_ref().to_owned(),
        source,
    }
}

/// A remote store's object this writer meant to create already exists: another writer
/// (on another host) got there first.
fn another_writer(b: &Arc<dyn Backend>, key: &str) -> StoreError {
    StoreError::Invalid(format!(
        "{}/{key} already exists: another writer is using this store; nothing of this \
         version was published (run the command again)",
        b.describe()
    ))
}

/// How to open a store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Take the writer lock (and create the store if it does not exist).
    pub write: bool,
    /// How new chunk records are compressed (each only when that saves an eighth or more).
    pub compression: arena::Compression,
    pub arena_limit: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            write: false,
            compression: arena::Compression::default(),
            arena_limit: DEFAULT_ARENA_LIMIT,
        }
    }
}

/// What is known about one arena file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaState {
    /// Bytes of the file that hold valid records (the whole file when sealed).
    pub len: u64,
    pub sealed: bool,
    /// The arena is an object in the store's backend (a remote store), not a local file.
    pub remote: bool,
}

/// What opening the store had to repair or re-read.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    /// Arenas the index did not cover as they are on disk, so they were re-read.
    pub rescanned: Vec<u32>,
    /// Why a rescanned arena's scan stopped early (a torn tail after a crash).
    pub torn: Vec<(u32, String)>,
    /// Records found while re-reading arenas whose payload does not hash to their id.
    pub corrupt: Vec<(ChunkId, Location)>,
    /// The index file was missing or did not parse.
    pub index_missing: bool,
}

/// An open store. See the module docs.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: File,
    opts: StoreOptions,
    index: HashMap<ChunkId, Location>,
    arenas: BTreeMap<u32, ArenaState>,
    readers: Mutex<HashMap<u32, Arc<dyn ArenaRead>>>,
    writer: Option<log::Writer>,
    open_report: OpenReport,
    /// A remote store: its objects, and the local staging directory (`dir`) that holds a
    /// copy of its manifests and the arena being filled until it is sealed and put.
    remote: Option<Remote>,
}

#[derive(Debug)]
struct Remote {
    backend: Arc<dyn Backend>,
    /// Sealed in staging, not put yet (put before the manifest that needs them).
    unsent: Vec<u32>,
    _staging: tempfile::TempDir,
}

fn lock(dir: &Path, write: bool) -> Result<File, StoreError> {
    use rustix::fs::{flock, FlockOperation};
    let path = dir.join("lock");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(write)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_at(&path, e))?;
    let op = if write {
        FlockOperation::LockExclusive
    } else {
        FlockOperation::LockShared
    };
    flock(&f, op).map_err(|e| io_at(&path, e.into()))?;
    Ok(f)
}

/// Write `bytes` to `path` atomically: a file in `tmp/`, synced, renamed over `path`, and the
/// directory of `path` synced.
pub(crate) fn write_atomic(store_dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = store_dir
        .join("tmp")
        .join(format!("{name}.{}.tmp", std::process::id()));
    let mut f = File::create(&tmp).map_err(|e| io_at(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_at(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io_at(path, e))?;
    log::sync_dir(path.parent().unwrap_or(store_dir))
}

impl Store {
    /// Open (or, for writing, create) the store in `dir`, taking its lock, and bring the
    /// index up to date with the arenas.
    ///
    /// # Errors
    /// I/O errors, [`StoreError::NotAStore`], an arena whose header is not one.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        if opts.write {
            for sub in ["arenas", "images", "tmp"] {
                let p = dir.join(sub);
                std::fs::create_dir_all(&p).map_err(|e| io_at(&p, e))?;
            }
        } else if !dir.join("arenas").is_dir() {
            return Err(StoreError::NotAStore(dir.to_owned()));
        }
        let lock = lock(dir, opts.write)?;
        let mut s = Store {
            dir: dir.to_owned(),
            _lock: lock,
            opts,
            index: HashMap::new(),
            arenas: BTreeMap::new(),
            readers: Mutex::new(HashMap::new()),
            writer: None,
            open_report: OpenReport::default(),
            remote: None,
        };
        s.load_index()?;
        if opts.write {
            s.clean_tmp();
            if !s.open_report.rescanned.is_empty() || s.open_report.index_missing {
                s.save_index()?;
            }
        }
        Ok(s)
    }

    /// Open the store whose objects are in `backend` (an S3 bucket, or a [`DirBackend`]
    /// directory): its manifests are copied into a fresh local staging directory, its index
    /// is read from the backend (or rebuilt from the sealed arenas' footers), and chunks are
    /// read with ranged gets. A writer fills a local arena; [`Store::add_version`] seals it
    /// and puts it before the manifest that names its chunks.
    ///
    /// One writer at a time per remote store: the local lock does not reach other hosts.
    ///
    /// [`DirBackend`]: backend::DirBackend
    ///
    /// # Errors
    /// Backend errors; an arena object whose header is not one.
    pub fn open_remote(backend: Arc<dyn Backend>, opts: StoreOptions) -> Result<Store, StoreError> {
        let staging = tempfile::Builder::new()
            .prefix("remoca-store-")
            .tempdir()
            .map_err(|e| io_at(std::env::temp_dir(), e))?;
        let dir = staging.path().to_owned();
        for sub in ["arenas", "images", "tmp"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| io_at(&p, e))?;
        }
        let mut found_any = false;
        for (key, _) in backend.list("images/")? {
            let Some(rest) = key.strip_prefix("images/") else {
                continue;
            };
            let Some((name, file)) = rest.split_once('/') else {
                continue;
            };
            let num = file
                .strip_suffix(".manifest")
                .or_else(|| file.strip_suffix(".removed"));
            if manifest::check_name(name).is_err() || num.is_none_or(|n| n.parse::<u32>().is_err())
            {
                continue;
            }
            found_any = true;
            let d = dir.join("images").join(name);
            std::fs::create_dir_all(&d).map_err(|e| io_at(&d, e))?;
            let bytes = if file.ends_with(".manifest") {
                backend.get(&key)?.unwrap_or_default()
            } else {
                Vec::new()
            };
            let p = d.join(file);
            std::fs::write(&p, bytes).map_err(|e| io_at(&p, e))?;
        }
        // A reader of a location holding nothing of a store is told so (a typo in the
        // prefix should not look like an empty store).
        if !opts.write
            && !found_any
            && backend.list("arenas/")?.is_empty()
            && backend.get("index")?.is_none()
        {
            return Err(StoreError::NotAStore(backend.describe().into()));
        }
        let lock = lock(&dir, true)?;
        let mut s = Store {
            dir,
            _lock: lock,
            opts,
            index: HashMap::new(),
            arenas: BTreeMap::new(),
            readers: Mutex::new(HashMap::new()),
            writer: None,
            open_report: OpenReport::default(),
            remote: Some(Remote {
                backend,
                unsent: Vec::new(),
                _staging: staging,
            }),
        };
        s.load_index()?;
        if opts.write && (!s.open_report.rescanned.is_empty() || s.open_report.index_missing) {
            s.save_index()?;
        }
        Ok(s)
    }

    /// Open a store given as a directory or as `s3://BUCKET/PREFIX` (endpoint, region and
    /// credentials from the environment, see [`s3`]).
    ///
    /// # Errors
    /// As [`Store::open`] and [`Store::open_remote`]; a malformed `s3://` location.
    pub fn open_location(location: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        match s3::S3Url::parse(&location.to_string_lossy()) {
            Some(url) => {
                let b = s3::S3Backend::from_env(url?)?;
                Store::open_remote(Arc::new(b), opts)
            }
            None => Store::open(location, opts),
        }
    }

    /// The store's backend, when it is a remote store.
    pub fn backend(&self) -> Option<&Arc<dyn Backend>> {
        self.remote.as_ref().map(|r| &r.backend)
    }

    /// The directory, or the backend's location for a remote store (for messages).
    pub fn location(&self) -> String {
        match &self.remote {
            Some(r) => r.backend.describe(),
            None => self.dir.display().to_string(),
        }
    }

    fn clean_tmp(&self) {
        if let Ok(rd) = std::fs::read_dir(self.dir.join("tmp")) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Arena numbers, lengths, and whether each is remote.
    fn arena_files(&self) -> Result<Vec<(u32, u64, bool)>, StoreError> {
        if let Some(r) = &self.remote {
            let mut out = Vec::new();
            for (key, len) in r.backend.list("arenas/")? {
                if let Some(n) = key.strip_prefix("arenas/").and_then(log::arena_number) {
                    out.push((n, len, true));
                }
            }
            out.sort_unstable();
            return Ok(out);
        }
        let d = self.dir.join("arenas");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&d).map_err(|e| io_at(&d, e))? {
            let e = e.map_err(|e| io_at(&d, e))?;
            if let Some(n) = log::arena_number(&e.file_name().to_string_lossy()) {
                let len = e.metadata().map_err(|err| io_at(e.path(), err))?.len();
                out.push((n, len, false));
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn load_index(&mut self) -> Result<(), StoreError> {
        let ipath = self.dir.join("index");
        let saved = match &self.remote {
            Some(r) => r
                .backend
                .get("index")?
                .and_then(|b| IndexFile::decode(&b).ok()),
            None => match std::fs::read(&ipath) {
                Ok(b) => IndexFile::decode(&b).ok(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_at(&ipath, e)),
            },
        };
        self.open_report.index_missing = saved.is_none();
        let saved = saved.unwrap_or_default();
        let mut by_arena: HashMap<u32, Vec<(ChunkId, Location)>> = HashMap::new();
        for (id, l) in &saved.entries {
            by_arena.entry(l.arena).or_default().push((*id, *l));
        }
        let files = self.arena_files()?;
        let last = files.last().map(|f| f.0);
        for (n, len, remote) in files {
            if remote {
                // Before the reader is made: it needs to know the arena is remote.
                self.arenas.insert(
                    n,
                    ArenaState {
                        len,
                        sealed: true,
                        remote,
                    },
                );
            }
            let file = self.reader(n)?;
            let (records, state) = if saved.covered.get(&n) == Some(&len) {
                let mut recs = by_arena.remove(&n).unwrap_or_default();
                recs.sort_by_key(|r| r.1.offset);
                // Remote arenas are put only once sealed.
                let sealed = remote || log::read_footer(&file, n, len).is_some();
                (
                    recs,
                    ArenaState {
                        len,
                        sealed,
                        remote,
                    },
                )
            } else {
                self.open_report.rescanned.push(n);
                let scan = log::scan_arena(&file, n, true)?;
                if let Some(t) = scan.torn {
                    self.open_report.torn.push((n, t));
                }
                self.open_report.corrupt.extend(scan.corrupt);
                (
                    scan.records,
                    ArenaState {
                        len: if remote { len } else { scan.valid_len },
                        sealed: scan.sealed,
                        remote,
                    },
                )
            };
            if self.opts.write && Some(n) == last && !state.sealed && !remote {
                let mut table: Vec<_> = records.clone();
                table.sort_by_key(|r| r.1.offset);
                self.writer = Some(log::Writer::resume(&self.dir, n, state.len, table)?);
                self.readers.lock().remove(&n);
            }
            for (id, l) in records {
                self.index.entry(id).or_insert(l);
            }
            self.arenas.insert(n, state);
        }
        Ok(())
    }

    /// Persist the index (atomically).
    pub fn save_index(&mut self) -> Result<(), StoreError> {
        if !self.opts.write {
            return Err(StoreError::ReadOnly);
        }
        if let Some(w) = &mut self.writer {
            w.sync()?;
            if let Some(a) = self.arenas.get_mut(&w.number) {
                a.len = w.len;
            }
        }
        let f = IndexFile {
            covered: self.arenas.iter().map(|(n, a)| (*n, a.len)).collect(),
            entries: self.index.clone(),
        };
        match &self.remote {
            Some(r) => r.backend.put("index", &f.encode()),
            None => write_atomic(&self.dir, &self.dir.join("index"), &f.encode()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn open_report(&self) -> &OpenReport {
        &self.open_report
    }

    pub fn arenas(&self) -> &BTreeMap<u32, ArenaState> {
        &self.arenas
    }

    pub fn index(&self) -> &HashMap<ChunkId, Location> {
        &self.index
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.index.contains_key(id)
    }

    fn reader(&self, n: u32) -> Result<Arc<dyn ArenaRead>, StoreError> {
        let mut r = self.readers.lock();
        if let Some(f) = r.get(&n) {
            return Ok(f.clone());
        }
        let f: Arc<dyn ArenaRead> = match (&self.remote, self.arenas.get(&n)) {
            (Some(rem), Some(a)) if a.remote => Arc::new(backend::RemoteArena {
                backend: rem.backend.clone(),
                key: format!("arenas/{n:08}.arena"),
                len: a.len,
            }),
            _ => {
                let p = log::arena_path(&self.dir, n);
                Arc::new(File::open(&p).map_err(|e| io_at(&p, e))?)
            }
        };
        r.insert(n, f.clone());
        Ok(f)
    }

    /// The raw, hash-checked bytes of chunk `id`.
    ///
    /// # Errors
    /// [`StoreError::Missing`], [`StoreError::Corrupt`], I/O errors.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let loc = self.index.get(id).ok_or(StoreError::Missing(*id))?;
        self.read_at(id, loc)
    }

    pub(crate) fn read_at(&self, id: &ChunkId, loc: &Location) -> Result<Vec<u8>, StoreError> {
        log::read_chunk(&*self.reader(loc.arena)?, id, loc)
    }

    /// Store `raw` unless a chunk with its id is already there. Returns the id and whether
    /// it was new. The record is not durable until [`Store::sync`].
    pub fn put_chunk(&mut self, raw: &[u8]) -> Result<(ChunkId, bool), StoreError> {
        let id = ChunkId::of(raw);
        if self.index.contains_key(&id) {
            return Ok((id, false));
        }
        let (codec, payload) = arena::encode_payload(raw, self.opts.compression);
        self.append_encoded(id, codec, raw.len() as u32, &payload)?;
        Ok((id, true))
    }

    /// Append an already encoded record (gc copies records without re-encoding them).
    pub(crate) fn append_encoded(
        &mut self,
        id: ChunkId,
        codec: u8,
        raw_len: u32,
        payload: &[u8],
    ) -> Result<Location, StoreError> {
        if !self.opts.write {
            return Err(StoreError::ReadOnly);
        }
        let need = (arena::RECORD_HEADER_LEN + payload.len()) as u64;
        let full = self.writer.as_ref().is_some_and(|w| {
            w.len + need > self.opts.arena_limit
                || w.table.len() as u64 + 1 >= arena::MAX_TABLE_ENTRIES
        });
        if full {
            self.seal_writer()?;
        }
        if self.writer.is_none() {
            let n = self.arenas.keys().next_back().map_or(1, |n| n + 1);
            let w = log::Writer::create(&self.dir, n)?;
            self.arenas.insert(
                n,
                ArenaState {
                    len: w.len,
                    sealed: false,
                    remote: false,
                },
            );
            self.writer = Some(w);
        }
        let w = self.writer.as_mut().expect("writer just made");
        let loc = w.append(id, codec, raw_len, payload)?;
        let n = w.number;
        let len = w.len;
        if let Some(a) = self.arenas.get_mut(&n) {
            a.len = len;
        }
        self.index.insert(id, loc);
        Ok(loc)
    }

    /// Seal the arena being appended to, if any.
    pub fn seal_writer(&mut self) -> Result<(), StoreError> {
        if let Some(w) = self.writer.take() {
            let n = w.number;
            let len = w.seal()?;
            self.readers.lock().remove(&n);
            self.arenas.insert(
                n,
                ArenaState {
                    len,
                    sealed: true,
                    remote: false,
                },
            );
            if let Some(r) = &mut self.remote {
                r.unsent.push(n);
            }
        }
        Ok(())
    }

    /// A remote store: seal the arena being filled and put every sealed arena not put yet
    /// (each whole, atomically), so every chunk appended so far is durable in the backend.
    /// A local store: nothing.
    fn send_arenas(&mut self) -> Result<(), StoreError> {
        if self.remote.is_none() {
            return Ok(());
        }
        self.seal_writer()?;
        let Some(r) = &mut self.remote else {
            return Ok(());
        };
        while let Some(&n) = r.unsent.first() {
            let p = log::arena_path(&self.dir, n);
            let bytes = std::fs::read(&p).map_err(|e| io_at(&p, e))?;
            let key = format!("arenas/{n:08}.arena");
            if !r.backend.put_new(&key, &bytes)? {
                return Err(another_writer(&r.backend, &key));
            }
            r.unsent.remove(0);
            // Reads of it go on from the staging copy, which is the same bytes.
        }
        Ok(())
    }

    /// Make every appended chunk durable.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if let Some(w) = &mut self.writer {
            w.sync()?;
        }
        Ok(())
    }

    fn image_dir(&self, image: &str) -> PathBuf {
        self.dir.join("images").join(image)
    }

    fn manifest_path(&self, v: &VersionRef) -> PathBuf {
        self.image_dir(&v.image)
            .join(format!("{}.manifest", v.version))
    }

    /// Image names, sorted.
    pub fn images(&self) -> Result<Vec<String>, StoreError> {
        let d = self.dir.join("images");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&d).map_err(|e| io_at(&d, e))? {
            let e = e.map_err(|e| io_at(&d, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if manifest::check_name(&name).is_ok() && e.path().is_dir() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Version numbers of `image` that have a manifest, and the highest number ever used
    /// (tombstones included).
    fn version_numbers(&self, image: &str) -> Result<(Vec<u32>, u32), StoreError> {
        let d = self.image_dir(image);
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(io_at(&d, e)),
        };
        let mut live = Vec::new();
        let mut max = 0;
        for e in rd {
            let e = e.map_err(|e| io_at(&d, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let (num, is_live) = if let Some(n) = name.strip_suffix(".manifest") {
                (n, true)
            } else if let Some(n) = name.strip_suffix(".removed") {
                (n, false)
            } else {
                continue;
            };
            if let Ok(v) = num.parse::<u32>() {
                max = max.max(v);
                if is_live {
                    live.push(v);
                }
            }
        }
        live.sort_unstable();
        Ok((live, max))
    }

    /// Every version of `image` that has a manifest, oldest first.
    pub fn versions(&self, image: &str) -> Result<Vec<VersionRef>, StoreError> {
        manifest::check_name(image)?;
        Ok(self
            .version_numbers(image)?
            .0
            .into_iter()
            .map(|version| VersionRef {
                image: image.to_string(),
                version,
            })
            .collect())
    }

    /// Every version in the store.
    pub fn all_versions(&self) -> Result<Vec<VersionRef>, StoreError> {
        let mut out = Vec::new();
        for i in self.images()? {
            out.extend(self.versions(&i)?);
        }
        Ok(out)
    }

    /// `NAME@N` as given, or `NAME` alone for its newest version.
    pub fn resolve(&self, spec: &str) -> Result<VersionRef, StoreError> {
        if spec.contains('@') {
            let v: VersionRef = spec.parse()?;
            if !self.manifest_path(&v).exists() {
                return Err(StoreError::NoSuchVersion(v));
            }
            return Ok(v);
        }
        let vs = self.versions(spec)?;
        vs.last()
            .cloned()
            .ok_or_else(|| StoreError::NoSuchImage(spec.to_string()))
    }

    pub fn manifest(&self, v: &VersionRef) -> Result<Manifest, StoreError> {
        let p = self.manifest_path(v);
        let b = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NoSuchVersion(v.clone()))
            }
            Err(e) => return Err(io_at(&p, e)),
        };
        let m = Manifest::decode(&b).map_err(|e| StoreError::Format(format!("{v}: {e}")))?;
        if m.version != v.version {
            return Err(StoreError::Format(format!(
                "{v}: manifest says it is version {}",
                m.version
            )));
        }
        Ok(m)
    }

    /// Make `m` (its chunks already appended) the next version of `image`: the chunks are
    /// synced, then the manifest is written atomically, then the index saved.
    pub(crate) fn add_version(
        &mut self,
        image: &str,
        mut m: Manifest,
    ) -> Result<VersionRef, StoreError> {
        manifest::check_name(image)?;
        self.sync()?;
        // A remote store: every chunk the manifest names is in a put arena first.
        self.send_arenas()?;
        let d = self.image_dir(image);
        if !d.is_dir() {
            std::fs::create_dir_all(&d).map_err(|e| io_at(&d, e))?;
            log::sync_dir(&self.dir.join("images"))?;
        }
        let v = VersionRef {
            image: image.to_string(),
            version: self.version_numbers(image)?.1 + 1,
        };
        m.version = v.version;
        let bytes = m.encode();
        if let Some(r) = &self.remote {
            let key = format!("images/{}/{}.manifest", v.image, v.version);
            if !r.backend.put_new(&key, &bytes)? {
                return Err(another_writer(&r.backend, &key));
            }
        }
        write_atomic(&self.dir, &self.manifest_path(&v), &bytes)?;
        self.save_index()?;
        Ok(v)
    }

    /// The chain of manifests from `v` down to its root (`v` first).
    pub fn chain(&self, v: &VersionRef) -> Result<Vec<(VersionRef, Manifest)>, StoreError> {
        let mut out: Vec<(VersionRef, Manifest)> = Vec::new();
        let mut seen = HashSet::new();
        let mut cur = Some(v.clone());
        while let Some(c) = cur {
            if !seen.insert(c.clone()) || out.len() >= MAX_LAYER_DEPTH {
                return Err(StoreError::Format(format!(
                    "{v}: layer chain loops or is deeper than {MAX_LAYER_DEPTH}"
                )));
            }
            let m = self.manifest(&c)?;
            if let Some((_, child)) = out.last() {
                if m.chunk_size != child.chunk_size || m.size != child.size {
                    return Err(StoreError::Format(format!(
                        "{c}: chunk size or image size differs from its layer's"
                    )));
                }
            }
            cur = m.parent.clone();
            out.push((c, m));
        }
        Ok(out)
    }

    /// Version `v` flattened: one entry per chunk-sized piece of the image.
    ///
    /// # Errors
    /// A missing or corrupt manifest in its chain.
    pub fn chunk_list(&self, v: &VersionRef) -> Result<ChunkList, StoreError> {
        let chain = self.chain(v)?;
        let root = &chain.last().expect("chain is never empty").1;
        let mut list = ChunkList {
            chunk_size: root.chunk_size,
            size: root.size,
            chunks: vec![None; root.chunk_count() as usize],
        };
        for (_, m) in chain.iter().rev() {
            for (&i, e) in &m.entries {
                list.chunks[i as usize] = *e;
            }
        }
        Ok(list)
    }

    /// Remove version `v` (its chunks stay until gc). Refused while another version is a
    /// layer on it.
    pub fn remove(&mut self, v: &VersionRef) -> Result<(), StoreError> {
        if !self.opts.write {
            return Err(StoreError::ReadOnly);
        }
        self.manifest(v)?;
        let mut by = Vec::new();
        for o in self.all_versions()? {
            if let Ok(m) = self.manifest(&o) {
                if m.parent.as_ref() == Some(v) {
                    by.push(o);
                }
            }
        }
        if !by.is_empty() {
            return Err(StoreError::InUse {
                version: v.clone(),
                by,
            });
        }
        if let Some(r) = &self.remote {
            r.backend
                .put(&format!("images/{}/{}.removed", v.image, v.version), b"")?;
            r.backend
                .delete(&format!("images/{}/{}.manifest", v.image, v.version))?;
        }
        let d = self.image_dir(&v.image);
        let tomb = d.join(format!("{}.removed", v.version));
        File::create(&tomb)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_at(&tomb, e))?;
        let p = self.manifest_path(v);
        std::fs::remove_file(&p).map_err(|e| io_at(&p, e))?;
        log::sync_dir(&d)
    }
}

impl ChunkSource for Store {
    fn fetch(&self, id: &ChunkId, len: usize) -> Result<Vec<u8>, ChunkError> {
        let loc = self.index.get(id).ok_or(ChunkError::NotFound(*id))?;
        if loc.raw_len as usize != len {
            return Err(ChunkError::Corrupt {
                id: *id,
                source_name: format!("store {} (chunk is {} bytes)", self.location(), loc.raw_len),
            });
        }
        self.read_at(id, loc).map_err(|e| match e {
            StoreError::Corrupt(id) => ChunkError::Corrupt {
                id,
                source_name: format!("store {}", self.location()),
            },
            StoreError::Io { source, .. } => ChunkError::Io(source),
            other => ChunkError::Unavailable {
                source_name: format!("store {}", self.location()),
                reason: other.to_string(),
            },
        })
    }
}
