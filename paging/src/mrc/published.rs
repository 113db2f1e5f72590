//! The working-set estimate in xenstore, under `/local/domain/<id>/remoca/`, and the thread
//! that keeps it current.
//!
//! | Key | Value |
//! |---|---|
//! | `mrc` | the curve: `size_kib:miss_ratio` points separated by one space, sizes evenly spaced and increasing from `current-kib`, ratios with 4 decimals, the last point the asymptote; at most [`MAX_POINTS`] points |
//! | `current-kib` | the guest's memory the curve starts from (`memory/target`, else its pages now) |
//! | `wss-kib` | estimated working set |
//! | `balloon-target-kib` | recommended memory target |
//! | `remote-share-kib` | `balloon-target-kib − current-kib`: what should live in remote memory |
//! | `samples` | sampled references behind the curve |
//! | `swap-ins`, `reads` | refaults and disk reads seen |
//! | `rate` | SHARDS sampling rate now |
//! | `updated` | Unix time of the estimate, seconds |
//!
//! The rules behind the sizes are in [`super::live`]. Dom0 writes every key in one
//! transaction (a reader never mixes two estimates) and makes the directory owned by dom0,
//! readable by the guest (`n0 r<id>`): a guest can see its recommendation but not forge it.
//! Values are decimal ASCII; a reader checks every key ([`read`]) before trusting it.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use remoca_xen::xenstore::{read_string, with_transaction, Access, Perm, XenStore};
use remoca_xen::{DomId, Host, Tx};

use super::live::{Estimate, WorkingSets, MAX_POINTS};
use super::plot;
use crate::pager::PAGE_KIB;

/// Longest `mrc` value a reader accepts (bytes).
const MAX_CURVE_LEN: usize = 4096;

/// Why a published estimate could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PublishedError {
    #[error("no working-set estimate for domain {dom} (is `remoca up` running with wss enabled and this domain's swap or disk on it?)")]
    Missing {
        dom: DomId,
        #[source]
        source: remoca_xen::Error,
    },
    #[error("{path}")]
    Read {
        path: String,
        #[source]
        source: remoca_xen::Error,
    },
    #[error("{key} = {value:?}: {why}")]
    Bad {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

/// `/local/domain/<dom>/remoca`.
pub fn dir(dom: DomId) -> String {
    format!("/local/domain/{dom}/remoca")
}

/// The `mrc` value of `e`.
pub fn encode_curve(e: &Estimate) -> String {
    let mut s = String::new();
    for (i, r) in e.ratios.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&format!(
            "{}:{:.4}",
            e.current_kib + i as u64 * e.bucket_kib,
            r
        ));
    }
    s
}

/// Parse an `mrc` value: `(first size, bucket, ratios)`, all in KiB.
///
/// # Errors
/// [`PublishedError::Bad`] naming what is wrong.
pub fn decode_curve(value: &str) -> Result<(u64, u64, Vec<f64>), PublishedError> {
    let bad = |why| PublishedError::Bad {
        key: "mrc",
        value: value.chars().take(80).collect(),
        why,
    };
    if value.len() > MAX_CURVE_LEN {
        return Err(bad("too long"));
    }
    let mut sizes = Vec::new();
    let mut ratios = Vec::new();
    for point in value.split(' ') {
        let (size, ratio) = point.split_once(':').ok_or_else(|| bad("not size:ratio"))?;
        let size: u64 = size.parse().map_err(|_| bad("size is not a number"))?;
        let ratio: f64 = ratio.parse().map_err(|_| bad("ratio is not a number"))?;
        if !(0.0..=1.0).contains(&ratio) {
            return Err(bad("ratio outside 0..1"));
        }
        sizes.push(size);
        ratios.push(ratio);
    }
    if ratios.len() > MAX_POINTS {
        return Err(bad("too many points"));
    }
    let bucket = match sizes.get(1) {
        Some(s1) if *s1 > sizes[0] => s1 - sizes[0],
        Some(_) => return Err(bad("sizes do not increase")),
        None => PAGE_KIB,
    };
    if sizes
        .windows(2)
        .any(|w| w[1].checked_sub(w[0]) != Some(bucket))
    {
        return Err(bad("sizes are not evenly spaced"));
    }
    Ok((sizes[0], bucket, ratios))
}

/// Write `e` for `dom` (one transaction).
///
/// # Errors
/// The xenstore error.
pub fn publish(store: &dyn XenStore, dom: DomId, e: &Estimate) -> remoca_xen::Result<()> {
    let d = dir(dom);
    let values = [
        ("mrc", encode_curve(e)),
        ("current-kib", e.current_kib.to_string()),
        ("wss-kib", e.wss_kib.to_string()),
        ("balloon-target-kib", e.balloon_target_kib.to_string()),
        ("remote-share-kib", e.remote_share_kib.to_string()),
        ("samples", e.samples.to_string()),
        ("swap-ins", e.swap_ins.to_string()),
        ("reads", e.reads.to_string()),
        ("rate", format!("{:.6}", e.rate)),
        ("updated", e.updated.to_string()),
    ];
    with_transaction(store, 5, |tx| {
        if store.read(tx, &d).is_err() {
            store.mkdir(tx, &d)?;
            store.set_perms(
                tx,
                &d,
                &[Perm::new(0, Access::None), Perm::new(dom, Access::Read)],
            )?;
        }
        for (k, v) in &values {
            store.write(tx, &format!("{d}/{k}"), v.as_bytes())?;
        }
        Ok(())
    })
}

/// Read and check what is published for `dom`.
///
/// # Errors
/// [`PublishedError`]: nothing published, or a key missing or malformed.
pub fn read(store: &dyn XenStore, dom: DomId) -> Result<Estimate, PublishedError> {
    let d = dir(dom);
    let curve = read_string(store, Tx::NONE, &format!("{d}/mrc"))
        .map_err(|source| PublishedError::Missing { dom, source })?;
    let (current_kib, bucket_kib, ratios) = decode_curve(&curve)?;
    let get = |key: &'static str| -> Result<String, PublishedError> {
        let path = format!("{d}/{key}");
        read_string(store, Tx::NONE, &path).map_err(|source| PublishedError::Read { path, source })
    };
    let num = |key: &'static str| -> Result<u64, PublishedError> {
        let v = get(key)?;
        v.trim().parse().map_err(|_| PublishedError::Bad {
            key,
            value: v,
            why: "not a number",
        })
    };
    let e = Estimate {
        current_kib,
        bucket_kib,
        ratios,
        wss_kib: num("wss-kib")?,
        balloon_target_kib: num("balloon-target-kib")?,
        remote_share_kib: num("remote-share-kib")?,
        samples: num("samples")?,
        swap_ins: num("swap-ins")?,
        reads: num("reads")?,
        rate: {
            let v = get("rate")?;
            v.trim().parse().map_err(|_| PublishedError::Bad {
                key: "rate",
                value: v,
                why: "not a number",
            })?
        },
        updated: num("updated")?,
    };
    if num("current-kib")? != e.current_kib {
        return Err(PublishedError::Bad {
            key: "current-kib",
            value: num("current-kib")?.to_string(),
            why: "differs from the curve's first size",
        });
    }
    Ok(e)
}

/// The memory `dom` has now, KiB: its balloon target (`memory/target`), else its pages.
pub fn current_kib(host: &Host, dom: DomId) -> Option<u64> {
    let target = read_string(
        &*host.store,
        Tx::NONE,
        &format!("/local/domain/{dom}/memory/target"),
    );
    match target.ok().and_then(|t| t.trim().parse().ok()) {
        Some(kib) => Some(kib),
        None => host.domains.info(dom).ok().map(|i| i.tot_pages * PAGE_KIB),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Print `e` for a person: a header, the plot, and one `name: value` line per size.
///
/// # Errors
/// The write error.
pub fn report(
    e: &Estimate,
    who: &str,
    width: usize,
    height: usize,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let age = unix_now().saturating_sub(e.updated);
    writeln!(
        out,
        "working set of {who}: {} sampled references (rate {:.4}), {} swap-ins, {} disk reads; updated {age} s ago",
        e.samples, e.rate, e.swap_ins, e.reads
    )?;
    writeln!(
        out,
        "miss ratio of the guest's misses against its memory (left edge: its memory now)"
    )?;
    let curve = e.curve();
    let mark = (e.balloon_target_kib - e.current_kib.min(e.balloon_target_kib)) / PAGE_KIB;
    out.write_all(
        plot::render_from(&curve, width, height, Some(mark), e.current_kib / PAGE_KIB).as_bytes(),
    )?;
    writeln!(out, "current: {} KiB", e.current_kib)?;
    writeln!(out, "wss: {} KiB", e.wss_kib)?;
    writeln!(out, "balloon target: {} KiB", e.balloon_target_kib)?;
    writeln!(out, "remote share: {} KiB", e.remote_share_kib)?;
    Ok(())
}

/// Estimates published every `interval` until stopped; the latest kept for a status line.
#[derive(Debug)]
pub struct Publisher {
    stop: Arc<AtomicBool>,
    wake: std::sync::mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
    latest: Arc<Mutex<BTreeMap<DomId, Estimate>>>,
}

impl Publisher {
    /// Publish every domain of `sets` every `interval` (the first time after one interval).
    ///
    /// # Errors
    /// The thread cannot start.
    pub fn spawn(
        host: Host,
        sets: Arc<WorkingSets>,
        interval: Duration,
    ) -> std::io::Result<Publisher> {
        let stop = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(Mutex::new(BTreeMap::new()));
        let (wake, sleep) = std::sync::mpsc::channel::<()>();
        let (s, l) = (stop.clone(), latest.clone());
        let thread = std::thread::Builder::new()
            .name("wss-publisher".into())
            .spawn(move || {
                let mut warned = false;
                loop {
                    let _ = sleep.recv_timeout(interval);
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                    for dom in sets.domains() {
                        let Some(current) = current_kib(&host, dom) else {
                            continue;
                        };
                        let Some(mut e) = sets.estimate(dom, current) else {
                            continue;
                        };
                        e.updated = unix_now();
                        if let Err(err) = publish(&*host.store, dom, &e) {
                            if !warned {
                                tracing::warn!(dom, error = %err, "cannot publish the working-set estimate");
                                warned = true;
                            }
                        }
                        l.lock().insert(dom, e);
                    }
                }
                for dom in sets.domains() {
                    let _ = host.store.rm(Tx::NONE, &dir(dom));
                }
            })?;
        Ok(Publisher {
            stop,
            wake,
            thread: Some(thread),
            latest,
        })
    }

    /// The last estimate published for `dom`.
    pub fn latest(&self, dom: DomId) -> Option<Estimate> {
        self.latest.lock().get(&dom).cloned()
    }

    /// A handle to the latest estimates (for a status column).
    pub fn latest_handle(&self) -> Arc<Mutex<BTreeMap<DomId, Estimate>>> {
        self.latest.clone()
    }

    /// Stop publishing and remove what was published.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mrc::Mrc;
    use remoca_xen::sim::SimHost;

    fn estimate() -> Estimate {
        let mrc = Mrc::from_ratios(64, &[1.0, 0.75, 0.5, 0.0]);
        let mut e = Estimate::from_curve(&mrc, 32768, 0.05);
        e.updated = 1_700_000_000;
        e.swap_ins = 12;
        e.reads = 3;
        e
    }

    #[test]
    fn a_published_estimate_reads_back() {
        let host = Host::from_sim(SimHost::demo().unwrap());
        let e = estimate();
        assert_eq!(
            encode_curve(&e),
            "32768:1.0000 33024:0.7500 33280:0.5000 33536:0.0000"
        );
        publish(&*host.store, 1, &e).unwrap();
        let back = read(&*host.store, 1).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.balloon_target_kib, 32768 + 3 * 256);
        let perms = host.store.get_perms(Tx::NONE, &dir(1)).unwrap();
        assert_eq!(perms[0], Perm::new(0, Access::None));
        assert!(matches!(
            read(&*host.store, 2),
            Err(PublishedError::Missing { dom: 2, .. })
        ));
        let mut out = Vec::new();
        report(&back, "domain 1", 40, 5, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("balloon target: 33536 KiB"), "{text}");
        assert!(text.contains("32.0 MiB"), "{text}");
    }

    #[test]
    fn malformed_curves_are_refused() {
        for bad in [
            "",
            "12",
            "1:0.5 2:x",
            "4:0.5 4:0.2",
            "4:0.5 8:0.2 16:0.1",
            "4:1.5",
        ] {
            assert!(decode_curve(bad).is_err(), "{bad:?}");
        }
        assert_eq!(decode_curve("8:1.0").unwrap(), (8, PAGE_KIB, vec![1.0]));
    }
}
