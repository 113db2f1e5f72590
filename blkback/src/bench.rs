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
//! Every row is the median of `reps` rounds over the three targets, each round starting
//! with the next target. For the first write pass the overlay is discarded (all clusters
//! Zero, data punched out) before each of its runs, so every round pays cluster and block
//! allocation again, while the raw copies stay preallocated. Each server gets its own copy
//! of the template for writes, so every row starts from the same bytes; after the first
//! pass every overlay cluster is allocated, so the later write rows measure overwrites of
//! allocated clusters.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
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

/// One row of the result table.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub unit: &'static str,
    pub qemu: f64,
    pub remoca: f64,
    pub overlay: f64,
}

/// The result table.
#[derive(Debug, Clone)]
pub struct Report {
    pub size: u64,
    pub count: u64,
    pub reps: usize,
    pub rows: Vec<Row>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "remoca bench blkback: {} MiB raw template, {} requests per 4 KiB run, \
             median of {} rounds, unix sockets",
            self.size >> 20,
            self.count,
            self.reps
        )?;
        writeln!(
            f,
            "| test | unit | qemu-nbd | remoca raw | remoca overlay | raw/qemu | overlay/raw |"
        )?;
        writeln!(f, "|---|---|---:|---:|---:|---:|---:|")?;
        for r in &self.rows {
            writeln!(
                f,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
                r.name,
                r.unit,
                r.qemu,
                r.remoca,
                r.overlay,
                r.remoca / r.qemu,
                r.overlay / r.remoca
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
    let _ = std::fs::remove_file(&overlay);

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

    // remoca, in-process on its own runtime.
    let base: Arc<dyn Disk> =
        Arc::new(RawFile::open_read_only(&template).map_err(|e| BenchError::Setup(e.to_string()))?);
    Overlay::create(
        &overlay,
        &*base,
        DEFAULT_CLUSTER_BITS,
        &template.to_string_lossy(),
    )
    .map_err(|e| BenchError::Setup(e.to_string()))?;
    let ov: Arc<dyn Disk> = Arc::new(
        Overlay::open(&overlay, base, false).map_err(|e| BenchError::Setup(e.to_string()))?,
    );
    let plain: Arc<dyn Disk> = Arc::new(
        RawFile::open_read_write(&plain_copy).map_err(|e| BenchError::Setup(e.to_string()))?,
    );
    let ov_handle = ov.clone();
    let exports = Exports::from_disks(vec![
        ("plain".into(), "raw copy".into(), plain),
        ("overlay".into(), "overlay over template".into(), ov),
    ])
    .map_err(|e| BenchError::Setup(e.to_string()))?;
    let rsock = dir.join("remoca.sock");
    let _ = std::fs::remove_file(&rsock);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let listener = {
        let _g = rt.enter();
        tokio::net::UnixListener::bind(&rsock)?
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(crate::nbd::run(
        crate::nbd::Listener::Unix(listener),
        exports,
        async {
            let _ = stop_rx.await;
        },
    ));

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
    // `first_pass`: before each of the overlay's runs, discard all of it (every cluster
    // becomes Zero, its data blocks are punched out), so every run allocates again.
    let mut measure = |name: &str,
                       unit: &'static str,
                       write: bool,
                       first_pass: bool,
                       f: &dyn Fn(&str) -> Result<f64, BenchError>| {
        // `reps` rounds over the three targets; the median of each.
        let mut v: [Vec<f64>; 3] = Default::default();
        for round in 0..reps {
            // Each round starts with another target, so none always runs right after the
            // same neighbour (whose writeback or cache misses it could inherit).
            for k in 0..targets.len() {
                let i = (round + k) % targets.len();
                let t = &targets[i];
                if first_pass && i == 2 {
                    ov_handle
                        .discard(0, size)
                        .and_then(|()| ov_handle.flush())
                        .map_err(|e| BenchError::Setup(e.to_string()))?;
                }
                // Start each run without another target's dirty pages being written back,
                // and with this target's files cached the same way as the others'.
                let _ = Command::new("sync").status();
                settle(&files[i], !write)?;
                v[i].push(f(t)?);
            }
        }
        let med = |x: &mut Vec<f64>| {
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let (q, r, o) = (med(&mut v[0]), med(&mut v[1]), med(&mut v[2]));
        let all = |x: &[f64]| {
            x.iter()
                .map(|s| format!("{s:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        eprintln!(
            "{name}: qemu-nbd {q:.0} [{}], remoca {r:.0} [{}], overlay {o:.0} [{}] {unit}",
            all(&v[0]),
            all(&v[1]),
            all(&v[2])
        );
        let _ = io::stderr().flush();
        rows.push(Row {
            name: name.into(),
            unit,
            qemu: q,
            remoca: r,
            overlay: o,
        });
        Ok::<(), BenchError>(())
    };
    let count = cfg.count;
    measure("seq read 1 MiB", "MB/s", false, false, &|u| {
        seq_read(u, size)
    })?;
    measure("4 KiB read QD1", "IOPS", false, false, &|u| {
        small_io(u, count, 1, false)
    })?;
    measure("4 KiB read QD16", "IOPS", false, false, &|u| {
        small_io(u, count, 16, false)
    })?;
    measure("4 KiB read QD32", "IOPS", false, false, &|u| {
        small_io(u, count, 32, false)
    })?;
    // The first write pass allocates every overlay cluster (again in every round: the
    // overlay is discarded before each of its runs); the raw files are preallocated.
    measure("seq write 1 MiB, first pass", "MB/s", true, true, &|u| {
        seq_write(&source, u, size)
    })?;
    measure("seq write 1 MiB", "MB/s", true, false, &|u| {
        seq_write(&source, u, size)
    })?;
    measure("4 KiB write QD1", "IOPS", true, false, &|u| {
        small_io(u, count, 1, true)
    })?;
    measure("4 KiB write QD16", "IOPS", true, false, &|u| {
        small_io(u, count, 16, true)
    })?;
    measure("4 KiB write QD32", "IOPS", true, false, &|u| {
        small_io(u, count, 32, true)
    })?;

    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    Ok(Report {
        size,
        count,
        reps,
        rows,
    })
}
