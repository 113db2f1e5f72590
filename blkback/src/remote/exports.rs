//! Opening exports that use the remote layers, beside plain (template / overlay) exports.
//!
//! The configuration is parsed at the edge (the CLI) into these types; this module opens
//! the disk stacks and builds one [`Exports`] for the frontends, and hands back the remote
//! layers so a status display can print their counters.

use std::sync::Arc;

use super::cache::{CacheConfig, RemoteCache};
use super::client::RemoteClient;
use super::swap::{SwapConfig, SwapDisk, SwapOpenError};
use crate::disk::Disk;
use crate::export::{ExportConfig, ExportError, Exports};

/// A swap export: a [`SwapDisk`] served under `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapExport {
    pub name: String,
    pub swap: SwapConfig,
}

/// A remote read cache over the plain export called `export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheExport<'a> {
    pub export: &'a str,
    pub cache: CacheConfig,
}

/// Why the exports could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RemoteExportError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("export {name:?}: swap device")]
    Swap {
        name: String,
        #[source]
        source: SwapOpenError,
    },
    #[error("a remote cache names export {0:?}, which is not configured")]
    UnknownCacheTarget(String),
}

/// What [`open_exports`] opened.
#[derive(Debug)]
pub struct OpenedExports {
    /// Every export that opened, for the NBD server and the blkif backend.
    pub exports: Exports,
    /// Exports that failed to open (the others are served).
    pub failed: Vec<RemoteExportError>,
    /// The swap devices, by export name (for counters).
    pub swaps: Vec<(String, Arc<SwapDisk>)>,
    /// The caches, by export name (for counters).
    pub caches: Vec<(String, Arc<RemoteCache>)>,
}

/// A namespace for one remote layer of one export: a hash of a host-unique `salt` (for
/// example the host name; several hosts share the memory servers), the layer `kind`
/// (`"swap"`, `"cache"`) and the export name.
pub fn namespace_for(salt: &str, kind: &str, export: &str) -> u64 {
    let mut h = blake3::Hasher::new_derive_key("remoca blkback remote namespace v1");
    for part in [salt, kind, export] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Open `plain` exports (a remote cache over those named in `caches`) and `swaps`. Call it
/// from a plain thread, not inside a tokio runtime (the remote layers talk to the servers
/// while opening). Exports that fail are reported in [`OpenedExports::failed`]; it is an
/// error only when none opens, or the configuration itself is wrong (duplicate names, a
/// cache over an unknown export, a bad block size).
///
/// # Errors
/// [`RemoteExportError`].
pub fn open_exports(
    plain: &[ExportConfig],
    swaps: &[SwapExport],
    caches: &[CacheExport<'_>],
    client: &Arc<RemoteClient>,
) -> Result<OpenedExports, RemoteExportError> {
    for c in caches {
        if !plain.iter().any(|p| p.name == c.export) {
            return Err(RemoteExportError::UnknownCacheTarget(c.export.to_owned()));
        }
    }
    let mut disks: Vec<(String, String, Arc<dyn Disk>)> = Vec::new();
    let mut min_blocks = Vec::new();
    let mut failed = Vec::new();
    let mut opened_caches = Vec::new();
    let mut opened_swaps = Vec::new();
    for p in plain {
        // Opens the template / overlay stack exactly as a plain export would.
        let one = match Exports::open(std::slice::from_ref(p)) {
            Ok(one) => one,
            Err(e @ (ExportError::BadBlockSize(..) | ExportError::NameTooLong)) => {
                return Err(e.into())
            }
            Err(e) => {
                failed.push(e.into());
                continue;
            }
        };
        let e = one.get(&p.name).expect("just opened");
        let (disk, description): (Arc<dyn Disk>, String) =
            match caches.iter().find(|c| c.export == p.name) {
                Some(c) => {
                    let cache = Arc::new(RemoteCache::new(e.disk.clone(), client.clone(), c.cache));
                    opened_caches.push((p.name.clone(), cache.clone()));
                    (cache, format!("remote cache over {}", e.description))
                }
                None => (e.disk.clone(), e.description.clone()),
            };
        disks.push((p.name.clone(), description, disk));
        min_blocks.push((p.name.clone(), p.min_block));
    }
    for s in swaps {
        match SwapDisk::open(client.clone(), s.swap.clone()) {
            Ok(d) => {
                let d = Arc::new(d);
                opened_swaps.push((s.name.clone(), d.clone()));
                disks.push((s.name.clone(), d.describe(), d));
                min_blocks.push((s.name.clone(), 4096));
            }
            Err(source) => failed.push(RemoteExportError::Swap {
                name: s.name.clone(),
                source,
            }),
        }
    }
    if disks.is_empty() && !failed.is_empty() {
        return Err(failed.remove(0));
    }
    let mut exports = Exports::from_disks(disks)?;
    for (name, mb) in min_blocks {
        exports = exports.with_min_block(&name, mb)?;
    }
    Ok(OpenedExports {
        exports,
        failed,
        swaps: opened_swaps,
        caches: opened_caches,
    })
}
