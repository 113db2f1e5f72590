//! Listens for the server's shutdown broadcast (mini-redis `shutdown.rs`).

use tokio::sync::broadcast;

/// Becomes ready once when the server starts shutting down.
#[derive(Debug)]
pub struct Shutdown {
    is_shutdown: bool,
    notify: broadcast::Receiver<()>,
}

impl Shutdown {
    pub fn new(notify: broadcast::Receiver<()>) -> Shutdown {
        Shutdown {
            is_shutdown: false,
            notify,
        }
    }

    pub fn is_shutdown(&self) -> bool {
        self.is_shutdown
    }

    /// Wait for the shutdown notice (returns at once if it was already seen).
    pub async fn recv(&mut self) {
        if self.is_shutdown {
            return;
        }
        // Either a value or `Closed` (sender dropped): both mean shut down.
        let _ = self.notify.recv().await;
        self.is_shutdown = true;
    }
}
