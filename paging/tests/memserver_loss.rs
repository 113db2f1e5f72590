//! The pager over two replicating memory servers; one dies mid-run and every page stays
//! intact.

mod support;

use std::sync::Arc;

use remoca_memserver::client::{ClientConfig, PageSecret};
use remoca_paging::{MemserverStore, Pager, PagerConfig, Target};
use support::{run_guest, trace, Guest, PagerThread, Pattern, TestMemserver};

#[test]
fn losing_one_of_two_memory_servers_keeps_every_page() {
    let mut servers = [TestMemserver::start(), TestMemserver::start()];
    let mut cfg = ClientConfig::new(
        servers.iter().map(|s| s.addr).collect(),
        None,
        PageSecret::random(),
    );
    cfg.replicas = 2;
    let store = Arc::new(MemserverStore::connect(cfg).unwrap());

    let guest = Guest::new(192);
    let dir = tempfile::tempdir().unwrap();
    let mut config = PagerConfig::new(guest.dom, Target::Kib(64 * 4), dir.path().join("journal"));
    config.batch = 16;
    let mut pager = Pager::start(&guest.host, config, store.clone()).unwrap();
    while guest.tot_pages() > 64 {
        pager.step().unwrap();
    }
    let running = PagerThread::spawn(pager);

    let mut out_at_kill = 0;
    run_guest(&guest, &trace(Pattern::Zipf, 192, 1200, 11), |i| {
        if i == 600 {
            out_at_kill = guest.paged_pages();
            servers[0].crash();
        }
    });
    assert!(out_at_kill > 0, "pages were out when the server died");
    // Every page, including those whose other replica died, reads back as last written.
    guest.check_all();
    let pager = running.stop();
    let stats = pager.stats().clone();
    assert!(stats.faults >= out_at_kill, "{stats}");
    assert!(stats.store_lost.is_none(), "{stats}");
    pager.shutdown().unwrap();
    assert_eq!(guest.paged_pages(), 0);
    assert!(!guest.crashed());
    guest.check_all();
}
