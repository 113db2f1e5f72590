//! `remoca bench failover`: what an NBD client sees when the active driver fails, and what
//! the split into endpoint and driver costs when nothing fails.
//!
//! 1. **Throughput**: the same workload (4 KiB random writes at queue depth 8 with a flush
//!    every 64 writes, then 4 KiB random reads at queue depth 8; `seconds` each) over NBD on
//!    a unix socket, against (a) the plain stack served in this process, as `remoca blkback`
//!    serves it, and (b) a failover endpoint in this process forwarding to a driver process
//!    (`remoca blkback driver`) with its monitor running. Both are set up side by side, each
//!    on a fresh overlay of the same template, and each row runs on both in turns of
//!    [`SLICE`] (100 ms: one stack, then the other, which one first alternating), until each
//!    has run `seconds`; the workload goes on where its last slice stopped. So a burst of
//!    load on the shared machine lands on both alike instead of on whichever row ran during
//!    it. Rows print IOPS and the split's ratio to plain. This runs `rounds` times (fresh
//!    stacks each time); rows print the medians, and the spread of the rounds' own ratios.
//!    Then, on the same connection, large requests: sequential [`LARGE`] (256 KiB) writes
//!    at queue depth 8 with a flush every [`LARGE_FLUSH_BYTES`] (64 MiB), then sequential
//!    256 KiB reads at queue depth 8 (`seconds` each, wrapping at the end of the disk);
//!    rows print MB/s (10^6 bytes per second) and the ratio. 4 KiB random I/O is the
//!    split's worst case (the hand-off cost per request); 256 KiB requests show what it
//!    costs per byte. 256 KiB is well within the maximum block size the NBD server
//!    advertises and accepts ([`crate::nbd::wire::MAX_PAYLOAD`], 32 MiB) and the channel's
//!    [`super::wire::MAX_DATA`] (32 MiB).
//! 2. **Failover**: one client writes 4 KiB blocks at queue depth 1 (a flush every 64)
//!    while the active driver is killed with SIGKILL `kills` times and hung with SIGSTOP
//!    `hangs` times, at random moments (each failed driver is restarted and becomes the
//!    backup). For each fault it reports the **detection time** (the fault to the endpoint
//!    declaring the driver faulty), the **takeover** (declared to every unanswered request
//!    re-sent to the backup) and the **client-visible pause** (the longest write that
//!    completed within a second after the fault). Then every block is read back and
//!    compared with what was last acknowledged. This part runs with the channel's readers
//!    on the third stack's CPU when there is one (`reader_cpu`), else unpinned.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::endpoint::{Endpoint, EndpointConfig};
use super::Addr;
use crate::disk::Disk;
use crate::export::{ExportConfig, Exports};
use crate::nbd::client::Client;
use crate::nbd::wire::{CMD_FLUSH, CMD_READ, CMD_WRITE};
use crate::overlay::{header::DEFAULT_CLUSTER_BITS, Overlay};
use crate::raw::RawFile;

const BLOCK: u64 = 4096;
const QD: usize = 8;
const FLUSH_EVERY: u64 = 64;
/// Request size of the large-request rows.
const LARGE: u64 = 256 << 10;
/// The large sequential writes flush after this many bytes.
const LARGE_FLUSH_BYTES: u64 = 64 << 20;
const _: () = assert!(LARGE <= crate::nbd::wire::MAX_PAYLOAD as u64);
const _: () = assert!(LARGE <= super::wire::MAX_DATA as u64);
/// The throughput rows switch between the two stacks after this much time on one.
const SLICE: Duration = Duration::from_millis(100);
const HEARTBEAT_MS: u64 = 50;
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(300);

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The `remoca` binary (drivers run as `remoca blkback driver`).
    pub exe: PathBuf,
    /// Scratch directory (a fresh temporary one under it is used and removed).
    pub dir: PathBuf,
    /// Disk size in bytes.
    pub size: u64,
    /// Seconds per throughput row.
    pub seconds: f64,
    /// Throughput rounds (fresh stacks each; plain and split take turns within each row);
    /// the table shows each row's median.
    pub rounds: usize,
    /// SIGKILLs of the active driver.
    pub kills: usize,
    /// SIGSTOP hangs of the active driver.
    pub hangs: usize,
    /// The CPU of the third stack's two channel readers ([`super::affinity`]), and of the
    /// failover part's; `None` leaves that stack out and runs the failover part unpinned.
    pub reader_cpu: Option<usize>,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Drivers {
    exe: PathBuf,
    export: String,
    reader_cpu: Option<usize>,
    children: Vec<(PathBuf, Child)>,
}

impl Drivers {
    fn start(&mut self, sock: &Path) -> Result<(), Error> {
        let _ = std::fs::remove_file(sock);
        let mut cmd = Command::new(&self.exe);
        cmd.args(["blkback", "driver", "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .args(["--export", &self.export])
            .args(["--heartbeat-ms", &HEARTBEAT_MS.to_string()]);
        if let Some(cpu) = self.reader_cpu {
            cmd.args(["--reader-cpu", &cpu.to_string()]);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().ok_or("no driver stdout")?);
        stdout.read_line(&mut line)?;
        // Keep reading what it prints, so it never writes into a closed pipe.
        std::thread::spawn(move || stdout.lines().map_while(Result::ok).for_each(drop));
        if !line.starts_with("driver listening") {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("driver did not start: {line:?}").into());
        }
        self.children.push((sock.to_owned(), child));
        Ok(())
    }

    fn pid(&self, sock: &Path) -> Option<u32> {
        self.children
            .iter()
            .find(|(s, _)| s == sock)
            .map(|(_, c)| c.id())
    }

    /// Reap `sock`'s driver (killed by us or by the endpoint) and start a new one there.
    fn restart(&mut self, sock: &Path) -> Result<(), Error> {
        if let Some(i) = self.children.iter().position(|(s, _)| s == sock) {
            let (_, mut c) = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
        self.start(sock)
    }
}

impl Drop for Drivers {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An NBD server for one disk (export `vm`) on a unix socket, in a runtime of its own;
/// also used by the endpoint's tests.
pub(super) struct NbdServer {
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    sock: PathBuf,
}

impl NbdServer {
    pub(super) fn start(disk: Arc<dyn Disk>, sock: PathBuf) -> Result<Self, Error> {
        let exports = Exports::from_disks(vec![("vm".into(), "bench".into(), disk)])?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = {
            let _g = rt.enter();
            tokio::net::UnixListener::bind(&sock)?
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(crate::nbd::run(
            crate::nbd::Listener::Unix(listener),
            exports,
            async move {
                let _ = rx.await;
            },
        ));
        Ok(Self {
            rt,
            stop: Some(tx),
            sock,
        })
    }

    pub(super) fn client(&self) -> Result<Client<UnixStream>, Error> {
        Ok(Client::connect(
            UnixStream::connect(&self.sock)?,
            "vm",
            true,
        )?)
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let rt = std::mem::replace(
            &mut self.rt,
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("an empty runtime"),
        );
        rt.shutdown_timeout(Duration::from_secs(2));
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn fresh_overlay(template: &Path, overlay: &Path) -> Result<(), Error> {
    let _ = std::fs::remove_file(overlay);
    let t = RawFile::open_read_only(template)?;
    Overlay::create(
        overlay,
        &t,
        DEFAULT_CLUSTER_BITS,
        &template.to_string_lossy(),
    )?;
    Ok(())
}

/// One throughput row's workload: `cmd` (READ or WRITE) of `len` bytes each at queue
/// depth [`QD`], at random `len`-aligned offsets or sequential ones (wrapping at the end of
/// the disk); WRITEs are followed by a FLUSH every `flush_every` completed writes.
#[derive(Debug, Clone, Copy)]
struct Workload {
    cmd: u16,
    len: u64,
    sequential: bool,
    flush_every: u64,
}

impl Workload {
    const fn random_4k(cmd: u16) -> Self {
        Workload {
            cmd,
            len: BLOCK,
            sequential: false,
            flush_every: FLUSH_EVERY,
        }
    }

    const fn sequential_large(cmd: u16) -> Self {
        Workload {
            cmd,
            len: LARGE,
            sequential: true,
            flush_every: LARGE_FLUSH_BYTES / LARGE,
        }
    }
}

/// One workload's progress on one stack, kept across the slices its row is cut into: the
/// offsets go on where the last slice stopped, and the totals add up.
struct Progress {
    rng: Rng,
    next: u64,
    since_flush: u64,
    done: u64,
    busy: Duration,
}

impl Progress {
    fn new() -> Self {
        Progress {
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            next: 0,
            since_flush: 0,
            done: 0,
            busy: Duration::ZERO,
        }
    }

    /// Operations per second over every slice so far.
    fn rate(&self) -> f64 {
        self.done as f64 / self.busy.as_secs_f64().max(1e-9)
    }

    /// Run `w` for `slice` on a disk of `size` bytes, then wait for what is in flight.
    fn slice(
        &mut self,
        c: &mut Client<UnixStream>,
        w: Workload,
        size: u64,
        slice: Duration,
    ) -> Result<(), Error> {
        let slots = size / w.len;
        if slots == 0 {
            return Err(format!("the disk is smaller than one {} B request", w.len).into());
        }
        let data = vec![0x5au8; w.len as usize];
        let len = u32::try_from(w.len)?;
        let t0 = Instant::now();
        let mut flying = 0usize;
        while t0.elapsed() < slice || flying > 0 {
            while flying < QD && t0.elapsed() < slice {
                let slot = if w.sequential {
                    let s = self.next;
                    self.next = (self.next + 1) % slots;
                    s
                } else {
                    self.rng.next() % slots
                };
                let payload: &[u8] = if w.cmd == CMD_WRITE { &data } else { &[] };
                c.send(w.cmd, 0, slot * w.len, len, payload)?;
                flying += 1;
            }
            let r = c.recv()?;
            if r.error != 0 {
                return Err(format!("NBD error {}", r.error).into());
            }
            flying -= 1;
            self.done += 1;
            self.since_flush += 1;
            if w.cmd == CMD_WRITE && self.since_flush >= w.flush_every {
                self.since_flush = 0;
                c.send(CMD_FLUSH, 0, 0, 0, &[])?;
                flying += 1;
                self.done = self.done.saturating_sub(1); // the flush's reply is not an I/O
            }
        }
        self.busy += t0.elapsed();
        Ok(())
    }
}

/// Run `w` on every stack's client for `seconds` each, in [`SLICE`]s taken in turn (which
/// stack goes first rotates slice by slice); returns each one's operations per second.
/// A burst of load on the shared machine that lasts longer than a slice or two then lands
/// on all alike, instead of on whichever row ran during it.
fn drive_all(
    clients: &mut [&mut Client<UnixStream>],
    w: Workload,
    size: u64,
    seconds: f64,
) -> Result<Vec<f64>, Error> {
    let n = clients.len();
    let mut progress: Vec<Progress> = (0..n).map(|_| Progress::new()).collect();
    let total =
        Duration::try_from_secs_f64(seconds).map_err(|e| format!("{seconds} s per row: {e}"))?;
    let mut turn = 0usize;
    while progress.iter().any(|p| p.busy < total) {
        for k in 0..n {
            let s = (turn + k) % n;
            if progress[s].busy < total {
                progress[s].slice(&mut *clients[s], w, size, SLICE)?;
            }
        }
        turn += 1;
    }
    Ok(progress.iter().map(Progress::rate).collect())
}

/// The `p` quantile of `v` with `decimals`, or "-" when there is no sample (no fault of
/// that kind was injected).
fn pct(v: &mut [f64], p: f64, decimals: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by(f64::total_cmp);
    format!(
        "{:.*}",
        decimals,
        v[((v.len() - 1) as f64 * p).round() as usize]
    )
}

/// What a stack of the throughput rows serves its disk with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The disk stack in the NBD server's process.
    Plain,
    /// The endpoint and two driver processes; `Some(cpu)` pins both channel readers there.
    Split(Option<usize>),
}

/// One of the stacks of the throughput rows, on a fresh overlay of the template in a
/// folder of its own, with its NBD server and a connected client.
struct Stack {
    client: Option<Client<UnixStream>>,
    srv: Option<NbdServer>,
    endpoint: Option<Endpoint>,
    /// The split's driver processes (none for the plain stack), killed when dropped.
    _drivers: Drivers,
}

impl Stack {
    fn start(cfg: &BenchConfig, dir: &Path, template: &Path, kind: Kind) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let overlay = dir.join("vm.ovl");
        fresh_overlay(template, &overlay)?;
        let mut drivers = Drivers {
            exe: cfg.exe.clone(),
            export: format!(
                "name=vm,template={},overlay={}",
                template.display(),
                overlay.display()
            ),
            reader_cpu: None,
            children: Vec::new(),
        };
        let mut endpoint = None;
        let disk: Arc<dyn Disk> = if let Kind::Split(reader_cpu) = kind {
            drivers.reader_cpu = reader_cpu;
            let socks = [dir.join("a.sock"), dir.join("b.sock")];
            for s in &socks {
                drivers.start(s)?;
            }
            let mut ec =
                EndpointConfig::new("vm", socks.iter().map(|s| Addr::Unix(s.clone())).collect());
            ec.monitor.heartbeat_timeout = HEARTBEAT_TIMEOUT;
            ec.reader_cpu = reader_cpu;
            let e = Endpoint::start(ec)?;
            endpoint = Some(e.clone());
            Arc::new(e)
        } else {
            let cfg = ExportConfig {
                name: "vm".into(),
                template: template.to_owned(),
                overlay: Some(overlay),
                read_only: false,
                min_block: 1,
            };
            Exports::open(&[cfg])?
                .iter()
                .next()
                .ok_or("no export")?
                .disk
                .clone()
        };
        let srv = NbdServer::start(disk, dir.join("nbd.sock"))?;
        let client = srv.client()?;
        Ok(Stack {
            client: Some(client),
            srv: Some(srv),
            endpoint,
            _drivers: drivers,
        })
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Client, then server, then the endpoint; the drivers last.
        self.client.take();
        self.srv.take();
        if let Some(e) = &self.endpoint {
            e.close();
        }
    }
}

/// One round of the throughput rows: the stacks of `kinds` side by side on fresh overlays,
/// each row run on all in turns of [`SLICE`] ([`drive_all`]). Per stack: 4K write IOPS, 4K
/// read IOPS, large write MB/s, large read MB/s.
fn throughput_round(
    cfg: &BenchConfig,
    d: &Path,
    template: &Path,
    round: usize,
    kinds: &[Kind],
) -> Result<Vec<[f64; 4]>, Error> {
    let dirs: Vec<PathBuf> = (0..kinds.len())
        .map(|k| d.join(format!("round{round}-stack{k}")))
        .collect();
    let mut stacks = Vec::new();
    for (dir, &kind) in dirs.iter().zip(kinds) {
        stacks.push(Stack::start(cfg, dir, template, kind)?);
    }
    let mut rows = vec![[0.0; 4]; kinds.len()];
    for (i, w) in [
        Workload::random_4k(CMD_WRITE),
        Workload::random_4k(CMD_READ),
        Workload::sequential_large(CMD_WRITE),
        Workload::sequential_large(CMD_READ),
    ]
    .into_iter()
    .enumerate()
    {
        let mut clients: Vec<&mut Client<UnixStream>> = stacks
            .iter_mut()
            .map(|s| s.client.as_mut().expect("a live client"))
            .collect();
        // Operations per second; the large rows in MB/s.
        let ops = drive_all(&mut clients, w, cfg.size, cfg.seconds)?;
        for s in 0..kinds.len() {
            rows[s][i] = if w.len == BLOCK {
                ops[s]
            } else {
                ops[s] * w.len as f64 / 1e6
            };
        }
    }
    drop(stacks);
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(rows)
}

/// Run the benchmark, printing its table to `out`.
///
/// # Errors
/// Zero rounds, setup failures (files, processes, sockets) and any NBD error or lost write.
pub fn run(cfg: &BenchConfig, out: &mut dyn Write) -> Result<(), Error> {
    if cfg.rounds == 0 {
        return Err("the throughput part needs at least one round".into());
    }
    let tmp = tempfile::Builder::new()
        .prefix("remoca-bench-failover")
        .tempdir_in(&cfg.dir)?;
    let d = tmp.path();
    let template = d.join("t.raw");
    std::fs::write(&template, vec![0u8; cfg.size as usize])?;
    let overlay = d.join("vm.ovl");
    let blocks = cfg.size / BLOCK;
    if cfg.size < LARGE {
        return Err(format!(
            "the disk must hold at least one {} KiB request",
            LARGE >> 10
        )
        .into());
    }
    let export = format!(
        "name=vm,template={},overlay={}",
        template.display(),
        overlay.display()
    );
    writeln!(
        out,
        "failover bench: {} MiB disk, 4 KiB I/O, QD {QD}, {} s per row and stack in turns of {} ms, median of {} rounds, driver heartbeat {HEARTBEAT_MS} ms, heartbeat timeout {} ms",
        cfg.size >> 20,
        cfg.seconds,
        SLICE.as_millis(),
        cfg.rounds,
        HEARTBEAT_TIMEOUT.as_millis()
    )?;

    // 1. Throughput: plain against endpoint + driver (and the same with its two channel
    //    readers on one CPU), row by row, the stacks taking turns of SLICE within each row,
    //    so none always runs on another's leftovers (dirty pages, a warm page cache) or
    //    alone through a burst of load.
    let mut kinds = vec![Kind::Plain, Kind::Split(None)];
    if let Some(cpu) = cfg.reader_cpu {
        kinds.push(Kind::Split(Some(cpu)));
    }
    let mut samples: Vec<Vec<[f64; 4]>> = vec![Vec::new(); kinds.len()];
    for round in 0..cfg.rounds {
        let rows = throughput_round(cfg, d, &template, round, &kinds)?;
        for (k, row) in rows.into_iter().enumerate() {
            samples[k].push(row);
        }
        eprint!("\r  throughput round {}/{}", round + 1, cfg.rounds);
    }
    eprintln!();
    let median = |rows: &[[f64; 4]], i: usize| {
        let mut v: Vec<f64> = rows.iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let medians: Vec<[f64; 4]> = samples
        .iter()
        .map(|rows| std::array::from_fn(|i| median(rows, i)))
        .collect();
    // Each round's own stack / plain ratio, for the spread.
    let spread = |k: usize, i: usize| {
        let mut v: Vec<f64> = samples[0]
            .iter()
            .zip(&samples[k])
            .map(|(p, s)| s[i] / p[i])
            .collect();
        v.sort_by(f64::total_cmp);
        format!("{:.2}-{:.2}", v[0], v[v.len() - 1])
    };
    let tables = [
        (
            "[throughput]          4K write IOPS   4K read IOPS".to_string(),
            [0usize, 1],
            [12usize, 12],
            0,
        ),
        (
            format!(
                "[large requests]      {0}K seq write MB/s   {0}K seq read MB/s   (QD {QD}, a flush every {1} MiB written)",
                LARGE >> 10,
                LARGE_FLUSH_BYTES >> 20
            ),
            [2, 3],
            [19, 18],
            1,
        ),
    ];
    for (title, [a, b], [wa, wb], decimals) in tables {
        writeln!(out, "\n{title}")?;
        let plain = medians[0];
        for (k, kind) in kinds.iter().enumerate() {
            let name = match kind {
                Kind::Plain => "plain backend".to_string(),
                Kind::Split(None) => "endpoint + driver".to_string(),
                Kind::Split(Some(cpu)) => format!("readers on CPU {cpu}"),
            };
            let m = medians[k];
            writeln!(
                out,
                "  {name:<19}  {:>wa$.decimals$}   {:>wb$.decimals$}",
                m[a], m[b]
            )?;
            if k == 0 {
                continue;
            }
            writeln!(
                out,
                "  ratio                {:>wa$.2}   {:>wb$.2}   (goal: overhead under 5 %, ratio >= 0.95)",
                m[a] / plain[a],
                m[b] / plain[b]
            )?;
            writeln!(
                out,
                "  ratio per round      {:>wa$}   {:>wb$}   (min-max over {} rounds)",
                spread(k, a),
                spread(k, b),
                cfg.rounds
            )?;
        }
    }

    // 2. Failover under faults.
    fresh_overlay(&template, &overlay)?;
    let socks = [d.join("a.sock"), d.join("b.sock")];
    let mut drivers = Drivers {
        exe: cfg.exe.clone(),
        export: export.clone(),
        reader_cpu: cfg.reader_cpu,
        children: Vec::new(),
    };
    for s in &socks {
        drivers.start(s)?;
    }
    let mut ec = EndpointConfig::new("vm", socks.iter().map(|s| Addr::Unix(s.clone())).collect());
    ec.monitor.heartbeat_timeout = HEARTBEAT_TIMEOUT;
    ec.reader_cpu = cfg.reader_cpu;
    let endpoint = Endpoint::start(ec)?;
    let srv = NbdServer::start(Arc::new(endpoint.clone()), d.join("nbd.sock"))?;

    // The writer: QD1, every completion's (time, latency); acknowledged sequence per block.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut c = srv.client()?;
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<_, String> {
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            let mut acked = vec![0u64; blocks as usize];
            let mut log = Vec::new();
            let mut seq = 0u64;
            while !stop.load(Ordering::Acquire) {
                let b = rng.next() % blocks;
                seq += 1;
                let mut data = vec![0u8; BLOCK as usize];
                data[..8].copy_from_slice(&seq.to_le_bytes());
                data[8..16].copy_from_slice(&b.to_le_bytes());
                let t = Instant::now();
                c.send(CMD_WRITE, 0, b * BLOCK, BLOCK as u32, &data)
                    .map_err(|e| e.to_string())?;
                let r = c.recv().map_err(|e| e.to_string())?;
                if r.error != 0 {
                    return Err(format!("write failed with NBD error {}", r.error));
                }
                acked[b as usize] = seq;
                log.push((Instant::now(), t.elapsed()));
                if seq % FLUSH_EVERY == 0 {
                    c.send(CMD_FLUSH, 0, 0, 0, &[]).map_err(|e| e.to_string())?;
                    let r = c.recv().map_err(|e| e.to_string())?;
                    if r.error != 0 {
                        return Err(format!("flush failed with NBD error {}", r.error));
                    }
                }
            }
            Ok((acked, log, c))
        })
    };

    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut faults: Vec<(bool, Instant)> = Vec::new(); // (a hang?, when)
    let mut detect = (Vec::new(), Vec::new());
    let mut takeover = (Vec::new(), Vec::new());
    let total = cfg.kills + cfg.hangs;
    let mut hangs_left = cfg.hangs;
    for i in 0..total {
        std::thread::sleep(Duration::from_millis(50 + rng.next() % 150));
        let st = endpoint.status();
        let active = st.active.clone().ok_or("no active driver")?;
        let sock = socks
            .iter()
            .find(|s| format!("unix:{}", s.display()) == active)
            .ok_or("active driver unknown")?
            .clone();
        let hang = hangs_left > 0 && (rng.next() % (total - i) as u64) < hangs_left as u64;
        let pid = drivers.pid(&sock).ok_or("no driver process")?;
        let (at, at_sys) = (Instant::now(), SystemTime::now());
        if hang {
            hangs_left -= 1;
            Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status()?;
        } else {
            Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()?;
        }
        // Wait for the takeover, then restart the failed driver as the backup.
        let t0 = Instant::now();
        let rec = loop {
            let s = endpoint.status();
            if s.failovers > st.failovers {
                break s.last_failover.ok_or("failover without a record")?;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err("no failover within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let declared = rec.at.checked_sub(rec.took).unwrap_or(rec.at);
        let detection = declared.duration_since(at_sys).unwrap_or_default();
        let took = rec.took.as_secs_f64() * 1e3;
        if hang {
            detect.1.push(detection.as_secs_f64() * 1e3);
            takeover.1.push(took);
        } else {
            detect.0.push(detection.as_secs_f64() * 1e3);
            takeover.0.push(took);
        }
        faults.push((hang, at));
        drivers.restart(&sock)?;
        while endpoint.status().standby.is_none() {
            if t0.elapsed() > Duration::from_secs(30) {
                return Err("the restarted driver never became the standby".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if (i + 1) % 10 == 0 {
            eprint!("\r  faults {}/{total}", i + 1);
        }
    }
    eprintln!();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Release);
    let (acked, log, mut c) = writer.join().map_err(|_| "writer panicked")??;

    // Every acknowledged write reads back.
    let mut lost = 0u64;
    for (b, &seq) in acked.iter().enumerate() {
        if seq == 0 {
            continue;
        }
        c.send(CMD_READ, 0, b as u64 * BLOCK, BLOCK as u32, &[])?;
        let r = c.recv()?;
        let got = r
            .data
            .get(..8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()));
        if r.error != 0 || got != Some(seq) {
            lost += 1;
        }
    }
    drop(c);
    drop(srv);
    endpoint.close();

    let pauses = |hang: bool| -> Vec<f64> {
        faults
            .iter()
            .filter(|f| f.0 == hang)
            .map(|&(_, at)| {
                log.iter()
                    .filter(|(done, _)| *done > at && *done <= at + Duration::from_secs(1))
                    .map(|(_, lat)| lat.as_secs_f64() * 1e3)
                    .fold(0.0, f64::max)
            })
            .collect()
    };
    let (mut pk, mut ph) = (pauses(false), pauses(true));
    let mut lat: Vec<f64> = log.iter().map(|(_, l)| l.as_secs_f64() * 1e3).collect();
    writeln!(
        out,
        "\n[failover]       faults   detection p50/p99 ms   takeover p50/p99 ms   client pause p50/p99 ms   ({})",
        cfg.reader_cpu.map_or("readers unpinned".to_owned(), |c| format!("readers on CPU {c}"))
    )?;
    writeln!(
        out,
        "  SIGKILL        {:>6}   {:>8} / {:<8}    {:>7} / {:<7}     {:>8} / {:<8}",
        cfg.kills,
        pct(&mut detect.0, 0.5, 1),
        pct(&mut detect.0, 0.99, 1),
        pct(&mut takeover.0, 0.5, 1),
        pct(&mut takeover.0, 0.99, 1),
        pct(&mut pk, 0.5, 1),
        pct(&mut pk, 0.99, 1)
    )?;
    writeln!(
        out,
        "  SIGSTOP        {:>6}   {:>8} / {:<8}    {:>7} / {:<7}     {:>8} / {:<8}",
        cfg.hangs,
        pct(&mut detect.1, 0.5, 1),
        pct(&mut detect.1, 0.99, 1),
        pct(&mut takeover.1, 0.5, 1),
        pct(&mut takeover.1, 0.99, 1),
        pct(&mut ph, 0.5, 1),
        pct(&mut ph, 0.99, 1)
    )?;
    writeln!(
        out,
        "  writes acknowledged {}, write latency p50 {} ms, lost or wrong on read-back: {lost}",
        log.len(),
        pct(&mut lat, 0.5, 3)
    )?;
    if lost > 0 {
        return Err(format!("{lost} acknowledged writes did not read back").into());
    }
    Ok(())
}
