//! `remoca mrc` and `remoca pager` from the command line: a curve from a trace file, clear
//! errors for bad traces, unknown domains and guests mem_paging cannot serve.

use std::process::{Command, Output};

fn remoca(dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_remoca"));
    c.env("REMOCA_SIM_XENSTORE", dir.join("none.sock"))
        .env_remove("REMOCA_BACKEND");
    c
}

fn output(c: &mut Command) -> (bool, String, String) {
    let o: Output = c.output().expect("run remoca");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn mrc_reads_a_trace_and_recommends_its_working_set() {
    let dir = tempfile::tempdir().unwrap();
    // A loop over 300 pages, repeated: the exact curve drops to the cold misses at 300 pages.
    let trace: String = (0..20)
        .flat_map(|_| 0..300u64)
        .map(|p| format!("{p:#x}\n"))
        .collect();
    let path = dir.path().join("trace.txt");
    std::fs::write(&path, format!("# a loop\n{trace}")).unwrap();
    let (ok, out, err) = output(
        remoca(dir.path())
            .args(["mrc", "--method", "exact"])
            .arg(&path),
    );
    assert!(ok, "{err}");
    let rec = out
        .lines()
        .find(|l| l.starts_with("recommended:"))
        .unwrap_or_else(|| panic!("{out}"));
    let pages: u64 = rec
        .split('(')
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (300..=512).contains(&pages),
        "a 300-page loop needs about 300 pages: {rec}"
    );

    std::fs::write(&path, "1\n2\nthree\n").unwrap();
    let (ok, _, err) = output(remoca(dir.path()).arg("mrc").arg(&path));
    assert!(
        !ok && err.contains("line 3") && err.contains("three"),
        "{err}"
    );
    let (ok, _, err) = output(remoca(dir.path()).args(["mrc", "--rate", "0"]));
    assert!(!ok && err.contains("--rate"), "{err}");
    let (ok, _, err) = output(
        remoca(dir.path())
            .arg("mrc")
            .arg(dir.path().join("missing")),
    );
    assert!(!ok && err.contains("missing"), "{err}");
}

#[test]
fn pager_says_why_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let (ok, _, err) = output(
        remoca(dir.path())
            .args([
                "--backend",
                "sim",
                "pager",
                "--domain",
                "77",
                "--journal-dir",
            ])
            .arg(&journal),
    );
    assert!(!ok && err.contains("no domain with id 77"), "{err}");
    // The demo guest is PV: mem_paging needs an HVM guest with HAP.
    let (ok, _, err) = output(
        remoca(dir.path())
            .args([
                "--backend",
                "sim",
                "pager",
                "--domain",
                "demo",
                "--journal-dir",
            ])
            .arg(&journal),
    );
    assert!(
        !ok && err.contains("mem_paging is unavailable") && err.contains("not HVM"),
        "{err}"
    );
}
