//! The pager's write-ahead journal of which pages are out: gfn → content hash.
//!
//! Invariant: an `Out` record for a page is on disk (fsync'ed) *before* the page is evicted,
//! so after a crash every page that may be out is in the journal and its copy in the store.
//! `In` records are written lazily (not synced): losing one only means a restarted pager
//! tries to load a page that is already resident, which Xen refuses harmlessly.
//!
//! The file is append-only; when it holds more than `2 × live + COMPACT_SLACK` records it is
//! rewritten (to `<path>.tmp`, fsync, rename, fsync of the directory) with one `Out` record
//! per page still out. A torn record at the end (crash mid-append) is cut off on open; a bad
//! record elsewhere is an error, since silently dropping it could lose a page.
//! The layout is in [`format`].

pub mod format;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use remoca_xen::{DomId, Gfn};

use format::{Decoded, FormatError, Record};

/// Records beyond twice the live set that trigger a compaction.
const COMPACT_SLACK: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal {path} is corrupt at byte {offset}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        #[source]
        source: FormatError,
    },
}

/// An open journal and the page map it describes.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    dom: DomId,
    file: File,
    /// Pages out, as the journal says: gfn → xxh3-64 of the content.
    out: HashMap<Gfn, u64>,
    records: u64,
    pending: Vec<u8>,
}

impl Journal {
    /// Open (or create) the journal of `dom` at `path` and replay it.
    ///
    /// # Errors
    /// `Io`, or `Corrupt` for a bad header or a bad record before the end of the file.
    pub fn open(path: &Path, dom: DomId) -> Result<Journal, JournalError> {
        let io_err = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        let corrupt = |offset, source| JournalError::Corrupt {
            path: path.to_owned(),
            offset,
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_err)?;
        let mut out = HashMap::new();
        let mut records = 0;
        if bytes.is_empty() {
            file.write_all(&format::encode_header(dom))
                .map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        } else {
            format::check_header(&bytes, dom).map_err(|e| corrupt(0, e))?;
            let mut at = format::HEADER_LEN;
            while let Decoded::Record(rec, n) =
                format::decode_record(&bytes[at..]).map_err(|e| corrupt(at as u64, e))?
            {
                apply(&mut out, rec);
                records += 1;
                at += n;
            }
            if at < bytes.len() {
                tracing::warn!(
                    path = %path.display(),
                    torn = bytes.len() - at,
                    "journal ends in a torn record; cutting it off"
                );
                file.set_len(at as u64).map_err(io_err)?;
                file.sync_all().map_err(io_err)?;
            }
        }
        Ok(Journal {
            path: path.to_owned(),
            dom,
            file,
            out,
            records,
            pending: Vec::new(),
        })
    }

    /// Pages out according to the journal.
    pub fn out(&self) -> &HashMap<Gfn, u64> {
        &self.out
    }

    /// Queue a record (written by the next [`Journal::flush`] or [`Journal::sync`]).
    pub fn record(&mut self, rec: Record) {
        apply(&mut self.out, rec);
        format::encode_record(&rec, &mut self.pending);
        self.records += 1;
    }

    /// Write queued records without waiting for the disk.
    ///
    /// # Errors
    /// `Io`.
    pub fn flush(&mut self) -> Result<(), JournalError> {
        if !self.pending.is_empty() {
            self.file
                .write_all(&self.pending)
                .map_err(|source| self.io(source))?;
            self.pending.clear();
        }
        Ok(())
    }

    /// Write queued records and wait until they are on disk; compact when due.
    ///
    /// # Errors
    /// `Io`.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.flush()?;
        self.file.sync_data().map_err(|source| self.io(source))?;
        if self.records > 2 * self.out.len() as u64 + COMPACT_SLACK {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrite the file with one record per page out.
    ///
    /// # Errors
    /// `Io`.
    pub fn compact(&mut self) -> Result<(), JournalError> {
        self.flush()?;
        let tmp = self.path.with_extension("tmp");
        let mut buf = format::encode_header(self.dom).to_vec();
        let mut gfns: Vec<(&Gfn, &u64)> = self.out.iter().collect();
        gfns.sort_unstable();
        for (&gfn, &hash) in gfns {
            format::encode_record(&Record::Out { gfn, hash }, &mut buf);
        }
        let write = || -> io::Result<File> {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            OpenOptions::new().append(true).open(&self.path)
        };
        self.file = write().map_err(|source| self.io(source))?;
        self.records = self.out.len() as u64;
        Ok(())
    }

    /// Records in the file (after the last compaction).
    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: io::Error) -> JournalError {
        JournalError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

fn apply(out: &mut HashMap<Gfn, u64>, rec: Record) {
    match rec {
        Record::Out { gfn, hash } => {
            out.insert(gfn, hash);
        }
        Record::In { gfn } => {
            out.remove(&gfn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_cuts_torn_tail_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let mut j = Journal::open(&path, 3).unwrap();
            for g in 0..10 {
                j.record(Record::Out {
                    gfn: g,
                    hash: g * 11,
                });
            }
            j.record(Record::In { gfn: 4 });
            j.sync().unwrap();
        }
        // A crash mid-append leaves half a record.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[16, 0, 1]).unwrap();
        drop(f);
        let mut j = Journal::open(&path, 3).unwrap();
        assert_eq!(j.out().len(), 9);
        assert_eq!(j.out().get(&7), Some(&77));
        assert!(!j.out().contains_key(&4));
        for g in 0..10 {
            j.record(Record::In { gfn: g });
        }
        j.record(Record::Out { gfn: 2, hash: 5 });
        j.compact().unwrap();
        assert_eq!(j.records(), 1);
        drop(j);
        let j = Journal::open(&path, 3).unwrap();
        assert_eq!(j.out().len(), 1);
        assert_eq!(j.out().get(&2), Some(&5));
        assert!(matches!(
            Journal::open(&path, 4),
            Err(JournalError::Corrupt { .. })
        ));
    }

    #[test]
    fn corruption_before_the_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let mut j = Journal::open(&path, 1).unwrap();
            j.record(Record::Out { gfn: 1, hash: 1 });
            j.record(Record::Out { gfn: 2, hash: 2 });
            j.sync().unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[format::HEADER_LEN + 5] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            Journal::open(&path, 1),
            Err(JournalError::Corrupt { .. })
        ));
    }
}
