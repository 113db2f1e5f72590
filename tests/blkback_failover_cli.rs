//! `remoca blkback driver` and `remoca blkback endpoint` as an operator runs them: two driver
//! processes on one overlay export, an endpoint serving NBD in front of them, real `qemu-io`
//! as the client. Each driver in turn is killed with SIGKILL and restarted as the backup; the
//! client's data must survive every takeover and the template must never change.

mod blkback_harness;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use blkback_harness::*;

/// A running `remoca blkback driver` or `endpoint`, started with its first stdout line read.
struct Proc {
    child: Option<Child>,
}

impl Proc {
    fn start(args: &[String], first_line_prefix: &str) -> Proc {
        let mut child = remoca()
            .arg("blkback")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn remoca blkback");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        if !line.starts_with(first_line_prefix) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "remoca blkback {args:?} did not start: {line:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Proc { child: Some(child) }
    }

    fn driver(sock: &Path, export: &str) -> Proc {
        Proc::start(
            &[
                "driver".into(),
                "--listen".into(),
                format!("unix:{}", sock.display()),
                "--export".into(),
                export.into(),
            ],
            "driver listening on",
        )
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait for exit; returns what it printed on stderr and whether it exited 0.
    fn terminate(mut self) -> (bool, String) {
        let child = self.child.take().unwrap();
        run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn blkback_status(dir: &Path) -> String {
    run_ok(
        remoca()
            .args(["blkback", "status", "--status-dir"])
            .arg(dir),
    )
}

fn qemu_io(uri: &str, cmd: &str) -> String {
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", uri, "-c", cmd]));
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification failed"),
        "qemu-io {cmd}: {out}"
    );
    out
}

#[test]
fn an_nbd_client_keeps_its_data_across_driver_kills_and_restarts() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let (template, overlay) = template_and_overlay(dir.path(), 4 << 20);
    let template_sum = sha(&template);
    let export = spec("vm", &template, Some(&overlay));
    let sock = |n: &str| -> PathBuf { dir.path().join(n) };
    let (a_sock, b_sock, nbd_sock) = (sock("a.sock"), sock("b.sock"), sock("vm.nbd"));
    let status_dir = dir.path().join("status");

    let mut a = Proc::driver(&a_sock, &export);
    let mut b = Proc::driver(&b_sock, &export);
    let endpoint = Proc::start(
        &[
            "endpoint".into(),
            "--nbd".into(),
            format!("unix:{}", nbd_sock.display()),
            "--export".into(),
            "vm".into(),
            "--driver".into(),
            format!("unix:{}", a_sock.display()),
            "--backup".into(),
            format!("unix:{}", b_sock.display()),
            "--status-dir".into(),
            status_dir.display().to_string(),
        ],
        "listening on",
    );
    let uri = format!("nbd+unix:///vm?socket={}", nbd_sock.display());

    // Written through driver A, flushed, then A dies: B must serve it.
    qemu_io(&uri, "write -P 0x5a 0 1M");
    qemu_io(&uri, "flush");
    a.kill9();
    qemu_io(&uri, "read -P 0x5a 0 1M");
    // Template data outside the write still comes through.
    let t = std::fs::read(&template).unwrap();
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        &format!("read -P {} {} 512", t[2 << 20], 2 << 20),
    ]));
    assert!(!out.contains("verification failed"), "{out}");

    // A comes back as the backup; written through B without a flush, then B dies: A must
    // serve the acknowledged write (the endpoint re-applies unflushed writes).
    a = Proc::driver(&a_sock, &export);
    qemu_io(&uri, "write -P 0xc3 1M 512k");
    b.kill9();
    qemu_io(&uri, "read -P 0xc3 1M 512k");
    qemu_io(&uri, "read -P 0x5a 0 1M");
    b = Proc::driver(&b_sock, &export);
    qemu_io(&uri, "flush");

    // `remoca blkback status` shows the export on driver A after two failovers (the status
    // file is rewritten every second).
    let row = (0..50)
        .find_map(|_| {
            let out = blkback_status(&status_dir);
            let row = out.lines().find(|l| l.starts_with("vm\t"))?.to_owned();
            if row.split('\t').nth(4) == Some("2") {
                Some(row)
            } else {
                std::thread::sleep(std::time::Duration::from_millis(100));
                None
            }
        })
        .unwrap_or_else(|| panic!("no row with 2 failovers: {}", blkback_status(&status_dir)));
    let cols: Vec<&str> = row.split('\t').collect();
    assert_eq!(cols[1], format!("unix:{}", a_sock.display()), "{row}");
    assert!(cols[2].parse::<u64>().unwrap() >= 2, "generation: {row}");
    assert!(
        cols[5].contains("-> unix:") && cols[5].contains("re-sent"),
        "{row}"
    );
    assert_eq!(cols[9], "-", "no reader CPU was asked for: {row}");

    // SIGTERM the endpoint: it exits cleanly and reports the two takeovers.
    let (ok, err) = endpoint.terminate();
    assert!(ok, "the endpoint failed on SIGTERM: {err}");
    assert!(err.contains("2 failovers"), "{err}");
    drop((a, b));
    assert!(
        blkback_status(&status_dir).contains("no failover endpoint is running"),
        "the endpoint left its status file"
    );

    // What the client wrote is in the overlay, read by a plain server; the template is intact.
    let srv = Server::tcp(&[spec("vm", &template, Some(&overlay))]);
    qemu_io(&srv.uri("vm"), "read -P 0x5a 0 1M");
    qemu_io(&srv.uri("vm"), "read -P 0xc3 1M 512k");
    srv.stop();
    assert_eq!(sha(&template), template_sum, "the template changed");
}

#[test]
fn bad_driver_and_endpoint_arguments_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone.raw");
    let e = run_err(remoca().args([
        "blkback",
        "driver",
        "--listen",
        &format!("unix:{}", dir.path().join("d.sock").display()),
        "--export",
        &spec("vm", &gone, None),
    ]));
    assert!(e.contains("gone.raw"), "{e}");
    let e = run_err(remoca().args([
        "blkback", "endpoint", "--nbd", "bogus:x", "--export", "vm", "--driver", "unix:/x",
        "--backup", "unix:/y",
    ]));
    assert!(e.contains("bogus"), "{e}");
    let short = dir.path().join("short.key");
    std::fs::write(&short, b"abc").unwrap();
    let e = run_err(remoca().args([
        "blkback",
        "driver",
        "--listen",
        &format!("unix:{}", dir.path().join("d.sock").display()),
        "--key-file",
        &short.display().to_string(),
        "--export",
        &spec("vm", &gone, None),
    ]));
    assert!(e.contains("short.key") && e.contains("16 bytes"), "{e}");
    // A reader CPU no process may run on: refused before anything starts, naming it.
    let e = run_err(remoca().args([
        "blkback",
        "driver",
        "--listen",
        &format!("unix:{}", dir.path().join("d.sock").display()),
        "--reader-cpu",
        "100000",
        "--export",
        &spec("vm", &gone, None),
    ]));
    assert!(e.contains("--reader-cpu") && e.contains("100000"), "{e}");
    let e = run_err(remoca().args([
        "blkback",
        "endpoint",
        "--nbd",
        &format!("unix:{}", dir.path().join("n.sock").display()),
        "--export",
        "vm",
        "--driver",
        &format!("unix:{}", dir.path().join("d.sock").display()),
        "--backup",
        &format!("unix:{}", dir.path().join("e.sock").display()),
        "--reader-cpu",
        "100000",
    ]));
    assert!(e.contains("reader CPU 100000"), "{e}");
    let e = run_err(remoca().args(["bench", "failover", "--reader-cpu", "many"]));
    assert!(e.contains("--reader-cpu"), "{e}");
    for seconds in ["0", "inf", "NaN"] {
        let e = run_err(remoca().args(["bench", "failover", "--seconds", seconds]));
        assert!(e.contains("--seconds"), "{seconds}: {e}");
    }
}

/// `remoca blkback standby` names a domain it cannot find and refuses one domain as both
/// primary and standby, before watching anything (on the simulated host, alone).
#[test]
fn standby_refuses_unknown_and_identical_driver_domains() {
    let dir = tempfile::tempdir().unwrap();
    let standby = |primary: &str, standby: &str| {
        run_err(
            remoca()
                .env("REMOCA_SIM_XENSTORE", dir.path().join("none.socket"))
                .args([
                    "--backend",
                    "sim",
                    "blkback",
                    "standby",
                    "--primary",
                    primary,
                ])
                .args(["--standby", standby]),
        )
    };
    let e = standby("no-such-storage", "Domain-0");
    assert!(
        e.contains("primary driver domain") && e.contains("no-such-storage"),
        "{e}"
    );
    let e = standby("Domain-0", "no-such-standby");
    assert!(
        e.contains("standby driver domain") && e.contains("no-such-standby"),
        "{e}"
    );
    let e = standby("Domain-0", "0");
    assert!(e.contains("same domain"), "{e}");
}

/// A short `remoca bench failover`: every table is printed with figures, every fault is
/// injected, and no acknowledged write is lost.
#[test]
fn a_short_failover_bench_runs_every_part_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(remoca().args([
        "bench",
        "failover",
        "--kills",
        "3",
        "--hangs",
        "1",
        "--seconds",
        "0.3",
        "--rounds",
        "1",
        "--size-mib",
        "4",
        "--dir",
        &dir.path().display().to_string(),
    ]));
    assert!(out.contains("0.3 s per row"), "{out}");
    // Both throughput tables: plain, split and split with its readers on one CPU (the
    // default third stack), each split one with its ratio, all positive numbers.
    let names = [
        "plain backend",
        "endpoint + driver",
        "ratio",
        "ratio per round",
        "readers on CPU",
        "ratio",
    ];
    for table in ["[throughput]", "[large requests]"] {
        let rows: Vec<&str> = out
            .lines()
            .skip_while(|l| !l.starts_with(table))
            .skip(1)
            .take_while(|l| !l.is_empty())
            .collect();
        assert_eq!(rows.len(), 7, "{table}: {out}");
        for (row, name) in rows.iter().zip(names) {
            if name == "ratio per round" {
                continue;
            }
            let rest = row
                .trim_start()
                .strip_prefix(name)
                .unwrap_or_else(|| panic!("{table} {name}: {out}"));
            let mut words = rest.split_whitespace();
            if name == "readers on CPU" {
                let cpu = words.next().unwrap_or_default();
                assert!(cpu.parse::<usize>().is_ok(), "{table}: {row}");
            }
            let figures: Vec<f64> = words.filter_map(|w| w.parse().ok()).collect();
            assert!(
                figures.len() >= 2 && figures[..2].iter().all(|f| *f > 0.0),
                "{table} {name}: {row}"
            );
        }
    }
    let faults = |kind: &str| -> String {
        out.lines()
            .find(|l| l.trim_start().starts_with(kind))
            .unwrap_or_else(|| panic!("no {kind} row: {out}"))
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(faults("SIGKILL"), "3", "{out}");
    assert_eq!(faults("SIGSTOP"), "1", "{out}");
    assert!(out.contains("lost or wrong on read-back: 0"), "{out}");
    // The bench removes its scratch folder.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// `remoca blkback status` rows as column maps (header names as keys).
fn status_rows(dir: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let out = blkback_status(dir);
    let mut lines = out.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let names: Vec<&str> = header.split('\t').collect();
    lines
        .map(|l| {
            names
                .iter()
                .zip(l.split('\t'))
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// Poll `remoca blkback status` until the `vm` row satisfies `ok` (20 s at most).
fn wait_row(
    dir: &Path,
    what: &str,
    ok: impl Fn(&std::collections::HashMap<String, String>) -> bool,
) -> std::collections::HashMap<String, String> {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(r) = status_rows(dir)
            .into_iter()
            .find(|r| r.get("export").map(String::as_str) == Some("vm") && ok(r))
        {
            return r;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "{what}: {}",
            blkback_status(dir)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let st = s[s.rfind(')')? + 1..].trim_start().chars().next()?;
            Some(st != 'Z')
        })
        .unwrap_or(false)
}

/// An `up` configuration serving one failover export `vm` and nothing else.
fn up_failover_config(
    dir: &Path,
    template: &Path,
    overlay: &Path,
    reader_cpu: Option<usize>,
) -> std::path::PathBuf {
    let config = dir.join("up.toml");
    std::fs::write(
        &config,
        format!(
            "[host]\nstatus_interval = 0.5\n[memserver]\nenabled = false\n[pager]\nenabled = false\n\
             [wss]\nenabled = false\n[blkback]\nblkif = false\n\
             [blkback.failover]\nheartbeat_timeout_ms = 500\nheartbeat_ms = 50\n\
             [[blkback.export]]\nname = \"vm\"\ntemplate = \"{}\"\noverlay = \"{}\"\nfailover = true\n{}",
            template.display(),
            overlay.display(),
            reader_cpu.map_or(String::new(), |c| format!("reader_cpu = {c}\n"))
        ),
    )
    .unwrap();
    config
}

/// The processes whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(&parent.to_string()) {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

/// `remoca up` on `config` with runtime directory `run`, once its NBD server listens: the
/// child, the rest of its stdout, what it printed so far and the NBD address.
#[allow(clippy::zombie_processes)] // the child goes back to the caller, which waits for it
fn start_up(config: &Path, run: &Path) -> (Child, BufReader<ChildStdout>, String, String) {
    let mut child = remoca()
        .env("XDG_RUNTIME_DIR", run)
        .env_remove("REMOCA_SIM_XENSTORE")
        .args(["--backend", "sim", "up", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "remoca up stopped: {seen}\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        seen.push_str(&line);
        if let Some(a) = line.trim().strip_prefix("blkback NBD listening on ") {
            let nbd = a.to_owned();
            return (child, out, seen, nbd);
        }
    }
}

/// `remoca up` killed with SIGKILL (no chance to stop anything) still takes its failover
/// drivers with it: each holds a pipe from `up` on its standard input and exits at its end.
#[test]
fn remoca_up_killed_with_sigkill_leaves_no_driver_running() {
    let dir = tempfile::tempdir().unwrap();
    let (template, overlay) = template_and_overlay(dir.path(), 1 << 20);
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let config = up_failover_config(dir.path(), &template, &overlay, None);
    let (mut child, _out, _, _) = start_up(&config, &run);
    let drivers = children_of(child.id());
    assert_eq!(
        drivers.len(),
        2,
        "expected two driver processes: {drivers:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    for pid in &drivers {
        let t0 = std::time::Instant::now();
        while alive(pid) {
            if t0.elapsed() > std::time::Duration::from_secs(10) {
                for p in &drivers {
                    let _ = Command::new("kill").args(["-KILL", p]).status();
                }
                panic!("driver {pid} outlived a SIGKILLed up");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// The lowest CPU this process may run on.
fn first_allowed_cpu() -> usize {
    cpu_list(&cpus_allowed(Path::new("/proc/self")).expect("our own status"))[0]
}

/// The `Cpus_allowed_list` value in `proc_dir`/status (a process's or a thread's).
fn cpus_allowed(proc_dir: &Path) -> Option<String> {
    let status = std::fs::read_to_string(proc_dir.join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|l| l.trim().to_string())
}

/// Every thread of `pid` named `name` (there is at least one) may run on `cpu` only.
fn assert_pinned(pid: &str, name: &str, cpu: usize) {
    let lists = thread_cpus(pid, name);
    assert!(
        !lists.is_empty() && lists.iter().all(|l| *l == cpu.to_string()),
        "pid {pid}'s {name} threads may run on {lists:?}, not only on CPU {cpu}"
    );
}

/// Every thread of `pid` named `name` (there is at least one) may run on each CPU `pid`
/// may run on except `cpu` (on `cpu` too when it is the only one).
fn assert_kept_off(pid: &str, name: &str, cpu: usize) {
    let process = cpu_list(&cpus_allowed(Path::new(&format!("/proc/{pid}"))).unwrap());
    let want: Vec<usize> = if process == [cpu] {
        process
    } else {
        process.into_iter().filter(|&c| c != cpu).collect()
    };
    let lists = thread_cpus(pid, name);
    assert!(
        !lists.is_empty() && lists.iter().all(|l| cpu_list(l) == want),
        "pid {pid}'s {name} threads may run on {lists:?}, not on {want:?}"
    );
}

/// The CPUs of a `Cpus_allowed_list` value such as `0-2,5`.
fn cpu_list(list: &str) -> Vec<usize> {
    list.trim()
        .split(',')
        .flat_map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()
        })
        .collect()
}

/// `Cpus_allowed_list` of each thread of `pid` named `name`.
fn thread_cpus(pid: &str, name: &str) -> Vec<String> {
    let mut lists = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        lists.extend(cpus_allowed(&t));
    }
    lists
}

/// `remoca up` with an export marked `failover = true`: it runs the endpoint and two driver
/// processes, `remoca blkback status` shows the active driver's pid, killing that pid moves
/// the disk to the other driver with the data intact, and the killed driver is restarted
/// and becomes the backup, so a second kill is survived too. SIGTERM stops everything.
#[test]
fn remoca_up_runs_a_failover_disk_and_restarts_killed_drivers() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let (template, overlay) = template_and_overlay(dir.path(), 4 << 20);
    let template_sum = sha(&template);
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    // The channel's readers pinned to the lowest CPU this test may run on.
    let cpu = first_allowed_cpu();
    let config = up_failover_config(dir.path(), &template, &overlay, Some(cpu));
    let (child, mut out, seen, nbd) = start_up(&config, &run);
    assert!(seen.contains("failover endpoint over 2 drivers"), "{seen}");
    // Keep draining stdout so `up` never blocks on it.
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        rest
    });
    let mut up = Proc { child: Some(child) };
    let status_dir = run.join("remoca").join("blkback");
    let uri = format!("nbd://{nbd}/vm");

    qemu_io(&uri, "write -P 0x5a 0 1M");
    qemu_io(&uri, "flush");
    let first = wait_row(&status_dir, "no standby", |r| r["standby"] != "-");
    let (pid1, active1) = (first["driver-pid"].clone(), first["active"].clone());
    assert!(
        alive(&pid1),
        "status shows pid {pid1}, not running: {first:?}"
    );
    assert_eq!(first["pid"], up.child.as_ref().unwrap().id().to_string());
    assert_eq!(first["reader-cpu"], cpu.to_string(), "{first:?}");
    assert_pinned(&first["pid"], "fo-reader", cpu);
    assert_kept_off(&first["pid"], "fo-writer", cpu);
    assert_pinned(&pid1, "fo-driver-conn", cpu);

    // Kill the active driver by the pid status shows: the other one serves the data.
    run_ok(Command::new("kill").args(["-KILL", &pid1]));
    qemu_io(&uri, "read -P 0x5a 0 1M");
    qemu_io(&uri, "write -P 0xc3 1M 512k");
    let second = wait_row(&status_dir, "no failover to the other driver", |r| {
        r["failovers"] == "1" && r["driver-pid"] != pid1 && r["active"] != active1
    });
    assert!(second["last-failover"].contains(&active1), "{second:?}");
    // The killed driver is restarted by `up` and becomes the backup again.
    let second = wait_row(&status_dir, "the killed driver never came back", |r| {
        r["standby"] == active1
    });
    let pid2 = second["driver-pid"].clone();
    run_ok(Command::new("kill").args(["-KILL", &pid2]));
    qemu_io(&uri, "read -P 0xc3 1M 512k");
    qemu_io(&uri, "read -P 0x5a 0 1M");
    let third = wait_row(&status_dir, "no second failover", |r| {
        r["failovers"] == "2" && r["active"] == active1
    });
    assert!(alive(&third["driver-pid"]), "{third:?}");
    assert_ne!(
        third["driver-pid"], pid1,
        "the restarted driver is a new process"
    );
    // `up` restarted it with the same reader CPU.
    assert_pinned(&third["driver-pid"], "fo-driver-conn", cpu);

    // SIGTERM: `up` stops the endpoint and its drivers and removes the status file.
    let up_child = up.child.take().unwrap();
    run_ok(Command::new("kill").args(["-TERM", &up_child.id().to_string()]));
    let o = up_child.wait_with_output().unwrap();
    let rest = drain.join().unwrap();
    assert!(
        o.status.success(),
        "up failed on SIGTERM: {rest}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("restarted as pid"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for pid in [&third["driver-pid"], &second["driver-pid"]] {
        let t0 = std::time::Instant::now();
        while alive(pid) {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "driver {pid} outlived up"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    assert!(
        blkback_status(&status_dir).contains("no failover endpoint is running"),
        "up left its status file"
    );
    let srv = Server::tcp(&[spec("vm", &template, Some(&overlay))]);
    qemu_io(&srv.uri("vm"), "read -P 0x5a 0 1M");
    qemu_io(&srv.uri("vm"), "read -P 0xc3 1M 512k");
    srv.stop();
    assert_eq!(sha(&template), template_sum, "the template changed");
}
