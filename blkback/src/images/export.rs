//! Exports whose template layer is an image version: the disk stack `remoca blkback
//! --export name=NAME,image=IMAGE@N,...` serves.
//!
//! Two ways to the chunks:
//!
//! - **Through this node's cache** (`chunk-list=PATH`): the export reads the version's
//!   [`ChunkList`] (the file `remoca image-node --store DIR --image NAME@N --chunk-list PATH`
//!   writes on the origin) and a [`ChunkTemplate`] over the node's [`Fetcher`]: every chunk
//!   the guest reads comes from the node cache, else from the peers, else from the origin,
//!   and is checked against its id before use (see `fetch`). One [`ImageNode`] (one cache,
//!   one fetcher, optionally one peer server) serves every image export of a process.
//! - **Straight from a store** (`store=DIR` or `store=s3://BUCKET/PREFIX`): the store is
//!   opened read-only and the template reads from its arenas. A local store's shared lock is
//!   held while the export is open, so no gc moves chunks under it; an S3 store has no lock
//!   other hosts see (docs/image-store.md: run gc there only when the prefix is quiet). For a
//!   host that holds the store itself, or reads it from S3.
//!
//! **Overlay.** With `overlay=PATH` the guest's writes go to a copy-on-write overlay over the
//! template; the overlay is created (4 KiB clusters) when the file does not exist, and an
//! existing one is checked against the template's fingerprint like any overlay. Without an
//! overlay the template is served read-only.
//!
//! **Boot profile.** Through the node, the first open of a version records the order in
//! which the guest first read each chunk; [`ImageNode::finish`] saves it to
//! `CACHE/profiles/<first 16 hex digits of the chunk list's hash>.profile`. A later open of
//! the same version prefetches the profile's chunks in that order in the background, while the
//! guest reads.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use super::cache::NodeCache;
use super::chunk::{ChunkId, ChunkList};
use super::fetch::{FetchConfig, Fetcher};
use super::peer::node::{self, Node, NodeConfig};
use super::store::{Store, StoreOptions};
use super::template::{AccessProfile, ChunkTemplate};
use crate::disk::Disk;
use crate::overlay::{header::DEFAULT_CLUSTER_BITS, Overlay, OverlayError};

/// Where an image export's chunks come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// Through the node: the version's chunk list, as the origin wrote it.
    Node { chunk_list: PathBuf },
    /// Straight from the store in this directory.
    Store { dir: PathBuf },
}

/// One export over an image version, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageExportSpec {
    pub name: String,
    /// `NAME@N` (or `NAME`, the newest version, with a store).
    pub image: String,
    pub source: ImageSource,
    pub overlay: Option<PathBuf>,
    pub read_only: bool,
    /// Minimum block size (see [`crate::ExportConfig::min_block`]).
    pub min_block: u32,
}

/// How this process takes part in the cooperative cache.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The cache directory (the fast device) and its bound in bytes.
    pub cache_dir: PathBuf,
    pub cache_bytes: u64,
    /// Serve this node's cache to its peers on this address (`None`: fetch only).
    pub listen: Option<SocketAddr>,
    pub origin: Option<SocketAddr>,
    /// Every node's address (the same list on every node; see `fetch`).
    pub peers: Vec<SocketAddr>,
    pub timeout: Duration,
}

/// Why an image export could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ImageExportError {
    #[error("export {name:?}: {what}")]
    Source { name: String, what: String },
    #[error("export {name:?}: overlay")]
    Overlay {
        name: String,
        #[source]
        source: OverlayError,
    },
    #[error("export {name:?}: the chunk-list= source needs the node options (a cache directory)")]
    NoNode { name: String },
}

struct Tracked {
    name: String,
    template: Arc<ChunkTemplate>,
    /// Where to save the boot profile when it was recorded by this open.
    profile: Option<PathBuf>,
}

/// The node side of a process serving image exports: the cache, the fetcher, the optional
/// peer server, and what each export recorded.
pub struct ImageNode {
    fetcher: Arc<Fetcher>,
    node: Option<Node>,
    cache_dir: PathBuf,
    tracked: Mutex<Vec<Tracked>>,
    stop: Arc<AtomicBool>,
    prefetchers: Mutex<Vec<JoinHandle<usize>>>,
    prefetch_failures: Arc<AtomicUsize>,
}

impl fmt::Debug for ImageNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageNode")
            .field("cache_dir", &self.cache_dir)
            .field("serving", &self.node.as_ref().map(Node::addr))
            .finish()
    }
}

/// One opened image export: its disk stack and a line describing it.
pub struct OpenedImage {
    pub disk: Arc<dyn Disk>,
    pub description: String,
    /// The template layer (for its chunk list and profile).
    pub template: Arc<ChunkTemplate>,
}

impl fmt::Debug for OpenedImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenedImage")
            .field("description", &self.description)
            .finish()
    }
}

/// The profile file of `list` in a cache directory.
pub fn profile_path(cache_dir: &Path, list: &ChunkList) -> PathBuf {
    let mut h = blake3::Hasher::new();
    h.update(&list.chunk_size.bytes().to_be_bytes());
    h.update(&list.size.to_be_bytes());
    for c in &list.chunks {
        match c {
            Some(id) => h.update(id.as_bytes()),
            None => h.update(&[0u8; 32]),
        };
    }
    let hex = h.finalize().to_hex();
    cache_dir
        .join("profiles")
        .join(format!("{}.profile", &hex[..16]))
}

impl ImageNode {
    /// Open the cache and start the fetcher (and the peer server with `listen`).
    ///
    /// # Errors
    /// Opening the cache, binding `listen`.
    pub fn start(o: &NodeOptions) -> io::Result<ImageNode> {
        let listener = o.listen.map(TcpListener::bind).transpose()?;
        ImageNode::start_on(o, listener)
    }

    /// As [`ImageNode::start`], serving peers on an already bound `listener` (so every
    /// node's address can be known before any starts); `o.listen` is ignored.
    ///
    /// # Errors
    /// Opening the cache, starting the server.
    pub fn start_on(o: &NodeOptions, listener: Option<TcpListener>) -> io::Result<ImageNode> {
        let fetch = FetchConfig {
            me: None,
            peers: o.peers.clone(),
            origin: o.origin,
            timeout: o.timeout,
            ..FetchConfig::default()
        };
        let (fetcher, node) = match listener {
            Some(l) => {
                let n = Node::start(
                    l,
                    NodeConfig {
                        cache_dir: o.cache_dir.clone(),
                        cache_bytes: o.cache_bytes,
                        fetch,
                        corrupt_served_chunks: false,
                        count_repeats: false,
                    },
                )?;
                (n.fetcher.clone(), Some(n))
            }
            None => {
                let cache = Arc::new(NodeCache::open(&o.cache_dir, o.cache_bytes)?);
                (Arc::new(Fetcher::new(cache, fetch)), None)
            }
        };
        Ok(ImageNode {
            fetcher,
            node,
            cache_dir: o.cache_dir.clone(),
            tracked: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
            prefetchers: Mutex::new(Vec::new()),
            prefetch_failures: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    /// The address the peer server listens on, if it runs.
    pub fn serving(&self) -> Option<SocketAddr> {
        self.node.as_ref().map(Node::addr)
    }

    /// A template over `list` through this node, recording the boot profile when none was
    /// saved for `list` yet, else prefetching the saved one in the background.
    ///
    /// # Errors
    /// An inconsistent list; an unreadable profile file.
    pub fn template(&self, name: &str, list: ChunkList) -> io::Result<Arc<ChunkTemplate>> {
        let ppath = profile_path(&self.cache_dir, &list);
        let saved = match AccessProfile::load(&ppath) {
            Ok(p) => Some(p),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!("{}: {e}; recording a new profile", ppath.display());
                None
            }
        };
        let ids: Vec<ChunkId> = list.chunks.iter().flatten().copied().collect();
        self.fetcher
            .cache()
            .set_references(&format!("export {name}"), ids);
        let wanted: Option<Vec<(ChunkId, usize)>> = saved
            .as_ref()
            .filter(|p| p.chunks == list.chunks.len())
            .map(|p| {
                p.order
                    .iter()
                    .filter_map(|&i| {
                        list.chunks[i as usize].map(|id| (id, list.len_of(i as usize)))
                    })
                    .collect()
            });
        let fetcher: Arc<dyn super::chunk::ChunkSource> = self.fetcher.clone();
        let t = ChunkTemplate::new(list, fetcher).map_err(|e| io::Error::other(e.to_string()))?;
        let (t, record) = match wanted {
            Some(wanted) => {
                let (f, stop, failed) = (
                    self.fetcher.clone(),
                    self.stop.clone(),
                    self.prefetch_failures.clone(),
                );
                let h = std::thread::Builder::new()
                    .name(format!("prefetch {name}"))
                    .spawn(move || {
                        let n = f.prefetch(&wanted, 16, 4, &stop);
                        failed.fetch_add(n, Ordering::Relaxed);
                        n
                    })?;
                self.prefetchers.lock().push(h);
                (t, false)
            }
            None => (t.recording(), true),
        };
        let t = Arc::new(t);
        self.tracked.lock().push(Tracked {
            name: name.to_owned(),
            template: t.clone(),
            profile: record.then_some(ppath),
        });
        Ok(t)
    }

    /// Wait for the background prefetches started so far; returns the chunks they could
    /// not get.
    pub fn wait_prefetch(&self) -> usize {
        for h in self.prefetchers.lock().drain(..) {
            let _ = h.join();
        }
        self.prefetch_failures.load(Ordering::Relaxed)
    }

    /// Stop prefetching and save the boot profiles recorded since the start. Returns one
    /// line per saved profile.
    ///
    /// # Errors
    /// Writing a profile.
    pub fn finish(&self) -> io::Result<Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.wait_prefetch();
        let mut out = Vec::new();
        for t in self.tracked.lock().iter() {
            let Some(path) = &t.profile else { continue };
            let p = t.template.profile();
            if p.order.is_empty() {
                continue;
            }
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            p.save(path)?;
            out.push(format!(
                "export {:?}: boot profile of {} chunks saved to {}",
                t.name,
                p.order.len(),
                path.display()
            ));
        }
        Ok(out)
    }

    /// The fetcher's counters and the cache's size, on one line.
    pub fn summary(&self) -> String {
        let c = self.fetcher.cache();
        format!(
            "{} | node cache {} chunks, {} bytes",
            self.fetcher.stats.summary(),
            c.len(),
            c.used_bytes()
        )
    }
}

/// Open one image export: `node` must be given for a [`ImageSource::Node`] export.
///
/// # Errors
/// [`ImageExportError`] naming the export and what failed.
pub fn open(
    spec: &ImageExportSpec,
    node: Option<&ImageNode>,
) -> Result<OpenedImage, ImageExportError> {
    let src = |what: String| ImageExportError::Source {
        name: spec.name.clone(),
        what,
    };
    let (template, from) = match &spec.source {
        ImageSource::Node { chunk_list } => {
            let n = node.ok_or_else(|| ImageExportError::NoNode {
                name: spec.name.clone(),
            })?;
            let list = node::load_chunk_list(chunk_list)
                .map_err(|e| src(format!("chunk list {}: {e}", chunk_list.display())))?;
            let t = n
                .template(&spec.name, list)
                .map_err(|e| src(e.to_string()))?;
            (t, format!("node cache {}", n.cache_dir.display()))
        }
        ImageSource::Store { dir } => {
            let store = Store::open_location(dir, StoreOptions::default())
                .map_err(|e| src(format!("store {}: {e}", dir.display())))?;
            let v = store.resolve(&spec.image).map_err(|e| src(e.to_string()))?;
            let list = store.chunk_list(&v).map_err(|e| src(e.to_string()))?;
            let t = ChunkTemplate::new(list, Arc::new(store)).map_err(|e| src(e.to_string()))?;
            (Arc::new(t), format!("store {}", dir.display()))
        }
    };
    let chunks = template.chunk_list().chunks.iter().flatten().count();
    let what = format!("image {} ({chunks} data chunks) via {from}", spec.image);
    let disk: Arc<dyn Disk> = match &spec.overlay {
        None => template.clone(),
        Some(path) => {
            let oerr = |source| ImageExportError::Overlay {
                name: spec.name.clone(),
                source,
            };
            let base: Arc<dyn Disk> = template.clone();
            let created = !path.exists();
            if created {
                let hint = format!("image {}", spec.image);
                Overlay::create(path, base.as_ref(), DEFAULT_CLUSTER_BITS, &hint).map_err(oerr)?;
            }
            let ov = Overlay::open(path, base, spec.read_only).map_err(oerr)?;
            let description = format!(
                "overlay {}{} over {what}",
                path.display(),
                if created { " (created)" } else { "" }
            );
            return Ok(OpenedImage {
                disk: Arc::new(ov),
                description,
                template,
            });
        }
    };
    Ok(OpenedImage {
        disk,
        description: what,
        template,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;
    use crate::images::chunk::ChunkSize;
    use crate::WriteFlags;

    /// 64 distinct pieces of 4 KiB, every 4th one zero.
    fn image() -> Vec<u8> {
        let mut v: Vec<u8> = (0..64 * 4096)
            .map(|i: usize| {
                ((i.wrapping_mul(2_654_435_761) >> 9) as u8 ^ (i / 4096) as u8).wrapping_add(1)
            })
            .collect();
        for p in (0..64).step_by(4) {
            v[p * 4096..(p + 1) * 4096].fill(0);
        }
        v
    }

    fn read_all(d: &dyn Disk) -> Vec<u8> {
        let mut out = vec![0u8; d.size() as usize];
        d.read_at(&mut out, 0).unwrap();
        out
    }

    struct Origin {
        _server: crate::images::peer::server::RunningServer,
        addr: SocketAddr,
        list: PathBuf,
        store: PathBuf,
    }

    fn origin(dir: &Path, img: &[u8]) -> Origin {
        let store = dir.join("store");
        let mut s = Store::open(
            &store,
            StoreOptions {
                write: true,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        s.import(
            "os",
            &mut Cursor::new(img),
            ChunkSize::new(4096).unwrap(),
            "t",
            &mut |_| {},
        )
        .unwrap();
        drop(s);
        let s = Store::open(&store, StoreOptions::default()).unwrap();
        let (_, l) = node::store_chunk_list(&s, "os@1").unwrap();
        let list = dir.join("os@1.list");
        node::save_chunk_list(&l, &list).unwrap();
        let server =
            node::serve_store(TcpListener::bind("127.0.0.1:0").unwrap(), s, false).unwrap();
        Origin {
            addr: server.addr(),
            _server: server,
            list,
            store,
        }
    }

    fn node_at(cache: &Path, origin: SocketAddr) -> ImageNode {
        ImageNode::start(&NodeOptions {
            cache_dir: cache.to_owned(),
            cache_bytes: 64 << 20,
            listen: None,
            origin: Some(origin),
            peers: Vec::new(),
            timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    fn spec(o: &Origin, overlay: Option<PathBuf>) -> ImageExportSpec {
        ImageExportSpec {
            name: "vm1".into(),
            image: "os@1".into(),
            source: ImageSource::Node {
                chunk_list: o.list.clone(),
            },
            overlay,
            read_only: false,
            min_block: 1,
        }
    }

    #[test]
    fn an_overlay_over_an_image_served_through_an_empty_cache_then_a_warm_one() {
        let d = tempfile::tempdir().unwrap();
        let img = image();
        let data_chunks = 48;
        let o = origin(d.path(), &img);
        let cache = d.path().join("cache");
        let ovl = d.path().join("vm1.ovl");
        let mut want = img.clone();

        // First boot: empty cache, the overlay is created; every chunk comes from the origin.
        let n = node_at(&cache, o.addr);
        let e = open(&spec(&o, Some(ovl.clone())), Some(&n)).unwrap();
        assert!(e.description.contains("(created)"), "{}", e.description);
        assert_eq!(read_all(e.disk.as_ref()), img);
        e.disk
            .write_at(&[0x77; 5000], 3 * 4096 + 100, WriteFlags::default())
            .unwrap();
        e.disk.flush().unwrap();
        want[3 * 4096 + 100..3 * 4096 + 5100].fill(0x77);
        assert_eq!(read_all(e.disk.as_ref()), want);
        assert_eq!(n.fetcher().stats.from_origin.load(Relaxed), data_chunks);
        assert_eq!(n.fetcher().cache().len(), data_chunks as usize);
        let saved = n.finish().unwrap();
        assert_eq!(saved.len(), 1, "{saved:?}");
        let ppath = profile_path(&cache, e.template.chunk_list());
        let profile = AccessProfile::load(&ppath).unwrap();
        assert_eq!(profile.order.len(), 64);
        drop((e, n));

        // Second boot on the warm cache: the overlay keeps the write, the origin is not asked.
        let n = node_at(&cache, o.addr);
        let e = open(&spec(&o, Some(ovl.clone())), Some(&n)).unwrap();
        assert!(!e.description.contains("(created)"));
        assert_eq!(n.wait_prefetch(), 0);
        assert_eq!(read_all(e.disk.as_ref()), want);
        assert_eq!(n.fetcher().stats.from_origin.load(Relaxed), 0);
        assert!(n.finish().unwrap().is_empty(), "the profile is kept");
        drop((e, n));

        // A new node given the profile prefetches the boot's chunks before the guest asks.
        let cache2 = d.path().join("cache2");
        std::fs::create_dir_all(cache2.join("profiles")).unwrap();
        std::fs::copy(
            &ppath,
            profile_path(&cache2, &node::load_chunk_list(&o.list).unwrap()),
        )
        .unwrap();
        let n = node_at(&cache2, o.addr);
        let e = open(&spec(&o, None), Some(&n)).unwrap();
        assert_eq!(n.wait_prefetch(), 0);
        assert_eq!(n.fetcher().stats.from_origin.load(Relaxed), data_chunks);
        assert_eq!(read_all(e.disk.as_ref()), img);
        assert_eq!(n.fetcher().stats.from_origin.load(Relaxed), data_chunks);
        assert!(e.disk.is_read_only());

        // The store's version never changed.
        let s = Store::open(&o.store, StoreOptions::default()).unwrap();
        let mut out = Vec::new();
        s.export_to(&s.resolve("os@1").unwrap(), &mut out, &mut |_| {})
            .unwrap();
        assert_eq!(out, img);
    }

    #[test]
    fn two_nodes_serving_each_other_take_each_chunk_from_the_origin_once() {
        let d = tempfile::tempdir().unwrap();
        let img = image();
        let o = origin(d.path(), &img);
        let ls: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let peers: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        let nodes: Vec<ImageNode> = ls
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let opts = NodeOptions {
                    cache_dir: d.path().join(format!("cache{i}")),
                    cache_bytes: 64 << 20,
                    listen: None,
                    origin: Some(o.addr),
                    peers: peers.clone(),
                    timeout: Duration::from_secs(5),
                };
                ImageNode::start_on(&opts, Some(l)).unwrap()
            })
            .collect();
        assert_eq!(nodes[0].serving(), Some(peers[0]));
        let a = open(&spec(&o, None), Some(&nodes[0])).unwrap();
        assert_eq!(read_all(a.disk.as_ref()), img);
        let b = open(&spec(&o, None), Some(&nodes[1])).unwrap();
        assert_eq!(read_all(b.disk.as_ref()), img);
        let s = |n: &ImageNode| {
            let st = &n.fetcher().stats;
            (st.from_origin.load(Relaxed), st.from_peers.load(Relaxed))
        };
        let (a_origin, a_peers) = s(&nodes[0]);
        let (b_origin, b_peers) = s(&nodes[1]);
        // Each chunk has one home; the home alone fetches it from the origin (for itself or
        // on the other's pull), so the origin served each of the 48 chunks once.
        let served = o._server.stats().chunks_served.load(Relaxed);
        assert_eq!(served, 48);
        assert_eq!(a_origin + b_origin, 48, "{a_origin} {b_origin}");
        assert!(a_peers > 0 && b_peers > 0, "{a_peers} {b_peers}");
        assert_eq!(
            a_peers + b_peers,
            48,
            "each chunk crossed between the nodes once"
        );
    }

    #[test]
    fn an_image_read_straight_from_the_store_and_a_node_export_without_a_node() {
        let d = tempfile::tempdir().unwrap();
        let img = image();
        let o = origin(d.path(), &img);
        let s = ImageExportSpec {
            source: ImageSource::Store {
                dir: o.store.clone(),
            },
            image: "os".into(),
            ..spec(&o, Some(d.path().join("v.ovl")))
        };
        let e = open(&s, None).unwrap();
        assert_eq!(read_all(e.disk.as_ref()), img);
        assert!(matches!(
            open(&spec(&o, None), None),
            Err(ImageExportError::NoNode { .. })
        ));
        let bad = ImageExportSpec {
            image: "nope@1".into(),
            ..s
        };
        assert!(open(&bad, None).is_err());
    }
}
