//! `remoca bench memserver` end to end with tiny cells: both systems answer every request of
//! every cell (needs Debian's `memcached`; the test fails with a clear message without it).

use remoca_memserver::bench::{run, BenchConfig};

#[test]
fn bench_runs_both_systems_through_every_cell() {
    let cfg = BenchConfig {
        threads: 1,
        memory: 64 << 20,
        seconds: 0.05,
        keys: 256,
        batch: 4,
        connections: 2,
        memcached: "memcached".into(),
        rounds: 1,
    };
    let report =
        run(&cfg).unwrap_or_else(|e| panic!("bench failed (is memcached installed?): {e}"));
    eprintln!("{report}");
    assert!(report.contains("loopback TCP ceiling"), "{report}");
    let rows: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("get ") || l.starts_with("set ") || l.starts_with("90/10"))
        .collect();
    assert_eq!(rows.len(), 3 * 2 * 3, "{report}");
    for r in rows {
        // Both systems completed some requests: no zero ops/s column.
        let cols: Vec<&str> = r.split('|').collect();
        assert!(!cols[1].trim().starts_with("0 "), "{r}");
        assert!(!cols[2].trim().starts_with("0 "), "{r}");
    }
    assert!(report.contains("through the real client"));
}
