//! In-process memory servers on 127.0.0.1:0 for the remote-layer tests, each in its own
//! runtime so a test can crash one (every task and socket dropped at once, as `kill -9`).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use remoca_blkback::remote::RemoteClient;
use remoca_memserver::client::{ClientConfig, PageSecret};
use remoca_memserver::server::{serve, ServerConfig};
use remoca_memserver::store::{ProcMeminfo, Store, StoreConfig};

pub struct TestServer {
    pub addr: SocketAddr,
    pub store: Arc<Store>,
    runtime: Option<tokio::runtime::Runtime>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TestServer {
    pub fn start(capacity: u64) -> TestServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let cfg = StoreConfig {
            capacity,
            headroom: 0,
        };
        let store = Arc::new(Store::new(cfg, Arc::new(ProcMeminfo)));
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let s = Arc::clone(&store);
        runtime.spawn(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let _ = serve(l, s, ServerConfig::new(cfg), stop_rx).await;
        });
        TestServer {
            addr,
            store,
            runtime: Some(runtime),
            _stop: stop,
        }
    }

    /// Drop every task and socket of this server at once, like kill -9.
    pub fn crash(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Pages held in (ephemeral, persistent).
    pub fn pages(&self) -> (u64, u64) {
        let s = self.store.stats();
        (s.pools[0].pages, s.pools[1].pages)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.crash();
    }
}

/// `n` servers of 64 MiB each and a client with two replicas.
pub fn servers_and_client(n: usize) -> (Vec<TestServer>, Arc<RemoteClient>) {
    let servers: Vec<TestServer> = (0..n).map(|_| TestServer::start(64 << 20)).collect();
    let mut cfg = ClientConfig::new(
        servers.iter().map(|s| s.addr).collect(),
        None,
        PageSecret::random(),
    );
    cfg.replicas = 2;
    cfg.request_timeout = Duration::from_secs(5);
    let client = RemoteClient::connect(cfg, 1).unwrap();
    (servers, client)
}
