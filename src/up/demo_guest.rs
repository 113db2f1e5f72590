//! The demo guest's workload on the simulated host: a thread that plays the guest's vCPU,
//! touching its pages with a skewed (zipf-like) pattern while the pager holds the domain
//! below its size, and checking that every page reads back what it last wrote.
//!
//! Each page carries a stamp `(gfn, version)` in its first 16 bytes; a write bumps the
//! version, a read compares with the version this thread remembers. A mismatch means the
//! paging path lost or mixed up a page, and is counted, never hidden.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use remoca_xen::sim::SimHost;
use remoca_xen::DomId;

/// Counters the status line shows.
#[derive(Debug, Default)]
pub struct WorkloadStats {
    pub accesses: AtomicU64,
    pub wrong: AtomicU64,
    pub errors: AtomicU64,
}

/// A running workload; stopped and joined by [`Workload::stop`].
#[derive(Debug)]
pub struct Workload {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<WorkloadStats>,
}

impl Workload {
    pub fn start(sim: SimHost, dom: DomId, pages: u64) -> std::io::Result<Workload> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(WorkloadStats::default());
        let (s, st) = (stop.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name(format!("demo-guest-{dom}"))
            .spawn(move || run(&sim, dom, pages, &s, &st))?;
        Ok(Workload {
            stop,
            thread: Some(thread),
            stats,
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(sim: &SimHost, dom: DomId, pages: u64, stop: &AtomicBool, stats: &WorkloadStats) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(dom));
    let mut versions = vec![0u64; pages as usize];
    while !stop.load(Ordering::Relaxed) {
        // Skewed: a quarter of the pages get most accesses, the rest are touched now and then.
        let hot = rng.gen_bool(0.8);
        let gfn = if hot {
            rng.gen_range(0..pages / 4)
        } else {
            rng.gen_range(0..pages)
        };
        let v = &mut versions[gfn as usize];
        let result = if rng.gen_bool(0.3) {
            *v += 1;
            let mut stamp = [0u8; 16];
            stamp[..8].copy_from_slice(&gfn.to_le_bytes());
            stamp[8..].copy_from_slice(&v.to_le_bytes());
            sim.guest_write(dom, gfn, 0, &stamp)
        } else {
            sim.guest_read(dom, gfn).map(|page| {
                let want = if *v == 0 {
                    [0u8; 16]
                } else {
                    let mut s = [0u8; 16];
                    s[..8].copy_from_slice(&gfn.to_le_bytes());
                    s[8..].copy_from_slice(&v.to_le_bytes());
                    s
                };
                if page[..16] != want {
                    stats.wrong.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        match result {
            Ok(()) => {
                stats.accesses.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(dom, gfn, error = %e, "demo guest access failed");
            }
        }
        // A guest does other things between page touches; keep the demo light on CPU.
        if stats.accesses.load(Ordering::Relaxed) % 64 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
