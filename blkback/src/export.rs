//! Named exports: validated configuration, the opened disk stack per export, and the
//! counters a status display prints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::disk::Disk;
use crate::overlay::{Overlay, OverlayError};
use crate::raw::{RawFile, RawOpenError};

/// Longest export name accepted (the NBD limit is 4096 bytes).
pub const MAX_NAME_LEN: usize = 4096;

/// One export as configured: a template, optionally a copy-on-write overlay over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// The name clients ask for (may be empty: the default export).
    pub name: String,
    /// The raw template image.
    pub template: PathBuf,
    /// The per-VM overlay. Without one the template itself is served, writable unless
    /// `read_only`.
    pub overlay: Option<PathBuf>,
    /// Refuse writes.
    pub read_only: bool,
    /// Minimum block size clients must align requests to (a power of two, 1..=65536;
    /// 1 = byte-granular). Misaligned requests get EINVAL.
    pub min_block: u32,
}

/// Why the exports could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("no exports configured")]
    Empty,
    #[error("export name {0:?} is used twice")]
    DuplicateName(String),
    #[error("export name is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
    #[error("export {0:?}: block size {1} is not a power of two between 1 and 65536")]
    BadBlockSize(String, u32),
    #[error("export {name:?}: template")]
    Template {
        name: String,
        #[source]
        source: RawOpenError,
    },
    #[error("export {name:?}: overlay")]
    Overlay {
        name: String,
        #[source]
        source: OverlayError,
    },
}

/// Per-export counters, updated by every frontend. Cheap relaxed atomics.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub errors: AtomicU64,
    pub connections: AtomicU64,
}

/// A point-in-time copy of [`ExportStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub errors: u64,
    pub connections: u64,
}

impl ExportStats {
    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Read all counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            reads: g(&self.reads),
            writes: g(&self.writes),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            flushes: g(&self.flushes),
            trims: g(&self.trims),
            zeroes: g(&self.zeroes),
            errors: g(&self.errors),
            connections: g(&self.connections),
        }
    }
}

/// One opened export.
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub disk: Arc<dyn Disk>,
    pub stats: ExportStats,
    /// Requests must be aligned to this (see [`ExportConfig::min_block`]).
    pub min_block: u32,
}

/// All exports, by name.
#[derive(Debug, Clone)]
pub struct Exports {
    by_name: Arc<BTreeMap<String, Arc<Export>>>,
    unavailable: Arc<BTreeMap<String, String>>,
}

/// Open one export's disk stack: (disk, description).
fn open_one(c: &ExportConfig) -> Result<(Arc<dyn Disk>, String), ExportError> {
    let terr = |source| ExportError::Template {
        name: c.name.clone(),
        source,
    };
    Ok(match &c.overlay {
        Some(ov) => {
            let base: Arc<dyn Disk> = Arc::new(RawFile::open_read_only(&c.template).map_err(terr)?);
            let overlay =
                Overlay::open(ov, base, c.read_only).map_err(|source| ExportError::Overlay {
                    name: c.name.clone(),
                    source,
                })?;
            let d = format!("overlay {} over {}", ov.display(), c.template.display());
            (Arc::new(overlay), d)
        }
        None => {
            let raw = if c.read_only {
                RawFile::open_read_only(&c.template)
            } else {
                RawFile::open_read_write(&c.template)
            };
            (
                Arc::new(raw.map_err(terr)?),
                format!("raw {}", c.template.display()),
            )
        }
    })
}

/// An error and its causes on one line (`a: b: c`), for logs and messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Exports {
    /// Open every configured export; any failure is an error.
    ///
    /// # Errors
    /// [`ExportError`] naming the export and the file that failed.
    pub fn open(configs: &[ExportConfig]) -> Result<Self, ExportError> {
        let (exports, mut failed) = Self::open_available(configs)?;
        match failed.is_empty() {
            true => Ok(exports),
            false => Err(failed.remove(0)),
        }
    }

    /// Open every export that can be opened. Exports that fail (a missing template, an
    /// overlay for another template, ...) are returned as errors and kept as *unavailable*:
    /// clients asking for them get an error naming the cause, while the other exports are
    /// served. A daemon serving many VMs uses this so one broken disk does not stop the rest.
    ///
    /// # Errors
    /// [`ExportError::Empty`], [`ExportError::DuplicateName`], [`ExportError::NameTooLong`],
    /// [`ExportError::BadBlockSize`], or the first failure when no export could be opened.
    pub fn open_available(
        configs: &[ExportConfig],
    ) -> Result<(Self, Vec<ExportError>), ExportError> {
        let mut seen = std::collections::BTreeSet::new();
        for c in configs {
            if !seen.insert(c.name.as_str()) {
                return Err(ExportError::DuplicateName(c.name.clone()));
            }
        }
        let mut disks = Vec::new();
        let mut failed = Vec::new();
        let mut unavailable = BTreeMap::new();
        for c in configs {
            match open_one(c) {
                Ok((disk, description)) => disks.push((c.name.clone(), description, disk)),
                Err(e) => {
                    unavailable.insert(c.name.clone(), error_chain(&e));
                    failed.push(e);
                }
            }
        }
        if disks.is_empty() && !failed.is_empty() {
            return Err(failed.remove(0));
        }
        let mut exports = Self::from_disks(disks)?;
        for c in configs
            .iter()
            .filter(|c| !unavailable.contains_key(&c.name))
        {
            exports = exports.with_min_block(&c.name, c.min_block)?;
        }
        exports.unavailable = Arc::new(unavailable);
        Ok((exports, failed))
    }

    /// Why the configured export `name` is not served, if it failed to open.
    pub fn unavailable(&self, name: &str) -> Option<&str> {
        self.unavailable.get(name).map(String::as_str)
    }

    /// Require requests to `name` to be aligned to `min_block` bytes. Only before the
    /// exports are shared (cloned).
    ///
    /// # Errors
    /// [`ExportError::BadBlockSize`] for a size that is not a power of two up to 64 KiB.
    pub fn with_min_block(mut self, name: &str, min_block: u32) -> Result<Self, ExportError> {
        if !min_block.is_power_of_two() || min_block > 65536 {
            return Err(ExportError::BadBlockSize(name.to_owned(), min_block));
        }
        if let Some(e) = Arc::get_mut(&mut self.by_name).and_then(|m| m.get_mut(name)) {
            if let Some(e) = Arc::get_mut(e) {
                e.min_block = min_block;
            }
        }
        Ok(self)
    }

    /// Build exports from already-opened disks (name, description, disk).
    ///
    /// # Errors
    /// [`ExportError::Empty`], [`ExportError::DuplicateName`], [`ExportError::NameTooLong`].
    pub fn from_disks(disks: Vec<(String, String, Arc<dyn Disk>)>) -> Result<Self, ExportError> {
        if disks.is_empty() {
            return Err(ExportError::Empty);
        }
        let mut by_name = BTreeMap::new();
        for (name, description, disk) in disks {
            if name.len() > MAX_NAME_LEN {
                return Err(ExportError::NameTooLong);
            }
            if by_name.contains_key(&name) {
                return Err(ExportError::DuplicateName(name));
            }
            let e = Export {
                name: name.clone(),
                description,
                disk,
                stats: ExportStats::default(),
                min_block: 1,
            };
            by_name.insert(name, Arc::new(e));
        }
        Ok(Self {
            unavailable: Arc::new(BTreeMap::new()),
            by_name: Arc::new(by_name),
        })
    }

    /// The export called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Export>> {
        self.by_name.get(name)
    }

    /// All exports in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.by_name.values()
    }

    /// Flush every export (used at shutdown).
    pub fn flush_all(&self) {
        for e in self.iter() {
            if let Err(err) = e.disk.flush() {
                tracing::warn!(export = %e.name, error = %err, "flush at shutdown failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemDisk;

    #[test]
    fn names_are_unique_and_missing_template_is_named() {
        let d: Arc<dyn Disk> = Arc::new(MemDisk::new(10));
        let e = Exports::from_disks(vec![
            ("a".into(), String::new(), d.clone()),
            ("a".into(), String::new(), d),
        ])
        .unwrap_err();
        assert!(matches!(e, ExportError::DuplicateName(_)));
        let cfg = ExportConfig {
            name: "vm1".into(),
            template: "/nonexistent/t.raw".into(),
            overlay: None,
            read_only: true,
            min_block: 1,
        };
        let e = Exports::open(&[cfg]).unwrap_err();
        assert!(e.to_string().contains("vm1"));
        assert!(matches!(Exports::open(&[]), Err(ExportError::Empty)));
    }

    #[test]
    fn open_available_serves_what_opens_and_remembers_why_the_rest_failed() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.raw");
        std::fs::write(&good, vec![0u8; 4096]).unwrap();
        let cfg = |name: &str, t: PathBuf| ExportConfig {
            name: name.into(),
            template: t,
            overlay: None,
            read_only: true,
            min_block: 1,
        };
        let configs = [
            cfg("good", good.clone()),
            cfg("bad", dir.path().join("gone.raw")),
        ];
        let (ex, failed) = Exports::open_available(&configs).unwrap();
        assert_eq!(failed.len(), 1);
        assert!(ex.get("good").is_some());
        assert!(ex.get("bad").is_none());
        assert!(ex.unavailable("bad").unwrap().contains("gone.raw"));
        assert!(Exports::open(&configs).is_err());
        let dup = [cfg("a", good.clone()), cfg("a", good)];
        assert!(matches!(
            Exports::open_available(&dup),
            Err(ExportError::DuplicateName(_))
        ));
    }
}
