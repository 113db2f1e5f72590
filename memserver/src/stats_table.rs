//! STATS as a table a person reads.

use std::fmt::Write;

use crate::byte_size::format_size;
use crate::protocol::control::{PoolCounters, StatsSnapshot};

fn row(out: &mut String, name: &str, c: &PoolCounters) {
    let lookups = c.hits + c.misses;
    let hit_rate = if lookups == 0 {
        "-".to_string()
    } else {
        format!("{:.1}%", 100.0 * c.hits as f64 / lookups as f64)
    };
    let _ = writeln!(
        out,
        "  {:<24} {:>10} {:>11} {:>10} {:>10} {:>10} {:>7} {:>10} {:>9}",
        name,
        c.pages,
        format_size(c.bytes),
        c.puts,
        c.hits,
        c.misses,
        hit_rate,
        c.evictions,
        c.refused
    );
}

fn header(out: &mut String, first: &str) {
    let _ = writeln!(
        out,
        "  {:<24} {:>10} {:>11} {:>10} {:>10} {:>10} {:>7} {:>10} {:>9}",
        first, "pages", "bytes", "puts", "hits", "misses", "hit%", "evictions", "refused"
    );
}

/// Render a STATS snapshot of the server at `addr`.
pub fn render(addr: &str, s: &StatsSnapshot) -> String {
    let mut out = String::new();
    let pct = |a: u64, b: u64| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    let _ = writeln!(
        out,
        "memory server {addr}  (up {}s, {} connections)",
        s.uptime_secs, s.connections
    );
    let _ = writeln!(
        out,
        "  used {} of limit {} ({:.1}%)   capacity {}   headroom {}   host available {}",
        format_size(s.used),
        format_size(s.limit),
        pct(s.used, s.limit),
        format_size(s.capacity),
        format_size(s.headroom),
        format_size(s.host_available)
    );
    let _ = writeln!(out);
    header(&mut out, "pool");
    row(&mut out, "ephemeral", &s.pools[0]);
    row(&mut out, "persistent", &s.pools[1]);
    if !s.namespaces.is_empty() {
        let _ = writeln!(out);
        header(&mut out, "namespace / pool");
        for n in &s.namespaces {
            for (i, name) in ["ephemeral", "persistent"].iter().enumerate() {
                let c = &n.pools[i];
                if c.pages == 0 && c.puts == 0 && c.hits == 0 && c.misses == 0 {
                    continue;
                }
                row(&mut out, &format!("{} / {}", n.namespace, name), c);
            }
        }
        if s.namespaces_omitted > 0 {
            let _ = writeln!(out, "  ... and {} smaller namespaces", s.namespaces_omitted);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::control::NamespaceStats;

    #[test]
    fn shows_pools_and_namespaces() {
        let mut s = StatsSnapshot {
            capacity: 1 << 30,
            limit: 1 << 30,
            used: 8192,
            ..Default::default()
        };
        s.pools[1].pages = 2;
        s.pools[1].bytes = 8192;
        s.pools[0].hits = 3;
        s.pools[0].misses = 1;
        let mut n = NamespaceStats {
            namespace: 17,
            ..Default::default()
        };
        n.pools[1].pages = 2;
        s.namespaces.push(n);
        let t = render("127.0.0.1:7000", &s);
        assert!(t.contains("persistent"));
        assert!(t.contains("17 / persistent"));
        assert!(t.contains("75.0%"), "{t}");
        assert!(!t.contains("17 / ephemeral"));
        assert!(t.contains("8.0 KiB"));
    }
}
