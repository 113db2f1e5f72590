//! The peer-protocol server: one tokio task per connection, requests answered in order.
//! Chunk reads (disk, and pull-through fetches from the origin) run on tokio's blocking pool.
//!
//! A node runs it over its [`crate::images::cache::NodeCache`], with the fetcher's
//! origin-only path as the pull source; the origin runs it over any
//! [`ChunkSource`] (the store, or an in-memory map in tests) with no pull source.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::wire::{self, Frame};
use crate::images::chunk::{ChunkError, ChunkId, ChunkSource};

/// Something that can fetch a batch of chunks at once (the fetcher's origin path).
pub trait BatchSource: Send + Sync {
    /// One result per want, in order.
    fn fetch_batch(&self, wants: &[(ChunkId, usize)]) -> Vec<Result<Vec<u8>, ChunkError>>;
}

/// Counters of one server since it started.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub chunks_served: AtomicU64,
    /// Chunk bytes sent (payload only): the egress a deployment test reports for the origin.
    pub bytes_served: AtomicU64,
    pub missing: AtomicU64,
    /// Chunks fetched from the origin on a pull request.
    pub pulled: AtomicU64,
    pub bad_requests: AtomicU64,
    /// Chunks sent that this server had sent before (to anyone): for the origin, the chunks
    /// that left it more than once. Counted only on a server built with
    /// [`Service::counting_repeats`]; always 0 otherwise.
    pub repeat_chunks: AtomicU64,
    /// The bytes of [`ServerStats::repeat_chunks`].
    pub repeat_bytes: AtomicU64,
}

/// What a server serves from.
pub struct Service {
    local: Arc<dyn ChunkSource>,
    holds: Box<dyn Fn(&ChunkId) -> bool + Send + Sync>,
    pull: Option<Arc<dyn BatchSource>>,
    corrupt: bool,
    /// Every chunk id served, to count repeats: only with [`Service::counting_repeats`].
    sent: Option<parking_lot::Mutex<std::collections::HashSet<ChunkId>>>,
    pub stats: ServerStats,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("pull", &self.pull.is_some())
            .field("corrupt", &self.corrupt)
            .field("counts_repeats", &self.counts_repeats())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Service {
    /// Serve what `local` has; `holds` answers HAVE queries.
    pub fn new(
        local: Arc<dyn ChunkSource>,
        holds: impl Fn(&ChunkId) -> bool + Send + Sync + 'static,
    ) -> Service {
        Service {
            local,
            holds: Box::new(holds),
            pull: None,
            corrupt: false,
            sent: None,
            stats: ServerStats::default(),
        }
    }

    /// On a GET with the pull flag, fetch what `local` lacks from `pull`.
    pub fn with_pull(mut self, pull: Arc<dyn BatchSource>) -> Service {
        self.pull = Some(pull);
        self
    }

    /// Count the chunks served more than once ([`ServerStats::repeat_chunks`]): for the
    /// origin of a deployment test or bench, which reports the chunks that left it twice.
    /// Off by default: it costs a lock and a set insert per chunk served, and a set entry per
    /// distinct chunk ever served, for the life of the server.
    pub fn counting_repeats(mut self, yes: bool) -> Service {
        self.sent = yes.then(Default::default);
        self
    }

    /// Whether [`ServerStats::repeat_chunks`] is counted (see [`Service::counting_repeats`]).
    pub fn counts_repeats(&self) -> bool {
        self.sent.is_some()
    }

    /// **Test hook**: flip one byte of every chunk served, to play a bad peer in the
    /// multi-node tests. Never set in production.
    pub fn corrupting(mut self, yes: bool) -> Service {
        self.corrupt = yes;
        self
    }

    /// Answer a GET frame by frame, in the order asked, handing each frame to `emit` as soon
    /// as it is ready: local chunks at once, pulled ones in runs of [`PULL_RUN`], so a client
    /// waiting on a slow origin keeps seeing progress within its read timeout.
    fn answer_get(
        &self,
        pull: bool,
        wants: &[(ChunkId, u32)],
        emit: &mut dyn FnMut(Frame) -> bool,
    ) {
        let mut i = 0;
        while i < wants.len() {
            let (id, len) = wants[i];
            if let Ok(d) = self.local.fetch(&id, len as usize) {
                if d.len() == len as usize {
                    if !emit(self.chunk_frame(id, d)) {
                        return;
                    }
                    i += 1;
                    continue;
                }
            }
            let Some(p) = self.pull.as_ref().filter(|_| pull) else {
                self.stats.missing.fetch_add(1, Ordering::Relaxed);
                if !emit(Frame::Missing(id)) {
                    return;
                }
                i += 1;
                continue;
            };
            // A run of up to PULL_RUN chunks from here, fetched from the origin together.
            let run: Vec<(ChunkId, usize)> = wants[i..]
                .iter()
                .take(PULL_RUN)
                .map(|(id, len)| (*id, *len as usize))
                .collect();
            for ((id, len), r) in run.iter().zip(p.fetch_batch(&run)) {
                let f = match r {
                    Ok(d) if d.len() == *len => {
                        self.stats.pulled.fetch_add(1, Ordering::Relaxed);
                        self.chunk_frame(*id, d)
                    }
                    _ => {
                        self.stats.missing.fetch_add(1, Ordering::Relaxed);
                        Frame::Missing(*id)
                    }
                };
                if !emit(f) {
                    return;
                }
            }
            i += run.len();
        }
    }

    fn chunk_frame(&self, id: ChunkId, mut data: Vec<u8>) -> Frame {
        self.stats.chunks_served.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_served
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        // Without counting: no lock, no set.
        let again = self.sent.as_ref().is_some_and(|s| !s.lock().insert(id));
        if again {
            self.stats.repeat_chunks.fetch_add(1, Ordering::Relaxed);
            self.stats
                .repeat_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        if self.corrupt {
            data[0] ^= 0x5a;
        }
        Frame::Chunk { id, data }
    }
}

/// Chunks pulled from the origin per step of a pull GET.
const PULL_RUN: usize = 4;

async fn connection(svc: Arc<Service>, mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    loop {
        let frame = match wire::read_frame_async(&mut s).await {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                svc.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                let _ = s
                    .write_all(&wire::encode(&Frame::Error(e.to_string())))
                    .await;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        svc.stats.requests.fetch_add(1, Ordering::Relaxed);
        match frame {
            Frame::Get { pull, wants } => {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Frame>(4);
                let svc2 = svc.clone();
                let job = tokio::task::spawn_blocking(move || {
                    svc2.answer_get(pull, &wants, &mut |f| tx.blocking_send(f).is_ok())
                });
                // While the next answer is being fetched (a pull from the origin), tell the
                // client so every WAIT_EVERY: it must not take this peer for a hung one.
                loop {
                    let f = match tokio::time::timeout(wire::WAIT_EVERY, rx.recv()).await {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(_) => Frame::Wait,
                    };
                    s.write_all(&wire::encode(&f)).await?;
                }
                job.await.map_err(io::Error::other)?;
            }
            Frame::HaveQuery(ids) => {
                let have = Frame::Have(ids.iter().map(|i| (svc.holds)(i)).collect());
                s.write_all(&wire::encode(&have)).await?;
            }
            _ => {
                svc.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                let msg = "only GET and HAVE_QUERY are requests".to_string();
                let _ = s.write_all(&wire::encode(&Frame::Error(msg))).await;
                return Ok(());
            }
        }
    }
}

/// Accept connections on `listener` forever, one task each.
///
/// # Errors
/// An error from `accept` that is not about one connection.
pub async fn serve(listener: TcpListener, svc: Arc<Service>) -> io::Result<()> {
    loop {
        let (s, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => return Err(e),
        };
        svc.stats.connections.fetch_add(1, Ordering::Relaxed);
        let svc = svc.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(svc, s).await {
                tracing::debug!("peer {peer}: {e}");
            }
        });
    }
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// A server running on its own thread and runtime; stops when dropped.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    svc: Arc<Service>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// Bind `listen` (port 0 for any) and serve `svc` on a new thread.
    ///
    /// # Errors
    /// Bind errors, runtime creation errors.
    pub fn start(listen: SocketAddr, svc: Arc<Service>) -> io::Result<RunningServer> {
        RunningServer::start_on(std::net::TcpListener::bind(listen)?, svc)
    }

    /// Serve `svc` on an already bound listener, on a new thread.
    ///
    /// # Errors
    /// Runtime creation errors.
    pub fn start_on(
        std_listener: std::net::TcpListener,
        svc: Arc<Service>,
    ) -> io::Result<RunningServer> {
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(128)
            .enable_all()
            .build()?;
        let s2 = svc.clone();
        let thread = std::thread::Builder::new()
            .name(format!("chunk-server {addr}"))
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("chunk server {addr}: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        r = serve(listener, s2) => if let Err(e) = r {
                            tracing::error!("chunk server {addr}: {e}");
                        },
                        _ = stopped => {}
                    }
                });
                rt.shutdown_background();
            })?;
        Ok(RunningServer {
            addr,
            svc,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &ServerStats {
        &self.svc.stats
    }

    /// Whether the server counts repeated chunks (see [`Service::counting_repeats`]).
    pub fn counts_repeats(&self) -> bool {
        self.svc.counts_repeats()
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::peer::client::{Answer, PeerClient};
    use std::time::Duration;

    /// Holds nothing.
    struct Empty;

    impl ChunkSource for Empty {
        fn fetch(&self, id: &ChunkId, _len: usize) -> Result<Vec<u8>, ChunkError> {
            Err(ChunkError::NotFound(*id))
        }
    }

    /// An origin path that takes `0` to produce `1`.
    struct SlowOrigin(Duration, Vec<u8>);

    impl BatchSource for SlowOrigin {
        fn fetch_batch(&self, wants: &[(ChunkId, usize)]) -> Vec<Result<Vec<u8>, ChunkError>> {
            std::thread::sleep(self.0);
            wants.iter().map(|_| Ok(self.1.clone())).collect()
        }
    }

    /// Holds one chunk.
    struct One(ChunkId, Vec<u8>);

    impl ChunkSource for One {
        fn fetch(&self, id: &ChunkId, _len: usize) -> Result<Vec<u8>, ChunkError> {
            if *id == self.0 {
                Ok(self.1.clone())
            } else {
                Err(ChunkError::NotFound(*id))
            }
        }
    }

    #[test]
    fn repeats_are_counted_only_on_a_server_that_asked_for_it() {
        let data = vec![3u8; 4096];
        let id = ChunkId::of(&data);
        for counting in [false, true] {
            let src = Arc::new(One(id, data.clone()));
            let svc = Service::new(src, move |i| *i == id).counting_repeats(counting);
            assert_eq!(svc.counts_repeats(), counting);
            assert_eq!(
                svc.sent.is_some(),
                counting,
                "the set exists only when counting"
            );
            let srv = RunningServer::start("127.0.0.1:0".parse().unwrap(), Arc::new(svc)).unwrap();
            assert_eq!(srv.counts_repeats(), counting);
            let c = PeerClient::new(srv.addr(), Duration::from_secs(5));
            // The same chunk three times: twice again.
            for _ in 0..3 {
                assert_eq!(
                    c.get(&[(id, 4096)], false).unwrap(),
                    vec![Answer::Data(data.clone())]
                );
            }
            let st = srv.stats();
            assert_eq!(st.chunks_served.load(Ordering::Relaxed), 3);
            let (rc, rb) = if counting { (2, 2 * 4096) } else { (0, 0) };
            assert_eq!(st.repeat_chunks.load(Ordering::Relaxed), rc, "{counting}");
            assert_eq!(st.repeat_bytes.load(Ordering::Relaxed), rb, "{counting}");
        }
        assert!(!Service::new(Arc::new(Empty), |_| false).counts_repeats());
    }

    #[test]
    fn a_peer_pulling_slowly_from_the_origin_is_waited_for_a_silent_one_is_not() {
        let data = vec![7u8; 4096];
        let id = ChunkId::of(&data);
        let timeout = Duration::from_millis(400);
        // The pull takes three read timeouts: WAIT frames keep the client waiting.
        let svc = Service::new(Arc::new(Empty), |_| false)
            .with_pull(Arc::new(SlowOrigin(timeout * 3, data.clone())));
        let srv = RunningServer::start("127.0.0.1:0".parse().unwrap(), Arc::new(svc)).unwrap();
        let c = PeerClient::new(srv.addr(), timeout);
        assert_eq!(
            c.get(&[(id, 4096)], true).unwrap(),
            vec![Answer::Data(data.clone())]
        );
        // Without the pull flag the same server answers MISSING at once.
        assert_eq!(c.get(&[(id, 4096)], false).unwrap(), vec![Answer::Missing]);
        // A peer that accepts and never answers still fails after one read timeout.
        let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = PeerClient::new(hung.local_addr().unwrap(), timeout);
        let e = c.get(&[(id, 4096)], true).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
    }
}
