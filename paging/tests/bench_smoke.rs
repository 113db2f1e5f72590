//! `remoca bench paging` with tiny sizes: every row is produced (no timing assertions).

use remoca_paging::bench::{run, PagingBenchConfig, EXPECTED_ROWS};

#[test]
fn tiny_bench_produces_every_row() {
    // A directory on the real disk (the current dir of a test is the package dir), so the
    // O_DIRECT path is exercised where the file system supports it.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let cfg = PagingBenchConfig {
        pages: 64,
        samples: 50,
        warmup: 5,
        swap_blocks: 32,
        cache_blocks: 16,
        cache_passes: 4,
        mrc_refs: 20_000,
        mrc_keys: 2_000,
        dir: dir.path().to_owned(),
        seed: 1,
    };
    let report = run(&cfg).expect("bench runs");
    for (section, name) in EXPECTED_ROWS {
        let row = report
            .row(section, name)
            .unwrap_or_else(|| panic!("row {section}/{name} missing:\n{}", report.text));
        assert!(!row.figures.is_empty(), "{section}/{name} has no figures");
        assert!(
            report.text.contains(name),
            "{name} not printed:\n{}",
            report.text
        );
    }
    assert_eq!(report.rows.len(), EXPECTED_ROWS.len(), "{}", report.text);
    let hits = report.row("cache", "RemoteCache re-read trace").unwrap();
    assert!(hits
        .figures
        .iter()
        .any(|(k, v)| *k == "hit rate %" && *v > 0.0));
    assert!(report.text.contains("goal"));
    // The local files are removed.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
