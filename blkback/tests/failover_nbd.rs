//! Failover on the NBD path: two driver processes serve the same export (one template, one
//! overlay), the failover endpoint serves it over NBD, and a client writes and verifies a
//! log of checksummed blocks (several writes in flight, periodic flushes) while the active
//! driver is killed with SIGKILL at random moments. Each killed driver is restarted and
//! becomes the new backup. The client must see no error and lose no acknowledged write.
//!
//! Then the active driver is hung with SIGSTOP several times: the endpoint must notice the
//! lost heartbeat, SIGKILL the hung process (its default extra measure besides the fence, see
//! docs/failover.md) before replaying, and fail over; the test then sends SIGCONT and checks
//! the process died of SIGKILL rather than resuming.
//!
//! A second test proves the generation fence without any kill: the endpoint does not SIGKILL
//! faulty drivers (as for a driver on another host), the active driver is SIGSTOPped with
//! writes sent to it, the backup takes over and newer data is written to the same blocks,
//! then the hung driver is woken with SIGCONT: the writes it still holds would overwrite
//! the newer data, and the fence must refuse them.
//!
//! `FAILOVER_KILLS` sets the number of kills (default 15) and `FAILOVER_STOPS` the number of
//! hangs (default 3), which keeps the test well under 30 s; `FAILOVER_SEED` replays a run. The driver processes are this test binary run
//! again with `FAILOVER_DRIVER_SOCKET` set.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use remoca_blkback::failover::driver::{self, DriverConfig, DriverListener};
use remoca_blkback::failover::endpoint::{Endpoint, EndpointConfig};
use remoca_blkback::failover::Addr;
use remoca_blkback::nbd::client::Client;
use remoca_blkback::nbd::wire::{CMD_FLUSH, CMD_READ, CMD_WRITE};
use remoca_blkback::overlay::Overlay;
use remoca_blkback::raw::RawFile;
use remoca_blkback::{Disk, ExportConfig, Exports};

const BLOCK: usize = 4096;
const SLOTS: u64 = 512;
const DISK: u64 = 16 << 20;
const IN_FLIGHT: usize = 4;
const FLUSH_EVERY: u64 = 16;

const ENV_SOCKET: &str = "FAILOVER_DRIVER_SOCKET";
const ENV_TEMPLATE: &str = "FAILOVER_DRIVER_TEMPLATE";
const ENV_OVERLAY: &str = "FAILOVER_DRIVER_OVERLAY";
/// Set in the test process: its drivers run without the generation fence (to show the
/// fence test fails without it).
const ENV_NO_FENCE: &str = "FAILOVER_NO_FENCE";

/// Run as a driver process when asked to (never returns then).
fn maybe_be_a_driver() {
    let Ok(sock) = std::env::var(ENV_SOCKET) else {
        return;
    };
    let cfg = ExportConfig {
        name: "vm".into(),
        template: std::env::var(ENV_TEMPLATE).unwrap().into(),
        overlay: Some(std::env::var(ENV_OVERLAY).unwrap().into()),
        read_only: false,
        min_block: 1,
    };
    let listener = DriverListener::bind(&Addr::Unix(sock.into())).unwrap();
    let r = driver::run(
        listener,
        DriverConfig {
            fencer: (std::env::var_os(ENV_NO_FENCE).is_none())
                .then(|| driver::fencer_for(vec![cfg.clone()])),
            opener: driver::opener_for(vec![cfg]),
            heartbeat_interval: Duration::from_millis(50),
            key: None,
            workers: 4,
            reader_cpu: None,
        },
    );
    eprintln!("driver stopped: {r:?}");
    std::process::exit(1);
}

/// What both tests run on: a template of `DISK` bytes (`pattern` of each offset) and an
/// overlay on it in `dir`, and two driver processes serving that overlay on `a.sock` and
/// `b.sock` there, started. Returns the template's bytes (what unwritten blocks read as),
/// the two sockets and the drivers.
fn two_drivers(
    dir: &Path,
    test: &'static str,
    pattern: fn(u64) -> u8,
) -> (Vec<u8>, [PathBuf; 2], Drivers) {
    let template = dir.join("t.raw");
    let template_bytes: Vec<u8> = (0..DISK).map(pattern).collect();
    std::fs::write(&template, &template_bytes).unwrap();
    let overlay = dir.join("vm.ovl");
    {
        let t = RawFile::open_read_only(&template).unwrap();
        Overlay::create(&overlay, &t, 16, &template.to_string_lossy()).unwrap();
    }
    let socks = [dir.join("a.sock"), dir.join("b.sock")];
    let mut drivers = Drivers {
        test,
        template,
        overlay,
        children: HashMap::new(),
    };
    for s in &socks {
        drivers.start(s);
    }
    (template_bytes, socks, drivers)
}

/// The endpoint of the two drivers, the first active. Hangs are detected by the lost
/// heartbeat (drivers send one every 50 ms).
fn endpoint_config(socks: &[PathBuf; 2]) -> EndpointConfig {
    let mut cfg = EndpointConfig::new("vm", socks.iter().map(|s| Addr::Unix(s.clone())).collect());
    cfg.connect_timeout = Duration::from_secs(20);
    cfg.monitor.heartbeat_timeout = Duration::from_millis(500);
    cfg
}

struct Drivers {
    /// The test whose binary re-run serves as a driver (`--exact NAME`).
    test: &'static str,
    template: PathBuf,
    overlay: PathBuf,
    children: HashMap<PathBuf, Child>,
}

impl Drivers {
    fn start(&mut self, sock: &Path) {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", self.test, "--nocapture"])
            .env(ENV_SOCKET, sock)
            .env(ENV_TEMPLATE, &self.template)
            .env(ENV_OVERLAY, &self.overlay)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.children.insert(sock.to_owned(), child);
        let t0 = Instant::now();
        while UnixStream::connect(sock).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "driver did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The overlay the drivers serve, opened read-only on its template: what reached the
    /// storage, once the drivers are stopped.
    fn stored(&self) -> Overlay {
        let t = Arc::new(RawFile::open_read_only(&self.template).unwrap());
        Overlay::open(&self.overlay, t, true).unwrap()
    }

    /// Restart any driver that is no longer running (the endpoint kills one it declares
    /// faulty on its own, e.g. when a loaded machine delays heartbeats).
    fn restart_dead(&mut self) -> usize {
        let dead: Vec<PathBuf> = self
            .children
            .iter_mut()
            .filter_map(|(p, c)| matches!(c.try_wait(), Ok(Some(_))).then(|| p.clone()))
            .collect();
        for p in &dead {
            self.children.remove(p);
            self.start(p);
        }
        dead.len()
    }

    fn signal(&self, sock: &Path, sig: &str) -> u32 {
        let pid = self.children[sock].id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
        pid
    }

    fn kill(&mut self, sock: &Path) {
        if let Some(mut c) = self.children.remove(sock) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Drivers {
    fn drop(&mut self) {
        for (_, mut c) in self.children.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
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

/// Block content: sequence number, slot, then bytes derived from both, then a BLAKE3 of
/// the rest in the last 32 bytes.
fn block(seq: u64, slot: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&slot.to_le_bytes());
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ slot;
    for chunk in b[16..BLOCK - 32].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let h = blake3::hash(&b[..BLOCK - 32]);
    b[BLOCK - 32..].copy_from_slice(h.as_bytes());
    b
}

/// Check a read block against the sequence number last acknowledged for its slot
/// (0 = never written: the template's bytes).
fn check(got: &[u8], slot: u64, expect: u64, template: &[u8], what: &str) {
    if expect == 0 {
        let off = (slot as usize) * BLOCK;
        assert!(
            got == &template[off..off + BLOCK],
            "{what}: slot {slot} never written but differs from the template"
        );
        return;
    }
    let h = blake3::hash(&got[..BLOCK - 32]);
    assert_eq!(
        h.as_bytes(),
        &got[BLOCK - 32..],
        "{what}: slot {slot} fails its checksum"
    );
    let seq = u64::from_le_bytes(got[..8].try_into().unwrap());
    assert_eq!(
        seq, expect,
        "{what}: slot {slot} holds write {seq}, the last acknowledged is {expect}"
    );
    assert_eq!(got, &block(expect, slot)[..], "{what}: slot {slot}");
}

#[test]
fn active_driver_killed_many_times() {
    maybe_be_a_driver();
    let kills: usize = std::env::var("FAILOVER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let seed: u64 = std::env::var("FAILOVER_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let stops: usize = std::env::var("FAILOVER_STOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    eprintln!("FAILOVER_KILLS={kills} FAILOVER_STOPS={stops} FAILOVER_SEED={seed}");

    let dir = tempfile::tempdir().unwrap();
    let (template_bytes, socks, mut drivers) =
        two_drivers(dir.path(), "active_driver_killed_many_times", |i| {
            (i * 7 % 251) as u8
        });
    let endpoint = Endpoint::start(endpoint_config(&socks)).unwrap();
    assert_eq!(endpoint.size(), DISK);

    // The endpoint served over NBD by the unchanged server.
    let nbd_sock = dir.path().join("nbd.sock");
    let exports = Exports::from_disks(vec![(
        "vm".into(),
        "failover endpoint".into(),
        Arc::new(endpoint.clone()) as Arc<dyn Disk>,
    )])
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = {
        let _g = rt.enter();
        tokio::net::UnixListener::bind(&nbd_sock).unwrap()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(remoca_blkback::nbd::run(
        remoca_blkback::nbd::Listener::Unix(listener),
        exports,
        async move {
            let _ = stop_rx.await;
        },
    ));

    // The client: a log of checksummed blocks, IN_FLIGHT writes at once, a flush every
    // FLUSH_EVERY writes, a read-back of a random slot after every completed write.
    let done = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let client = {
        let (nbd_sock, done, written) = (nbd_sock.clone(), done.clone(), written.clone());
        let template_bytes = template_bytes.clone();
        std::thread::spawn(move || {
            let s = UnixStream::connect(&nbd_sock).unwrap();
            let mut c = Client::connect(s, "vm", true).unwrap();
            let mut rng = Rng(seed);
            let mut acked = vec![0u64; SLOTS as usize];
            let mut seq = 0u64;
            let mut worst = Duration::ZERO;
            // cookie -> (slot, seq, sent at)
            let mut flying: HashMap<u64, (u64, u64, Instant)> = HashMap::new();
            let mut busy_slots = std::collections::HashSet::new();
            let mut since_flush = 0;
            while !done.load(Ordering::Acquire) || !flying.is_empty() {
                while !done.load(Ordering::Acquire) && flying.len() < IN_FLIGHT {
                    let slot = loop {
                        let s = rng.next() % SLOTS;
                        if !busy_slots.contains(&s) {
                            break s;
                        }
                    };
                    seq += 1;
                    let b = block(seq, slot);
                    let cookie = c
                        .send(CMD_WRITE, 0, slot * BLOCK as u64, BLOCK as u32, &b)
                        .unwrap();
                    busy_slots.insert(slot);
                    flying.insert(cookie, (slot, seq, Instant::now()));
                }
                if flying.is_empty() {
                    break;
                }
                let r = c.recv().unwrap();
                assert_eq!(r.error, 0, "write failed with NBD error {}", r.error);
                let (slot, s, t) = flying.remove(&r.cookie).expect("a reply to a write");
                worst = worst.max(t.elapsed());
                busy_slots.remove(&slot);
                acked[slot as usize] = s;
                written.fetch_add(1, Ordering::Relaxed);
                since_flush += 1;
                if since_flush >= FLUSH_EVERY {
                    since_flush = 0;
                    let cookie = c.send(CMD_FLUSH, 0, 0, 0, &[]).unwrap();
                    let mut flushed = false;
                    while !flushed {
                        let r = c.recv().unwrap();
                        assert_eq!(r.error, 0, "NBD error {}", r.error);
                        if r.cookie == cookie {
                            flushed = true;
                        } else {
                            let (slot, s, _) = flying.remove(&r.cookie).expect("a write");
                            busy_slots.remove(&slot);
                            acked[slot as usize] = s;
                            written.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                // Read back a slot no write is in flight for.
                let slot = rng.next() % SLOTS;
                if !busy_slots.contains(&slot) {
                    let cookie = c
                        .send(CMD_READ, 0, slot * BLOCK as u64, BLOCK as u32, &[])
                        .unwrap();
                    loop {
                        let r = c.recv().unwrap();
                        assert_eq!(r.error, 0, "NBD error {}", r.error);
                        if r.cookie == cookie {
                            check(
                                &r.data,
                                slot,
                                acked[slot as usize],
                                &template_bytes,
                                "read-back",
                            );
                            break;
                        }
                        let (s2, q, _) = flying.remove(&r.cookie).expect("a write");
                        busy_slots.remove(&s2);
                        acked[s2 as usize] = q;
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            c.flush().unwrap();
            for slot in 0..SLOTS {
                let got = c.read(slot * BLOCK as u64, BLOCK as u32).unwrap();
                check(&got, slot, acked[slot as usize], &template_bytes, "final");
            }
            let _ = c.disconnect();
            (acked, worst)
        })
    };

    // The killer: SIGKILL the active driver at a random moment, restart it as the backup,
    // wait until the endpoint has it as its standby, repeat.
    let mut rng = Rng(seed.rotate_left(17) | 1);
    let mut pauses = Vec::new();
    let mut restarted_by_endpoint = 0;
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(20 + rng.next() % 130));
        let before = endpoint.status();
        let active = before.active.clone().expect("an active driver");
        let sock = socks
            .iter()
            .find(|s| Addr::Unix((*s).clone()).to_string() == active)
            .expect("active is one of ours")
            .clone();
        drivers.kill(&sock);
        let t0 = Instant::now();
        loop {
            let st = endpoint.status();
            if st.failovers > before.failovers && st.active.is_some() {
                pauses.push(st.last_failover.unwrap().took);
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "kill {k}: no failover"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        drivers.start(&sock);
        let t0 = Instant::now();
        while endpoint.status().standby.is_none() {
            restarted_by_endpoint += drivers.restart_dead();
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "kill {k}: restarted driver never became the standby"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!client.is_finished(), "client stopped early");
    }
    let active_sock = |endpoint: &Endpoint| {
        let active = endpoint.status().active.expect("an active driver");
        socks
            .iter()
            .find(|s| Addr::Unix((*s).clone()).to_string() == active)
            .expect("active is one of ours")
            .clone()
    };
    let mut detections = Vec::new();
    for k in 0..stops {
        std::thread::sleep(Duration::from_millis(20 + rng.next() % 130));
        let before = endpoint.status().failovers;
        let sock = active_sock(&endpoint);
        drivers.signal(&sock, "-STOP");
        let t0 = Instant::now();
        while endpoint.status().failovers == before || endpoint.status().active.is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "stop {k}: the hung driver was never replaced"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        detections.push(t0.elapsed());
        let reason = endpoint.status().last_failover.unwrap().reason;
        assert!(
            reason.contains("heartbeat"),
            "stop {k}: failed over for {reason:?}"
        );
        // Resume it: the endpoint must already have killed it.
        drivers.signal(&sock, "-CONT");
        let mut child = drivers.children.remove(&sock).unwrap();
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                panic!("stop {k}: the hung driver resumed after the takeover");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "stop {k}: the hung driver was not killed before the takeover ({status:?})"
        );
        drivers.start(&sock);
        let t0 = Instant::now();
        while endpoint.status().standby.is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "stop {k}: no standby"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    done.store(true, Ordering::Release);
    let (acked, worst) = client.join().expect("client saw no error");
    let st = endpoint.status();
    // Failovers the endpoint made on its own (a false positive) are harmless to the data
    // but are reported.
    assert!(st.failovers as usize >= kills + stops);
    eprintln!(
        "{} failovers for {kills} kills and {stops} hangs; {restarted_by_endpoint} other drivers \
         killed by the endpoint itself; hang to takeover: {:?}",
        st.failovers, detections
    );
    assert_eq!(st.in_flight, 0);

    // Stop everything, then read the overlay file directly: every acknowledged write is on
    // the storage, not only in a driver's memory.
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    endpoint.close();
    for s in &socks {
        drivers.kill(s);
    }
    let ov = drivers.stored();
    let mut buf = vec![0u8; BLOCK];
    for slot in 0..SLOTS {
        ov.read_at(&mut buf, slot * BLOCK as u64).unwrap();
        check(
            &buf,
            slot,
            acked[slot as usize],
            &template_bytes,
            "overlay file",
        );
    }

    pauses.sort();
    let pct =
        |p: f64| pauses[((pauses.len() as f64 * p).ceil() as usize).clamp(1, pauses.len()) - 1];
    if !pauses.is_empty() {
        eprintln!(
            "{kills} kills, {} writes acknowledged; failover (fault declared to requests re-sent) \
             p50 {:?} p99 {:?} max {:?}; slowest client write {:?}",
            written.load(Ordering::Relaxed),
            pct(0.5),
            pct(0.99),
            pauses.last().unwrap(),
            worst
        );
    }
}

/// The state letter of a process (`T` = stopped), or `None` once it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..].trim_start().chars().next()
}

/// Wait until every thread of `pid` is stopped: `kill -STOP` returns before the group stop
/// has reached all threads, and a driver thread still running could answer the writes the
/// test sends to the "hung" driver.
fn wait_stopped(pid: u32) {
    let thread_state = |e: std::fs::DirEntry| {
        let s = std::fs::read_to_string(e.path().join("stat")).ok()?;
        s[s.rfind(')')? + 1..].trim_start().chars().next()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let all_stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.flatten().all(|e| thread_state(e) == Some('T')))
            .unwrap_or(false);
        if all_stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "driver {pid} did not stop within 10 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The fence, with no SIGKILL anywhere: a driver hung with SIGSTOP while writes are sent to
/// it, woken with SIGCONT after the backup took over and newer data was written to the same
/// blocks, must write nothing. `FAILOVER_FENCE_ROUNDS` (default 4) sets the rounds;
/// `FAILOVER_NO_FENCE=1` runs the drivers without the fence, and then this test fails.
#[test]
fn hung_driver_woken_after_takeover_writes_nothing() {
    maybe_be_a_driver();
    const SLOTS_F: u64 = 8;
    const STALE: u64 = 4;
    let rounds: usize = std::env::var("FAILOVER_FENCE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let dir = tempfile::tempdir().unwrap();
    let (template_bytes, socks, mut drivers) = two_drivers(
        dir.path(),
        "hung_driver_woken_after_takeover_writes_nothing",
        |i| (i * 11 % 253) as u8,
    );
    let mut cfg = endpoint_config(&socks);
    // No kill: the hung driver stays alive and is stopped by the fence alone.
    cfg.kill_local = false;
    let endpoint = Endpoint::start(cfg).unwrap();

    let nbd_sock = dir.path().join("nbd.sock");
    let exports = Exports::from_disks(vec![(
        "vm".into(),
        "failover endpoint".into(),
        Arc::new(endpoint.clone()) as Arc<dyn Disk>,
    )])
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = {
        let _g = rt.enter();
        tokio::net::UnixListener::bind(&nbd_sock).unwrap()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(remoca_blkback::nbd::run(
        remoca_blkback::nbd::Listener::Unix(listener),
        exports,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let mut c = Client::connect(UnixStream::connect(&nbd_sock).unwrap(), "vm", true).unwrap();
    let mut acked = vec![0u64; SLOTS_F as usize];
    let mut seq = 0u64;
    let write_all = |c: &mut Client<UnixStream>, acked: &mut Vec<u64>, seq: &mut u64| {
        for slot in 0..SLOTS_F {
            *seq += 1;
            let seq = *seq;
            c.write(slot * BLOCK as u64, &block(seq, slot), false)
                .unwrap();
            acked[slot as usize] = seq;
        }
        c.flush().unwrap();
    };
    let active_sock = |endpoint: &Endpoint| {
        let active = endpoint.status().active.expect("an active driver");
        socks
            .iter()
            .find(|s| Addr::Unix((*s).clone()).to_string() == active)
            .expect("active is one of ours")
            .clone()
    };
    for round in 0..rounds {
        write_all(&mut c, &mut acked, &mut seq);
        // Every write so far is answered, so the driver is between requests: hang it, then
        // send it writes it will hold until it wakes.
        // The endpoint may still have its own flush in flight (it flushes on its own once
        // enough acknowledged writes are unflushed); a driver stopped inside that flush holds
        // the fence's shared lock, and the takeover would wait for it (the documented price
        // of the lock-based fence, docs/failover.md). Stop it only once nothing is in flight.
        let t0 = std::time::Instant::now();
        while endpoint.status().in_flight != 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "round {round}: requests still in flight after 10 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let before = endpoint.status().failovers;
        let sock = active_sock(&endpoint);
        let pid = drivers.signal(&sock, "-STOP");
        wait_stopped(pid);
        let mut stale = HashMap::new();
        for slot in 0..STALE {
            seq += 1;
            let cookie = c
                .send(
                    CMD_WRITE,
                    0,
                    slot * BLOCK as u64,
                    BLOCK as u32,
                    &block(seq, slot),
                )
                .unwrap();
            stale.insert(cookie, (slot, seq));
        }
        // The endpoint declares the silent driver faulty and re-sends them to the backup.
        while !stale.is_empty() {
            let r = c.recv().unwrap();
            assert_eq!(
                r.error, 0,
                "round {round}: write failed with NBD error {}",
                r.error
            );
            let (slot, q) = stale.remove(&r.cookie).expect("a reply to a write");
            acked[slot as usize] = q;
        }
        let st = endpoint.status();
        assert!(st.failovers > before, "round {round}: no takeover");
        let reason = st.last_failover.unwrap().reason;
        assert!(
            reason.contains("heartbeat"),
            "round {round}: failed over for {reason:?}"
        );
        assert_ne!(
            active_sock(&endpoint),
            sock,
            "round {round}: still on the hung driver"
        );
        assert_eq!(
            proc_state(pid),
            Some('T'),
            "round {round}: the hung driver is not stopped"
        );
        // Newer data over the same blocks, through the new driver.
        write_all(&mut c, &mut acked, &mut seq);
        // Wake the old driver: it still holds the writes sent to it before the takeover.
        drivers.signal(&sock, "-CONT");
        // Give it time to run them (a settle, not a measured bound).
        std::thread::sleep(Duration::from_millis(1000));
        assert!(
            proc_state(pid).is_some_and(|s| s != 'Z'),
            "round {round}: the woken driver died; the test must not rely on a kill"
        );
        for slot in 0..SLOTS_F {
            let got = c.read(slot * BLOCK as u64, BLOCK as u32).unwrap();
            check(
                &got,
                slot,
                acked[slot as usize],
                &template_bytes,
                &format!("round {round}, after the hung driver woke"),
            );
        }
        // The woken driver, never restarted, becomes the new backup.
        let t0 = Instant::now();
        while endpoint.status().standby.as_deref() != Some(&Addr::Unix(sock.clone()).to_string()) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "round {round}: the woken driver never became the backup"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(drivers.children[&sock].id(), pid);
    }
    let _ = c.disconnect();
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    endpoint.close();
    for s in &socks {
        drivers.kill(s);
    }
    // The storage itself holds the newest data.
    let ov = drivers.stored();
    let mut buf = vec![0u8; BLOCK];
    for slot in 0..SLOTS_F {
        ov.read_at(&mut buf, slot * BLOCK as u64).unwrap();
        check(
            &buf,
            slot,
            acked[slot as usize],
            &template_bytes,
            "overlay file",
        );
    }
}
