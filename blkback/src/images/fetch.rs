//! The fetcher: how a node gets a chunk it does not hold — from its peers, several at once,
//! else from the origin — and keeps it in its [`NodeCache`].
//!
//! **Who has what: rendezvous hashing, no tracker.** Every node knows the same list of node
//! addresses (its own `me` and its `peers`). For each chunk, every node ranks all nodes by
//! `BLAKE3(address | chunk id)` (highest random weight); the first is the chunk's *home*.
//! The home is the one node that fetches the chunk from the origin; everyone else asks the
//! home with a pull GET, and the home fetches from the origin on the first such request (or
//! its own first read, or when its home stream gets there: [`Fetcher::stream_home`]) and
//! serves its cached copy to every later one. With N nodes deploying
//! the same image, each chunk leaves the origin about once and each node serves about 1/N of
//! the image to the others. Nothing is announced or stored centrally: the ranking is a pure
//! function of the address list and the id, so there is no tracker to lose. The price is
//! that every node must be configured with the same addresses.
//!
//! **Multi-path.** A batch of wanted chunks is split by home: one GET per home peer (and one
//! to the origin for the chunks this node is home of), all in flight at once on their own
//! threads.
//!
//! **HAVE, when homes fail.** A chunk whose home is down, demoted or answered MISSING is
//! retried in further rounds: first the fetcher asks the live peers which of the pending
//! chunks they already hold (HAVE_QUERY) and gets each from one that does (plain GET); else
//! it goes to the next node in the chunk's ranking (pull GET), and when this node comes next
//! in the ranking, or nobody is left, to the origin.
//!
//! **Failures.** Every chunk is checked against its id before it is used or cached. A peer
//! that sends bad bytes is *demoted*: never asked again while this fetcher lives (it costs
//! one retry, never bad data). A peer that fails to answer (connection refused or reset,
//! timeout mid-transfer) is skipped for `down_for` and its chunks go elsewhere at once. A
//! home that is still pulling a chunk from the origin says so (WAIT frames) and is waited
//! for, so a slow origin does not make a chunk leave it twice.
//! A pull request makes the home fetch from the origin only, never from other peers, so
//! requests cannot loop; pull fetches have their own single-flight table, so a node waiting
//! on a peer never blocks a peer waiting on it.
//!
//! **Single flight.** Concurrent reads of the same missing chunk (the guest and the
//! prefetcher, or several peers' pull requests) share one fetch.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::cache::NodeCache;
use super::chunk::{ChunkError, ChunkId, ChunkSource};
use super::peer::client::{Answer, PeerClient};
use super::peer::server::BatchSource;
use super::peer::wire::MAX_BATCH;

/// How a node reaches the others.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// This node's address as the others list it (it takes part in the ranking), or `None`
    /// for a client that serves nobody.
    pub me: Option<SocketAddr>,
    /// The other nodes.
    pub peers: Vec<SocketAddr>,
    /// The origin (a peer-protocol server over the store).
    pub origin: Option<SocketAddr>,
    /// Connect, read and write timeout of each peer call.
    pub timeout: Duration,
    /// How long a peer that failed to answer is skipped.
    pub down_for: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            me: None,
            peers: Vec::new(),
            origin: None,
            timeout: Duration::from_secs(2),
            down_for: Duration::from_secs(5),
        }
    }
}

/// Counters of one fetcher.
#[derive(Debug, Default)]
pub struct FetchStats {
    pub from_cache: AtomicU64,
    pub from_peers: AtomicU64,
    pub bytes_from_peers: AtomicU64,
    pub from_origin: AtomicU64,
    pub bytes_from_origin: AtomicU64,
    /// Chunks received whose bytes did not match their id (discarded).
    pub corrupt_rejected: AtomicU64,
    /// Peer calls that failed (refused, reset, timed out, protocol violation).
    pub peer_failures: AtomicU64,
    pub peers_demoted: AtomicU64,
}

impl FetchStats {
    /// One line for logs and tests' messages.
    pub fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "cache {} | peers {} chunks {} B | origin {} chunks {} B | corrupt rejected {} | peer failures {} | demoted {}",
            g(&self.from_cache),
            g(&self.from_peers),
            g(&self.bytes_from_peers),
            g(&self.from_origin),
            g(&self.bytes_from_origin),
            g(&self.corrupt_rejected),
            g(&self.peer_failures),
            g(&self.peers_demoted),
        )
    }
}

#[derive(Debug)]
struct Peer {
    client: PeerClient,
    down_until: Mutex<Option<Instant>>,
    demoted: AtomicBool,
}

impl Peer {
    fn usable(&self) -> bool {
        !self.demoted.load(Ordering::Relaxed)
            && self.down_until.lock().is_none_or(|t| Instant::now() >= t)
    }
}

#[derive(Debug, Default)]
struct Flight {
    result: Mutex<Option<Result<Vec<u8>, String>>>,
    cv: Condvar,
}

type Flights = Mutex<HashMap<ChunkId, Arc<Flight>>>;
type Results = Vec<Result<Vec<u8>, ChunkError>>;

/// What one GET of a round brought back.
enum Job {
    Peer(std::io::Result<Vec<Answer>>),
    /// Final results from the origin path (already checked).
    Origin(Results),
}

/// Where one GET goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Src {
    Peer { index: usize, pull: bool },
    Origin,
}

/// A node's way to chunks: cache, peers, origin. See the module docs.
#[derive(Debug)]
pub struct Fetcher {
    cache: Arc<NodeCache>,
    me: Option<SocketAddr>,
    peers: Vec<Peer>,
    origin: Option<PeerClient>,
    down_for: Duration,
    flights: Flights,
    origin_flights: Flights,
    pub stats: FetchStats,
}

fn unavailable(name: &str, reason: impl ToString) -> ChunkError {
    ChunkError::Unavailable {
        source_name: name.to_string(),
        reason: reason.to_string(),
    }
}

fn score(addr: &SocketAddr, id: &ChunkId) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(addr.to_string().as_bytes());
    h.update(id.as_bytes());
    let b = h.finalize();
    u64::from_be_bytes(b.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

impl Fetcher {
    pub fn new(cache: Arc<NodeCache>, cfg: FetchConfig) -> Fetcher {
        Fetcher {
            cache,
            me: cfg.me,
            peers: cfg
                .peers
                .iter()
                .filter(|p| Some(**p) != cfg.me)
                .map(|a| Peer {
                    client: PeerClient::new(*a, cfg.timeout),
                    down_until: Mutex::new(None),
                    demoted: AtomicBool::new(false),
                })
                .collect(),
            origin: cfg.origin.map(|a| PeerClient::new(a, cfg.timeout)),
            down_for: cfg.down_for,
            flights: Mutex::new(HashMap::new()),
            origin_flights: Mutex::new(HashMap::new()),
            stats: FetchStats::default(),
        }
    }

    pub fn cache(&self) -> &Arc<NodeCache> {
        &self.cache
    }

    /// The home of `id` among this node and its peers (`None` = this node), ignoring
    /// liveness. Every node with the same address list computes the same answer.
    pub fn home_of(&self, id: &ChunkId) -> Option<SocketAddr> {
        let me = self.me.map(|a| (score(&a, id), None));
        let peers = self
            .peers
            .iter()
            .map(|p| (score(&p.client.addr(), id), Some(p.client.addr())));
        me.into_iter().chain(peers).max().and_then(|(_, a)| a)
    }

    /// Whether peer `addr` has been demoted for serving bad chunks.
    pub fn is_demoted(&self, addr: SocketAddr) -> bool {
        self.peers
            .iter()
            .any(|p| p.client.addr() == addr && p.demoted.load(Ordering::Relaxed))
    }

    /// Get every chunk of `wants` (id and length): from the cache, else peers and origin.
    /// One result per want, in order; fetched chunks are cached.
    pub fn fetch_many(&self, wants: &[(ChunkId, usize)]) -> Results {
        self.single_flight(&self.flights, wants, |w| self.fetch_remote(w))
    }

    /// As [`Fetcher::fetch_many`], but from the origin only (the pull-through path a peer
    /// triggers; never asks other peers, so pull requests cannot loop).
    pub fn fetch_from_origin(&self, wants: &[(ChunkId, usize)]) -> Results {
        self.single_flight(&self.origin_flights, wants, |w| self.origin_batch(w))
    }

    /// Fetch `order` into the cache, `batch` chunks per request, with `parallel` requests in
    /// flight, stopping early when `stop` is set. Returns how many chunks could not be had.
    pub fn prefetch(
        &self,
        order: &[(ChunkId, usize)],
        batch: usize,
        parallel: usize,
        stop: &AtomicBool,
    ) -> usize {
        self.pump(order, batch, parallel, stop, |w| self.fetch_many(w))
    }

    /// Stream the chunks of `order` this node is the home of from the origin into the cache,
    /// in that order, `batch` chunks per request and `parallel` requests in flight, until
    /// done or `stop`: what keeps the origin link busy from the start of a deployment,
    /// whatever the peers ask when. Goes through the origin single-flight table, shared with
    /// the pull requests peers send, so no chunk is fetched twice. Does nothing without peers
    /// or origin. Returns how many chunks could not be had.
    pub fn stream_home(
        &self,
        order: &[(ChunkId, usize)],
        batch: usize,
        parallel: usize,
        stop: &AtomicBool,
    ) -> usize {
        if self.peers.is_empty() || self.origin.is_none() || self.me.is_none() {
            return 0;
        }
        let mine: Vec<(ChunkId, usize)> = order
            .iter()
            .filter(|(id, _)| self.home_of(id).is_none())
            .copied()
            .collect();
        self.pump(&mine, batch, parallel, stop, |w| self.fetch_from_origin(w))
    }

    fn pump(
        &self,
        order: &[(ChunkId, usize)],
        batch: usize,
        parallel: usize,
        stop: &AtomicBool,
        fetch: impl Fn(&[(ChunkId, usize)]) -> Results + Sync,
    ) -> usize {
        let batch = batch.clamp(1, MAX_BATCH);
        let next = AtomicUsize::new(0);
        let failed = AtomicUsize::new(0);
        let batches: Vec<&[(ChunkId, usize)]> = order.chunks(batch).collect();
        std::thread::scope(|s| {
            for _ in 0..parallel.max(1) {
                s.spawn(|| loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(b) = batches.get(i) else { return };
                    let wants: Vec<(ChunkId, usize)> = b
                        .iter()
                        .filter(|(id, _)| !self.cache.contains(id))
                        .copied()
                        .collect();
                    if wants.is_empty() {
                        continue;
                    }
                    let bad = fetch(&wants).iter().filter(|r| r.is_err()).count();
                    failed.fetch_add(bad, Ordering::Relaxed);
                });
            }
        });
        failed.into_inner()
    }

    fn single_flight(
        &self,
        table: &Flights,
        wants: &[(ChunkId, usize)],
        work: impl FnOnce(&[(ChunkId, usize)]) -> Results,
    ) -> Results {
        let mut out: Vec<Option<Result<Vec<u8>, ChunkError>>> = Vec::with_capacity(wants.len());
        let mut mine: Vec<(usize, Arc<Flight>)> = Vec::new();
        let mut theirs: Vec<(usize, Arc<Flight>)> = Vec::new();
        for (i, (id, len)) in wants.iter().enumerate() {
            match self.cache.get(id) {
                Ok(Some(d)) if d.len() == *len => {
                    self.stats.from_cache.fetch_add(1, Ordering::Relaxed);
                    out.push(Some(Ok(d)));
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("node cache read of {id}: {e}"),
            }
            // A flight is removed from the table only after its chunk is in the cache, so
            // if there is no flight and the cache has the chunk now, it landed meanwhile.
            let mut t = table.lock();
            if let Some(f) = t.get(id) {
                theirs.push((i, f.clone()));
                out.push(None);
                continue;
            }
            if self.cache.contains(id) {
                drop(t);
                if let Ok(Some(d)) = self.cache.get(id) {
                    if d.len() == *len {
                        self.stats.from_cache.fetch_add(1, Ordering::Relaxed);
                        out.push(Some(Ok(d)));
                        continue;
                    }
                }
                t = table.lock();
            }
            out.push(None);
            match t.get(id) {
                Some(f) => theirs.push((i, f.clone())),
                None => {
                    let f = Arc::new(Flight::default());
                    t.insert(*id, f.clone());
                    mine.push((i, f));
                }
            }
        }
        if !mine.is_empty() {
            let ask: Vec<(ChunkId, usize)> = mine.iter().map(|(i, _)| wants[*i]).collect();
            let got = work(&ask);
            for ((i, flight), r) in mine.into_iter().zip(got) {
                let id = wants[i].0;
                if let Ok(d) = &r {
                    if let Err(e) = self.cache.insert(&id, d) {
                        tracing::warn!("node cache insert of {id}: {e}");
                    }
                }
                *flight.result.lock() = Some(match &r {
                    Ok(d) => Ok(d.clone()),
                    Err(e) => Err(e.to_string()),
                });
                flight.cv.notify_all();
                table.lock().remove(&id);
                out[i] = Some(r);
            }
        }
        for (i, flight) in theirs {
            let mut g = flight.result.lock();
            while g.is_none() {
                flight.cv.wait(&mut g);
            }
            out[i] = Some(match g.as_ref() {
                Some(Ok(d)) => Ok(d.clone()),
                Some(Err(e)) => Err(unavailable("shared fetch", e)),
                None => Err(unavailable("shared fetch", "no result")),
            });
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(unavailable("fetcher", "no result"))))
            .collect()
    }

    /// Where to ask for `id` next, given the sources already tried for it.
    fn route(&self, id: &ChunkId, tried: &[Src], hint: Option<usize>) -> Option<Src> {
        if let Some(h) = hint {
            let src = Src::Peer {
                index: h,
                pull: false,
            };
            if !tried.contains(&src) && self.peers[h].usable() {
                return Some(src);
            }
        }
        let mut ranking: Vec<(u64, Option<usize>)> = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| (score(&p.client.addr(), id), Some(i)))
            .collect();
        if let Some(me) = self.me {
            ranking.push((score(&me, id), None));
        }
        ranking.sort_unstable_by(|a, b| b.cmp(a));
        for (_, who) in ranking {
            match who {
                None => break,
                Some(i) => {
                    let was_tried = tried
                        .iter()
                        .any(|s| matches!(s, Src::Peer { index, .. } if *index == i));
                    if !was_tried && self.peers[i].usable() {
                        return Some(Src::Peer {
                            index: i,
                            pull: true,
                        });
                    }
                }
            }
        }
        (self.origin.is_some() && !tried.contains(&Src::Origin)).then_some(Src::Origin)
    }

    fn peer_failed(&self, index: usize, why: &std::io::Error) {
        let p = &self.peers[index];
        tracing::info!(
            "peer {} failed: {why}; skipped for {:?}",
            p.client.addr(),
            self.down_for
        );
        self.stats.peer_failures.fetch_add(1, Ordering::Relaxed);
        *p.down_until.lock() = Some(Instant::now() + self.down_for);
        p.client.reset();
    }

    fn demote(&self, index: usize, id: &ChunkId) {
        let p = &self.peers[index];
        self.stats.corrupt_rejected.fetch_add(1, Ordering::Relaxed);
        if !p.demoted.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "peer {} served bad bytes for {id}: demoted",
                p.client.addr()
            );
            self.stats.peers_demoted.fetch_add(1, Ordering::Relaxed);
            p.client.reset();
        }
    }

    /// Ask the live peers which of `ids` they hold: for each id, the first peer that does.
    fn have_hints(&self, ids: &[ChunkId]) -> Vec<Option<usize>> {
        let mut hints = vec![None; ids.len()];
        let live: Vec<usize> = (0..self.peers.len())
            .filter(|&i| self.peers[i].usable())
            .collect();
        let answers: Vec<(usize, usize, Vec<bool>)> = std::thread::scope(|s| {
            let handles: Vec<_> = live
                .iter()
                .flat_map(|&p| {
                    ids.chunks(MAX_BATCH)
                        .enumerate()
                        .map(move |(b, part)| (p, b, part))
                })
                .map(|(p, b, part)| s.spawn(move || (p, b, self.peers[p].client.have(part))))
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().ok())
                .filter_map(|(p, b, r)| match r {
                    Ok(bits) => Some((p, b, bits)),
                    Err(e) => {
                        self.peer_failed(p, &e);
                        None
                    }
                })
                .collect()
        });
        for (p, b, bits) in answers {
            for (k, has) in bits.into_iter().enumerate() {
                let slot = &mut hints[b * MAX_BATCH + k];
                if has && slot.is_none() {
                    *slot = Some(p);
                }
            }
        }
        hints
    }

    fn fetch_remote(&self, wants: &[(ChunkId, usize)]) -> Results {
        let n = wants.len();
        let mut out: Vec<Option<Result<Vec<u8>, ChunkError>>> = (0..n).map(|_| None).collect();
        let mut tried: Vec<Vec<Src>> = vec![Vec::new(); n];
        let mut hints: Vec<Option<usize>> = vec![None; n];
        for round in 0..self.peers.len() + 3 {
            let pending: Vec<usize> = (0..n).filter(|&i| out[i].is_none()).collect();
            if pending.is_empty() {
                break;
            }
            if round > 0 && !self.peers.is_empty() {
                let ids: Vec<ChunkId> = pending.iter().map(|&i| wants[i].0).collect();
                for (&i, h) in pending.iter().zip(self.have_hints(&ids)) {
                    hints[i] = h;
                }
            }
            let mut groups: HashMap<Src, Vec<usize>> = HashMap::new();
            for &i in &pending {
                match self.route(&wants[i].0, &tried[i], hints[i]) {
                    Some(src) => groups.entry(src).or_default().push(i),
                    None => {
                        let why = if self.origin.is_none() {
                            "no peer has it and there is no origin"
                        } else {
                            "every peer and the origin failed"
                        };
                        out[i] = Some(Err(unavailable("fetcher", why)));
                    }
                }
            }
            let jobs: Vec<(Src, Vec<usize>)> = groups
                .into_iter()
                .flat_map(|(src, idx)| {
                    idx.chunks(MAX_BATCH)
                        .map(|c| (src, c.to_vec()))
                        .collect::<Vec<_>>()
                })
                .collect();
            let answers = std::thread::scope(|s| {
                let handles: Vec<_> = jobs
                    .iter()
                    .map(|(src, idx)| {
                        s.spawn(move || {
                            let ask: Vec<(ChunkId, u32)> = idx
                                .iter()
                                .map(|&i| (wants[i].0, wants[i].1 as u32))
                                .collect();
                            match src {
                                Src::Peer { index, pull } => {
                                    Job::Peer(self.peers[*index].client.get(&ask, *pull))
                                }
                                // Through the origin single-flight table, shared with the
                                // pull requests peers send this node as the chunks' home.
                                Src::Origin => Job::Origin(self.fetch_from_origin(
                                    &idx.iter().map(|&i| wants[i]).collect::<Vec<_>>(),
                                )),
                            }
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Job::Peer(Err(std::io::Error::other("fetch thread panicked")))
                        })
                    })
                    .collect::<Vec<_>>()
            });
            for ((src, idx), answer) in jobs.iter().zip(answers) {
                let answer = match answer {
                    Job::Origin(results) => {
                        for (&i, r) in idx.iter().zip(results) {
                            out[i] = Some(r);
                        }
                        continue;
                    }
                    Job::Peer(a) => a,
                };
                match answer {
                    Err(e) => {
                        if let Src::Peer { index, .. } = src {
                            self.peer_failed(*index, &e);
                        }
                        for &i in idx {
                            tried[i].push(*src);
                        }
                    }
                    Ok(list) => {
                        for (&i, a) in idx.iter().zip(list) {
                            let id = wants[i].0;
                            match a {
                                Answer::Data(d) if id.matches(&d) => {
                                    let (c, b) = match src {
                                        Src::Origin => {
                                            (&self.stats.from_origin, &self.stats.bytes_from_origin)
                                        }
                                        Src::Peer { .. } => {
                                            (&self.stats.from_peers, &self.stats.bytes_from_peers)
                                        }
                                    };
                                    c.fetch_add(1, Ordering::Relaxed);
                                    b.fetch_add(d.len() as u64, Ordering::Relaxed);
                                    out[i] = Some(Ok(d));
                                }
                                Answer::Data(_) => {
                                    match src {
                                        Src::Peer { index, .. } => self.demote(*index, &id),
                                        Src::Origin => {
                                            self.stats
                                                .corrupt_rejected
                                                .fetch_add(1, Ordering::Relaxed);
                                            out[i] = Some(Err(ChunkError::Corrupt {
                                                id,
                                                source_name: "origin".into(),
                                            }));
                                        }
                                    }
                                    tried[i].push(*src);
                                }
                                Answer::Missing => {
                                    tried[i].push(*src);
                                    if *src == Src::Origin {
                                        out[i] = Some(Err(ChunkError::NotFound(id)));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(unavailable("fetcher", "out of retries"))))
            .collect()
    }

    fn origin_batch(&self, wants: &[(ChunkId, usize)]) -> Results {
        let Some(origin) = &self.origin else {
            return wants
                .iter()
                .map(|_| Err(unavailable("fetcher", "no origin configured")))
                .collect();
        };
        let mut out = Vec::with_capacity(wants.len());
        for part in wants.chunks(MAX_BATCH) {
            let ask: Vec<(ChunkId, u32)> = part.iter().map(|(id, l)| (*id, *l as u32)).collect();
            // One retry on a fresh connection: a pooled one may have gone stale.
            let got = origin.get(&ask, false).or_else(|_| {
                origin.reset();
                origin.get(&ask, false)
            });
            match got {
                Err(e) => out.extend(part.iter().map(|_| Err(unavailable("origin", &e)))),
                Ok(list) => {
                    for ((id, _), a) in part.iter().zip(list) {
                        out.push(match a {
                            Answer::Data(d) if id.matches(&d) => {
                                self.stats.from_origin.fetch_add(1, Ordering::Relaxed);
                                self.stats
                                    .bytes_from_origin
                                    .fetch_add(d.len() as u64, Ordering::Relaxed);
                                Ok(d)
                            }
                            Answer::Data(_) => {
                                self.stats.corrupt_rejected.fetch_add(1, Ordering::Relaxed);
                                Err(ChunkError::Corrupt {
                                    id: *id,
                                    source_name: "origin".into(),
                                })
                            }
                            Answer::Missing => Err(ChunkError::NotFound(*id)),
                        });
                    }
                }
            }
        }
        out
    }
}

impl ChunkSource for Fetcher {
    fn fetch(&self, id: &ChunkId, len: usize) -> Result<Vec<u8>, ChunkError> {
        self.fetch_many(&[(*id, len)])
            .pop()
            .unwrap_or(Err(ChunkError::NotFound(*id)))
    }
}

/// The fetcher's origin-only path, as the pull source of this node's server.
#[derive(Debug, Clone)]
pub struct OriginPath(pub Arc<Fetcher>);

impl BatchSource for OriginPath {
    fn fetch_batch(&self, wants: &[(ChunkId, usize)]) -> Results {
        self.0.fetch_from_origin(wants)
    }
}
