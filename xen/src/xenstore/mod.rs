//! The xenstore capability: a hierarchical key/value store shared by all domains.
//!
//! Paths are absolute (`/local/domain/5/name`) or relative to the caller's domain path.
//! Values are bytes (usually ASCII). Every node has a permission list: the first entry
//! names the owner and the access everyone else gets; later entries grant per-domain
//! access. Transactions see a consistent snapshot and fail with `EAGAIN` at commit when a
//! node they touched changed meanwhile; [`with_transaction`] retries them. A watch fires
//! once when registered and again whenever its path or anything below it changes.

mod perms;
pub mod wire;

pub use perms::{access_of, Access, Perm};

use std::time::Duration;

use crate::error::{Error, Result};
use crate::types::DomId;

/// A transaction id; [`Tx::NONE`] means "outside any transaction".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tx(pub u32);

impl Tx {
    pub const NONE: Tx = Tx(0);
}

/// One firing of a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path that changed (the watched path itself on the initial firing).
    pub path: String,
    pub token: String,
}

/// A registered watch; dropping it unregisters it.
pub struct Watch {
    events: crossbeam_channel::Receiver<WatchEvent>,
    unregister: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

impl Watch {
    /// Backends build a watch from their event channel and an unregister action.
    pub fn new(
        events: crossbeam_channel::Receiver<WatchEvent>,
        unregister: Box<dyn FnOnce() + Send>,
    ) -> Self {
        Watch {
            events,
            unregister: Some(unregister),
        }
    }

    /// Wait for the next event, at most `timeout`.
    pub fn next_timeout(&self, timeout: Duration) -> Option<WatchEvent> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Block until the next event; `None` when the connection is gone.
    pub fn next(&self) -> Option<WatchEvent> {
        self.events.recv().ok()
    }

    /// An event if one is queued.
    pub fn try_next(&self) -> Option<WatchEvent> {
        self.events.try_recv().ok()
    }

    /// The receiving side, for `select!` over several watches.
    pub fn receiver(&self) -> &crossbeam_channel::Receiver<WatchEvent> {
        &self.events
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(f) = self.unregister.take() {
            f();
        }
    }
}

/// Xenstore capability.
pub trait XenStore: Send + Sync {
    fn read(&self, tx: Tx, path: &str) -> Result<Vec<u8>>;
    fn write(&self, tx: Tx, path: &str, value: &[u8]) -> Result<()>;
    /// Create a node (and missing parents) with an empty value; no error if it exists.
    fn mkdir(&self, tx: Tx, path: &str) -> Result<()>;
    /// Remove a node and everything below it.
    fn rm(&self, tx: Tx, path: &str) -> Result<()>;
    /// Names of the node's children.
    fn directory(&self, tx: Tx, path: &str) -> Result<Vec<String>>;
    fn get_perms(&self, tx: Tx, path: &str) -> Result<Vec<Perm>>;
    fn set_perms(&self, tx: Tx, path: &str, perms: &[Perm]) -> Result<()>;
    fn transaction_start(&self) -> Result<Tx>;
    /// Commit (`commit = true`) or abort. Commit fails with `EAGAIN` on conflict.
    fn transaction_end(&self, tx: Tx, commit: bool) -> Result<()>;
    fn watch(&self, path: &str, token: &str) -> Result<Watch>;
    /// `/local/domain/<dom>`.
    fn domain_path(&self, dom: DomId) -> Result<String> {
        Ok(format!("/local/domain/{dom}"))
    }
}

/// Read a node as UTF-8 text.
pub fn read_string(store: &dyn XenStore, tx: Tx, path: &str) -> Result<String> {
    let bytes = store.read(tx, path)?;
    String::from_utf8(bytes).map_err(|_| Error::Invalid(format!("{path}: value is not UTF-8")))
}

/// Run `body` in a transaction, retrying on `EAGAIN` up to `attempts` times.
///
/// # Errors
/// The body's error (the transaction is aborted), or the commit error once attempts run out.
pub fn with_transaction<T>(
    store: &dyn XenStore,
    attempts: usize,
    mut body: impl FnMut(Tx) -> Result<T>,
) -> Result<T> {
    let mut left = attempts.max(1);
    loop {
        let tx = store.transaction_start()?;
        let value = match body(tx) {
            Ok(v) => v,
            Err(e) => {
                let _ = store.transaction_end(tx, false);
                return Err(e);
            }
        };
        match store.transaction_end(tx, true) {
            Ok(()) => return Ok(value),
            Err(e) if e.is_errno(libc::EAGAIN) && left > 1 => left -= 1,
            Err(e) => return Err(e),
        }
    }
}

/// Check a path the way xenstored does before sending it anywhere.
///
/// # Errors
/// `EINVAL` for empty paths, `//`, a trailing `/` (except the root), characters outside
/// `[A-Za-z0-9-/_@]`, or paths longer than [`wire::MAX_PATH`].
pub fn validate_path(path: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::os(
            format!("xenstore path {path:?}: {why}"),
            libc::EINVAL,
        ))
    };
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > wire::MAX_PATH {
        return bad("too long");
    }
    if path.contains("//") || (path.len() > 1 && path.ends_with('/')) {
        return bad("empty component");
    }
    if !path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-/_@.".contains(&b))
    {
        return bad("bad character");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert!(validate_path("/local/domain/0/name").is_ok());
        assert!(validate_path("/").is_ok());
        assert!(validate_path("device/vbd/51712").is_ok());
        for bad in ["", "//a", "/a/", "/a b", "/a\0"] {
            assert!(
                validate_path(bad).unwrap_err().is_errno(libc::EINVAL),
                "{bad:?}"
            );
        }
    }
}
