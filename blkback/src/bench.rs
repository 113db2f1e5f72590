//! `remoca bench blkback`: the same raw template served by `qemu-nbd` and by remoca (plain,
//! and through a copy-on-write overlay), driven by the same external clients in one run.
//!
//! - sequential 1 MiB read and write: `nbdcopy --request-size=1M --connections=1`
//!   (read to `null:`, write from a local file), MB/s;
//! - 4 KiB reads and writes at queue depth 1, 16 and 32: `qemu-img bench -s 4096 -d D`, with a
//!   large odd step so successive requests are scattered over the image (qemu-img bench
//!   has no random mode; offsets advance by the step modulo the image size), IOPS.
//!
//! Before every measurement `sync` runs (no target pays for another's writeback) and the
//! files behind the measured target are written back and dropped from the page cache, so
//! every target starts from the same cache state: for the read rows they are then read once
//! sequentially (all cached, by the same readahead); for the write rows they stay out of the
//! cache, so every write makes its own page-cache folio the same way on every target.
//! (Without this the overlay file, first cached by the 1 MiB writes of the first pass, and
//! the raw copies, cached by the copy, held different page-cache folios, and the kernel's
//! 4 KiB buffered write, which walks the block buffers of the whole folio it lands in, cost
//! more on the overlay: `perf` showed more time in `ext4_block_write_begin`, a difference
//! that had nothing to do with the servers.)
//!
//! Every figure is the median of `reps` rounds, printed with the rounds' minimum and
//! maximum; the ratios are the medians (and ranges) of the per-round ratios, since the
//! targets of one round run back to back and share whatever else the machine was doing.
//! Each round starts with another target. The read rows read an overlay that was never
//! written (its reads fall through to the template). Each write row is measured on the raw
//! copies (preallocated: qemu-nbd and remoca each overwrite their own) and on an overlay
//! that is **fresh in every round** (a new file, the remoca server restarted on it), written
//! once ("first write": every cluster it touches is allocated) and then with the same
//! requests again ("rewrite": those clusters are already `Data`); the table has a row for
//! each, with the same raw and qemu-nbd samples.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::disk::Disk;
use crate::export::Exports;
use crate::overlay::{header::DEFAULT_CLUSTER_BITS, Overlay};
use crate::raw::{drop_cached_pages, RawFile};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Template size in bytes.
    pub size: u64,
    /// Requests per `qemu-img bench` run.
    pub count: u64,
    /// Where the images go (default: a temporary directory).
    pub dir: Option<PathBuf>,
    /// Repetitions per row (the median is reported).
    pub reps: usize,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("I/O while preparing the benchmark")]
    Io(#[from] io::Error),
    #[error("cannot run {tool} (is it installed? qemu-utils, libnbd-bin)")]
    Spawn {
        tool: String,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed: {stderr}")]
    Tool { tool: String, stderr: String },
    #[error("cannot open the benchmark disks: {0}")]
    Setup(String),
}

/// One row of the result table: medians of the rounds, and the samples behind them.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub unit: &'static str,
    pub qemu: f64,
    pub remoca: f64,
    pub overlay: f64,
    pub samples: Samples,
}

/// The result table.
#[derive(Debug, Clone)]
pub struct Report {
    pub size: u64,
    pub count: u64,
    pub reps: usize,
    pub cluster_size: u64,
    pub rows: Vec<Row>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "remoca bench blkback: {} MiB raw template, overlay clusters of {} KiB, {} requests \
             per 4 KiB run, {} rounds, unix sockets",
            self.size >> 20,
            self.cluster_size >> 10,
            self.count,
            self.reps
        )?;
        writeln!(
            f,
            "figures: median (min-max) of the rounds; ratios: median (min-max) of the \
             per-round ratios (the targets of a round ran back to back)"
        )?;
        writeln!(
            f,
            "| test | unit | qemu-nbd | remoca raw | remoca overlay | raw/qemu | overlay/raw |"
        )?;
        writeln!(f, "|---|---|---:|---:|---:|---:|---:|")?;
        let cell = |med: f64, x: &[f64]| {
            let (lo, hi) = min_max(x);
            format!("{med:.0} ({lo:.0}-{hi:.0})")
        };
        let ratio = |(m, lo, hi): (f64, f64, f64)| format!("{m:.2} ({lo:.2}-{hi:.2})");
        for r in &self.rows {
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.name,
                r.unit,
                cell(r.qemu, &r.samples.qemu),
                cell(r.remoca, &r.samples.remoca),
                cell(r.overlay, &r.samples.overlay),
                ratio(r.qemu_ratio()),
                ratio(r.overlay_ratio()),
            )?;
        }
        Ok(())
    }
}

fn tool(cmd: &mut Command, name: &str) -> Result<String, BenchError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BenchError::Spawn {
            tool: name.into(),
            source,
        })?;
    if !out.status.success() {
        return Err(BenchError::Tool {
            tool: name.into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_pattern(path: &Path, size: u64) -> io::Result<()> {
    let f = File::create(path)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut pos = 0;
    while pos < size {
        for b in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        let n = (size - pos).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], pos)?;
        pos += n as u64;
    }
    f.sync_all()
}

/// Write `paths` back, drop them from the page cache and, if `warm`, read each once
/// sequentially, so every target starts with its files cached (or not) the same way.
fn settle(paths: &[&Path], warm: bool) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for p in paths {
        let f = File::open(p)?;
        f.sync_all()?;
        drop_cached_pages(&f)?;
        if !warm {
            continue;
        }
        let mut pos = 0;
        loop {
            let n = f.read_at(&mut buf, pos)?;
            if n == 0 {
                break;
            }
            pos += n as u64;
        }
    }
    Ok(())
}

fn uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

fn wait_for_socket(path: &Path) -> Result<(), BenchError> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(BenchError::Setup(format!(
                "{} never appeared",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Sequential read of the whole export with nbdcopy; MB/s.
fn seq_read(uri: &str, size: u64) -> Result<f64, BenchError> {
    let t = Instant::now();
    tool(
        Command::new("nbdcopy").args([
            "--request-size=1048576",
            "--connections=1",
            "--requests=16",
            "--no-extents",
            uri,
            "null:",
        ]),
        "nbdcopy",
    )?;
    Ok(size as f64 / 1e6 / t.elapsed().as_secs_f64())
}

/// Sequential write of the whole export from `src` with nbdcopy (flushed at the end); MB/s.
fn seq_write(src: &Path, uri: &str, size: u64) -> Result<f64, BenchError> {
    let t = Instant::now();
    tool(
        Command::new("nbdcopy")
            .args([
                "--request-size=1048576",
                "--connections=1",
                "--requests=16",
                "--no-extents",
                "--flush",
            ])
            .arg(src)
            .arg(uri),
        "nbdcopy",
    )?;
    Ok(size as f64 / 1e6 / t.elapsed().as_secs_f64())
}

/// 4 KiB requests at `depth` with qemu-img bench; IOPS.
fn small_io(uri: &str, count: u64, depth: u32, write: bool) -> Result<f64, BenchError> {
    // 4 KiB × 7919 (prime): successive requests land ~31 MiB apart, wrapping modulo size.
    let step = (4096u64 * 7919).to_string();
    let mut cmd = Command::new("qemu-img");
    cmd.args([
        "bench", "-f", "raw", "-s", "4096", "-S", &step, "-t", "none",
    ])
    .args(["-c", &count.to_string(), "-d", &depth.to_string()]);
    if write {
        cmd.arg("-w");
    }
    let out = tool(cmd.arg(uri), "qemu-img bench")?;
    let secs = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .ok_or_else(|| BenchError::Tool {
            tool: "qemu-img bench".into(),
            stderr: out.clone(),
        })?;
    Ok(count as f64 / f64::max(secs, 1e-6))
}

/// Kills the child on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// remoca's NBD server, in process, serving `plain` and `overlay` on a unix socket.
struct Remoca {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), crate::nbd::ServerError>>>,
}

impl Remoca {
    fn start(
        rt: &tokio::runtime::Runtime,
        sock: &Path,
        plain: &Arc<dyn Disk>,
        overlay: &Arc<dyn Disk>,
    ) -> Result<Self, BenchError> {
        let exports = Exports::from_disks(vec![
            ("plain".into(), "raw copy".into(), plain.clone()),
            (
                "overlay".into(),
                "overlay over template".into(),
                overlay.clone(),
            ),
        ])
        .map_err(|e| BenchError::Setup(e.to_string()))?;
        let _ = std::fs::remove_file(sock);
        let listener = {
            let _g = rt.enter();
            tokio::net::UnixListener::bind(sock)?
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(crate::nbd::run(
            crate::nbd::Listener::Unix(listener),
            exports,
            async {
                let _ = stop_rx.await;
            },
        ));
        Ok(Self {
            stop: Some(stop_tx),
            server: Some(server),
        })
    }

    /// Stop serving and wait until the server has let go of its disks.
    fn stop(mut self, rt: &tokio::runtime::Runtime) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = rt.block_on(h);
        }
    }
}

/// A fresh, empty overlay at `path` over `base` (any old one removed first).
fn fresh_overlay(
    path: &Path,
    base: &Arc<dyn Disk>,
    hint: &str,
) -> Result<Arc<dyn Disk>, BenchError> {
    let _ = std::fs::remove_file(path);
    Overlay::create(path, &**base, DEFAULT_CLUSTER_BITS, hint)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let ov =
        Overlay::open(path, base.clone(), false).map_err(|e| BenchError::Setup(e.to_string()))?;
    Ok(Arc::new(ov))
}

/// The samples of one row: every round's figure per target.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub qemu: Vec<f64>,
    pub remoca: Vec<f64>,
    pub overlay: Vec<f64>,
}

fn median(x: &[f64]) -> f64 {
    let mut v = x.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn min_max(x: &[f64]) -> (f64, f64) {
    x.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

impl Row {
    fn from_samples(name: String, unit: &'static str, s: Samples) -> Self {
        Self {
            name,
            unit,
            qemu: median(&s.qemu),
            remoca: median(&s.remoca),
            overlay: median(&s.overlay),
            samples: s,
        }
    }

    /// Per-round ratios `a[i] / b[i]` (the targets of one round ran back to back).
    fn paired(a: &[f64], b: &[f64]) -> Vec<f64> {
        a.iter().zip(b).map(|(x, y)| x / y).collect()
    }

    /// overlay/raw per round: (median, min, max).
    pub fn overlay_ratio(&self) -> (f64, f64, f64) {
        let r = Self::paired(&self.samples.overlay, &self.samples.remoca);
        let (lo, hi) = min_max(&r);
        (median(&r), lo, hi)
    }

    /// raw/qemu per round: (median, min, max).
    pub fn qemu_ratio(&self) -> (f64, f64, f64) {
        let r = Self::paired(&self.samples.remoca, &self.samples.qemu);
        let (lo, hi) = min_max(&r);
        (median(&r), lo, hi)
    }
}

/// Run the benchmark.
///
/// # Errors
/// [`BenchError`] when a tool is missing or fails.
pub fn run(cfg: &BenchConfig) -> Result<Report, BenchError> {
    let tmp;
    let dir = match &cfg.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let size = cfg.size.div_ceil(1 << 20) << 20;
    let template = dir.join("template.raw");
    let qemu_copy = dir.join("qemu.raw");
    let plain_copy = dir.join("plain.raw");
    let source = dir.join("source.raw");
    let overlay = dir.join("vm.ovl");
    write_pattern(&template, size)?;
    for p in [&qemu_copy, &plain_copy, &source] {
        std::fs::copy(&template, p)?;
        // No writeback of the copies during the runs.
        File::open(p)?.sync_all()?;
    }
    let hint = template.to_string_lossy().into_owned();

    // qemu-nbd, the baseline.
    let qsock = dir.join("qemu.sock");
    let _ = std::fs::remove_file(&qsock);
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            "bench",
            "-t",
            "-e",
            "16",
            "--cache=writeback",
            "-k",
        ])
        .arg(&qsock)
        .arg(&qemu_copy)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            tool: "qemu-nbd".into(),
            source,
        })?;
    let _qemu = Reaped(child);
    wait_for_socket(&qsock)?;

    // remoca, in process on its own runtime; restarted whenever the overlay is replaced.
    let base: Arc<dyn Disk> =
        Arc::new(RawFile::open_read_only(&template).map_err(|e| BenchError::Setup(e.to_string()))?);
    let plain: Arc<dyn Disk> = Arc::new(
        RawFile::open_read_write(&plain_copy).map_err(|e| BenchError::Setup(e.to_string()))?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rsock = dir.join("remoca.sock");
    let ov = fresh_overlay(&overlay, &base, &hint)?;
    let mut server = Some(Remoca::start(&rt, &rsock, &plain, &ov)?);
    drop(ov);

    let targets = [
        uri(&qsock, "bench"),
        uri(&rsock, "plain"),
        uri(&rsock, "overlay"),
    ];
    // The files behind each target, in the order of `targets`.
    let files: [Vec<&Path>; 3] = [
        vec![&qemu_copy],
        vec![&plain_copy],
        vec![&template, &overlay],
    ];
    settle(&[&source], true)?;
    let reps = cfg.reps.max(1);
    let mut rows = Vec::new();
    // One measurement: sync, the target's files reset in the page cache, the run.
    let run_one = |i: usize, warm: bool, f: &dyn Fn(&str) -> Result<f64, BenchError>| {
        // Start each run without another target's dirty pages being written back, and
        // with this target's files cached the same way as the others'.
        let _ = Command::new("sync").status();
        settle(&files[i], warm)?;
        f(&targets[i])
    };
    let show = |name: &str, unit: &str, v: &[f64]| {
        let all = v
            .iter()
            .map(|s| format!("{s:.0}"))
            .collect::<Vec<_>>()
            .join(" ");
        eprintln!("  {name}: median {:.0} [{all}] {unit}", median(v));
    };
    // Read rows: `reps` rounds over the three targets, each round starting with another
    // target (none always runs right after the same neighbour). The overlay has never
    // been written: its reads fall through to the template.
    let mut reads = |name: &str, f: &dyn Fn(&str) -> Result<f64, BenchError>| {
        let mut v: [Vec<f64>; 3] = Default::default();
        for round in 0..reps {
            for k in 0..3 {
                let i = (round + k) % 3;
                v[i].push(run_one(i, true, f)?);
            }
        }
        let unit = if name.starts_with("seq") {
            "MB/s"
        } else {
            "IOPS"
        };
        eprintln!("{name}:");
        for (t, x) in ["qemu-nbd", "remoca raw", "overlay"].iter().zip(&v) {
            show(t, unit, x);
        }
        let [q, r, o] = v;
        rows.push(Row::from_samples(
            name.into(),
            unit,
            Samples {
                qemu: q,
                remoca: r,
                overlay: o,
            },
        ));
        Ok::<(), BenchError>(())
    };
    let count = cfg.count;
    reads("seq read 1 MiB", &|u| seq_read(u, size))?;
    reads("4 KiB read QD1", &|u| small_io(u, count, 1, false))?;
    reads("4 KiB read QD16", &|u| small_io(u, count, 16, false))?;
    reads("4 KiB read QD32", &|u| small_io(u, count, 32, false))?;

    // Write rows: per round qemu-nbd, remoca raw (both overwrite a preallocated file) and
    // the overlay unit: a fresh overlay (new file, remoca restarted on it) written once
    // ("first write": every cluster allocated, the file system reserving its blocks) and
    // then the same requests again ("rewrite": all clusters already Data). Rounds rotate
    // which of the three units goes first.
    let mut writes =
        |name: &str, unit: &'static str, f: &dyn Fn(&str) -> Result<f64, BenchError>| {
            let mut v: [Vec<f64>; 4] = Default::default();
            for round in 0..reps {
                for k in 0..3 {
                    let i = (round + k) % 3;
                    if i < 2 {
                        v[i].push(run_one(i, false, f)?);
                        continue;
                    }
                    if let Some(s) = server.take() {
                        s.stop(&rt);
                    }
                    let ov = fresh_overlay(&overlay, &base, &hint)?;
                    server = Some(Remoca::start(&rt, &rsock, &plain, &ov)?);
                    drop(ov);
                    v[2].push(run_one(2, false, f)?);
                    v[3].push(run_one(2, false, f)?);
                }
            }
            eprintln!("{name}:");
            for (t, x) in [
                "qemu-nbd",
                "remoca raw",
                "overlay first write",
                "overlay rewrite",
            ]
            .iter()
            .zip(&v)
            {
                show(t, unit, x);
            }
            let [q, r, first, again] = v;
            rows.push(Row::from_samples(
                format!("{name}, overlay first write"),
                unit,
                Samples {
                    qemu: q.clone(),
                    remoca: r.clone(),
                    overlay: first,
                },
            ));
            rows.push(Row::from_samples(
                format!("{name}, overlay rewrite"),
                unit,
                Samples {
                    qemu: q,
                    remoca: r,
                    overlay: again,
                },
            ));
            Ok::<(), BenchError>(())
        };
    writes("seq write 1 MiB", "MB/s", &|u| seq_write(&source, u, size))?;
    writes("4 KiB write QD1", "IOPS", &|u| small_io(u, count, 1, true))?;
    writes("4 KiB write QD16", "IOPS", &|u| {
        small_io(u, count, 16, true)
    })?;
    writes("4 KiB write QD32", "IOPS", &|u| {
        small_io(u, count, 32, true)
    })?;

    if let Some(s) = server.take() {
        s.stop(&rt);
    }
    Ok(Report {
        size,
        count,
        reps,
        cluster_size: 1 << DEFAULT_CLUSTER_BITS,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_paired_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        let row = Row::from_samples(
            "x".into(),
            "IOPS",
            Samples {
                qemu: vec![10.0, 10.0, 10.0],
                remoca: vec![20.0, 10.0, 40.0],
                overlay: vec![10.0, 10.0, 30.0],
            },
        );
        assert_eq!(row.remoca, 20.0);
        assert_eq!(row.overlay_ratio(), (0.75, 0.5, 1.0));
        assert_eq!(row.qemu_ratio(), (2.0, 1.0, 4.0));
        let table = Report {
            size: 1 << 20,
            count: 1,
            reps: 3,
            cluster_size: 4096,
            rows: vec![row],
        }
        .to_string();
        assert!(table.contains("| x | IOPS | 10 (10-10) | 20 (10-40) | 10 (10-30) | 2.00 (1.00-4.00) | 0.75 (0.50-1.00) |"), "{table}");
    }
}
