//! In-product NFSv3 client (being built).

pub mod url;

use std::io;

pub use url::NfsUrl;

use crate::dest::{DestError, Sink};
use crate::image::ReadAt;

/// NFS errors.
#[derive(Debug, thiserror::Error)]
pub enum NfsError {
    #[error("bad NFS URL {0:?}: expected nfs://host[:port]/export/path/file")]
    BadUrl(String),
    #[error("NFS destinations are not available in this build")]
    Unsupported,
}

/// Image file on an NFS server, written sequentially.
#[derive(Debug)]
pub struct NfsSink;

impl NfsSink {
    /// # Errors
    /// Always, for now.
    pub fn create(_u: &NfsUrl) -> Result<Self, NfsError> {
        Err(NfsError::Unsupported)
    }
}

impl io::Write for NfsSink {
    fn write(&mut self, _b: &[u8]) -> io::Result<usize> {
        Err(io::Error::other("unsupported"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Sink for NfsSink {
    fn commit(self: Box<Self>) -> Result<(), DestError> {
        Err(DestError::Nfs(NfsError::Unsupported))
    }
}

/// Image file on an NFS server, read at offsets.
#[derive(Debug)]
pub struct NfsFile;

impl NfsFile {
    /// # Errors
    /// Always, for now.
    pub fn open(_u: &NfsUrl) -> Result<Self, NfsError> {
        Err(NfsError::Unsupported)
    }
}

impl ReadAt for NfsFile {
    fn read_exact_at(&self, _b: &mut [u8], _o: u64) -> io::Result<()> {
        Err(io::Error::other("unsupported"))
    }
    fn size(&self) -> io::Result<u64> {
        Ok(0)
    }
}
