//! The pager against a simulated guest: correctness under three access patterns at a
//! target below the guest's size, shutdown and crash/restart with pages out, store loss,
//! the xenstore target, and why `enable` failed.

mod support;

use std::sync::Arc;

use remoca_paging::store::{MemoryStore, PageStore, StoreError};
use remoca_paging::{Pager, PagerConfig, PagerError, Target};
use remoca_xen::sim::{DomainSpec, Fault};
use remoca_xen::{DomId, Gfn, Host, Tx};
use support::{run_guest, trace, Guest, PagerThread, Pattern};

const PAGES: u64 = 256;
const TARGET_PAGES: u64 = 96;

fn config(dom: DomId, dir: &tempfile::TempDir, target_pages: u64) -> PagerConfig {
    let mut c = PagerConfig::new(
        dom,
        Target::Kib(target_pages * 4),
        dir.path().join("journal"),
    );
    c.batch = 16;
    c
}

/// Step the pager (no guest running) until the guest is at its target.
fn settle(pager: &mut Pager, guest: &Guest, target: u64) {
    for _ in 0..10_000 {
        if guest.tot_pages() <= target {
            return;
        }
        pager.step().unwrap();
    }
    panic!(
        "pager did not bring the guest to {target} pages: {}",
        guest.tot_pages()
    );
}

fn pattern_stays_correct(pattern: Pattern, seed: u64) {
    let guest = Guest::new(PAGES);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let mut pager = Pager::start(
        &guest.host,
        config(guest.dom, &dir, TARGET_PAGES),
        store.clone(),
    )
    .unwrap();
    settle(&mut pager, &guest, TARGET_PAGES);
    assert_eq!(guest.paged_pages(), PAGES - TARGET_PAGES);

    let running = PagerThread::spawn(pager);
    run_guest(&guest, &trace(pattern, PAGES, 3000, seed), |_| {});
    let mut pager = running.stop();
    let stats = pager.stats().clone();
    assert!(stats.faults > 0, "the guest never faulted: {stats}");
    assert!(
        stats.evicted > PAGES - TARGET_PAGES,
        "no evictions while running: {stats}"
    );

    settle(&mut pager, &guest, TARGET_PAGES);
    let running = PagerThread::spawn(pager);
    guest.check_all();
    let pager = running.stop();
    pager.shutdown().unwrap();
    assert_eq!(guest.paged_pages(), 0);
    assert!(!guest.crashed());
    guest.check_all();
}

#[test]
fn uniform_access_stays_correct_at_target() {
    pattern_stays_correct(Pattern::Uniform, 1);
}

#[test]
fn zipf_access_stays_correct_at_target() {
    pattern_stays_correct(Pattern::Zipf, 2);
}

#[test]
fn scan_access_stays_correct_at_target() {
    pattern_stays_correct(Pattern::Scan, 3);
}

#[test]
fn shutdown_with_pages_out_pages_everything_back() {
    let guest = Guest::new(64);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let mut pager = Pager::start(&guest.host, config(guest.dom, &dir, 8), store.clone()).unwrap();
    settle(&mut pager, &guest, 8);
    assert_eq!(guest.paged_pages(), 56);
    let report = pager.shutdown().unwrap();
    assert_eq!(report.paged_back, 56);
    assert_eq!(guest.paged_pages(), 0);
    assert!(!guest.crashed(), "paging was disabled with pages out");
    assert!(store.is_empty());
    guest.check_all();
}

#[test]
fn crash_and_restart_from_the_journal_keeps_every_page() {
    let guest = Guest::new(128);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let mut pager = Pager::start(&guest.host, config(guest.dom, &dir, 32), store.clone()).unwrap();
    settle(&mut pager, &guest, 32);
    let running = PagerThread::spawn(pager);
    run_guest(&guest, &trace(Pattern::Zipf, 128, 600, 7), |_| {});
    let pager = running.stop();
    assert!(guest.paged_pages() > 0);
    // The pager dies: no shutdown, its ring and event channel go away, paging stays on.
    drop(pager);
    assert!(!guest.crashed());

    let mut pager = Pager::start(&guest.host, config(guest.dom, &dir, 32), store.clone()).unwrap();
    assert_eq!(
        guest.paged_pages(),
        0,
        "restart pages the dead pager's pages back"
    );
    settle(&mut pager, &guest, 32);
    let running = PagerThread::spawn(pager);
    guest.check_all();
    running.stop().shutdown().unwrap();
    assert!(!guest.crashed());
    guest.check_all();
}

/// A store that loses some pages (every page with an odd gfn), as a memory server that
/// died with the only replica would.
#[derive(Debug)]
struct LosesOddPages {
    inner: MemoryStore,
    lost: std::sync::atomic::AtomicBool,
}

impl PageStore for LosesOddPages {
    fn put_batch(&self, dom: DomId, pages: &[(Gfn, &[u8])]) -> Result<(), StoreError> {
        self.inner.put_batch(dom, pages)
    }
    fn get(&self, dom: DomId, gfn: Gfn) -> Result<Vec<u8>, StoreError> {
        if self.lost.load(std::sync::atomic::Ordering::SeqCst) && gfn % 2 == 1 {
            return Err(StoreError::Unavailable {
                source: "replica gone".into(),
            });
        }
        self.inner.get(dom, gfn)
    }
    fn remove(&self, dom: DomId, gfns: &[Gfn]) -> Result<(), StoreError> {
        self.inner.remove(dom, gfns)
    }
    fn describe(&self) -> String {
        "lossy".into()
    }
}

#[test]
fn store_loss_pages_back_what_it_can_and_reports() {
    let guest = Guest::new(64);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LosesOddPages {
        inner: MemoryStore::new(),
        lost: false.into(),
    });
    let mut pager = Pager::start(&guest.host, config(guest.dom, &dir, 16), store.clone()).unwrap();
    settle(&mut pager, &guest, 16);
    let out: Vec<Gfn> = (0..64)
        .filter(|g| {
            guest.sim.page_state(guest.dom, *g).unwrap() == remoca_xen::sim::PageState::PagedOut
        })
        .collect();
    let odd_out = out.iter().filter(|g| *g % 2 == 1).count() as u64;
    let even_out = *out.iter().find(|g| *g % 2 == 0).unwrap();
    assert!(odd_out > 0);
    store.lost.store(true, std::sync::atomic::Ordering::SeqCst);

    let odd = *out.iter().find(|g| *g % 2 == 1).unwrap();
    let blocked = {
        let guest = guest.clone();
        std::thread::spawn(move || guest.sim.guest_read(guest.dom, odd))
    };
    // The fault cannot be served: the pager pages back every page the store still has.
    for _ in 0..1000 {
        if pager.stats().store_lost.is_some() {
            break;
        }
        pager.step().unwrap();
    }
    let stats = pager.stats().clone();
    assert!(stats.store_lost.is_some(), "{stats}");
    assert_eq!(stats.out_pages, odd_out);
    assert_eq!(guest.paged_pages(), odd_out);
    assert_eq!(
        guest.sim.page_state(guest.dom, even_out).unwrap(),
        remoca_xen::sim::PageState::Ram
    );
    assert!(stats.unserved_faults >= 1);
    assert!(!blocked.is_finished());
    // Shutdown refuses to disable paging (it would crash the guest) and says which pages.
    let failed = pager.shutdown().unwrap_err();
    match &failed.error {
        PagerError::PagesLost { gfns, .. } => assert_eq!(gfns.len() as u64, odd_out),
        e => panic!("unexpected {e}"),
    }
    assert!(!guest.crashed());
    // The replica comes back: the kept pager serves the blocked vCPU and shuts down cleanly.
    store.lost.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut pager = *failed.pager;
    for _ in 0..1000 {
        if pager.stats().unserved_faults == 0 {
            break;
        }
        pager.step().unwrap();
    }
    assert_eq!(pager.stats().unserved_faults, 0);
    blocked.join().unwrap().unwrap();
    pager.shutdown().unwrap();
    assert!(!guest.crashed());
    guest.check_all();
}

#[test]
fn follows_the_xenstore_target() {
    let guest = Guest::new(64);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(guest.dom, &dir, 0);
    cfg.target = Target::Xenstore;
    let path = remoca_paging::pager::target_path(guest.dom);
    let mut pager = Pager::start(&guest.host, cfg, Arc::new(MemoryStore::new())).unwrap();
    for _ in 0..5 {
        pager.step().unwrap();
    }
    assert_eq!(guest.paged_pages(), 0, "no target, no paging");
    guest.host.store.write(Tx::NONE, &path, b"160").unwrap(); // KiB = 40 pages
    settle(&mut pager, &guest, 40);
    assert_eq!(guest.tot_pages(), 40);
    guest.host.store.write(Tx::NONE, &path, b"64").unwrap(); // 16 pages
    settle(&mut pager, &guest, 16);
    assert_eq!(pager.stats().target_pages, Some(16));
    pager.shutdown().unwrap();
    assert!(!guest.crashed());
    guest.check_all();
}

fn start_error(host: &Host, dom: DomId) -> PagerError {
    let dir = tempfile::tempdir().unwrap();
    Pager::start(host, config(dom, &dir, 1), Arc::new(MemoryStore::new())).unwrap_err()
}

#[test]
fn enable_failure_says_why() {
    let guest = Guest::new(16);
    guest
        .sim
        .inject(
            "paging.enable",
            Fault::FailNth {
                nth: 1,
                errno: libc::ENOSYS,
            },
        )
        .unwrap();
    let e = start_error(&guest.host, guest.dom);
    assert!(
        e.to_string().contains("CONFIG_MEM_PAGING"),
        "unexpected message: {e}"
    );
    let pv = guest.sim.create_domain(DomainSpec::pv("pv", 16)).unwrap();
    let e = start_error(&guest.host, pv);
    assert!(matches!(e, PagerError::Unavailable { .. }), "{e}");
    assert!(e.to_string().contains("not HVM"), "{e}");
}

#[test]
fn run_pager_publishes_status_and_stops_with_every_page_back() {
    use remoca_paging::service::{pager_status, run_pager, status_path, PagerRunConfig};
    use std::sync::atomic::{AtomicBool, Ordering};

    let guest = Guest::new(64);
    let dir = tempfile::tempdir().unwrap();
    let status = guest
        .host
        .store
        .watch(&status_path(guest.dom), "test")
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let (host, stop) = (guest.host.clone(), stop.clone());
        let mut cfg = PagerRunConfig::new("guest", dir.path().to_path_buf());
        cfg.target_kib = Some(32 * 4);
        cfg.batch = 8;
        cfg.status_interval = std::time::Duration::ZERO;
        std::thread::spawn(move || run_pager(&host, cfg, &stop, |_| {}))
    };
    // Wait (on the xenstore watch) until the pager reports the guest at its target.
    loop {
        status.next().expect("xenstore watch");
        if pager_status(&guest.host, guest.dom).as_deref() == Some("out 128 KiB / tgt 128 KiB") {
            break;
        }
    }
    assert_eq!(guest.paged_pages(), 32);
    // The guest is idle and at its target: stopping pages exactly those 32 back.
    stop.store(true, Ordering::Relaxed);
    let report = runner.join().unwrap().unwrap();
    assert_eq!(report.paged_back, 32);
    assert_eq!(guest.paged_pages(), 0);
    assert!(!guest.crashed());
    assert_eq!(pager_status(&guest.host, guest.dom), None);
    guest.check_all();
}
