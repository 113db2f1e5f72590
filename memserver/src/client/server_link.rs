//! One configured server: its connection pool and its health.
//!
//! Health: a connection-level failure (refused, reset, protocol violation) marks the server
//! down at once; timeouts mark it down after three in a row. A down server is skipped until
//! `retry_after` has passed, then one request (or the background probe) may try it again; a
//! success marks it up.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::connection::Connection;
use super::error::ClientError;
use super::placement::server_seed;
use super::sync_conn::SyncConnection;
use crate::protocol::auth::AuthKey;
use crate::protocol::{Reply, Request};

const TIMEOUTS_BEFORE_DOWN: u32 = 3;
/// Idle blocking connections kept per server (one per worker thread that calls at once).
const MAX_IDLE_SYNC: usize = 16;

#[derive(Debug, Default)]
struct Health {
    consecutive_failures: u32,
    down_since: Option<Instant>,
    retry_at: Option<Instant>,
}

/// What [`super::Client::health`] reports per server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHealth {
    pub addr: SocketAddr,
    pub up: bool,
    pub down_for: Option<Duration>,
    pub requests: u64,
    pub failures: u64,
}

#[derive(Debug)]
pub struct ServerLink {
    pub addr: SocketAddr,
    pub seed: u64,
    slots: Vec<Mutex<Option<Arc<Connection>>>>,
    /// Idle connections for [`ServerLink::call_blocking`].
    sync_idle: Mutex<Vec<SyncConnection>>,
    connecting: tokio::sync::Mutex<()>,
    rr: AtomicUsize,
    health: Mutex<Health>,
    requests: AtomicU64,
    failures: AtomicU64,
    auth: Option<AuthKey>,
    request_timeout: Duration,
    connect_timeout: Duration,
    retry_after: Duration,
    reply_spin: Duration,
}

impl ServerLink {
    pub fn new(
        addr: SocketAddr,
        connections: usize,
        auth: Option<AuthKey>,
        request_timeout: Duration,
        connect_timeout: Duration,
        retry_after: Duration,
        reply_spin: Duration,
    ) -> ServerLink {
        ServerLink {
            addr,
            seed: server_seed(&addr.to_string()),
            slots: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
            sync_idle: Mutex::new(Vec::new()),
            connecting: tokio::sync::Mutex::new(()),
            rr: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            auth,
            request_timeout,
            connect_timeout,
            retry_after,
            reply_spin,
        }
    }

    /// Not known to be down.
    pub fn is_up(&self) -> bool {
        self.health.lock().down_since.is_none()
    }

    /// Up, or down long enough to deserve another try.
    pub fn is_usable(&self) -> bool {
        let h = self.health.lock();
        h.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    pub fn health(&self) -> ServerHealth {
        let h = self.health.lock();
        ServerHealth {
            addr: self.addr,
            up: h.down_since.is_none(),
            down_for: h.down_since.map(|t| t.elapsed()),
            requests: self.requests.load(Relaxed),
            failures: self.failures.load(Relaxed),
        }
    }

    fn record_ok(&self) {
        let mut h = self.health.lock();
        if h.down_since.is_some() {
            tracing::info!(addr = %self.addr, "memory server is back up");
        }
        *h = Health::default();
    }

    /// Returns `true` when this failure took the server from up to down.
    fn record_failure(&self, e: &ClientError) -> bool {
        self.failures.fetch_add(1, Relaxed);
        let mut h = self.health.lock();
        h.consecutive_failures += 1;
        let now_down = !matches!(e, ClientError::Timeout { .. })
            || h.consecutive_failures >= TIMEOUTS_BEFORE_DOWN;
        h.retry_at = now_down.then(|| Instant::now() + self.retry_after);
        if now_down && h.down_since.is_none() {
            h.down_since = Some(Instant::now());
            tracing::warn!(addr = %self.addr, error = %e, "memory server marked down");
            return true;
        }
        false
    }

    async fn conn(&self) -> Result<Arc<Connection>, ClientError> {
        if !self.is_usable() {
            return Err(ClientError::Down { addr: self.addr });
        }
        let i = self.rr.fetch_add(1, Relaxed) % self.slots.len();
        if let Some(c) = self.slots[i].lock().as_ref() {
            if !c.is_dead() {
                return Ok(Arc::clone(c));
            }
        }
        let _g = self.connecting.lock().await;
        if let Some(c) = self.slots[i].lock().as_ref() {
            if !c.is_dead() {
                return Ok(Arc::clone(c));
            }
        }
        let c = Connection::connect(self.addr, self.auth.as_ref(), self.connect_timeout).await?;
        *self.slots[i].lock() = Some(Arc::clone(&c));
        Ok(c)
    }

    /// Send one request on a pooled connection, tracking health.
    /// Returns the reply and whether this call took the server down.
    pub async fn call(&self, req: &Request) -> (Result<Reply, ClientError>, bool) {
        self.requests.fetch_add(1, Relaxed);
        let r = match self.conn().await {
            Ok(c) => c.call(req, self.request_timeout).await,
            Err(e) => Err(e),
        };
        let went_down = self.record(&r);
        (r, went_down)
    }

    /// Like [`ServerLink::call`], but the calling thread writes the request and reads the
    /// reply itself on a blocking connection of its own (no runtime hand-off). Blocks the
    /// thread for up to the request timeout: never call it on an async executor. For
    /// idempotent requests only (a failed call on an idle connection is retried once).
    pub fn call_blocking(&self, req: &Request) -> (Result<Reply, ClientError>, bool) {
        self.requests.fetch_add(1, Relaxed);
        let r = if self.is_usable() {
            let idle = self.sync_idle.lock().pop();
            match idle {
                Some(c) => match self.sync_call(c, req) {
                    // An idle connection the server closed meanwhile says nothing about the
                    // server yet; a fresh one does. (Only idempotent reads come this way.)
                    Err(ClientError::ConnectionLost { .. } | ClientError::Io { .. }) => {
                        self.sync_connect().and_then(|c| self.sync_call(c, req))
                    }
                    r => r,
                },
                None => self.sync_connect().and_then(|c| self.sync_call(c, req)),
            }
        } else {
            Err(ClientError::Down { addr: self.addr })
        };
        let went_down = self.record(&r);
        (r, went_down)
    }

    fn sync_connect(&self) -> Result<SyncConnection, ClientError> {
        SyncConnection::connect(
            self.addr,
            self.auth.as_ref(),
            self.connect_timeout,
            self.request_timeout,
            self.reply_spin,
        )
    }

    /// One call on `c`; a connection that answered cleanly goes back to the idle list.
    fn sync_call(&self, mut c: SyncConnection, req: &Request) -> Result<Reply, ClientError> {
        let r = c.call(req)?;
        let mut idle = self.sync_idle.lock();
        if idle.len() < MAX_IDLE_SYNC {
            idle.push(c);
        }
        Ok(r)
    }

    /// Health bookkeeping for one call; `true` when it took the server down.
    fn record(&self, r: &Result<Reply, ClientError>) -> bool {
        match r {
            Ok(_) => {
                self.record_ok();
                false
            }
            Err(ClientError::Down { .. }) => false,
            Err(e) if e.is_server_failure() => self.record_failure(e),
            Err(_) => false,
        }
    }

    /// Drop every pooled connection (used after the server is found dead).
    pub fn reset(&self) {
        for s in &self.slots {
            *s.lock() = None;
        }
        self.sync_idle.lock().clear();
    }
}
