//! A Linux guest under `qemu-system-x86_64` (TCG, no network) runs a checksummed file
//! workload on an ext4 filesystem on its remoca disk while the test SIGKILLs the active
//! storage driver again and again. The disk is an overlay on a raw template, served by two
//! `remoca blkback driver` processes behind a `remoca blkback endpoint` that QEMU reaches
//! over NBD on a unix socket. Each kill makes the endpoint fail over to the backup driver;
//! the killed driver is restarted and becomes the new backup.
//!
//! The guest (busybox initramfs, `tests/blkback_harness/fs_workload.c`) writes files of
//! seeded content with fsync and rename in rounds, drops its page cache and reads every file
//! back after each round, until the test says the kills are done; it then unmounts, mounts
//! again and verifies every file once more, and reports I/O errors. Afterwards the test
//! checks what a user would: the guest verified every file with no I/O error and its kernel
//! logged none, the endpoint reports exactly one failover per kill, the overlay folded into
//! a raw image (`remoca image commit`) passes `e2fsck -fn` and holds every file with the
//! expected bytes (read on the host with `debugfs`), and the template never changed.
//!
//! Knobs: `FAILOVER_GUEST_KILLS` (default 10), `FAILOVER_GUEST_SEED` (kill timing),
//! `FAILOVER_GUEST_CORRUPT=1` writes over the first block of one of the guest's files
//! (through the endpoint, while the filesystem is unmounted) before the last verification:
//! the test must then fail, which shows the guest's check catches a corrupted file.
//! `FAILOVER_GUEST_LOSSY=N` puts a faulty stand-in (test code) in front of the backup
//! driver that acknowledges every N-th write without applying it: the test must fail too.
//!
//! Needs what `blkback_guest` needs (a Debian kernel unpacked by
//! `blkback/tests/guest/fetch-kernel.sh`, `busybox-static`, `e2fsprogs`, `cpio`,
//! `qemu-system-x86`), `qemu-io` (`qemu-utils`) and `gcc` with static glibc (`libc6-dev`).

mod blkback_harness;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkback_harness::*;
use rand::{Rng, SeedableRng};
use remoca_blkback::failover::status;

/// Files the guest rewrites each round (4 to 68 KiB each).
const FILES: u64 = 32;

const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
stty -echo
for m in $(cat /modules/order); do insmod /modules/$m; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /mnt /tmp
if mount -t ext4 /dev/vda /mnt; then
  mkdir -p /mnt/work
  /bin/fs_workload run /mnt/work @FILES@ /tmp/state
  if umount /mnt; then echo "REMOCA-UMOUNTED"; else echo "REMOCA-UMOUNT-FAILED"; fi
  read line
  if mount -t ext4 /dev/vda /mnt; then
    /bin/fs_workload verify /mnt/work @FILES@ /tmp/state
    if umount /mnt; then echo "REMOCA-UMOUNTED-AGAIN"; else echo "REMOCA-UMOUNT-FAILED"; fi
  else
    echo "REMOCA-MOUNT-FAILED"
  fi
else
  echo "REMOCA-MOUNT-FAILED"
fi
dmesg | grep -E 'EXT4-fs|JBD2|I/O error|blk_update_request|virtio_blk' | sed 's/^/REMOCA-DMESG /'
sync
echo "REMOCA-DONE"
poweroff -f
"#;

/// The content the guest workload writes to file `i` in round `r` (the formula of
/// `fs_workload.c`: size and a xorshift64 stream, both from one mixed seed).
fn file_content(r: u64, i: u64) -> Vec<u8> {
    let mut z = (r << 32 | i).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let h = (z ^ (z >> 31)) | 1;
    let size = (4096 * (1 + h % 16) + (h >> 8) % 4096) as usize;
    let mut out = Vec::with_capacity(size + 8);
    let mut x = h;
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

/// A `remoca blkback driver` or `endpoint` process, its stderr going to a file.
struct Proc {
    child: Option<Child>,
    stderr: PathBuf,
}

impl Proc {
    fn start(args: &[String], first_line_prefix: &str, stderr: PathBuf) -> Proc {
        let mut child = remoca()
            .arg("blkback")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn remoca blkback");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        if !line.starts_with(first_line_prefix) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "remoca blkback {args:?} did not start: {line:?}\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        Proc {
            child: Some(child),
            stderr,
        }
    }

    fn driver(sock: &Path, export: &str, stderr: PathBuf) -> Proc {
        Proc::start(
            &[
                "driver".into(),
                "--listen".into(),
                format!("unix:{}", sock.display()),
                "--export".into(),
                export.into(),
            ],
            "driver listening on",
            stderr,
        )
    }

    /// SIGKILL (by PID) and reap.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait up to 20 s (then SIGKILL); whether it exited 0 and what it printed on
    /// stderr.
    fn terminate(mut self) -> (bool, String) {
        let mut child = self.child.take().unwrap();
        run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let start = Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        if st.is_none() {
            err.push_str("\n(still running 20 s after SIGTERM: killed)");
        }
        (st.is_some_and(|s| s.success()), err)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The QEMU process, SIGKILLed (by PID) if the test ends before the guest powered off.
struct Guest(Child);

impl Drop for Guest {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The endpoint's status file as key=value fields (it is rewritten every second).
fn endpoint_status(file: &Path) -> Option<std::collections::BTreeMap<String, String>> {
    status::parse(&std::fs::read_to_string(file).ok()?).ok()
}

/// Wait up to 30 s for the status file to satisfy `ok`.
fn wait_status(
    file: &Path,
    what: &str,
    ok: impl Fn(&std::collections::BTreeMap<String, String>) -> bool,
) -> Result<(), String> {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < Duration::from_secs(30) {
        if let Some(f) = endpoint_status(file) {
            if ok(&f) {
                return Ok(());
            }
            last = Some(f);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{what}: not seen within 30 s; last status {last:?}"
    ))
}

/// `text` without terminal colour sequences (ESC `[` ... `m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A faulty driver for showing that the test can fail (`FAILOVER_GUEST_LOSSY=N`): it sits
/// on the channel between the endpoint and a real driver and acknowledges every N-th WRITE
/// without passing it on, so the write is lost (the endpoint's replay of unflushed writes
/// may repair a loss that a takeover follows before the next flush; most are not). Test code
/// only: the product has no such switch.
fn lossy_proxy(listen: &Path, driver: PathBuf, every: u64) -> Arc<AtomicU64> {
    use remoca_blkback::failover::wire;
    use std::io::Read;
    use std::os::unix::net::{UnixListener, UnixStream};
    let dropped = Arc::new(AtomicU64::new(0));
    let listener = UnixListener::bind(listen).unwrap();
    let count = dropped.clone();
    std::thread::spawn(move || {
        let writes = Arc::new(AtomicU64::new(0));
        for down in listener.incoming() {
            let Ok(down) = down else { return };
            let Ok(up) = UnixStream::connect(&driver) else {
                continue; // the driver is down: the endpoint sees a refused connection
            };
            let down_w = Arc::new(Mutex::new(down.try_clone().unwrap()));
            let (mut up_r, mut down_r) = (up.try_clone().unwrap(), down.try_clone().unwrap());
            let (to_endpoint, both) = (down_w.clone(), (up.try_clone().unwrap(), down));
            // Driver to endpoint: whole frames, so the fake replies never split one.
            std::thread::spawn(move || {
                let mut relay = || -> std::io::Result<()> {
                    // The hello reply, then the ready (the driver sends it, keyed or not).
                    let mut hello = [0u8; wire::HELLO_REPLY_LEN];
                    up_r.read_exact(&mut hello)?;
                    to_endpoint.lock().unwrap().write_all(&hello)?;
                    let mut ready = [0u8; wire::READY_LEN];
                    up_r.read_exact(&mut ready)?;
                    to_endpoint.lock().unwrap().write_all(&ready)?;
                    loop {
                        let mut h = [0u8; wire::REPLY_HEADER_LEN];
                        up_r.read_exact(&mut h)?;
                        let r = wire::parse_reply(&h).map_err(std::io::Error::other)?;
                        let mut data = vec![0u8; r.data_len as usize];
                        up_r.read_exact(&mut data)?;
                        let mut w = to_endpoint.lock().unwrap();
                        w.write_all(&h)?;
                        w.write_all(&data)?;
                    }
                };
                if let Err(e) = relay() {
                    eprintln!("lossy stand-in: driver to endpoint: {e}");
                }
                let _ = both.0.shutdown(std::net::Shutdown::Both);
                let _ = both.1.shutdown(std::net::Shutdown::Both);
            });
            // Endpoint to driver: every `every`-th WRITE is answered here and not passed on.
            let (count, writes) = (count.clone(), writes.clone());
            let mut up_w = up;
            std::thread::spawn(move || {
                let mut relay = || -> std::io::Result<()> {
                    let mut hello = [0u8; wire::HELLO_FIXED_LEN];
                    down_r.read_exact(&mut hello)?;
                    let h = wire::parse_hello_header(&hello).map_err(std::io::Error::other)?;
                    let mut name = vec![0u8; h.name_len];
                    down_r.read_exact(&mut name)?;
                    up_w.write_all(&hello)?;
                    up_w.write_all(&name)?;
                    let mut auth = [0u8; wire::AUTH_LEN];
                    down_r.read_exact(&mut auth)?;
                    up_w.write_all(&auth)?;
                    loop {
                        let mut h = [0u8; wire::REQUEST_HEADER_LEN];
                        down_r.read_exact(&mut h)?;
                        let q = wire::parse_request(&h).map_err(std::io::Error::other)?;
                        let mut data = vec![0u8; q.data_len()];
                        down_r.read_exact(&mut data)?;
                        if q.op == wire::OP_WRITE
                            && writes.fetch_add(1, Ordering::Relaxed) % every == every - 1
                        {
                            count.fetch_add(1, Ordering::Relaxed);
                            let reply = wire::encode_reply(&wire::ReplyHeader {
                                kind: wire::KIND_REPLY,
                                error: 0,
                                id: q.id,
                                data_len: 0,
                            });
                            down_w.lock().unwrap().write_all(&reply)?;
                        } else {
                            up_w.write_all(&h)?;
                            up_w.write_all(&data)?;
                        }
                    }
                };
                if let Err(e) = relay() {
                    eprintln!("lossy stand-in: endpoint to driver: {e}");
                }
                let _ = up_w.shutdown(std::net::Shutdown::Both);
                let _ = down_r.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    dropped
}

/// What the killer thread did.
struct Kills {
    done: u32,
    times: Vec<Duration>,
    error: Option<String>,
}

/// SIGKILL the active driver `kills` times at random moments; after each, wait for the
/// endpoint to count the failover, restart the killed driver and wait until it is the
/// standby. Then tell the guest (a line on its console) to stop its write rounds.
#[allow(clippy::too_many_arguments)]
fn kill_drivers(
    drivers: Arc<Mutex<Vec<Proc>>>,
    socks: [PathBuf; 2],
    addrs: [PathBuf; 2],
    export: String,
    logs: PathBuf,
    status_file: PathBuf,
    kills: u32,
    seed: u64,
    guest: Arc<Mutex<ChildStdin>>,
    qemu_pid: u32,
) -> Kills {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut k = Kills {
        done: 0,
        times: Vec::new(),
        error: None,
    };
    for n in 1..=kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
        let Some(st) = endpoint_status(&status_file) else {
            k.error = Some("no endpoint status file".into());
            break;
        };
        let active = st.get("active").cloned().unwrap_or_default();
        let Some(victim) = addrs
            .iter()
            .position(|s| active == format!("unix:{}", s.display()))
        else {
            k.error = Some(format!("active driver {active:?} is neither of ours"));
            break;
        };
        let t = Instant::now();
        drivers.lock().unwrap()[victim].kill9();
        if let Err(e) = wait_status(&status_file, &format!("failover {n}"), |f| {
            f.get("failovers").map(String::as_str) == Some(&n.to_string())
        }) {
            k.error = Some(e);
            break;
        }
        k.times.push(t.elapsed());
        k.done = n;
        let log = logs.join(format!("driver-{victim}-{n}.stderr"));
        drivers.lock().unwrap()[victim] = Proc::driver(&socks[victim], &export, log);
        let want = format!("unix:{}", addrs[victim].display());
        if let Err(e) = wait_status(&status_file, &format!("standby after kill {n}"), |f| {
            f.get("standby") == Some(&want)
        }) {
            k.error = Some(e);
            break;
        }
    }
    if k.error.is_some() {
        // No driver serves the disk: the guest would wait out its I/O timeouts. Stop it.
        let _ = Command::new("kill")
            .args(["-KILL", &qemu_pid.to_string()])
            .status();
    }
    let mut g = guest.lock().unwrap();
    let _ = g.write_all(b"stop\n").and_then(|_| g.flush());
    k
}

#[test]
fn linux_guest_keeps_its_files_and_a_clean_filesystem_across_driver_kills() {
    require("qemu-system-x86_64");
    require("qemu-io");
    require("mkfs.ext4");
    require("e2fsck");
    require("debugfs");
    require("cpio");
    require("gcc");
    let kernel = guest::require_kernel();
    let kills: u32 = std::env::var("FAILOVER_GUEST_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("FAILOVER_GUEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let corrupt = std::env::var("FAILOVER_GUEST_CORRUPT").is_ok_and(|v| v == "1");
    let lossy: Option<u64> = std::env::var("FAILOVER_GUEST_LOSSY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0);
    eprintln!(
        "FAILOVER_GUEST_KILLS={kills} FAILOVER_GUEST_SEED={seed} corrupt={corrupt} lossy={lossy:?}"
    );
    let started = Instant::now();

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let template = d.join("template.raw");
    std::fs::File::create(&template)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-F", "-q"]).arg(&template));
    let template_sum = sha(&template);
    let overlay = d.join("vm.ovl");
    run_ok(
        remoca()
            .args(["image", "create", "--template"])
            .arg(&template)
            .arg("--overlay")
            .arg(&overlay),
    );
    let initrd = guest::build_initramfs_with(
        d,
        &kernel,
        guest::MODULES,
        &INIT.replace("@FILES@", &FILES.to_string()),
        &["fs_workload.c"],
    );

    let export = spec("vm", &template, Some(&overlay));
    let socks = [d.join("a.sock"), d.join("b.sock")];
    // The addresses the endpoint is given: the drivers' own, or for the backup a lossy
    // stand-in in front of it.
    let mut addrs = socks.clone();
    let dropped = lossy.map(|every| {
        addrs[1] = d.join("b-lossy.sock");
        lossy_proxy(&addrs[1], socks[1].clone(), every)
    });
    let nbd_sock = d.join("vm.nbd");
    let status_dir = d.join("status");
    let status_file = status::path_for(&status_dir, "vm");
    let drivers = Arc::new(Mutex::new(vec![
        Proc::driver(&socks[0], &export, d.join("driver-0.stderr")),
        Proc::driver(&socks[1], &export, d.join("driver-1.stderr")),
    ]));
    let endpoint = Proc::start(
        &[
            "endpoint".into(),
            "--nbd".into(),
            format!("unix:{}", nbd_sock.display()),
            "--export".into(),
            "vm".into(),
            "--driver".into(),
            format!("unix:{}", addrs[0].display()),
            "--backup".into(),
            format!("unix:{}", addrs[1].display()),
            "--status-dir".into(),
            status_dir.display().to_string(),
        ],
        "listening on",
        d.join("endpoint.stderr"),
    );
    let uri = format!("nbd+unix:///vm?socket={}", nbd_sock.display());

    let mut qemu = Guest(
        Command::new("qemu-system-x86_64")
            .args(["-machine", "q35,accel=tcg", "-m", "256", "-smp", "1"])
            .args(["-nographic", "-monitor", "none", "-serial", "stdio"])
            .args(["-nic", "none", "-no-reboot", "-kernel"])
            .arg(kernel.join("vmlinuz"))
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 rdinit=/init panic=-1 loglevel=3"])
            .arg("-drive")
            .arg(format!("file={uri},format=raw,if=virtio,cache=writeback"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(d.join("qemu.stderr")).unwrap())
            .spawn()
            .expect("qemu-system-x86_64 is not installed: apt-get install qemu-system-x86"),
    );
    // Watchdog: give up on a hung guest after 8 minutes (kill by PID).
    let pid = qemu.0.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(480)).is_err() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    });

    let guest_in = Arc::new(Mutex::new(qemu.0.stdin.take().unwrap()));
    let mut killer = None;
    let mut workload_started = None;
    let mut target = None;
    let mut console = String::new();
    for line in BufReader::new(qemu.0.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        console.push_str(&line);
        console.push('\n');
        if line.contains("REMOCA-WORKLOAD-START") && killer.is_none() {
            workload_started = Some(started.elapsed());
            let (drivers, socks, export) = (drivers.clone(), socks.clone(), export.clone());
            let (logs, file, guest) = (d.to_path_buf(), status_file.clone(), guest_in.clone());
            let addrs = addrs.clone();
            killer = Some(std::thread::spawn(move || {
                kill_drivers(
                    drivers, socks, addrs, export, logs, file, kills, seed, guest, pid,
                )
            }));
        }
        if let Some(off) = line.trim().strip_prefix("REMOCA-TARGET offset=") {
            target = off.parse::<u64>().ok();
        }
        // After the first unmount the guest waits for a line before it mounts again.
        let first_umount = line.contains("REMOCA-UMOUNTED") && !line.contains("AGAIN");
        if first_umount || (line.contains("REMOCA-UMOUNT-FAILED") && target.is_some()) {
            if corrupt && first_umount {
                let off = target.expect("the guest printed no REMOCA-TARGET");
                eprintln!("corrupting 4 KiB at disk offset {off} (the first block of f_0)");
                run_ok(Command::new("qemu-io").args([
                    "-f",
                    "raw",
                    &uri,
                    "-c",
                    &format!("write -P 0xee {off} 4k"),
                    "-c",
                    "flush",
                ]));
            }
            let mut g = guest_in.lock().unwrap();
            let _ = g.write_all(b"go\n").and_then(|_| g.flush());
        }
    }
    let _ = qemu.0.wait();
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    let guest_time = started.elapsed();
    let qemu_err = std::fs::read_to_string(d.join("qemu.stderr")).unwrap_or_default();
    console.push_str(&format!("--- qemu stderr ---\n{qemu_err}"));
    let k = killer
        .unwrap_or_else(|| panic!("the guest workload never started:\n{console}"))
        .join()
        .unwrap();

    // The endpoint stops cleanly and counted one failover per kill.
    let (ok, err) = endpoint.terminate();
    drop(drivers);
    eprintln!("endpoint: {}", err.trim());
    // What each takeover had to do, from the endpoint's log (information only: the log
    // format is not an interface): requests in flight at the kill were re-sent.
    let plain = strip_ansi(&err);
    let resent: Vec<u64> = plain
        .lines()
        .filter(|l| l.contains("failed over"))
        .filter_map(|l| {
            l.split("resent=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    eprintln!(
        "takeovers logged: {}, with requests re-sent: {}, requests re-sent in all: {}",
        resent.len(),
        resent.iter().filter(|&&n| n > 0).count(),
        resent.iter().sum::<u64>()
    );
    eprintln!(
        "kills done {} of {kills}; kill to failover counted: {:?}",
        k.done, k.times
    );
    eprintln!(
        "workload started at {:?}, guest powered off at {guest_time:?}",
        workload_started.unwrap()
    );
    for l in console.lines().filter(|l| {
        l.contains("REMOCA-ROUND") || l.contains("REMOCA-FINAL") || l.contains("REMOCA-DMESG")
    }) {
        eprintln!("guest: {l}");
    }
    if let Some(n) = &dropped {
        eprintln!(
            "lossy stand-in: {} writes acknowledged and not applied",
            n.load(Ordering::Relaxed)
        );
    }
    assert!(k.error.is_none(), "{}\n{console}", k.error.unwrap());
    assert_eq!(k.done, kills, "{console}");
    assert!(ok, "the endpoint failed on SIGTERM: {err}");
    assert!(
        err.contains(&format!(", {kills} failovers")),
        "the endpoint does not report {kills} failovers: {err}"
    );

    // The guest verified every file after every round and after a fresh mount, and neither
    // it nor its kernel saw an I/O error.
    assert!(console.contains("REMOCA-DONE"), "{console}");
    let final_line = console
        .lines()
        .find(|l| l.starts_with("REMOCA-FINAL"))
        .unwrap_or_else(|| panic!("no final verification:\n{console}"));
    let round: u64 = final_line
        .rsplit("round=")
        .next()
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("{final_line}"));
    assert_eq!(
        final_line.trim(),
        format!("REMOCA-FINAL files={FILES} verified={FILES} bad=0 ioerr=0 round={round}"),
        "the guest did not verify every file:\n{console}"
    );
    let rounds: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("REMOCA-ROUND"))
        .collect();
    assert_eq!(rounds.len() as u64, round, "{console}");
    for r in &rounds {
        assert!(
            r.ends_with(&format!("verified={FILES} bad=0 ioerr=0")),
            "{r}\n{console}"
        );
    }
    for bad in [
        "REMOCA-IOERR",
        "REMOCA-BAD-FILE",
        "I/O error",
        "EXT4-fs error",
    ] {
        assert!(!console.contains(bad), "the guest saw {bad:?}:\n{console}");
    }
    assert!(console.contains("REMOCA-UMOUNTED-AGAIN"), "{console}");

    // The overlay folded into a raw image: a clean filesystem holding every file's bytes.
    let merged = d.join("merged.raw");
    run_ok(
        remoca()
            .args(["image", "commit"])
            .arg(&overlay)
            .arg("--to")
            .arg(&merged),
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn found problems (exit {}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let out = d.join("dump");
    std::fs::create_dir(&out).unwrap();
    run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump /work {}", out.display()))
            .arg(&merged),
    );
    for i in 0..FILES {
        let got = std::fs::read(out.join(format!("work/f_{i}")))
            .unwrap_or_else(|e| panic!("f_{i} not in the committed image: {e}"));
        assert!(
            got == file_content(round, i),
            "f_{i} in the committed image does not hold round {round}'s content"
        );
    }
    assert_eq!(sha(&template), template_sum, "the template changed");
    eprintln!("test took {:?}", started.elapsed());
}
