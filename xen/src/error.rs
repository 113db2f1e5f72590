//! Errors of the Xen seam.
//!
//! The errno of a failed call is kept in the `io::Error` source so callers can match
//! `EAGAIN` (transaction conflict), `EBUSY`, `ENOENT` (missing path, paged-out page), and
//! the mem_paging availability errors (`ENOSYS`, `ENODEV`, `EMLINK`, `EXDEV`, `EOPNOTSUPP`).

use std::io;

/// Result of every call into the Xen seam.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The real backend was asked for on a host without Xen.
    #[error("Xen is not available on this host: {reason}")]
    Absent { reason: String },
    /// A call into Xen (or the simulator) failed; `op` names the call and its object.
    #[error("{op}")]
    Call {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The domain does not exist.
    #[error("no domain with id {0}")]
    NoDomain(u32),
    /// The backend cannot do this at all (not an error of the arguments).
    #[error("{what} is not supported by the {backend} backend")]
    Unsupported {
        what: &'static str,
        backend: &'static str,
    },
    /// An argument was rejected before any call was made.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl Error {
    /// A failed call with the given errno.
    pub fn os(op: impl Into<String>, errno: i32) -> Self {
        Error::Call {
            op: op.into(),
            source: io::Error::from_raw_os_error(errno),
        }
    }

    /// A failed call whose errno is the thread's last OS error.
    pub fn last_os(op: impl Into<String>) -> Self {
        Error::Call {
            op: op.into(),
            source: io::Error::last_os_error(),
        }
    }

    /// The errno behind this error, where there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Call { source, .. } => source.raw_os_error(),
            Error::NoDomain(_) => Some(libc::ESRCH),
            Error::Unsupported { .. } => Some(libc::EOPNOTSUPP),
            Error::Invalid(_) => Some(libc::EINVAL),
            Error::Absent { .. } => Some(libc::ENODEV),
        }
    }

    /// True when the error carries `errno`.
    pub fn is_errno(&self, errno: i32) -> bool {
        self.errno() == Some(errno)
    }
}
