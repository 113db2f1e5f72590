//! Pages in the persistent pool of a set of memory servers.
//!
//! One namespace per domain (the domid). The client seals every page, places it on
//! `replicas` servers by rendezvous hashing, acknowledges a put only when every replica has
//! it, and reads from a surviving replica when a server dies; see `docs/memserver.md`.
//!
//! Limit: the client keeps its page→version map in memory, so a *new* client (a pager
//! process restarted after a crash) cannot read pages an earlier client stored. A pager
//! restarted in the same process with the same store keeps them readable.

use std::net::SocketAddr;

use remoca_memserver::client::{BlockingClient, ClientConfig, ClientError};
use remoca_memserver::protocol::Pool;
use remoca_xen::{DomId, Gfn};

use super::{PageStore, StoreError};

/// A [`PageStore`] over [`BlockingClient`].
#[derive(Debug)]
pub struct MemserverStore {
    client: BlockingClient,
    servers: Vec<SocketAddr>,
    replicas: usize,
}

impl MemserverStore {
    /// Connect with `config` (servers, keys, replicas) and a 2-thread client runtime.
    ///
    /// # Errors
    /// As [`BlockingClient::connect`].
    pub fn connect(config: ClientConfig) -> Result<MemserverStore, ClientError> {
        let servers = config.servers.clone();
        let replicas = config.replicas;
        Ok(MemserverStore {
            client: BlockingClient::connect(config, 2)?,
            servers,
            replicas,
        })
    }

    /// The client, for health and repair reports.
    pub fn client(&self) -> &BlockingClient {
        &self.client
    }
}

fn unavailable(e: ClientError) -> StoreError {
    StoreError::Unavailable {
        source: Box::new(e),
    }
}

impl PageStore for MemserverStore {
    fn put_batch(&self, dom: DomId, pages: &[(Gfn, &[u8])]) -> Result<(), StoreError> {
        self.client
            .put_batch(Pool::Persistent, u64::from(dom), pages)
            .map_err(unavailable)
    }

    fn get(&self, dom: DomId, gfn: Gfn) -> Result<Vec<u8>, StoreError> {
        self.client
            .get(Pool::Persistent, u64::from(dom), gfn)
            .map_err(unavailable)?
            .ok_or(StoreError::Missing { dom, gfn })
    }

    fn remove(&self, dom: DomId, gfns: &[Gfn]) -> Result<(), StoreError> {
        for g in gfns {
            self.client
                .delete(Pool::Persistent, u64::from(dom), *g)
                .map_err(unavailable)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let up = self.client.health().iter().filter(|h| h.up).count();
        format!(
            "memory servers {up}/{} up, {} replicas",
            self.servers.len(),
            self.replicas
        )
    }
}
