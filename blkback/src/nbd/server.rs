//! The NBD server: accept connections on TCP or a unix socket, bound how many run at once,
//! give each a handler, and stop cleanly on shutdown (after answering what is in flight and
//! flushing every export).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{broadcast, mpsc, Semaphore};
use tracing::Instrument;

use super::handshake::{negotiate, HandshakeError};
use super::shutdown::Shutdown;
use super::transmission::serve;
use crate::export::{ExportStats, Exports};
use crate::workers::{WorkerPool, DEFAULT_WORKERS};

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// A client must finish the option phase within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("accept failed")]
    Accept(#[source] io::Error),
    #[error("cannot start the I/O worker threads")]
    Workers(#[source] io::Error),
}

/// Serve `exports` on `listener` until `shutdown` completes.
///
/// # Errors
/// [`ServerError::Accept`] when accepting fails for a reason other than a transient one.
pub async fn run(
    listener: Listener,
    exports: Exports,
    shutdown: impl Future,
) -> Result<(), ServerError> {
    let (notify, _) = broadcast::channel::<()>(1);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let workers =
        Arc::new(WorkerPool::new(DEFAULT_WORKERS, "nbd-io").map_err(ServerError::Workers)?);
    let accept_loop = async {
        loop {
            let permit = limit
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let handler = Handler {
                exports: exports.clone(),
                shutdown: Shutdown::new(notify.subscribe()),
                workers: workers.clone(),
                _done: done_tx.clone(),
            };
            match &listener {
                Listener::Tcp(l) => {
                    let (sock, peer) = accept_with_retry(|| l.accept()).await?;
                    let _ = sock.set_nodelay(true);
                    tokio::spawn(async move {
                        let (r, w) = sock.into_split();
                        handler.run(r, w, peer.to_string()).await;
                        drop(permit);
                    });
                }
                Listener::Unix(l) => {
                    let (sock, _) = accept_with_retry(|| l.accept()).await?;
                    tokio::spawn(async move {
                        let (r, w) = sock.into_split();
                        handler.run(r, w, "unix".into()).await;
                        drop(permit);
                    });
                }
            }
        }
    };
    let result: Result<(), ServerError> = tokio::select! {
        r = accept_loop => r,
        _ = shutdown => Ok(()),
    };
    drop(notify);
    drop(done_tx);
    let _ = done_rx.recv().await;
    let flush_exports = exports.clone();
    let _ = tokio::task::spawn_blocking(move || flush_exports.flush_all()).await;
    result
}

async fn accept_with_retry<T, F, Fut>(mut accept: F) -> Result<T, ServerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    let mut backoff = Duration::from_millis(10);
    loop {
        match accept().await {
            Ok(v) => return Ok(v),
            // Out of file descriptors or a connection reset before accept: wait and retry.
            Err(e) if backoff <= Duration::from_secs(2) => {
                tracing::warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(e) => return Err(ServerError::Accept(e)),
        }
    }
}

/// Serve one already-connected client on `reader`/`writer` until it disconnects (no
/// connection limit, no shutdown signal). For socket activation, tests and fuzzing.
pub async fn serve_stream<R, W>(reader: R, writer: W, exports: Exports)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (notify, _) = broadcast::channel::<()>(1);
    let (done, _) = mpsc::channel::<()>(1);
    let Ok(workers) = WorkerPool::new(2, "nbd-io") else {
        tracing::warn!("cannot start worker threads");
        return;
    };
    let handler = Handler {
        exports,
        shutdown: Shutdown::new(notify.subscribe()),
        workers: Arc::new(workers),
        _done: done,
    };
    handler.run(reader, writer, "stream".into()).await;
}

/// One connection.
struct Handler {
    exports: Exports,
    shutdown: Shutdown,
    workers: Arc<WorkerPool>,
    _done: mpsc::Sender<()>,
}

impl Handler {
    async fn run<R, W>(mut self, reader: R, mut writer: W, peer: String)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut reader = BufReader::with_capacity(256 << 10, reader);
        let negotiated = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT,
                    negotiate(&mut reader, &mut writer, &self.exports)) => r,
            _ = self.shutdown.recv() => return,
        };
        let session = match negotiated {
            Ok(Ok(s)) => s,
            Ok(Err(HandshakeError::Aborted)) => return,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "handshake ended");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "handshake timed out");
                return;
            }
        };
        let export = session.export.clone();
        let span = tracing::info_span!("nbd", export = %export.name, %peer);
        ExportStats::add(&export.stats.connections, 1);
        let structured = session.structured;
        let served = async {
            tracing::info!(structured, "client connected");
            if let Err(e) = serve(
                &mut reader,
                writer,
                session,
                &self.workers,
                &mut self.shutdown,
            )
            .await
            {
                tracing::info!(error = %e, "connection ended with an error");
            }
        };
        served.instrument(span).await;
        export
            .stats
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
