//! The memory-server client used by paging and the block backend.
//!
//! - Pages are sealed ([`seal`]) before they leave the host; servers hold ciphertext only.
//! - Placement is rendezvous hashing ([`placement`]) over the configured servers. The
//!   persistent pool writes `replicas` copies and acknowledges only when every one of them is
//!   stored; a server that is down, slow or full (`PersistentFull`) is replaced by the next in
//!   the page's preference list. The ephemeral pool writes one copy.
//! - Where each page lives and which version is current is kept in a location map, so a read
//!   knows the version to expect (a stale page replayed by a server is detected) and which
//!   replicas to try, in order.
//! - Every server has a pool of pipelined connections ([`connection`]) and health tracking
//!   ([`server_link`]); a background probe pings servers, and when one goes down the client
//!   re-replicates the persistent pages it held from their surviving replicas ([`Client::
//!   repair`]).
//! - [`BlockingClient`] wraps all of it for threads that are not async.

mod blocking;
mod connection;
mod error;
pub mod placement;
pub mod seal;
mod server_link;
mod sync_conn;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::task::JoinSet;

pub use blocking::BlockingClient;
pub use connection::Connection;
pub use error::ClientError;
pub use seal::{PageCipher, PageSecret, SealError};
pub use server_link::ServerHealth;

use crate::protocol::auth::AuthKey;
use crate::protocol::control::StatsSnapshot;
use crate::protocol::frame::{MAX_BATCH, MAX_PAYLOAD};
use crate::protocol::{Pool, Reply, ReplyBody, Request, Status};
use server_link::ServerLink;

/// Default [`ClientConfig::reply_spin`].
pub const DEFAULT_REPLY_SPIN: Duration = Duration::from_micros(100);

/// Most copies of a persistent page.
pub const MAX_REPLICAS: usize = 4;

/// Validated client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub servers: Vec<SocketAddr>,
    /// Pre-shared key for the servers' challenge-response.
    pub auth_key: Option<AuthKey>,
    /// Secret from which per-namespace page keys are derived.
    pub page_secret: PageSecret,
    /// Copies of each persistent page (1..=MAX_REPLICAS, at most the number of servers).
    pub replicas: usize,
    pub connections_per_server: usize,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long a down server is skipped before it is tried again.
    pub retry_after: Duration,
    /// Probe interval of the background health check (also drives automatic repair).
    pub probe_interval: Duration,
    /// Re-replicate persistent pages automatically when a server goes down.
    pub auto_repair: bool,
    /// How long a blocking read ([`Client::get_batch_blocking`]) polls its socket for the
    /// reply before the thread sleeps: trades up to this much CPU per read for not paying a
    /// thread wake-up (tens of microseconds on a VM). Zero: always sleep.
    pub reply_spin: Duration,
}

impl ClientConfig {
    /// Two replicas, two connections per server, 2 s request timeout, 1 s retry, repair on,
    /// blocking reads poll up to 100 µs before sleeping.
    pub fn new(
        servers: Vec<SocketAddr>,
        auth_key: Option<AuthKey>,
        page_secret: PageSecret,
    ) -> Self {
        ClientConfig {
            replicas: 2.min(servers.len().max(1)),
            servers,
            auth_key,
            page_secret,
            connections_per_server: 2,
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            retry_after: Duration::from_secs(1),
            probe_interval: Duration::from_millis(500),
            auto_repair: true,
            reply_spin: DEFAULT_REPLY_SPIN,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Location {
    version: u64,
    n: u8,
    servers: [u16; MAX_REPLICAS],
}

impl Location {
    fn new(version: u64, servers: &[u16]) -> Location {
        let mut s = [0u16; MAX_REPLICAS];
        let n = servers.len().min(MAX_REPLICAS);
        s[..n].copy_from_slice(&servers[..n]);
        Location {
            version,
            n: n as u8,
            servers: s,
        }
    }

    fn servers(&self) -> &[u16] {
        &self.servers[..self.n as usize]
    }
}

type PageId = (Pool, u64, u64);

/// What a [`Client::repair`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Persistent pages that had a replica on a down server.
    pub affected: u64,
    /// Of those, pages copied to a new server (back to full replication).
    pub repaired: u64,
    /// Pages still short of replicas (no spare server, or the copy failed).
    pub degraded: u64,
    /// Pages with no readable replica left.
    pub lost: u64,
}

#[derive(Debug)]
struct Inner {
    servers: Vec<ServerLink>,
    seeds: Vec<u64>,
    cipher: PageCipher,
    locations: DashMap<PageId, Location>,
    version: AtomicU64,
    replicas: usize,
    auto_repair: bool,
    repair_requested: AtomicBool,
    repairing: tokio::sync::Mutex<()>,
}

/// Async client; clone freely (all clones share the connections and the location map).
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

fn want(inner: &Inner, pool: Pool) -> usize {
    match pool {
        Pool::Persistent => inner.replicas,
        Pool::Ephemeral => 1,
    }
}

fn reply_error(addr: SocketAddr, r: &Reply) -> ClientError {
    ClientError::Refused {
        addr,
        status: r.status,
        reason: match &r.body {
            ReplyBody::Error(s) => s.clone(),
            _ => String::new(),
        },
    }
}

impl Client {
    /// Build the client, try every server once (so a wrong key shows at once), and start the
    /// background health probe. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// `NoServers`, or the last server's error when none of them could be reached.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        if config.servers.is_empty() {
            return Err(ClientError::NoServers);
        }
        let servers: Vec<ServerLink> = config
            .servers
            .iter()
            .map(|a| {
                ServerLink::new(
                    *a,
                    config.connections_per_server,
                    config.auth_key.clone(),
                    config.request_timeout,
                    config.connect_timeout,
                    config.retry_after,
                    config.reply_spin,
                )
            })
            .collect();
        let inner = Arc::new(Inner {
            seeds: servers.iter().map(|s| s.seed).collect(),
            servers,
            cipher: PageCipher::new(config.page_secret.clone()),
            locations: DashMap::new(),
            version: AtomicU64::new(1),
            replicas: config
                .replicas
                .clamp(1, MAX_REPLICAS.min(config.servers.len())),
            auto_repair: config.auto_repair,
            repair_requested: AtomicBool::new(false),
            repairing: tokio::sync::Mutex::new(()),
        });
        let mut last_err = None;
        let mut reachable = 0;
        for s in &inner.servers {
            match s.call(&Request::Ping).await.0 {
                Ok(_) => reachable += 1,
                Err(e) => {
                    tracing::warn!(addr = %s.addr, error = %e, "memory server unreachable");
                    last_err = Some(e);
                }
            }
        }
        if reachable == 0 {
            return Err(last_err.expect("at least one server"));
        }
        tokio::spawn(probe_loop(Arc::downgrade(&inner), config.probe_interval));
        Ok(Client { inner })
    }

    /// Health of every configured server.
    pub fn health(&self) -> Vec<ServerHealth> {
        self.inner.servers.iter().map(ServerLink::health).collect()
    }

    /// The servers currently holding a page (for tests and diagnostics).
    pub fn replicas_of(&self, pool: Pool, namespace: u64, key: u64) -> Vec<SocketAddr> {
        self.inner
            .locations
            .get(&(pool, namespace, key))
            .map(|l| {
                l.servers()
                    .iter()
                    .map(|&i| self.inner.servers[i as usize].addr)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Store one page. Persistent pages are acknowledged only once every replica has them.
    ///
    /// # Errors
    /// `NotEnoughReplicas` (the page is not safely stored; keep it locally), or the server's
    /// refusal for the ephemeral pool.
    pub async fn put(
        &self,
        pool: Pool,
        namespace: u64,
        key: u64,
        page: &[u8],
    ) -> Result<(), ClientError> {
        self.put_batch(pool, namespace, &[(key, page)]).await
    }

    /// Store many pages of one namespace, batched per server.
    ///
    /// # Errors
    /// As [`Client::put`]; pages that were stored stay stored.
    pub async fn put_batch(
        &self,
        pool: Pool,
        namespace: u64,
        pages: &[(u64, &[u8])],
    ) -> Result<(), ClientError> {
        let inner = &self.inner;
        let want = want(inner, pool);
        let sealed: Vec<(u64, u64, Bytes)> = pages
            .iter()
            .map(|(k, p)| {
                let v = inner.version.fetch_add(1, Relaxed);
                (
                    *k,
                    v,
                    Bytes::from(inner.cipher.seal(pool, namespace, *k, v, p)),
                )
            })
            .collect();
        // First choice: the top `want` usable servers of each page.
        let mut groups: HashMap<u16, Vec<usize>> = HashMap::new();
        let mut ranked: Vec<Vec<u16>> = Vec::with_capacity(sealed.len());
        for (i, (k, _, _)) in sealed.iter().enumerate() {
            let r: Vec<u16> = placement::rank(&inner.seeds, namespace, *k)
                .into_iter()
                .map(|s| s as u16)
                .collect();
            for &s in r
                .iter()
                .filter(|&&s| inner.servers[s as usize].is_usable())
                .take(want)
            {
                groups.entry(s).or_default().push(i);
            }
            ranked.push(r);
        }
        let mut stored: Vec<Vec<u16>> = vec![Vec::new(); sealed.len()];
        let mut reqs = Vec::new();
        for (server, idxs) in groups {
            for chunk in chunk_entries(&idxs, |i| sealed[i].2.len()) {
                let entries: Vec<(u64, Bytes)> = chunk
                    .iter()
                    .map(|&i| (sealed[i].0, sealed[i].2.clone()))
                    .collect();
                let req = if entries.len() == 1 {
                    let (key, value) = entries.into_iter().next().expect("one entry");
                    Request::Put {
                        pool,
                        namespace,
                        key,
                        value,
                    }
                } else {
                    Request::PutBatch {
                        pool,
                        namespace,
                        entries,
                    }
                };
                reqs.push((server, chunk, req));
            }
        }
        for (server, chunk, r) in inner.call_all(reqs).await {
            match r {
                Ok(Reply {
                    status: Status::Ok,
                    body: ReplyBody::Statuses(st),
                    ..
                }) => {
                    for (&i, s) in chunk.iter().zip(st) {
                        if s == Status::Ok {
                            stored[i].push(server);
                        }
                    }
                }
                Ok(Reply {
                    status: Status::Ok,
                    body: ReplyBody::Done,
                    ..
                }) if chunk.len() == 1 => stored[chunk[0]].push(server),
                Ok(r) => tracing::debug!(server, status = ?r.status, "put refused"),
                Err(e) => tracing::debug!(server, error = %e, "put failed"),
            }
        }
        let mut first_err = None;
        for (i, (key, version, blob)) in sealed.into_iter().enumerate() {
            let mut have = std::mem::take(&mut stored[i]);
            if have.len() < want {
                let exclude: Vec<u16> = have.clone();
                match inner
                    .place_more(
                        pool, namespace, key, &blob, want, have, &ranked[i], &exclude,
                    )
                    .await
                {
                    Ok(h) => have = h,
                    Err((h, e)) => {
                        // Not acknowledged: forget the partial copies' location, remove them.
                        inner.delete_copies(pool, namespace, key, &h);
                        first_err.get_or_insert(e);
                        continue;
                    }
                }
            }
            let old = inner
                .locations
                .insert((pool, namespace, key), Location::new(version, &have));
            if let Some(old) = old {
                let gone: Vec<u16> = old
                    .servers()
                    .iter()
                    .copied()
                    .filter(|s| !have.contains(s))
                    .collect();
                inner.delete_copies(pool, namespace, key, &gone);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Fetch one page. `Ok(None)` when it was never stored (or, for the ephemeral pool, when
    /// the server dropped it).
    ///
    /// # Errors
    /// `Integrity` for a tampered, swapped or stale page on every replica; `Unavailable` when
    /// no replica of a persistent page answered.
    pub async fn get(
        &self,
        pool: Pool,
        namespace: u64,
        key: u64,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        Ok(self
            .get_batch(pool, namespace, &[key])
            .await?
            .pop()
            .flatten())
    }

    /// Fetch many pages of one namespace, batched per server; falls back to other replicas
    /// page by page.
    ///
    /// # Errors
    /// As [`Client::get`], for the first page that fails.
    pub async fn get_batch(
        &self,
        pool: Pool,
        namespace: u64,
        keys: &[u64],
    ) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        let inner = &self.inner;
        let (mut got, reqs) = GetPlan::new(inner, pool, namespace, keys);
        for (_, chunk, r) in inner.call_all(reqs).await {
            got.absorb(inner, &chunk, r);
        }
        got.finish(inner).await
    }

    /// [`Client::get_batch`] for a thread that may block (not an async executor's), such as
    /// a pager or block-backend worker: when the pages need one request to one server, this
    /// thread sends it and reads the reply on a blocking connection of its own, without a
    /// hand-off to the runtime's tasks. Anything else (several servers, replica fallback,
    /// repair) runs as [`Client::get_batch`] does, driven by `handle`.
    ///
    /// # Panics
    /// If called from inside an async task (as `Handle::block_on` does).
    ///
    /// # Errors
    /// As [`Client::get_batch`].
    pub fn get_batch_blocking(
        &self,
        handle: &tokio::runtime::Handle,
        pool: Pool,
        namespace: u64,
        keys: &[u64],
    ) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        let inner = &self.inner;
        let (mut got, mut reqs) = GetPlan::new(inner, pool, namespace, keys);
        if reqs.len() != 1 {
            return handle.block_on(async move {
                for (_, chunk, r) in inner.call_all(reqs).await {
                    got.absorb(inner, &chunk, r);
                }
                got.finish(inner).await
            });
        }
        let (server, chunk, req) = reqs.pop().expect("one request");
        let link = &inner.servers[server as usize];
        let (r, went_down) = link.call_blocking(&req);
        if went_down {
            let _g = handle.enter();
            inner.server_went_down(server);
        }
        got.absorb(inner, &chunk, r);
        if got.all_done() {
            return Ok(got.out);
        }
        handle.block_on(got.finish(inner))
    }

    /// Delete one page from every replica.
    ///
    /// # Errors
    /// None today (a down replica's copy is removed when its namespace is dropped); kept
    /// fallible for symmetry.
    pub async fn delete(&self, pool: Pool, namespace: u64, key: u64) -> Result<(), ClientError> {
        if let Some((_, l)) = self.inner.locations.remove(&(pool, namespace, key)) {
            for &s in l.servers() {
                let _ = self
                    .inner
                    .call(
                        s,
                        &Request::Delete {
                            pool,
                            namespace,
                            key,
                        },
                    )
                    .await;
            }
        }
        Ok(())
    }

    /// Delete many pages, batched per server.
    ///
    /// # Errors
    /// As [`Client::delete`].
    pub async fn delete_batch(
        &self,
        pool: Pool,
        namespace: u64,
        keys: &[u64],
    ) -> Result<(), ClientError> {
        let mut groups: HashMap<u16, Vec<u64>> = HashMap::new();
        for k in keys {
            if let Some((_, l)) = self.inner.locations.remove(&(pool, namespace, *k)) {
                for &s in l.servers() {
                    groups.entry(s).or_default().push(*k);
                }
            }
        }
        for (s, ks) in groups {
            for c in ks.chunks(MAX_BATCH as usize) {
                let req = Request::DeleteBatch {
                    pool,
                    namespace,
                    keys: c.to_vec(),
                };
                let _ = self.inner.call(s, &req).await;
            }
        }
        Ok(())
    }

    /// Free a namespace (a destroyed VM) on every server. Returns pages freed.
    ///
    /// # Errors
    /// The first server that could not be told (its pages stay until it is told again).
    pub async fn drop_namespace(&self, namespace: u64) -> Result<u64, ClientError> {
        self.inner
            .locations
            .retain(|(_, ns, _), _| *ns != namespace);
        let mut pages = 0;
        let mut first_err = None;
        for i in 0..self.inner.servers.len() {
            match self
                .inner
                .call(i as u16, &Request::DropNamespace { namespace })
                .await
            {
                Ok(Reply {
                    body: ReplyBody::Dropped { pages: p, .. },
                    ..
                }) => pages += p,
                Ok(r) => {
                    first_err.get_or_insert(reply_error(self.inner.servers[i].addr, &r));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(pages),
        }
    }

    /// STATS from every server.
    pub async fn stats(&self) -> Vec<(SocketAddr, Result<StatsSnapshot, ClientError>)> {
        let mut out = Vec::new();
        for (i, s) in self.inner.servers.iter().enumerate() {
            let r = match self.inner.call(i as u16, &Request::Stats).await {
                Ok(Reply {
                    status: Status::Ok,
                    body: ReplyBody::Stats(st),
                    ..
                }) => Ok(*st),
                Ok(r) => Err(reply_error(s.addr, &r)),
                Err(e) => Err(e),
            };
            out.push((s.addr, r));
        }
        out
    }

    /// Re-replicate every persistent page that has a copy on a down server.
    pub async fn repair(&self) -> RepairReport {
        self.inner.repair().await
    }
}

/// A GET or GET-BATCH in progress: what each page expects, and what came back so far.
struct GetPlan<'k> {
    pool: Pool,
    namespace: u64,
    keys: &'k [u64],
    locs: Vec<Option<Location>>,
    out: Vec<Option<Vec<u8>>>,
    done: Vec<bool>,
}

/// Requests of a [`GetPlan`]: server, indices of the pages asked, request.
type GetRequests = Vec<(u16, Vec<usize>, Request)>;

impl<'k> GetPlan<'k> {
    /// Look the pages up and group them per server (first up replica), batched.
    fn new(inner: &Inner, pool: Pool, namespace: u64, keys: &'k [u64]) -> (Self, GetRequests) {
        let locs: Vec<Option<Location>> = keys
            .iter()
            .map(|k| inner.locations.get(&(pool, namespace, *k)).map(|l| *l))
            .collect();
        let mut done = vec![false; keys.len()];
        let mut groups: HashMap<u16, Vec<usize>> = HashMap::new();
        for (i, l) in locs.iter().enumerate() {
            match l {
                None => done[i] = true,
                Some(l) => {
                    let first = l
                        .servers()
                        .iter()
                        .copied()
                        .find(|&s| inner.servers[s as usize].is_up())
                        .or_else(|| l.servers().first().copied());
                    if let Some(s) = first {
                        groups.entry(s).or_default().push(i);
                    }
                }
            }
        }
        let mut reqs = Vec::new();
        for (server, idxs) in groups {
            for chunk in idxs.chunks(MAX_BATCH as usize) {
                let chunk = chunk.to_vec();
                let req = if chunk.len() == 1 {
                    Request::Get {
                        pool,
                        namespace,
                        key: keys[chunk[0]],
                    }
                } else {
                    Request::GetBatch {
                        pool,
                        namespace,
                        keys: chunk.iter().map(|&i| keys[i]).collect(),
                    }
                };
                reqs.push((server, chunk, req));
            }
        }
        let plan = GetPlan {
            pool,
            namespace,
            keys,
            locs,
            out: vec![None; keys.len()],
            done,
        };
        (plan, reqs)
    }

    /// Take one request's reply: open and verify every value it carries. Pages it did not
    /// settle stay undone for [`GetPlan::finish`].
    fn absorb(&mut self, inner: &Inner, chunk: &[usize], r: Result<Reply, ClientError>) {
        let (pool, namespace) = (self.pool, self.namespace);
        let values: Vec<Option<Bytes>> = match r {
            Ok(Reply {
                status: Status::Ok,
                body: ReplyBody::Values(v),
                ..
            }) => v,
            Ok(Reply {
                status: Status::Ok,
                body: ReplyBody::Value(v),
                ..
            }) => vec![Some(v)],
            Ok(Reply {
                status: Status::NotFound,
                ..
            }) => vec![None],
            _ => return, // fall back page by page in `finish`
        };
        for (&i, v) in chunk.iter().zip(values) {
            let Some(v) = v else {
                if pool == Pool::Ephemeral {
                    self.done[i] = true; // a miss is normal
                }
                continue;
            };
            let l = self.locs[i].expect("grouped pages have a location");
            if let Ok(p) = inner
                .cipher
                .open(pool, namespace, self.keys[i], l.version, &v)
            {
                self.out[i] = Some(p);
                self.done[i] = true;
            }
        }
    }

    fn all_done(&self) -> bool {
        self.done.iter().all(|d| *d)
    }

    /// Fetch every page not settled yet from its replicas, one by one.
    async fn finish(mut self, inner: &Arc<Inner>) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        for i in 0..self.keys.len() {
            if !self.done[i] {
                let l = self.locs[i].expect("undone pages have a location");
                self.out[i] = inner
                    .get_from_replicas(self.pool, self.namespace, self.keys[i], l)
                    .await?;
            }
        }
        Ok(self.out)
    }
}

/// One STATS request to one server on a fresh connection (for `remoca memserver stats`).
///
/// # Errors
/// Connection, authentication or protocol failures.
pub async fn fetch_stats(
    addr: SocketAddr,
    auth_key: Option<&AuthKey>,
    timeout: Duration,
) -> Result<StatsSnapshot, ClientError> {
    let conn = Connection::connect(addr, auth_key, timeout).await?;
    match conn.call(&Request::Stats, timeout).await? {
        Reply {
            status: Status::Ok,
            body: ReplyBody::Stats(st),
            ..
        } => Ok(*st),
        r => Err(reply_error(addr, &r)),
    }
}

/// Split entry indices into request-sized chunks (count and payload limits).
fn chunk_entries(idxs: &[usize], len: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    let budget = MAX_PAYLOAD as usize / 2;
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for &i in idxs {
        let l = len(i) + 12;
        if !cur.is_empty() && (cur.len() == MAX_BATCH as usize || bytes + l > budget) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        cur.push(i);
        bytes += l;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl Inner {
    /// Run requests concurrently (inline when there is only one, saving a task hop).
    async fn call_all<T: Send + 'static>(
        self: &Arc<Self>,
        reqs: Vec<(u16, T, Request)>,
    ) -> Vec<(u16, T, Result<Reply, ClientError>)> {
        if reqs.len() == 1 {
            let (s, t, req) = reqs.into_iter().next().expect("one request");
            let r = self.call(s, &req).await;
            return vec![(s, t, r)];
        }
        let mut set = JoinSet::new();
        for (s, t, req) in reqs {
            let me = Arc::clone(self);
            set.spawn(async move {
                let r = me.call(s, &req).await;
                (s, t, r)
            });
        }
        let mut out = Vec::new();
        while let Some(j) = set.join_next().await {
            out.push(j.expect("request task panicked"));
        }
        out
    }

    async fn call(self: &Arc<Self>, server: u16, req: &Request) -> Result<Reply, ClientError> {
        let (r, went_down) = self.servers[server as usize].call(req).await;
        if went_down {
            self.server_went_down(server);
        }
        r
    }

    /// Forget the server's connections and, if configured, start re-replicating its pages.
    /// Needs a runtime context (it may spawn the repair).
    fn server_went_down(self: &Arc<Self>, server: u16) {
        self.servers[server as usize].reset();
        if self.auto_repair {
            self.request_repair();
        }
    }

    fn request_repair(self: &Arc<Self>) {
        if self.repair_requested.swap(true, Relaxed) {
            return;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let r = me.repair().await;
            if r.affected > 0 {
                tracing::info!(?r, "re-replication after server loss");
            }
        });
    }

    /// Put `blob` on further servers from `ranked` (skipping `exclude` and down servers)
    /// until `want` hold it. Returns the holders, or the holders so far and the error.
    #[allow(clippy::too_many_arguments)]
    async fn place_more(
        self: &Arc<Self>,
        pool: Pool,
        namespace: u64,
        key: u64,
        blob: &Bytes,
        want: usize,
        mut have: Vec<u16>,
        ranked: &[u16],
        exclude: &[u16],
    ) -> Result<Vec<u16>, (Vec<u16>, ClientError)> {
        let mut last: Option<ClientError> = None;
        for &s in ranked {
            if have.len() >= want {
                break;
            }
            if have.contains(&s) || exclude.contains(&s) || !self.servers[s as usize].is_usable() {
                continue;
            }
            let req = Request::Put {
                pool,
                namespace,
                key,
                value: blob.clone(),
            };
            match self.call(s, &req).await {
                Ok(Reply {
                    status: Status::Ok, ..
                }) => have.push(s),
                Ok(r) => last = Some(reply_error(self.servers[s as usize].addr, &r)),
                Err(e) => last = Some(e),
            }
        }
        if have.len() >= want {
            return Ok(have);
        }
        let got = have.len();
        tracing::debug!(namespace, key, got, want, last = ?last, "not enough replicas");
        Err((have, ClientError::NotEnoughReplicas { got, want }))
    }

    fn delete_copies(self: &Arc<Self>, pool: Pool, namespace: u64, key: u64, servers: &[u16]) {
        for &s in servers {
            if !self.servers[s as usize].is_up() {
                continue;
            }
            let me = Arc::clone(self);
            tokio::spawn(async move {
                let _ = me
                    .call(
                        s,
                        &Request::Delete {
                            pool,
                            namespace,
                            key,
                        },
                    )
                    .await;
            });
        }
    }

    /// Try each replica in turn (up servers first); verify what comes back.
    async fn get_from_replicas(
        self: &Arc<Self>,
        pool: Pool,
        namespace: u64,
        key: u64,
        l: Location,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let mut order: Vec<u16> = l.servers().to_vec();
        order.sort_by_key(|&s| !self.servers[s as usize].is_up());
        let mut last: Option<ClientError> = None;
        for s in order {
            let addr = self.servers[s as usize].addr;
            match self
                .call(
                    s,
                    &Request::Get {
                        pool,
                        namespace,
                        key,
                    },
                )
                .await
            {
                Ok(Reply {
                    status: Status::Ok,
                    body: ReplyBody::Value(v),
                    ..
                }) => match self.cipher.open(pool, namespace, key, l.version, &v) {
                    Ok(p) => return Ok(Some(p)),
                    Err(e) => {
                        tracing::warn!(%addr, namespace, key, error = %e, "replica failed verification");
                        last = Some(ClientError::Integrity {
                            namespace,
                            key,
                            source: e,
                        });
                    }
                },
                Ok(Reply {
                    status: Status::NotFound,
                    ..
                }) if pool == Pool::Ephemeral => return Ok(None),
                Ok(r) => last = Some(reply_error(addr, &r)),
                Err(e) => last = Some(e),
            }
        }
        match (pool, last) {
            (_, Some(e @ ClientError::Integrity { .. })) => Err(e),
            (Pool::Ephemeral, _) => Ok(None),
            (Pool::Persistent, last) => Err(ClientError::Unavailable {
                namespace,
                key,
                last: Box::new(last.unwrap_or(ClientError::NoServers)),
            }),
        }
    }

    async fn repair(self: &Arc<Self>) -> RepairReport {
        let _g = self.repairing.lock().await;
        self.repair_requested.store(false, Relaxed);
        let mut report = RepairReport::default();
        let down: Vec<bool> = self.servers.iter().map(|s| !s.is_up()).collect();
        let affected: Vec<(PageId, Location)> = self
            .locations
            .iter()
            .filter(|e| {
                e.key().0 == Pool::Persistent && e.servers().iter().any(|&s| down[s as usize])
            })
            .map(|e| (*e.key(), *e.value()))
            .collect();
        for ((pool, namespace, key), loc) in affected {
            report.affected += 1;
            let survivors: Vec<u16> = loc
                .servers()
                .iter()
                .copied()
                .filter(|&s| !down[s as usize])
                .collect();
            // Read a verified copy from a survivor.
            let mut blob = None;
            for &s in &survivors {
                if let Ok(Reply {
                    status: Status::Ok,
                    body: ReplyBody::Value(v),
                    ..
                }) = self
                    .call(
                        s,
                        &Request::Get {
                            pool,
                            namespace,
                            key,
                        },
                    )
                    .await
                {
                    if self
                        .cipher
                        .open(pool, namespace, key, loc.version, &v)
                        .is_ok()
                    {
                        blob = Some(v);
                        break;
                    }
                }
            }
            let Some(blob) = blob else {
                report.lost += 1;
                tracing::error!(
                    namespace,
                    key,
                    "persistent page has no readable replica left"
                );
                continue;
            };
            let ranked: Vec<u16> = placement::rank(&self.seeds, namespace, key)
                .into_iter()
                .map(|s| s as u16)
                .collect();
            let r = self
                .place_more(
                    pool,
                    namespace,
                    key,
                    &blob,
                    self.replicas,
                    survivors,
                    &ranked,
                    loc.servers(),
                )
                .await;
            let (have, ok) = match r {
                Ok(h) => (h, true),
                Err((h, _)) => (h, false),
            };
            // Only record if nobody rewrote the page meanwhile.
            if let Some(mut cur) = self.locations.get_mut(&(pool, namespace, key)) {
                if cur.version == loc.version {
                    *cur = Location::new(loc.version, &have);
                }
            }
            if ok {
                report.repaired += 1;
            } else {
                report.degraded += 1;
            }
        }
        report
    }
}

/// Ping every server periodically: brings servers back up and notices silent deaths.
async fn probe_loop(inner: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        for i in 0..inner.servers.len() {
            if inner.servers[i].is_usable() {
                let _ = inner.call(i as u16, &Request::Ping).await;
            }
        }
    }
}
