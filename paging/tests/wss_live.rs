//! The live estimator fed by real remote layers: a guest model swapping to a `SwapDisk` and
//! reading through a `RemoteCache`, both on an in-process memory server on 127.0.0.1:0,
//! with `WorkingSets` attached as their observer. The guest loops over W pages with M
//! resident, so the estimate must ask for W − M more pages.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use remoca_blkback::memory::MemDisk;
use remoca_blkback::remote::observe::{AccessObserver, Source};
use remoca_blkback::remote::{CacheConfig, RemoteCache, RemoteClient, SwapConfig, SwapDisk};
use remoca_blkback::{Disk, WriteFlags};
use remoca_memserver::client::{ClientConfig, PageSecret};
use remoca_memserver::server::{serve, ServerConfig};
use remoca_memserver::store::{ProcMeminfo, Store, StoreConfig};
use remoca_paging::mrc::live::{LiveConfig, WorkingSets};

const PAGE: usize = 4096;

/// A memory server on its own runtime, stopped when dropped.
struct Server {
    addr: std::net::SocketAddr,
    _runtime: tokio::runtime::Runtime,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn server() -> Server {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    let cfg = StoreConfig {
        capacity: 64 << 20,
        headroom: 0,
    };
    let store = Arc::new(Store::new(cfg, Arc::new(ProcMeminfo)));
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(async move {
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        let _ = serve(l, store, ServerConfig::new(cfg), stop_rx).await;
    });
    Server {
        addr,
        _runtime: runtime,
        _stop: stop,
    }
}

fn stamp(page: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; PAGE];
    b[..8].copy_from_slice(&page.to_le_bytes());
    b[8..16].copy_from_slice(&version.to_le_bytes());
    b
}

#[test]
fn a_looping_guest_on_real_layers_is_recommended_its_missing_pages() {
    let srv = server();
    let mut cfg = ClientConfig::new(vec![srv.addr], None, PageSecret::random());
    cfg.replicas = 1;
    cfg.request_timeout = Duration::from_secs(5);
    let client = RemoteClient::connect(cfg, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let swap = SwapDisk::open(
        client.clone(),
        SwapConfig {
            size: 4 << 20,
            namespace: 1,
            spill_path: dir.path().join("swap.spill"),
            spill_max: 4 << 20,
        },
    )
    .unwrap();
    let disk: Arc<dyn Disk> = Arc::new(MemDisk::new(1 << 20));
    let cache = RemoteCache::new(disk, client, CacheConfig::new(2));
    let sets = Arc::new(WorkingSets::new(LiveConfig::default()));
    let observer: Arc<dyn AccessObserver> = sets.clone();
    swap.observe(Source { dom: 5, device: 0 }, observer.clone());
    cache.observe(Source { dom: 5, device: 1 }, observer);

    // The guest: W anonymous pages, M frames, LRU, every evicted page written to swap.
    let (w, m) = (500u64, 300usize);
    let mut resident: HashMap<u64, u64> = HashMap::new();
    let mut lru: BTreeMap<u64, u64> = BTreeMap::new();
    let mut version = vec![0u64; w as usize];
    let mut on_swap = vec![false; w as usize];
    let mut buf = vec![0u8; PAGE];
    for t in 0..6 * w {
        let p = t % w;
        if let Some(old) = resident.insert(p, t) {
            lru.remove(&old);
        } else if on_swap[p as usize] {
            swap.read_at(&mut buf, p * PAGE as u64).unwrap();
            assert_eq!(
                buf,
                stamp(p, version[p as usize]),
                "page {p} came back wrong"
            );
        }
        lru.insert(t, p);
        version[p as usize] += 1;
        if resident.len() > m {
            let (_, victim) = lru.pop_first().unwrap();
            resident.remove(&victim);
            let data = stamp(victim, version[victim as usize]);
            swap.write_at(&data, victim * PAGE as u64, WriteFlags::default())
                .unwrap();
            on_swap[victim as usize] = true;
        }
    }
    // A few disk reads, each block once: cold misses, which no memory avoids.
    for b in 0..10u64 {
        cache.read_at(&mut buf, b * PAGE as u64).unwrap();
    }

    let e = sets.estimate(5, 65536).expect("domain 5 is estimated");
    let extra = e.balloon_target_kib - e.current_kib;
    let want = (w - m as u64) * 4;
    assert!(
        want <= extra && extra <= want + 256,
        "the guest lacks {want} KiB; the estimate asks for {extra}: {e:?}"
    );
    assert_eq!(e.remote_share_kib, extra);
    assert_eq!(e.reads, 10);
    assert_eq!(
        e.swap_ins,
        5 * w,
        "every access after the first loop misses"
    );
    assert!(
        e.ratios[0] > 0.95 && *e.ratios.last().unwrap() > 0.0,
        "{e:?}"
    );
}
