//! A blocking face of [`Client`] for worker threads that are not async (the pager, the block
//! backend's request threads). It owns a small tokio runtime; every call is
//! `Handle::block_on`, so many threads may call at once and their requests pipeline on the
//! shared connections, except reads that need one request to one server: the calling thread
//! sends those and reads the reply itself ([`Client::get_batch_blocking`]). Do not call it from inside an async task (tokio panics on nested
//! `block_on`).

use std::net::SocketAddr;

use tokio::runtime::Runtime;

use super::{Client, ClientConfig, ClientError, RepairReport, ServerHealth};
use crate::protocol::control::StatsSnapshot;
use crate::protocol::Pool;

#[derive(Debug)]
pub struct BlockingClient {
    runtime: Runtime,
    client: Client,
}

impl BlockingClient {
    /// Start a runtime with `io_threads` workers and connect.
    ///
    /// # Errors
    /// As [`Client::connect`], or an I/O error if the runtime cannot start.
    pub fn connect(config: ClientConfig, io_threads: usize) -> Result<BlockingClient, ClientError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(io_threads.max(1))
            .thread_name("memserver-client")
            .enable_all()
            .build()
            .map_err(|e| ClientError::Io {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source: e,
            })?;
        let client = runtime.block_on(Client::connect(config))?;
        Ok(BlockingClient { runtime, client })
    }

    /// The async client inside (for code that has a runtime of its own).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.handle().block_on(f)
    }

    /// See [`Client::put`].
    ///
    /// # Errors
    /// As [`Client::put`].
    pub fn put(
        &self,
        pool: Pool,
        namespace: u64,
        key: u64,
        page: &[u8],
    ) -> Result<(), ClientError> {
        self.block_on(self.client.put(pool, namespace, key, page))
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

    /// See [`Client::get`]. A page on one server is fetched by this thread itself
    /// ([`Client::get_batch_blocking`]).
    ///
    /// # Errors
    /// As [`Client::get`].
    pub fn get(
        &self,
        pool: Pool,
        namespace: u64,
        key: u64,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        Ok(self
            .client
            .get_batch_blocking(self.runtime.handle(), pool, namespace, &[key])?
            .pop()
            .flatten())
    }

    /// See [`Client::get_batch`]; one request to one server is sent by this thread itself
    /// ([`Client::get_batch_blocking`]).
    ///
    /// # Errors
    /// As [`Client::get_batch`].
    pub fn get_batch(
        &self,
        pool: Pool,
        namespace: u64,
        keys: &[u64],
    ) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        self.client
            .get_batch_blocking(self.runtime.handle(), pool, namespace, keys)
    }

    /// See [`Client::delete`].
    ///
    /// # Errors
    /// As [`Client::delete`].
    pub fn delete(&self, pool: Pool, namespace: u64, key: u64) -> Result<(), ClientError> {
        self.block_on(self.client.delete(pool, namespace, key))
    }

    /// See [`Client::drop_namespace`].
    ///
    /// # Errors
    /// As [`Client::drop_namespace`].
    pub fn drop_namespace(&self, namespace: u64) -> Result<u64, ClientError> {
        self.block_on(self.client.drop_namespace(namespace))
    }

    pub fn stats(&self) -> Vec<(SocketAddr, Result<StatsSnapshot, ClientError>)> {
        self.block_on(self.client.stats())
    }

    pub fn repair(&self) -> RepairReport {
        self.block_on(self.client.repair())
    }

    pub fn health(&self) -> Vec<ServerHealth> {
        self.client.health()
    }
}
