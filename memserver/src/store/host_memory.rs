//! How much memory the host still has free: `MemAvailable` from `/proc/meminfo`, behind a
//! trait so tests can model a small host.

use std::io;

/// A source of "bytes the host can still give out".
pub trait HostMemory: Send + Sync + std::fmt::Debug {
    /// Currently available bytes.
    ///
    /// # Errors
    /// The source could not be read.
    fn available(&self) -> io::Result<u64>;
}

/// Reads `MemAvailable` from `/proc/meminfo`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcMeminfo;

impl HostMemory for ProcMeminfo {
    fn available(&self) -> io::Result<u64> {
        let text = std::fs::read_to_string("/proc/meminfo")?;
        parse_mem_available(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no MemAvailable in /proc/meminfo",
            )
        })
    }
}

/// `MemAvailable:  123456 kB` -> bytes.
pub fn parse_mem_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut it = line["MemAvailable:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mem_available_in_kib() {
        let t = "MemTotal:       24576000 kB\nMemFree:  1000 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(t), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn reads_this_host() {
        assert!(ProcMeminfo.available().unwrap() > 0);
    }
}
