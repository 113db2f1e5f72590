//! Event channels: the doorbells between domains.

use std::os::fd::RawFd;

use crate::error::Result;
use crate::types::{DomId, Port};

/// An open event-channel device (`/dev/xen/evtchn`); its ports are unbound on drop.
///
/// The file descriptor becomes readable when a port fires; read the port with
/// [`EventChannelHandle::pending`], handle it, then [`EventChannelHandle::unmask`] it.
pub trait EventChannelHandle: Send + Sync {
    /// A pollable descriptor for async readiness (e.g. tokio `AsyncFd`).
    fn fd(&self) -> RawFd;
    /// Bind to `remote_port`, an unbound port `dom` allocated for us. Returns our port.
    ///
    /// # Errors
    /// `ESRCH` no such domain; `EINVAL` the remote port is not unbound for us.
    fn bind_interdomain(&self, dom: DomId, remote_port: Port) -> Result<Port>;
    fn unbind(&self, port: Port) -> Result<()>;
    fn notify(&self, port: Port) -> Result<()>;
    /// The next port that fired, if any (non-blocking).
    fn pending(&self) -> Result<Option<Port>>;
    fn unmask(&self, port: Port) -> Result<()>;
    /// Block until a port fires or `timeout` passes.
    fn wait(&self, timeout: std::time::Duration) -> Result<Option<Port>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self.pending()? {
                return Ok(Some(p));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            poll_readable(self.fd(), left);
        }
    }
}

/// Wait up to `timeout` for `fd` to become readable.
pub fn poll_readable(fd: RawFd, timeout: std::time::Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is a valid pollfd on our stack and we pass a count of 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    rc > 0
}

/// Event-channel capability.
pub trait EventChannels: Send + Sync {
    fn open(&self) -> Result<Box<dyn EventChannelHandle>>;
}
