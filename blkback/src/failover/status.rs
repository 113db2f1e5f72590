//! The endpoint's status file, which `remoca blkback status` reads.
//!
//! Each running `remoca blkback endpoint` keeps one file, `endpoint-<export>.status`, in its
//! status directory (by default remoca's state directory plus `blkback/`). It rewrites the file
//! about once a second (so a failover shows within a second), by writing a temporary file and renaming it, so
//! a reader never sees half a file. It removes the file when it stops. The format is one
//! `key=value` line per field (documented in docs/failover.md):
//!
//! ```text
//! export=vm
//! pid=4242
//! active=unix:/run/remoca/a.sock
//! driver-pid=4250
//! standby=unix:/run/remoca/b.sock
//! generation=3
//! in-flight=2
//! unflushed-writes=17
//! failovers=2
//! updated=1764474000
//! last-failover=1764473990 unix:/run/remoca/b.sock -> unix:/run/remoca/a.sock (connection lost; 3 re-applied, 1 re-sent, 4 ms)
//! reader-cpu=0
//! ```
//!
//! Values never contain a newline; absent optional fields are written as `-`.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::endpoint::{Endpoint, EndpointStatus};

/// Larger status files are not status files: refuse them before reading.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// The fields `remoca blkback status` shows, in its column order.
pub const COLUMNS: [&str; 10] = [
    "export",
    "active",
    "generation",
    "in-flight",
    "failovers",
    "last-failover",
    "pid",
    "driver-pid",
    "standby",
    "reader-cpu",
];

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Replace anything that would break the line format.
fn clean(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The file's text for `export` in state `st`.
pub fn render(export: &str, pid: u32, st: &EndpointStatus, now: SystemTime) -> String {
    let opt = |v: &Option<String>| v.as_deref().map_or("-".to_owned(), clean);
    let last = st.last_failover.as_ref().map_or("-".to_owned(), |f| {
        clean(&format!(
            "{} {} -> {} ({}; {} re-applied, {} re-sent, {} ms)",
            unix_secs(f.at),
            f.from,
            f.to,
            f.reason,
            f.reapplied,
            f.resent,
            f.took.as_millis()
        ))
    });
    format!(
        "export={}\npid={pid}\nactive={}\ndriver-pid={}\nstandby={}\ngeneration={}\n\
         in-flight={}\nunflushed-writes={}\nfailovers={}\nupdated={}\nlast-failover={last}\n\
         reader-cpu={}\n",
        clean(export),
        opt(&st.active),
        st.active_pid.map_or("-".to_owned(), |p| p.to_string()),
        opt(&st.standby),
        st.generation,
        st.in_flight,
        st.unflushed_writes,
        st.failovers,
        unix_secs(now),
        st.reader_cpu.map_or("-".to_owned(), |c| c.to_string()),
    )
}

/// Parse a status file's text into its fields.
///
/// # Errors
/// A line without `=`, or a file without `export`.
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut fields = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: {line:?} is not key=value", n + 1))?;
        fields.insert(k.to_owned(), v.to_owned());
    }
    if !fields.contains_key("export") {
        return Err("no export= line".to_owned());
    }
    Ok(fields)
}

/// The file an endpoint serving `export` keeps in `dir`.
pub fn path_for(dir: &Path, export: &str) -> PathBuf {
    let safe: String = export
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("endpoint-{safe}.status"))
}

/// Write `text` to `path` atomically (temporary file in the same directory, then rename).
///
/// # Errors
/// I/O errors creating the directory or writing the file.
pub fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// One status file found by [`read_dir`]: its path and its fields, or why it is unreadable.
pub type Entry = (PathBuf, Result<BTreeMap<String, String>, String>);

/// Every `endpoint-*.status` file in `dir`, sorted by name. A missing directory is empty.
///
/// # Errors
/// I/O errors listing the directory (other than its absence).
pub fn read_dir(dir: &Path) -> io::Result<Vec<Entry>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in rd {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("endpoint-") && name.ends_with(".status")) {
            continue;
        }
        out.push((path.clone(), read_one(&path)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn read_one(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if len > MAX_FILE_BYTES {
        return Err(format!("{len} bytes, more than a status file holds"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    parse(&text)
}

/// Whether the process that wrote a status file still runs (a file left by a crashed
/// endpoint is shown as stale).
pub fn writer_alive(fields: &BTreeMap<String, String>) -> bool {
    fields
        .get("pid")
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// Rewrites an endpoint's status file about once a second until stopped, then removes it.
#[derive(Debug)]
pub struct Publisher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl Publisher {
    /// Write the file for `export` now (an error here is returned) and then every second,
    /// with `pid` as the writer.
    ///
    /// # Errors
    /// The first write's I/O error.
    pub fn start(endpoint: Endpoint, export: String, path: PathBuf) -> io::Result<Self> {
        let write = {
            let path = path.clone();
            move || {
                let text = render(
                    &export,
                    std::process::id(),
                    &endpoint.status(),
                    SystemTime::now(),
                );
                write_atomically(&path, &text)
            }
        };
        write()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("endpoint-status".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::park_timeout(Duration::from_secs(1));
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Err(e) = write() {
                            tracing::warn!(error = %e, "cannot update the status file");
                        }
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
            path,
        })
    }

    /// The file it keeps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop rewriting and remove the file.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::super::endpoint::FailoverRecord;
    use super::*;

    fn status() -> EndpointStatus {
        EndpointStatus {
            active: Some("unix:/a".into()),
            active_pid: Some(77),
            standby: None,
            generation: 3,
            in_flight: 2,
            unflushed_writes: 5,
            failovers: 1,
            last_failover: Some(FailoverRecord {
                at: UNIX_EPOCH + Duration::from_secs(100),
                from: "unix:/b".into(),
                to: "unix:/a".into(),
                reason: "connection lost\nreally".into(),
                reapplied: 4,
                resent: 1,
                took: Duration::from_millis(7),
            }),
            reader_cpu: Some(1),
        }
    }

    #[test]
    fn rendered_status_parses_back_with_every_field() {
        let text = render("vm", 42, &status(), UNIX_EPOCH + Duration::from_secs(200));
        let f = parse(&text).unwrap();
        assert_eq!(f["export"], "vm");
        assert_eq!(f["active"], "unix:/a");
        assert_eq!(f["standby"], "-");
        assert_eq!(f["driver-pid"], "77");
        assert_eq!(f["generation"], "3");
        assert_eq!(f["in-flight"], "2");
        assert_eq!(f["updated"], "200");
        assert_eq!(f["reader-cpu"], "1");
        assert_eq!(
            f["last-failover"],
            "100 unix:/b -> unix:/a (connection lost really; 4 re-applied, 1 re-sent, 7 ms)"
        );
        for c in COLUMNS {
            assert!(f.contains_key(c), "{c} missing");
        }
    }

    #[test]
    fn malformed_files_are_refused_not_misread() {
        assert!(parse("export=vm\ngarbage\n")
            .unwrap_err()
            .contains("line 2"));
        assert!(parse("pid=3\n").unwrap_err().contains("export"));
    }

    #[test]
    fn the_directory_lists_only_status_files_and_flags_oversized_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = path_for(dir.path(), "a/b c");
        assert_eq!(p.file_name().unwrap(), "endpoint-a_b_c.status");
        write_atomically(&p, &render("a/b c", 1, &status(), UNIX_EPOCH)).unwrap();
        std::fs::write(dir.path().join("other.txt"), "x").unwrap();
        let big = dir.path().join("endpoint-big.status");
        std::fs::write(&big, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let found = read_dir(dir.path()).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].1.as_ref().unwrap()["export"], "a/b c");
        assert!(found[1].1.as_ref().unwrap_err().contains("more than"));
        assert!(read_dir(&dir.path().join("none")).unwrap().is_empty());
    }
}
