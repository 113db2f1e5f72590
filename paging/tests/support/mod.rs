//! Scenario support: a simulated host whose mem_paging behaves like Xen's for a pager
//! racing a guest, a guest workload with a model of every page's contents, a pager on its
//! own thread, and in-process memory servers that can be crashed.
//!
//! Why the paging shim: the simulator (xen/src/sim) marks a nominated page "touched" when
//! dom0 maps it, so xenpaging's order (nominate, map + copy, evict) always fails to evict
//! there; and `guest_read`/`guest_write` check the p2m and copy the bytes under two
//! separate lock acquisitions, so an eviction can slip between them. On Xen a foreign map
//! of a nominated page does not un-nominate it, and a guest access is atomic with respect
//! to the p2m change. [`XenLikePaging`] restores those two properties on top of the
//! simulator's public API: `nominate` records the page in a window, a guest access removes
//! its page from the window (Xen's "touched") and marks it in use until it completes, and
//! `evict` nominates and evicts in the simulator — under the gate, so no access to that
//! page can begin meanwhile — only if the page is still in the window and not in use. Everything else (ring, event channel, load, resume, disable, crash on disable
//! with pages out) is the simulator's own.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use remoca_paging::{Pager, PagerError};
use remoca_xen::foreign::ForeignMemory;
use remoca_xen::mem_paging::{MemPaging, PagingRing};
use remoca_xen::sim::{DomainSpec, PageState, SimHost};
use remoca_xen::{DomId, Error, Gfn, Host, Mapping, PAGE_SIZE};

#[derive(Debug, Default)]
struct GateState {
    /// Nominated pages not touched since.
    window: HashSet<Gfn>,
    /// Pages a guest access is using right now.
    in_access: HashSet<Gfn>,
}

#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
}

impl Gate {
    /// A guest access to `gfn` begins: it un-nominates the page, as on Xen.
    fn enter(&self, gfn: Gfn) {
        let mut st = self.state.lock();
        st.window.remove(&gfn);
        st.in_access.insert(gfn);
    }

    /// The access is over. A nomination made while it ran saw the page in use: the access
    /// touched the page after nomination, so that nomination is void too.
    fn leave(&self, gfn: Gfn) {
        let mut st = self.state.lock();
        st.in_access.remove(&gfn);
        st.window.remove(&gfn);
    }
}

/// mem_paging + foreign memory with Xen's semantics for concurrent guests (see module doc).
#[derive(Debug)]
pub struct XenLikePaging {
    sim: SimHost,
    gate: Arc<Gate>,
}

impl MemPaging for XenLikePaging {
    fn enable(&self, dom: DomId) -> remoca_xen::Result<PagingRing> {
        self.sim.enable(dom)
    }
    fn disable(&self, dom: DomId) -> remoca_xen::Result<()> {
        self.gate.state.lock().window.clear();
        MemPaging::disable(&self.sim, dom)
    }
    fn nominate(&self, dom: DomId, gfn: Gfn) -> remoca_xen::Result<()> {
        match self.sim.page_state(dom, gfn)? {
            PageState::Ram => {
                self.gate.state.lock().window.insert(gfn);
                Ok(())
            }
            _ => Err(Error::os(format!("nominate gfn {gfn:#x}"), libc::EBUSY)),
        }
    }
    fn evict(&self, dom: DomId, gfn: Gfn) -> remoca_xen::Result<()> {
        let busy = || Error::os(format!("evict gfn {gfn:#x}: touched"), libc::EBUSY);
        // Holding the gate, no guest access to this page can begin until it is out.
        let mut st = self.gate.state.lock();
        if st.in_access.contains(&gfn) || !st.window.remove(&gfn) {
            return Err(busy());
        }
        self.sim.nominate(dom, gfn)?;
        self.sim.evict(dom, gfn)
    }
    fn load(&self, dom: DomId, gfn: Gfn, page: &[u8]) -> remoca_xen::Result<()> {
        self.sim.load(dom, gfn, page)
    }
    fn resume(&self, dom: DomId) -> remoca_xen::Result<()> {
        self.sim.resume(dom)
    }
}

impl ForeignMemory for XenLikePaging {
    fn map(&self, dom: DomId, gfns: &[Gfn], writable: bool) -> remoca_xen::Result<Mapping> {
        self.sim.map(dom, gfns, writable)
    }
    fn map_sparse(
        &self,
        dom: DomId,
        gfns: &[Gfn],
        writable: bool,
    ) -> remoca_xen::Result<(Mapping, Vec<i32>)> {
        self.sim.map_sparse(dom, gfns, writable)
    }
}

/// A simulated host with one HVM guest of `pages` pages, every page initialised.
#[derive(Debug, Clone)]
pub struct Guest {
    pub sim: SimHost,
    pub host: Host,
    pub dom: DomId,
    pub pages: u64,
    gate: Arc<Gate>,
    /// Last value written to each page.
    model: Arc<Mutex<Vec<u64>>>,
}

fn page_image(gfn: Gfn, value: u64) -> Vec<u8> {
    let mut p = vec![(value as u8) ^ (gfn as u8); PAGE_SIZE];
    p[..8].copy_from_slice(&gfn.to_le_bytes());
    p[8..16].copy_from_slice(&value.to_le_bytes());
    p[PAGE_SIZE - 8..].copy_from_slice(&value.to_le_bytes());
    p
}

impl Guest {
    pub fn new(pages: u64) -> Guest {
        let sim = SimHost::new();
        let dom = sim.create_domain(DomainSpec::hvm("guest", pages)).unwrap();
        let gate = Arc::new(Gate::default());
        let shim = Arc::new(XenLikePaging {
            sim: sim.clone(),
            gate: gate.clone(),
        });
        let mut host = Host::from_sim(sim.clone());
        host.paging = shim.clone();
        host.foreign = shim;
        let g = Guest {
            sim,
            host,
            dom,
            pages,
            gate,
            model: Arc::new(Mutex::new(vec![0; pages as usize])),
        };
        for gfn in 0..pages {
            g.write(gfn, 1);
        }
        g
    }

    /// The guest writes `value` into page `gfn` (faulting it in through the pager).
    pub fn write(&self, gfn: Gfn, value: u64) {
        self.gate.enter(gfn);
        self.sim
            .guest_write(self.dom, gfn, 0, &page_image(gfn, value))
            .unwrap_or_else(|e| panic!("guest write of gfn {gfn:#x}: {e}"));
        self.model.lock()[gfn as usize] = value;
        self.gate.leave(gfn);
    }

    /// The guest reads page `gfn` and checks it holds what was last written.
    pub fn check(&self, gfn: Gfn) {
        self.gate.enter(gfn);
        let page = self
            .sim
            .guest_read(self.dom, gfn)
            .unwrap_or_else(|e| panic!("guest read of gfn {gfn:#x}: {e}"));
        self.gate.leave(gfn);
        let want = self.model.lock()[gfn as usize];
        assert!(
            page == page_image(gfn, want),
            "gfn {gfn:#x}: expected value {want}, page holds gfn {} value {}",
            u64::from_le_bytes(page[..8].try_into().unwrap()),
            u64::from_le_bytes(page[8..16].try_into().unwrap()),
        );
    }

    /// Check every page.
    pub fn check_all(&self) {
        for gfn in 0..self.pages {
            self.check(gfn);
        }
    }

    pub fn tot_pages(&self) -> u64 {
        self.host.domains.info(self.dom).unwrap().tot_pages
    }

    pub fn paged_pages(&self) -> u64 {
        self.host.domains.info(self.dom).unwrap().paged_pages
    }

    pub fn crashed(&self) -> bool {
        self.sim.is_crashed(self.dom).unwrap()
    }
}

/// Access patterns of the scenario guests.
#[derive(Debug, Clone, Copy)]
pub enum Pattern {
    Uniform,
    /// Zipf with exponent 1 over a shuffled page order.
    Zipf,
    /// Sequential sweeps over all pages.
    Scan,
}

/// `n` page numbers in `0..pages` following `pattern`.
pub fn trace(pattern: Pattern, pages: u64, n: usize, seed: u64) -> Vec<Gfn> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    match pattern {
        Pattern::Uniform => (0..n).map(|_| rng.gen_range(0..pages)).collect(),
        Pattern::Scan => (0..n as u64).map(|i| i % pages).collect(),
        Pattern::Zipf => {
            let mut order: Vec<Gfn> = (0..pages).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.gen_range(0..=i));
            }
            let weights: Vec<f64> = (1..=pages).map(|r| 1.0 / r as f64).collect();
            let total: f64 = weights.iter().sum();
            let mut cdf = Vec::with_capacity(weights.len());
            let mut acc = 0.0;
            for w in weights {
                acc += w / total;
                cdf.push(acc);
            }
            (0..n)
                .map(|_| {
                    let u: f64 = rng.gen();
                    let r = cdf.partition_point(|&c| c < u).min(order.len() - 1);
                    order[r]
                })
                .collect()
        }
    }
}

/// Run `trace` on the guest: every other access writes a new value, the others read and
/// check. `on_op` sees the op index (to trigger failures mid-run).
pub fn run_guest(guest: &Guest, trace: &[Gfn], mut on_op: impl FnMut(usize)) {
    for (i, &gfn) in trace.iter().enumerate() {
        on_op(i);
        if i % 2 == 0 {
            guest.write(gfn, i as u64 + 2);
        } else {
            guest.check(gfn);
        }
    }
}

/// A pager stepping on its own thread until stopped.
#[derive(Debug)]
pub struct PagerThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<Pager, PagerError>>>,
}

impl PagerThread {
    pub fn spawn(mut pager: Pager) -> PagerThread {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            pager.run_until(&s)?;
            Ok(pager)
        });
        PagerThread {
            stop,
            handle: Some(handle),
        }
    }

    /// Stop stepping and hand the pager back.
    pub fn stop(mut self) -> Pager {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("pager thread panicked")
            .expect("pager failed")
    }
}

impl Drop for PagerThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An in-process memory server on 127.0.0.1:0 in a runtime of its own, so a test can crash
/// it (drop every task and socket at once, like kill -9).
#[derive(Debug)]
pub struct TestMemserver {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestMemserver {
    pub fn start() -> TestMemserver {
        use remoca_memserver::server::{serve, ServerConfig};
        use remoca_memserver::store::{ProcMeminfo, Store, StoreConfig};
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = StoreConfig {
            capacity: 64 << 20,
            headroom: 0,
        };
        let store = Arc::new(Store::new(cfg, Arc::new(ProcMeminfo)));
        let config = ServerConfig::new(cfg);
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = serve(listener, store, config, std::future::pending::<()>()).await;
        });
        TestMemserver {
            addr,
            runtime: Some(runtime),
        }
    }

    pub fn crash(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for TestMemserver {
    fn drop(&mut self) {
        self.crash();
    }
}
