//! The memory-server daemon, in the shape of tokio's mini-redis: an accept loop bounded by a
//! connection semaphore, one [`connection`] handler task per client, and a broadcast that tells
//! every handler to stop reading, answer what it already read, and close.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use remoca_memserver::server::{self, ServerConfig};
//! use remoca_memserver::store::StoreConfig;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let config = ServerConfig::new(StoreConfig { capacity: 1 << 30, headroom: 512 << 20 });
//! server::run(listener, config, tokio::signal::ctrl_c()).await
//! # }
//! ```

mod connection;
mod shutdown;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, Semaphore};

use crate::protocol::auth::AuthKey;
use crate::store::{Store, StoreConfig};
use connection::Handler;
pub use shutdown::Shutdown;

/// Default cap on simultaneous client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Validated daemon settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub store: StoreConfig,
    /// Most simultaneous connections; further clients wait in the accept backlog.
    pub max_connections: usize,
    /// Pre-shared key; `None` means any client that completes HELLO may use the server.
    pub auth_key: Option<AuthKey>,
}

impl ServerConfig {
    /// Defaults for everything but the store bounds: 1024 connections, no authentication.
    pub fn new(store: StoreConfig) -> ServerConfig {
        ServerConfig {
            store,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            auth_key: None,
        }
    }
}

/// Run a daemon with a fresh store that watches `/proc/meminfo`, until `shutdown` completes.
/// In-flight requests are answered before this returns.
///
/// # Errors
/// Only if the listener fails permanently.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future,
) -> std::io::Result<()> {
    let store = Arc::new(Store::with_proc_meminfo(config.store));
    serve(listener, store, config, shutdown).await
}

/// Like [`run`], on a store the caller holds (to read [`Store::stats`] while it serves).
///
/// # Errors
/// Only if the listener fails permanently.
pub async fn serve(
    listener: TcpListener,
    store: Arc<Store>,
    config: ServerConfig,
    shutdown: impl Future,
) -> std::io::Result<()> {
    let (notify_shutdown, _) = broadcast::channel(1);
    let (shutdown_complete_tx, mut shutdown_complete_rx) = mpsc::channel::<()>(1);
    let limit = Arc::new(Semaphore::new(config.max_connections.max(1)));
    if config.auth_key.is_none() {
        tracing::warn!("memory server runs without a pre-shared key: any client may connect");
    }
    let result = tokio::select! {
        res = accept_loop(&listener, &store, &config, &limit, &notify_shutdown, &shutdown_complete_tx) => res,
        _ = shutdown => {
            tracing::info!("memory server shutting down");
            Ok(())
        }
    };
    drop(notify_shutdown);
    drop(shutdown_complete_tx);
    // Every handler holds a sender; when all are dropped, all connections are done.
    let _ = shutdown_complete_rx.recv().await;
    result
}

async fn accept_loop(
    listener: &TcpListener,
    store: &Arc<Store>,
    config: &ServerConfig,
    limit: &Arc<Semaphore>,
    notify_shutdown: &broadcast::Sender<()>,
    shutdown_complete: &mpsc::Sender<()>,
) -> std::io::Result<()> {
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = Arc::clone(limit)
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let (socket, peer) = match listener.accept().await {
            Ok(s) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(e) => {
                // EMFILE and friends: wait and retry rather than die.
                tracing::warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let handler = Handler::new(
            socket,
            peer,
            Arc::clone(store),
            config.auth_key.clone(),
            Shutdown::new(notify_shutdown.subscribe()),
            shutdown_complete.clone(),
        );
        tokio::spawn(async move {
            handler.run().await;
            drop(permit);
        });
    }
}
