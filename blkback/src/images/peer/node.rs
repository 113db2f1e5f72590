//! One node of the cooperative cache put together: its [`NodeCache`], its [`Fetcher`] and its
//! peer server (serving the cache, pulling from the origin for the chunks it is home of), and
//! a deployment of an image through a [`ChunkTemplate`] with prefetch in boot order.
//!
//! `remoca image node` runs one of these; the multi-node tests and `remoca bench images`
//! run several.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::server::{RunningServer, Service};
use crate::disk::Disk;
use crate::images::cache::NodeCache;
use crate::images::chunk::{ChunkId, ChunkList};
use crate::images::fetch::{FetchConfig, Fetcher, OriginPath};
use crate::images::store::{Store, StoreError, VersionRef};
use crate::images::template::{AccessProfile, ChunkTemplate};

/// How to run one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The cache directory and its bound in bytes.
    pub cache_dir: std::path::PathBuf,
    pub cache_bytes: u64,
    /// Peers, origin, timeouts. `fetch.me` is set to the listener's address when `None`.
    pub fetch: FetchConfig,
    /// Test hook: serve corrupted chunks (see [`Service::corrupting`]).
    pub corrupt_served_chunks: bool,
    /// Count the chunks its server sends more than once (see
    /// [`Service::counting_repeats`]): for a node playing the origin in a bench. Off on
    /// ordinary nodes.
    pub count_repeats: bool,
}

/// A running node: stops serving when dropped.
#[derive(Debug)]
pub struct Node {
    pub fetcher: Arc<Fetcher>,
    pub server: RunningServer,
}

impl Node {
    /// Start a node serving on `listener` (already bound, so every node's address can be
    /// known before any starts).
    ///
    /// # Errors
    /// Opening the cache; starting the server.
    pub fn start(listener: TcpListener, mut cfg: NodeConfig) -> io::Result<Node> {
        let cache = Arc::new(NodeCache::open(&cfg.cache_dir, cfg.cache_bytes)?);
        if cfg.fetch.me.is_none() {
            cfg.fetch.me = Some(listener.local_addr()?);
        }
        let fetcher = Arc::new(Fetcher::new(cache.clone(), cfg.fetch));
        let holder = cache.clone();
        let svc = Service::new(cache, move |id| holder.contains(id))
            .with_pull(Arc::new(OriginPath(fetcher.clone())))
            .corrupting(cfg.corrupt_served_chunks)
            .counting_repeats(cfg.count_repeats);
        let server = RunningServer::start_on(listener, Arc::new(svc))?;
        Ok(Node { fetcher, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
}

/// The origin served out of the image store: a peer server over `store` (its chunks, and
/// HAVE answers from its index), with no pull source of its own. Nodes list its address as
/// their origin and deploy from the chunk lists of [`store_chunk_list`]. `count_repeats`:
/// count the chunks sent more than once (see [`Service::counting_repeats`]).
///
/// # Errors
/// Starting the server.
pub fn serve_store(
    listener: TcpListener,
    store: Store,
    count_repeats: bool,
) -> io::Result<RunningServer> {
    let store = Arc::new(store);
    let holder = store.clone();
    let svc = Service::new(store, move |id| holder.contains(id)).counting_repeats(count_repeats);
    RunningServer::start_on(listener, Arc::new(svc))
}

/// The chunk list of `spec` (`NAME` for its newest version, or `NAME@N`) in `store`, with the
/// version it resolved to: what an origin serving the store hands to its nodes.
///
/// # Errors
/// No such image or version; a missing or corrupt manifest.
pub fn store_chunk_list(store: &Store, spec: &str) -> Result<(VersionRef, ChunkList), StoreError> {
    let v = store.resolve(spec)?;
    let list = store.chunk_list(&v)?;
    Ok((v, list))
}

/// Chunks per origin GET of the home stream (see [`Fetcher::stream_home`]): few, since a
/// peer's pull waiting on one of them waits for the whole GET (a flight completes with its
/// request).
pub const HOME_STREAM_BATCH: usize = 4;
/// Origin GETs the home stream keeps in flight (2 MiB at 64 KiB chunks): enough to keep the
/// origin link full.
pub const HOME_STREAM_DEPTH: usize = 8;

/// What one deployment did.
#[derive(Debug, Clone)]
pub struct DeployReport {
    /// Image bytes read through the template.
    pub bytes: u64,
    pub data_chunks: usize,
    pub elapsed: Duration,
    /// When the home stream (see [`Fetcher::stream_home`]) was done, from the start.
    pub home_stream: Duration,
    /// When the prefetcher was done, from the start.
    pub prefetched: Duration,
    /// When every chunk had been read (and written to `out`), before `out` was synced.
    pub read_done: Duration,
    /// Chunks the prefetcher could not get (the reader then failed too, or got them later).
    pub prefetch_failures: usize,
}

/// Deploy `list` on this node the way a booting VM would: a reader reads every chunk through
/// a [`ChunkTemplate`] in `profile` order (then the rest in list order; list order without a
/// profile), while a prefetcher fetches ahead in the same order, `batch` chunks per request
/// and `parallel` requests in flight. With peers, the chunks this node is home of are also
/// streamed from the origin from the start ([`Fetcher::stream_home`], [`HOME_STREAM_BATCH`]
/// chunks per GET, [`HOME_STREAM_DEPTH`] GETs in flight). The bytes read are written at
/// their offsets into `out` when given, and `out` is synced as it fills (every 200 ms) and
/// at the end. `progress` counts chunks read so far.
///
/// # Errors
/// The first read that fails (a chunk no peer and no origin could give).
pub fn deploy(
    fetcher: &Arc<Fetcher>,
    list: &ChunkList,
    profile: Option<&AccessProfile>,
    out: Option<&File>,
    batch: usize,
    parallel: usize,
    progress: &AtomicU64,
) -> io::Result<DeployReport> {
    let start = Instant::now();
    let order: Vec<usize> = match profile.filter(|p| p.chunks == list.chunks.len()) {
        Some(p) => {
            let mut seen = vec![false; list.chunks.len()];
            let mut o = Vec::with_capacity(list.chunks.len());
            for i in p
                .order
                .iter()
                .map(|&i| i as usize)
                .chain(0..list.chunks.len())
            {
                if i < seen.len() && !seen[i] {
                    seen[i] = true;
                    o.push(i);
                }
            }
            o
        }
        None => (0..list.chunks.len()).collect(),
    };
    let wanted: Vec<(ChunkId, usize)> = order
        .iter()
        .filter_map(|&i| list.chunks[i].map(|id| (id, list.len_of(i))))
        .collect();
    let template = ChunkTemplate::new(list.clone(), fetcher.clone())
        .map_err(|e| io::Error::other(e.to_string()))?;
    let stop = AtomicBool::new(false);
    let cs = list.chunk_size.bytes() as u64;
    let (read, helpers) = std::thread::scope(|s| {
        // With peers, this node streams the chunks it is home of from the origin from the
        // start (the peers pull them from here), so the origin link is busy from t=0
        // whatever order the peers ask in.
        let home = s.spawn(|| {
            let failed = fetcher.stream_home(&wanted, HOME_STREAM_BATCH, HOME_STREAM_DEPTH, &stop);
            (failed, start.elapsed())
        });
        let pf = s.spawn(|| {
            let failed = fetcher.prefetch(&wanted, batch, parallel, &stop);
            (failed, start.elapsed())
        });
        // Write-behind: sync `out` while the chunks arrive, so that the final sync has only
        // the last few writes left. The reader drops `done` when it is through, which ends
        // this at once.
        let (done, reading) = std::sync::mpsc::channel::<()>();
        if let Some(f) = out {
            s.spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    reading.recv_timeout(Duration::from_millis(200))
                {
                    let _ = f.sync_data();
                }
            });
        }
        let read = (|| -> io::Result<(u64, Duration)> {
            let mut buf = vec![0u8; cs as usize];
            let mut bytes = 0u64;
            for &i in &order {
                let len = list.len_of(i);
                let b = &mut buf[..len];
                template
                    .read_at(b, i as u64 * cs)
                    .map_err(|e| io::Error::other(format!("chunk {i}: {e}")))?;
                if let Some(f) = out {
                    f.write_all_at(b, i as u64 * cs)?;
                }
                bytes += len as u64;
                progress.fetch_add(1, Ordering::Relaxed);
            }
            Ok((bytes, start.elapsed()))
        })();
        drop(done);
        stop.store(true, Ordering::Relaxed);
        let (home_failures, home_stream) = home.join().unwrap_or_default();
        let (pf_failures, prefetched) = pf.join().unwrap_or_default();
        (read, (pf_failures + home_failures, home_stream, prefetched))
    });
    let (prefetch_failures, home_stream, prefetched) = helpers;
    let (bytes, read_done) = read?;
    if let Some(f) = out {
        f.set_len(list.size)?;
        f.sync_all()?;
    }
    Ok(DeployReport {
        bytes,
        data_chunks: wanted.len(),
        elapsed: start.elapsed(),
        home_stream,
        prefetched,
        read_done,
        prefetch_failures,
    })
}

/// Cut the raw image at `path` into `chunk_size` chunks, put every non-zero chunk into
/// `cache` and return the image's chunk list: how an origin's cache is seeded in tests and
/// benches that do not build a store (an origin over the store is [`serve_store`]). The cache must be large enough to hold the image.
///
/// # Errors
/// I/O errors; a cache too small for the image.
pub fn seed_from_raw(
    cache: &NodeCache,
    path: &Path,
    chunk_size: crate::images::chunk::ChunkSize,
) -> io::Result<ChunkList> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let size = f.metadata()?.len();
    let cs = chunk_size.bytes() as usize;
    let mut chunks = Vec::with_capacity(ChunkList::count_for(size, chunk_size) as usize);
    let mut buf = vec![0u8; cs];
    let mut left = size;
    while left > 0 {
        let n = (left as usize).min(cs);
        f.read_exact(&mut buf[..n])?;
        left -= n as u64;
        let piece = &buf[..n];
        if piece.iter().all(|&b| b == 0) {
            chunks.push(None);
            continue;
        }
        let id = ChunkId::of(piece);
        cache
            .insert(&id, piece)
            .map_err(|e| io::Error::other(e.to_string()))?;
        chunks.push(Some(id));
    }
    if chunks.iter().flatten().any(|id| !cache.contains(id)) {
        return Err(io::Error::other(format!(
            "the cache ({} bytes) cannot hold {}",
            cache.max_bytes(),
            path.display()
        )));
    }
    Ok(ChunkList {
        chunk_size,
        size,
        chunks,
    })
}

/// Write `list` as text: a header line `remoca-chunk-list v1 <chunk size> <size>`, then one
/// line per chunk, its id in hex or `0` for a zero chunk. The format a node reads with
/// `--chunk-list` (until it gets lists from the store).
///
/// # Errors
/// I/O errors.
pub fn save_chunk_list(list: &ChunkList, path: &Path) -> io::Result<()> {
    let mut text = format!(
        "remoca-chunk-list v1 {} {}\n",
        list.chunk_size.bytes(),
        list.size
    );
    for c in &list.chunks {
        match c {
            Some(id) => text.push_str(&id.to_string()),
            None => text.push('0'),
        }
        text.push('\n');
    }
    std::fs::write(path, text)
}

/// Read a list written by [`save_chunk_list`].
///
/// # Errors
/// I/O errors; [`io::ErrorKind::InvalidData`] for anything malformed or inconsistent.
pub fn load_chunk_list(path: &Path) -> io::Result<ChunkList> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    let text = std::fs::read_to_string(path)?;
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    let (cs, size) = match head.as_slice() {
        ["remoca-chunk-list", "v1", cs, size] => (
            cs.parse::<u64>().map_err(|e| bad(e.to_string()))?,
            size.parse::<u64>().map_err(|e| bad(e.to_string()))?,
        ),
        _ => return Err(bad(format!("{}: not a chunk list", path.display()))),
    };
    let chunk_size = crate::images::chunk::ChunkSize::new(cs).map_err(|e| bad(e.to_string()))?;
    let chunks = lines
        .map(|l| match l.trim() {
            "0" => Ok(None),
            hex => hex.parse().map(Some).map_err(|e| bad(format!("{e}"))),
        })
        .collect::<io::Result<Vec<_>>>()?;
    let list = ChunkList {
        chunk_size,
        size,
        chunks,
    };
    if !list.is_consistent() {
        return Err(bad(format!(
            "{}: {} entries for {size} bytes",
            path.display(),
            list.chunks.len()
        )));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::chunk::ChunkSize;

    #[test]
    fn chunk_lists_round_trip_and_bad_ones_are_refused() {
        let list = ChunkList {
            chunk_size: ChunkSize::new(8192).unwrap(),
            size: 20000,
            chunks: vec![Some(ChunkId::of(b"a")), None, Some(ChunkId::of(b"c"))],
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        save_chunk_list(&list, &p).unwrap();
        assert_eq!(load_chunk_list(&p).unwrap(), list);
        for text in [
            "",
            "remoca-chunk-list v1 8192 20000\n0\n0\n",
            "remoca-chunk-list v1 1000 2000\n0\n0\n",
            "remoca-chunk-list v1 8192 20000\n0\nzz\n0\n",
        ] {
            std::fs::write(&p, text).unwrap();
            assert!(load_chunk_list(&p).is_err(), "{text:?}");
        }
    }
}
