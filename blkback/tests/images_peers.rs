//! The cooperative cache on loopback, in one process: an origin server over an in-memory
//! chunk source and several nodes (cache + fetcher + peer server) deploying the same image at
//! once, with a peer that serves corrupted chunks, a peer that hangs, and a peer that is gone.
//! Every node's image must come out byte for byte. (The same with real processes in network
//! namespaces, a SIGKILL mid-transfer and a shaped origin link: tests/images_peers_netns.rs
//! in the root crate.)

use std::collections::HashMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use remoca_blkback::images::chunk::{ChunkError, ChunkId, ChunkList, ChunkSize, ChunkSource};
use remoca_blkback::images::fetch::{FetchConfig, Fetcher};
use remoca_blkback::images::peer::node::{deploy, Node, NodeConfig};
use remoca_blkback::images::peer::server::{RunningServer, Service};
use remoca_blkback::images::template::{AccessProfile, ChunkTemplate};
use remoca_blkback::Disk;

struct MemSource(HashMap<ChunkId, Vec<u8>>);

impl ChunkSource for MemSource {
    fn fetch(&self, id: &ChunkId, _len: usize) -> Result<Vec<u8>, ChunkError> {
        self.0.get(id).cloned().ok_or(ChunkError::NotFound(*id))
    }
}

/// A 6 MiB image in 16 KiB chunks: pseudo-random data, every 7th chunk zero, a few chunks
/// repeated (dedup), and a short tail.
fn image() -> (Vec<u8>, ChunkList, MemSource) {
    let cs = 16 * 1024;
    let size = 6 * 1024 * 1024 + 5000;
    let mut img = vec![0u8; size];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, c) in img.chunks_mut(cs).enumerate() {
        if i % 7 == 3 {
            continue;
        }
        if i % 11 == 5 {
            c.fill(0x42); // the same chunk many times
            continue;
        }
        for b in c.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    let mut src = HashMap::new();
    let chunks = img
        .chunks(cs)
        .map(|c| {
            if c.iter().all(|&b| b == 0) {
                None
            } else {
                let id = ChunkId::of(c);
                src.insert(id, c.to_vec());
                Some(id)
            }
        })
        .collect();
    let list = ChunkList {
        chunk_size: ChunkSize::new(cs as u64).unwrap(),
        size: size as u64,
        chunks,
    };
    (img, list, MemSource(src))
}

fn origin(src: MemSource) -> RunningServer {
    let src = Arc::new(src);
    let holds = src.clone();
    // Counting repeats: the tests assert that no chunk left the origin twice.
    let svc = Service::new(src, move |id| holds.0.contains_key(id)).counting_repeats(true);
    RunningServer::start("127.0.0.1:0".parse().unwrap(), Arc::new(svc)).unwrap()
}

fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

fn cfg(dir: &std::path::Path, peers: &[SocketAddr], origin: SocketAddr) -> NodeConfig {
    NodeConfig {
        cache_dir: dir.to_owned(),
        cache_bytes: 64 << 20,
        fetch: FetchConfig {
            me: None,
            peers: peers.to_vec(),
            origin: Some(origin),
            timeout: Duration::from_millis(500),
            down_for: Duration::from_secs(30),
        },
        corrupt_served_chunks: false,
        count_repeats: false,
    }
}

/// Running nodes and their cache directories (removed after the nodes stop).
struct Nodes {
    nodes: Vec<Node>,
    _dirs: Vec<tempfile::TempDir>,
}

/// Start `n` nodes, each on a fresh cache, listing every one of them and `extra_peers` as
/// their peers and `origin` as their origin; `tune(i, cfg)` adjusts node `i`'s config.
fn start_nodes(
    n: usize,
    extra_peers: &[SocketAddr],
    origin: SocketAddr,
    tune: impl Fn(usize, &mut NodeConfig),
) -> Nodes {
    let listeners: Vec<TcpListener> = (0..n).map(|_| bind()).collect();
    let mut addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    addrs.extend_from_slice(extra_peers);
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let mut c = cfg(dirs[i].path(), &addrs, origin);
            tune(i, &mut c);
            Node::start(l, c).unwrap()
        })
        .collect();
    Nodes { nodes, _dirs: dirs }
}

/// Deploy on `node` into a file; return the bytes written.
fn deploy_to_vec(node: &Node, list: &ChunkList, profile: Option<&AccessProfile>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    let f = File::create(&path).unwrap();
    let progress = AtomicU64::new(0);
    let r = deploy(&node.fetcher, list, profile, Some(&f), 16, 4, &progress).unwrap();
    assert_eq!(r.bytes, list.size);
    assert_eq!(progress.load(Ordering::Relaxed), list.chunks.len() as u64);
    std::fs::read(&path).unwrap()
}

/// Deploy on every node at once; each node's disk must equal `img`.
fn deploy_all_and_check(nodes: &[Node], list: &ChunkList, img: &[u8]) {
    let images: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = nodes
            .iter()
            .map(|n| s.spawn(|| deploy_to_vec(n, list, None)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, got) in images.iter().enumerate() {
        assert!(got == img, "node {i}'s image differs from the original");
    }
}

#[test]
fn nodes_deploy_the_same_image_despite_a_corrupting_peer_a_hung_peer_and_a_dead_one() {
    let (img, list, src) = image();
    let data_bytes: u64 = src.0.values().map(|c| c.len() as u64).sum();
    let origin = origin(src);

    // A peer that accepts and never answers (hangs), and one that is gone (refuses).
    let hung = bind();
    let hung_addr = hung.local_addr().unwrap();
    let dead_addr = bind().local_addr().unwrap(); // listener dropped at once: refused

    let started = start_nodes(4, &[hung_addr, dead_addr], origin.addr(), |i, c| {
        c.corrupt_served_chunks = i == 3;
    });
    let nodes = &started.nodes;

    deploy_all_and_check(nodes, &list, &img);
    let egress = origin.stats().bytes_served.load(Ordering::Relaxed);
    for (i, n) in nodes.iter().enumerate() {
        eprintln!("node {i}: {}", n.fetcher.stats.summary());
    }
    eprintln!(
        "origin egress {egress} B for {data_bytes} B of distinct data ({:.2}x)",
        egress as f64 / data_bytes as f64
    );
    // Every honest node met the corrupting peer (it is home of about a sixth of the chunks),
    // rejected its bytes and demoted it; the bad peer itself never saw bad data.
    for n in &nodes[..3] {
        assert!(n.fetcher.stats.corrupt_rejected.load(Ordering::Relaxed) >= 1);
        assert!(n.fetcher.is_demoted(nodes[3].addr()));
        assert!(n.fetcher.stats.from_peers.load(Ordering::Relaxed) > 0);
        assert!(n.fetcher.stats.peer_failures.load(Ordering::Relaxed) >= 1);
    }
    assert_eq!(
        nodes[3]
            .fetcher
            .stats
            .corrupt_rejected
            .load(Ordering::Relaxed),
        0
    );
    // Each chunk left the origin at most once per node, and the peers did share: the origin
    // served less than four full copies.
    assert!(egress < 4 * data_bytes, "origin egress {egress}");
    drop(hung);
}

#[test]
fn a_peer_that_dies_mid_deployment_costs_a_retry_not_the_deployment() {
    let (img, list, src) = image();
    let origin = origin(src);
    let mut started = start_nodes(3, &[], origin.addr(), |_, _| {});
    // Node 2 warms up (fetches its share and more), then goes away while 0 and 1 deploy.
    let n2 = started.nodes.pop().unwrap();
    let nodes = &started.nodes;
    let half = ChunkList {
        chunks: list
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| if i % 2 == 0 { *c } else { None })
            .collect(),
        ..list.clone()
    };
    let progress = AtomicU64::new(0);
    deploy(&n2.fetcher, &half, None, None, 16, 2, &progress).unwrap();
    let images: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = nodes
            .iter()
            .map(|n| s.spawn(|| deploy_to_vec(n, &list, None)))
            .collect();
        drop(n2); // stops serving while the others are fetching
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for got in &images {
        assert!(got == &img);
    }
}

#[test]
fn a_restarted_node_serves_from_its_cache_and_prefetches_in_profile_order() {
    let (img, list, src) = image();
    let origin = origin(src);
    let dir = tempfile::tempdir().unwrap();
    // First boot: record the access profile through a recording template.
    let profile = {
        let node = Node::start(bind(), cfg(dir.path(), &[], origin.addr())).unwrap();
        let t = ChunkTemplate::new(list.clone(), node.fetcher.clone())
            .unwrap()
            .recording();
        let mut b = vec![0; 4096];
        for off in [5 << 20, 0, 1 << 20, (3 << 20) + 16384] {
            t.read_at(&mut b, off).unwrap();
        }
        let p = t.profile();
        assert_eq!(p.order.len(), 4);
        assert_eq!(p.order[0] as u64, (5 << 20) / (16 * 1024));
        p
    };
    let before = origin.stats().bytes_served.load(Ordering::Relaxed);
    assert!(before > 0);
    // Restart on the same cache: nothing already fetched leaves the origin again.
    let node = Node::start(bind(), cfg(dir.path(), &[], origin.addr())).unwrap();
    assert_eq!(node.fetcher.cache().len(), 4);
    let got = deploy_to_vec(&node, &list, Some(&profile));
    assert!(got == img);
    let distinct: u64 = {
        let mut seen = std::collections::HashSet::new();
        list.chunks
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.filter(|id| seen.insert(*id))
                    .map(|_| list.len_of(i) as u64)
            })
            .sum()
    };
    let after = origin.stats().bytes_served.load(Ordering::Relaxed);
    assert_eq!(
        after, distinct,
        "each distinct chunk left the origin exactly once"
    );
    assert_eq!(node.fetcher.stats.from_peers.load(Ordering::Relaxed), 0);
}

#[test]
fn without_an_origin_a_missing_chunk_is_an_error_not_zeroes() {
    let (_, list, _) = image();
    let dir = tempfile::tempdir().unwrap();
    let cache =
        Arc::new(remoca_blkback::images::cache::NodeCache::open(dir.path(), 1 << 20).unwrap());
    let f = Arc::new(Fetcher::new(cache, FetchConfig::default()));
    let t = ChunkTemplate::new(list, f).unwrap();
    let mut b = vec![0; 100];
    assert!(t.read_at(&mut b, 0).is_err());
}

#[test]
fn nodes_deploy_a_stored_image_from_a_store_backed_origin() {
    use remoca_blkback::images::peer::node::{serve_store, store_chunk_list};
    use remoca_blkback::images::store::{Store, StoreOptions};

    let (img, _, _) = image();
    // A second version with a few chunks changed: most of its chunks are the first one's.
    let mut img2 = img.clone();
    for i in [1usize, 40, 200] {
        img2[i * 16 * 1024..(i * 16 * 1024 + 100)].fill(0x17);
    }
    let sdir = tempfile::tempdir().unwrap();
    let cs = ChunkSize::new(16 * 1024).unwrap();
    {
        let w = StoreOptions {
            write: true,
            ..StoreOptions::default()
        };
        let mut st = Store::open(sdir.path(), w).unwrap();
        for im in [&img, &img2] {
            st.import("demo", &mut &im[..], cs, "", &mut |_| {})
                .unwrap();
        }
    }
    // The origin opens the store read-only, as `remoca image-node --store` does.
    let store = Store::open(sdir.path(), StoreOptions::default()).unwrap();
    let versions = store.versions("demo").unwrap();
    assert_eq!(versions.len(), 2);
    let (newest, list2) = store_chunk_list(&store, "demo").unwrap();
    assert_eq!(newest, versions[1]);
    let (_, list1) = store_chunk_list(&store, &versions[0].to_string()).unwrap();
    let mut exported = Vec::new();
    for v in &versions {
        let mut out = Vec::new();
        store.export_to(v, &mut out, &mut |_| {}).unwrap();
        exported.push(out);
    }
    assert!(store_chunk_list(&store, "nonesuch").is_err());
    let origin = serve_store(bind(), store, true).unwrap();

    let started = start_nodes(2, &[], origin.addr(), |_, _| {});
    let nodes = &started.nodes;
    // Node 0 deploys version 2, node 1 version 1, at the same time.
    let (got2, got1) = std::thread::scope(|s| {
        let a = s.spawn(|| deploy_to_vec(&nodes[0], &list2, None));
        let b = s.spawn(|| deploy_to_vec(&nodes[1], &list1, None));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(got1 == exported[0], "version 1 differs from its export");
    assert!(got2 == exported[1], "version 2 differs from its export");
    assert!(got1 == img && got2 == img2);
    assert!(origin.stats().chunks_served.load(Ordering::Relaxed) > 0);
    assert_eq!(origin.stats().missing.load(Ordering::Relaxed), 0);
    assert!(origin.counts_repeats());
}

#[test]
fn healthy_nodes_deploying_together_take_each_chunk_from_the_origin_once() {
    let (img, list, src) = image();
    let distinct = src.0.len() as u64;
    let origin = origin(src);
    // No failures here: a generous timeout, so a slow test machine is not one.
    let started = start_nodes(4, &[], origin.addr(), |_, c| {
        c.fetch.timeout = Duration::from_secs(10);
    });
    let nodes = &started.nodes;
    deploy_all_and_check(nodes, &list, &img);
    // Each node streamed the chunks it is home of and the others pulled them from it: no
    // chunk left the origin twice, and the nodes did share.
    let st = origin.stats();
    assert!(origin.counts_repeats());
    assert_eq!(st.repeat_chunks.load(Ordering::Relaxed), 0);
    assert_eq!(st.chunks_served.load(Ordering::Relaxed), distinct);
    for (i, n) in nodes.iter().enumerate() {
        let f = &n.fetcher.stats;
        assert!(
            f.from_peers.load(Ordering::Relaxed) > 0 && f.from_origin.load(Ordering::Relaxed) > 0,
            "node {i}: {}",
            f.summary()
        );
        assert_eq!(f.peer_failures.load(Ordering::Relaxed), 0, "node {i}");
    }
}
