//! Shutdown signal for connection handlers (the mini-redis pattern): a broadcast receiver
//! that remembers it fired.

use tokio::sync::broadcast;

/// Listens for the server's shutdown.
#[derive(Debug)]
pub struct Shutdown {
    fired: bool,
    rx: broadcast::Receiver<()>,
}

impl Shutdown {
    pub fn new(rx: broadcast::Receiver<()>) -> Self {
        Self { fired: false, rx }
    }

    /// Whether shutdown was signalled.
    pub fn is_shutdown(&self) -> bool {
        self.fired
    }

    /// Wait for shutdown (returns at once if it already fired). Dropping the sender counts.
    pub async fn recv(&mut self) {
        if self.fired {
            return;
        }
        let _ = self.rx.recv().await;
        self.fired = true;
    }
}
