//! `remoca up` on the simulated host, and `remoca xen ...` from other processes reaching it
//! through the simulated xenstore socket, as an operator would use them in two shells.

mod up_harness;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use up_harness::{remoca, Up};

fn ok(c: &mut Command) -> String {
    let out = c.output().expect("run remoca");
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn err(c: &mut Command) -> String {
    let out: Output = c.output().expect("run remoca");
    assert!(!out.status.success(), "{c:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn up_serves_the_demo_host_and_xen_commands_reach_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("xs.sock");
    let cfg = dir.path().join("up.toml");
    std::fs::write(
        &cfg,
        format!(
            "[host]\nstate_dir = {:?}\nstatus_interval = 0.5\n[memserver]\ncapacity = \"16M\"\n",
            dir.path()
        ),
    )
    .unwrap();
    let up = Up::start(&sock, &cfg);

    // Another process sees the same host: domains, and xenstore changes that persist.
    let list = ok(remoca(&sock).args(["xen", "list"]));
    assert!(list.lines().any(|l| l.starts_with("Domain-0")), "{list}");
    assert!(
        list.lines()
            .any(|l| l.starts_with("demo ") && l.contains(" 64 ")),
        "{list}"
    );
    ok(remoca(&sock).args(["xen", "store", "write", "/local/domain/1/data/k", "v1"]));
    assert_eq!(
        ok(remoca(&sock).args(["xen", "store", "read", "/local/domain/1/data/k"])),
        "v1\n"
    );
    let ls = ok(remoca(&sock).args(["xen", "store", "ls", "/local/domain/1"]));
    assert!(
        ls.contains("name = \"demo\"") && ls.contains(" k = \"v1\""),
        "{ls}"
    );
    ok(remoca(&sock).args([
        "xen",
        "store",
        "perms",
        "/local/domain/1/data/k",
        "--set",
        "n0",
        "r1",
    ]));
    assert_eq!(
        ok(remoca(&sock).args(["xen", "store", "perms", "/local/domain/1/data/k"])),
        "n0 r1\n"
    );
    ok(remoca(&sock).args(["xen", "store", "rm", "/local/domain/1/data"]));
    let e = err(remoca(&sock).args(["xen", "store", "read", "/local/domain/1/data/k"]));
    assert!(
        e.contains("/local/domain/1/data/k") && e.contains("No such file"),
        "{e}"
    );

    // A watch in one process sees a write from another.
    let mut watch = remoca(&sock)
        .args([
            "xen",
            "store",
            "watch",
            "/local/domain/1/w",
            "--count",
            "2",
            "--timeout",
            "30",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut out = BufReader::new(watch.stdout.take().unwrap());
    out.read_line(&mut first).unwrap();
    assert_eq!(first, "/local/domain/1/w remoca\n", "initial firing");
    ok(remoca(&sock).args(["xen", "store", "write", "/local/domain/1/w", "x"]));
    let mut second = String::new();
    out.read_line(&mut second).unwrap();
    assert_eq!(second, "/local/domain/1/w remoca\n");
    assert!(watch.wait().unwrap().success());

    // The services say where they listen, and the demo disk serves its pattern over NBD.
    let nbd = ok(remoca(&sock).args(["xen", "store", "read", "/tool/remoca/up/blkback/nbd"]));
    let mem = ok(remoca(&sock).args(["xen", "store", "read", "/tool/remoca/up/memserver"]));
    assert!(mem.trim().parse::<std::net::SocketAddr>().is_ok(), "{mem}");
    if Command::new("qemu-io").arg("--version").output().is_ok() {
        let uri = format!("nbd://{}/demo", nbd.trim());
        let read = ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -v 1M 32", &uri]));
        assert!(read.contains("remoca.demo.disk"), "{read}");
        ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 4k", &uri]));
    }
    // The demo swap device keeps its blocks on the memory server: a write reads back, and
    // the status counts the blocks held remotely.
    if Command::new("qemu-io").arg("--version").output().is_ok() {
        let uri = format!("nbd://{}/demo-swap", nbd.trim());
        ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xa7 64k 256k", &uri]));
        let read =
            ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0xa7 64k 256k", &uri]));
        assert!(!read.contains("Pattern verification failed"), "{read}");
        let line = up.wait_for("blocks remote");
        assert!(
            line.contains("swap demo-swap: 64 blocks remote, 0 spilled, 0 errors"),
            "{line}"
        );
    }
    up.wait_for("blkback read");

    // A second `up` on the same simulated host is refused with the reason.
    let e = err(remoca(&sock)
        .args(["--backend", "sim", "up", "--config"])
        .arg(&cfg));
    assert!(e.contains("another `remoca up`"), "{e}");

    // The demo HVM guest runs under the pager, its pages on the memory server, and every
    // page it reads back is what it wrote.
    let line = up.wait_for("pager d");
    assert!(
        line.contains("demo-hvm") && line.contains(" 0 wrong, 0 failed"),
        "{line}"
    );

    let (status, lines) = up.terminate();
    assert!(status.success(), "{lines:?}");
    let last = lines
        .iter()
        .rev()
        .find(|l| l.contains("demo-hvm"))
        .expect("a final status line");
    assert!(
        last.contains(" 0 wrong, 0 failed") && last.contains("pages paged back"),
        "{last}"
    );
    let accesses: u64 = last
        .split("demo-hvm ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("an access count");
    assert!(accesses > 0, "the demo guest ran: {last}");
    assert!(
        lines.iter().any(|l| l.contains("stopping (SIGTERM)")),
        "{lines:?}"
    );
    assert!(!sock.exists(), "the xenstore socket is removed on exit");
    // The overlay kept the write; the template did not change.
    let tpl = std::fs::read(dir.path().join("demo-template.raw")).unwrap();
    assert!(tpl.starts_with(b"remoca demo disk, MiB 0\n"));
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[memserver]\ncapcity = \"1G\"\n").unwrap();
    let e = err(remoca(&sock).args(["up", "--config"]).arg(&bad));
    assert!(e.contains("memserver.capcity"), "{e}");
    std::fs::write(&bad, "[host]\nstatus_interval = \"fast\"\n").unwrap();
    let e = err(remoca(&sock).args(["up", "--config"]).arg(&bad));
    assert!(e.contains("status_interval"), "{e}");
    std::fs::write(&bad, "[blkback]\nbackend_domain = \"dom1\"\n").unwrap();
    let e = err(remoca(&sock).args(["up", "--config"]).arg(&bad));
    assert!(e.contains("backend_domain") && e.contains("dom1"), "{e}");
    let e = err(remoca(&sock)
        .args(["up", "--config"])
        .arg(dir.path().join("missing.toml")));
    assert!(e.contains("missing.toml"), "{e}");

    let e = err(remoca(&sock).args(["--backend", "xen5", "xen", "list"]));
    assert!(e.contains("unknown backend \"xen5\""), "{e}");
    if !Path::new("/dev/xen/privcmd").exists() {
        let e = err(remoca(&sock).args(["--backend", "real", "xen", "list"]));
        assert!(e.contains("Xen is not available"), "{e}");
        let e = err(remoca(&sock).args(["--backend", "real", "up"]));
        assert!(e.contains("Xen is not available"), "{e}");
    }
    // Without a running `up`, commands use a private demo host.
    let e = err(remoca(&sock).args(["--backend", "sim", "xen", "find-marker", "77", "M"]));
    assert!(e.contains("no domain with id 77"), "{e}");
    let e = err(remoca(&sock).args(["--backend", "sim", "xen", "find-marker", "nosuch", "M"]));
    assert!(e.contains("no domain named \"nosuch\""), "{e}");
    let e = err(remoca(&sock).args(["--backend", "sim", "xen", "store", "ls", "/no/such"]));
    assert!(e.contains("/no/such"), "{e}");
    let e = err(remoca(&sock).args([
        "--backend",
        "sim",
        "xen",
        "store",
        "write",
        "/bad path",
        "v",
    ]));
    assert!(e.contains("bad character"), "{e}");
    let e = err(remoca(&sock).args([
        "--backend",
        "sim",
        "xen",
        "store",
        "perms",
        "/local",
        "--set",
        "q9",
    ]));
    assert!(e.contains("q9"), "{e}");
}

#[test]
fn selftest_passes_on_the_simulated_host() {
    let dir = tempfile::tempdir().unwrap();
    let out =
        ok(remoca(&dir.path().join("none.sock")).args(["--backend", "sim", "xen", "selftest"]));
    let results: Vec<&str> = out.lines().filter(|l| l.starts_with("@@RESULT ")).collect();
    assert!(results.len() >= 10, "{out}");
    assert!(results.iter().all(|l| l.ends_with(" PASS")), "{out}");
}

#[test]
fn binary_has_no_link_time_xen_dependency() {
    let Ok(out) = Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_remoca"))
        .output()
    else {
        return;
    };
    let libs = String::from_utf8_lossy(&out.stdout);
    assert!(libs.contains("libc.so"), "ldd printed {libs}");
    assert!(
        !libs.contains("libxen"),
        "remoca links a Xen library: {libs}"
    );
}
