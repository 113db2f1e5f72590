//! The memory-server client as the remote layers hold it.
//!
//! [`RemoteClient`] owns an async [`Client`] and a small tokio runtime to drive it, and is
//! shared by every remote layer of a backend process. Disk calls run on worker threads, never
//! on an async executor, so blocking on the runtime is safe there. (It is
//! `remoca_memserver::client::BlockingClient`'s shape, plus `delete_batch`, which
//! `BlockingClient` does not offer.) Dropping a tokio runtime from inside an async context
//! panics; an export stack may well be dropped there (the NBD server drops its exports when
//! `run` returns), so a drop inside a runtime hands this runtime to a plain thread.

use std::future::Future;
use std::sync::Arc;

use remoca_memserver::client::{Client, ClientConfig, ClientError, MAX_REPLICAS};
use remoca_memserver::protocol::Pool;
use tokio::runtime::Runtime;

/// A connected memory-server client for the remote disk layers.
#[derive(Debug)]
pub struct RemoteClient {
    runtime: Option<Runtime>,
    client: Client,
    replicas: usize,
}

impl RemoteClient {
    /// Connect to the servers in `config` with `io_threads` runtime threads. Call it from a
    /// plain thread (not inside a tokio runtime): it blocks until every server was tried.
    ///
    /// # Errors
    /// As [`Client::connect`]: no server reachable, authentication refused, ...; `Io` if the
    /// runtime cannot start.
    pub fn connect(config: ClientConfig, io_threads: usize) -> Result<Arc<Self>, ClientError> {
        let replicas = config
            .replicas
            .clamp(1, MAX_REPLICAS)
            .min(config.servers.len().max(1));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(io_threads.max(1))
            .thread_name("remote-disk-client")
            .enable_all()
            .build()
            .map_err(|source| ClientError::Io {
                addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?;
        let client = runtime.block_on(Client::connect(config))?;
        Ok(Arc::new(RemoteClient {
            runtime: Some(runtime),
            client,
            replicas,
        }))
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime
            .as_ref()
            .expect("present until drop")
            .handle()
            .block_on(f)
    }

    /// The async client (for diagnostics such as `replicas_of`).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Copies of each persistent page.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Servers not known to be down.
    pub fn servers_up(&self) -> usize {
        self.client.health().iter().filter(|h| h.up).count()
    }

    /// See [`Client::put_batch`].
    ///
    /// # Errors
    /// As [`Client::put_batch`].
    pub fn put_batch(
        &self,
        pool: Pool,
        namespace: u64,
        pages: &[(u64, &[u8])],
    ) -> Result<(), ClientError> {
        self.block_on(self.client.put_batch(pool, namespace, pages))
    }

    /// See [`Client::get_batch`].
    ///
    /// # Errors
    /// As [`Client::get_batch`].
    pub fn get_batch(
        &self,
        pool: Pool,
        namespace: u64,
        keys: &[u64],
    ) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        self.client.get_batch_blocking(
            self.runtime.as_ref().expect("present until drop").handle(),
            pool,
            namespace,
            keys,
        )
    }

    /// See [`Client::delete_batch`].
    ///
    /// # Errors
    /// As [`Client::delete_batch`].
    pub fn delete_batch(
        &self,
        pool: Pool,
        namespace: u64,
        keys: &[u64],
    ) -> Result<(), ClientError> {
        self.block_on(self.client.delete_batch(pool, namespace, keys))
    }

    /// See [`Client::drop_namespace`].
    ///
    /// # Errors
    /// As [`Client::drop_namespace`].
    pub fn drop_namespace(&self, namespace: u64) -> Result<u64, ClientError> {
        self.block_on(self.client.drop_namespace(namespace))
    }
}

impl Drop for RemoteClient {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                std::thread::spawn(move || drop(rt));
            }
        }
    }
}
