//! Test servers run in their own runtime so a test can crash one (drop every task and socket
//! at once, as a kill -9 would) or stop it gracefully.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use remoca_memserver::protocol::auth::AuthKey;
use remoca_memserver::protocol::control::{Hello, NONCE_LEN};
use remoca_memserver::protocol::{decode, Reply, ReplyBody, Request, Status};
use remoca_memserver::server::{serve, ServerConfig};
use remoca_memserver::store::{ProcMeminfo, Store, StoreConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub const KEY: &[u8] = b"test pre-shared key 0123456789";

pub fn key() -> AuthKey {
    AuthKey::from_secret(KEY).unwrap()
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub store: Arc<Store>,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<std::io::Result<()>>>,
}

impl TestServer {
    pub fn start(capacity: u64, auth: Option<AuthKey>) -> TestServer {
        TestServer::start_with(capacity, auth, 64)
    }

    pub fn start_with(capacity: u64, auth: Option<AuthKey>, max_connections: usize) -> TestServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let cfg = StoreConfig {
            capacity,
            headroom: 0,
        };
        let store = Arc::new(Store::new(cfg, Arc::new(ProcMeminfo)));
        let mut config = ServerConfig::new(cfg);
        config.auth_key = auth;
        config.max_connections = max_connections;
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done) = oneshot::channel();
        let s = Arc::clone(&store);
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let r = serve(listener, s, config, stop_rx).await;
            let _ = done_tx.send(r);
        });
        TestServer {
            addr,
            store,
            runtime: Some(runtime),
            stop: Some(stop),
            done: Some(done),
        }
    }

    /// Drop every task and socket of this server at once, like kill -9.
    pub fn crash(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Graceful shutdown; returns once `serve` has returned.
    pub async fn stop(&mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = self.done.take().unwrap().await.unwrap();
        self.crash();
        r
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.crash();
    }
}

/// A bare protocol connection for tests that speak frames directly.
pub struct Raw {
    pub s: TcpStream,
    pub buf: BytesMut,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    /// Connect and complete HELLO (+ AUTH when a key is given).
    pub async fn ready(addr: SocketAddr, key: Option<&AuthKey>) -> Raw {
        let mut r = Raw::connect(addr).await;
        let nonce = [9u8; NONCE_LEN];
        let hello = r
            .call(
                1,
                &Request::Hello(Hello {
                    min_version: 1,
                    max_version: 1,
                    client_nonce: nonce,
                    client_name: "raw".into(),
                }),
            )
            .await;
        let ReplyBody::Hello(h) = hello.body else {
            panic!("bad hello reply {hello:?}")
        };
        if let Some(k) = key {
            let proof = k.client_proof(&h.server_nonce, &nonce);
            let a = r.call(2, &Request::Auth { proof }).await;
            assert_eq!(a.status, Status::Ok);
        }
        r
    }

    pub async fn send(&mut self, id: u64, req: &Request) {
        let mut b = BytesMut::new();
        req.encode(id, &mut b);
        self.s.write_all(&b).await.unwrap();
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    /// Next reply, or `None` at EOF.
    pub async fn recv(&mut self) -> Option<Reply> {
        loop {
            if let Some(f) = decode(&mut self.buf).unwrap() {
                return Some(Reply::from_frame(f).unwrap());
            }
            if self.s.read_buf(&mut self.buf).await.unwrap_or(0) == 0 {
                return None;
            }
        }
    }

    pub async fn call(&mut self, id: u64, req: &Request) -> Reply {
        self.send(id, req).await;
        let r = self.recv().await.expect("reply");
        assert_eq!(r.request_id, id);
        r
    }
}
