//! Live working-set estimation under `remoca up` on the simulated host, checked from other
//! processes as an operator would: the keys under `/local/domain/<id>/remoca` through
//! `remoca xen store`, and `remoca mrc DOMAIN`.
//!
//! The demo guest (`src/up/demo_guest.rs`) loops over 1536 anonymous pages of which 1024 fit
//! (512 pages = 2 MiB too many) and reads 1024 disk blocks through a 768-block page cache:
//! its ghost stack never holds more than 512 + 1024 pages, so a correct estimate asks for at
//! least 2 MiB and at most 6 MiB more than the guest has.

mod up_harness;

use std::process::Command;
use std::time::{Duration, Instant};

use up_harness::{remoca, Up};

const DEMO: &str = "demo-hvm";
const NEEDS_AT_LEAST_KIB: u64 = 512 * 4;
const GHOST_AT_MOST_KIB: u64 = (512 + 1024) * 4;

fn run(c: &mut Command) -> (bool, String, String) {
    let o = c.output().expect("run remoca");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// `name: N KiB` from `remoca mrc` output.
fn kib(out: &str, name: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name:?} line in {out}"));
    line[name.len() + 2..]
        .strip_suffix(" KiB")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad line {line:?}"))
}

#[test]
fn up_publishes_the_demo_guests_working_set_and_mrc_draws_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("xs.sock");
    let cfg = dir.path().join("up.toml");
    std::fs::write(
        &cfg,
        format!(
            "[host]\nstate_dir = {:?}\nstatus_interval = 1.0\n[memserver]\ncapacity = \"64M\"\n\
             [wss]\ninterval = 0.5\n",
            dir.path()
        ),
    )
    .unwrap();
    let up = Up::start(&sock, &cfg);
    let list = run(remoca(&sock).args(["xen", "list"])).1;
    let dom: u32 = list
        .lines()
        .find(|l| l.starts_with(DEMO))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("{list}"));
    let keys = format!("/local/domain/{dom}/remoca");

    // Wait until the guest has refaulted long enough for the estimate to see its loop.
    let deadline = Instant::now() + Duration::from_secs(150);
    let out = loop {
        let (ok, out, err) = run(remoca(&sock).args(["mrc", DEMO]));
        if ok && kib(&out, "remote share") >= NEEDS_AT_LEAST_KIB {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "the estimate never asked for {NEEDS_AT_LEAST_KIB} KiB more: {out}{err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };

    // One consistent estimate, as `remoca mrc` printed it.
    let current = kib(&out, "current");
    let target = kib(&out, "balloon target");
    let wss = kib(&out, "wss");
    assert_eq!(current, 32 * 1024, "demo-hvm has 32 MiB: {out}");
    assert_eq!(kib(&out, "remote share"), target - current, "{out}");
    assert!(
        target - current <= GHOST_AT_MOST_KIB && wss >= target,
        "{out}"
    );
    assert!(
        wss - current <= GHOST_AT_MOST_KIB,
        "more than the ghost stack can hold: {out}"
    );
    assert!(
        out.contains("working set of domain") && out.contains(DEMO),
        "{out}"
    );
    assert!(out.contains('▲') && out.contains("32.0 MiB"), "{out}");

    // The keys, by path, from another process.
    let (ok, ls, err) = run(remoca(&sock).args(["xen", "store", "ls", &keys]));
    assert!(ok, "{err}");
    for k in [
        "mrc",
        "current-kib",
        "wss-kib",
        "balloon-target-kib",
        "remote-share-kib",
        "samples",
        "swap-ins",
        "reads",
        "rate",
        "updated",
    ] {
        assert!(ls.contains(&format!("{k} = \"")), "{k} missing: {ls}");
    }
    let read = |k: &str| -> String {
        let (ok, v, err) =
            run(remoca(&sock).args(["xen", "store", "read", &format!("{keys}/{k}")]));
        assert!(ok, "{err}");
        v.trim().to_string()
    };
    let points: Vec<(u64, f64)> = read("mrc")
        .split(' ')
        .map(|p| {
            let (s, r) = p.split_once(':').unwrap();
            (s.parse().unwrap(), r.parse().unwrap())
        })
        .collect();
    assert_eq!(points[0].0, current);
    assert!(points.len() >= 2 && points.len() <= 33, "{points:?}");
    assert!(
        points
            .windows(2)
            .all(|w| w[1].0 > w[0].0 && w[1].1 <= w[0].1),
        "sizes rise and ratios do not: {points:?}"
    );
    assert!(points.iter().all(|p| (0.0..=1.0).contains(&p.1)));
    assert!(read("samples").parse::<u64>().unwrap() > 0);
    assert!(read("swap-ins").parse::<u64>().unwrap() > 0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let updated: u64 = read("updated").parse().unwrap();
    assert!(now.abs_diff(updated) < 120, "updated {updated}, now {now}");
    let perms = run(remoca(&sock).args(["xen", "store", "perms", &keys])).1;
    assert_eq!(
        perms.trim(),
        format!("n0 r{dom}"),
        "the guest may read, not write"
    );

    // By id too; a domain without an estimate and an unknown one are clear errors.
    let (ok, by_id, err) = run(remoca(&sock).args(["mrc", &dom.to_string()]));
    assert!(ok && by_id.contains("balloon target:"), "{err}");
    let (ok, _, err) = run(remoca(&sock).args(["mrc", "demo"]));
    assert!(!ok && err.contains("no working-set estimate"), "{err}");
    let (ok, _, err) = run(remoca(&sock).args(["mrc", "nosuch"]));
    assert!(!ok && err.contains("nosuch"), "{err}");

    let status = up.wait_for(&format!("wss d{dom} "));
    assert!(status.contains("target"), "{status}");
    assert!(up.terminate().0.success());
}
