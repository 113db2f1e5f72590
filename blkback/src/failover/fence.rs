//! The generation fence: storage that refuses the writes of a superseded driver.
//!
//! Next to the storage a driver writes (the overlay, or a writable template) lies a **fence
//! record**, `<storage>.fence`: eight bytes, the generation of the driver connection that
//! took the storage over last (an empty or missing file is generation 0).
//!
//! - **Takeover** ([`Fence::take_over`]): a driver connection of generation `g`, at its first
//!   request and before it opens the disk stack, takes an exclusive OFD lock on the record
//!   (waiting for every write in progress to end), refuses if the record already holds a
//!   newer generation, writes `g`, syncs, and unlocks.
//! - **Every mutating call** (write, flush, discard, write-zeroes) of a [`FencedDisk`] runs
//!   inside a **section**: the driver holds a shared OFD lock on the record, and the record
//!   holds its own generation. Otherwise the call fails with `ESTALE` and writes nothing.
//!
//! Why a woken driver can never write after a takeover: the record changes only under the
//! exclusive lock, which the kernel grants only when no section of any process holds the
//! shared one. A section that began before the takeover therefore ended before the record
//! changed (its write is ordered before everything the new driver does), and a section that
//! begins after it reads the new generation and refuses. A driver stopped between the check
//! and its `pwrite` is inside a section, so it holds the shared lock: the takeover waits for
//! it instead of racing it. That wait is the price (see docs/failover.md): in the endpoint's
//! default mode the faulty local driver is SIGKILLed, which drops its locks at once; without
//! the kill, a driver hung *inside* a write delays the takeover until it resumes or dies.
//!
//! The locks are `fcntl` open-file-description locks: they belong to the open file, not to
//! the process, so two connections of one driver process fence each other too, and they are
//! released by the kernel when the process dies. They hold wherever the drivers see one
//! file with coherent locks (one host, or a shared file system that supports them).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::disk::{Disk, DiskError, Extent, WriteFlags, ZeroFlags};
use crate::export::ExportConfig;

/// The fence record of a storage file: `<path>.fence`.
pub fn record_path(storage: &Path) -> PathBuf {
    let mut s = storage.as_os_str().to_owned();
    s.push(".fence");
    PathBuf::from(s)
}

/// The fence record of an export: next to its overlay, or next to its template when the
/// template itself is written; `None` for a read-only export (nothing to fence).
pub fn record_for(cfg: &ExportConfig) -> Option<PathBuf> {
    if cfg.read_only {
        return None;
    }
    Some(record_path(cfg.overlay.as_ref().unwrap_or(&cfg.template)))
}

/// Why a takeover failed.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("fence record {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("fence record {path} holds generation {current}, newer than ours ({ours})")]
    Superseded {
        path: PathBuf,
        current: u64,
        ours: u64,
    },
}

/// A whole-file OFD lock (`F_RDLCK`, `F_WRLCK` or `F_UNLCK`); `wait` blocks until granted.
fn ofd_lock(file: &File, kind: libc::c_int, wait: bool) -> io::Result<bool> {
    let fl = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: FFI call on a descriptor `file` keeps open, with a pointer to a live,
        // initialised `flock` the kernel only reads for SETLK/SETLKW.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &fl as *const libc::flock) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EACCES) if !wait => return Ok(false),
            _ => return Err(e),
        }
    }
}

fn read_generation(file: &File) -> io::Result<u64> {
    let mut b = [0u8; 8];
    let mut n = 0;
    while n < 8 {
        match file.read_at(&mut b[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(match n {
        0 => 0,
        8 => u64::from_be_bytes(b),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "fence record is not 8 bytes",
            ))
        }
    })
}

fn stale() -> DiskError {
    DiskError::Io(io::Error::from_raw_os_error(libc::ESTALE))
}

#[derive(Debug, Default)]
struct Sections {
    /// Sections in progress in this connection; the shared lock is held while non-zero.
    active: usize,
    /// The record held a newer generation: refuse for good.
    superseded: bool,
    /// Mutating calls refused.
    refused: u64,
}

/// One driver connection's hold on a fence record.
#[derive(Debug)]
pub struct Fence {
    path: PathBuf,
    file: File,
    generation: u64,
    sections: Mutex<Sections>,
}

impl Fence {
    /// Take the storage over for `generation`: wait for every write section in progress (of
    /// any process), refuse if a newer generation already holds it, record ours.
    /// `on_wait` is called about once a second while a section keeps us waiting.
    ///
    /// # Errors
    /// [`FenceError::Superseded`], or I/O errors on the record.
    pub fn take_over(
        path: &Path,
        generation: u64,
        mut on_wait: impl FnMut(Duration),
    ) -> Result<Self, FenceError> {
        let io = |source| FenceError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let t0 = Instant::now();
        let mut told = Duration::ZERO;
        while !ofd_lock(&file, libc::F_WRLCK, false).map_err(io)? {
            if t0.elapsed() >= told + Duration::from_secs(1) {
                told = t0.elapsed();
                on_wait(told);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let r = (|| {
            let current = read_generation(&file).map_err(io)?;
            if current > generation {
                return Err(FenceError::Superseded {
                    path: path.to_owned(),
                    current,
                    ours: generation,
                });
            }
            file.write_all_at(&generation.to_be_bytes(), 0)
                .map_err(io)?;
            file.sync_data().map_err(io)
        })();
        ofd_lock(&file, libc::F_UNLCK, true).map_err(io)?;
        r?;
        Ok(Self {
            path: path.to_owned(),
            file,
            generation,
            sections: Mutex::new(Sections::default()),
        })
    }

    /// The generation this hold was taken for.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Mutating calls refused so far because a newer generation took over.
    pub fn refused(&self) -> u64 {
        self.sections.lock().refused
    }

    /// Run `f` inside a section, or refuse with `ESTALE` when superseded.
    fn section<T>(&self, f: impl FnOnce() -> Result<T, DiskError>) -> Result<T, DiskError> {
        self.enter(true)?;
        let r = f();
        self.leave();
        r
    }

    /// Hold a section open until the guard drops, so that the mutating calls made meanwhile
    /// (which nest inside it) need no lock of their own. The driver holds one across a batch
    /// of requests it runs back to back, and drops it before it sends their replies. `None`
    /// when superseded (the calls then refuse one by one) or the lock fails.
    pub fn hold(&self) -> Option<Section<'_>> {
        self.enter(false).ok().map(|()| Section(self))
    }

    /// Enter a section: the first one takes the shared lock and checks the record.
    fn enter(&self, count_refusal: bool) -> Result<(), DiskError> {
        let mut s = self.sections.lock();
        if s.superseded {
            s.refused += u64::from(count_refusal);
            return Err(stale());
        }
        if s.active == 0 {
            ofd_lock(&self.file, libc::F_RDLCK, true).map_err(DiskError::Io)?;
            // The record cannot change while we hold the shared lock.
            let current = match read_generation(&self.file) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ofd_lock(&self.file, libc::F_UNLCK, true);
                    return Err(DiskError::Io(e));
                }
            };
            if current != self.generation {
                let _ = ofd_lock(&self.file, libc::F_UNLCK, true);
                s.superseded = true;
                s.refused += u64::from(count_refusal);
                tracing::warn!(
                    record = %self.path.display(), ours = self.generation, current,
                    "superseded by a newer driver generation: refusing every write"
                );
                return Err(stale());
            }
        }
        s.active += 1;
        Ok(())
    }

    /// Leave a section: the last one releases the shared lock.
    fn leave(&self) {
        let mut s = self.sections.lock();
        s.active -= 1;
        if s.active == 0 {
            if let Err(e) = ofd_lock(&self.file, libc::F_UNLCK, true) {
                tracing::error!(error = %e, "cannot release the fence lock");
            }
        }
    }
}

/// A section held open by [`Fence::hold`]; dropping it leaves the section.
#[derive(Debug)]
pub struct Section<'a>(&'a Fence);

impl Drop for Section<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// A disk whose mutating calls run inside a [`Fence`] section: after a newer generation took
/// the storage over they fail with `ESTALE` and change nothing. Reads pass through (a
/// superseded driver's replies are ignored by the endpoint).
#[derive(Debug, Clone)]
pub struct FencedDisk {
    inner: Arc<dyn Disk>,
    fence: Arc<Fence>,
}

impl FencedDisk {
    pub fn new(inner: Arc<dyn Disk>, fence: Arc<Fence>) -> Self {
        Self { inner, fence }
    }

    pub fn fence(&self) -> &Arc<Fence> {
        &self.fence
    }
}

impl Disk for FencedDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<(), DiskError> {
        self.fence
            .section(|| self.inner.write_at(buf, offset, flags))
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.fence.section(|| self.inner.flush())
    }

    fn write_is_stored(&self, offset: u64, len: u64) -> bool {
        self.inner.write_is_stored(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.fence.section(|| self.inner.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), DiskError> {
        self.fence
            .section(|| self.inner.write_zeroes(offset, len, flags))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        self.inner.block_status(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemDisk;

    fn fenced(disk: &Arc<MemDisk>, rec: &Path, g: u64) -> FencedDisk {
        let f = Fence::take_over(rec, g, |_| {}).unwrap();
        FencedDisk::new(disk.clone(), Arc::new(f))
    }

    #[test]
    fn a_superseded_generation_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let rec = record_path(&dir.path().join("vm.ovl"));
        assert!(rec.ends_with("vm.ovl.fence"));
        let disk = Arc::new(MemDisk::new(1 << 16));
        let old = fenced(&disk, &rec, 5);
        old.write_at(&[1; 4096], 0, WriteFlags::default()).unwrap();
        old.flush().unwrap();
        let new = fenced(&disk, &rec, 6);
        new.write_at(&[2; 4096], 0, WriteFlags::default()).unwrap();
        // The old generation wakes up: every mutating call is refused, data untouched.
        let e = old
            .write_at(&[1; 4096], 0, WriteFlags::default())
            .unwrap_err();
        assert_eq!(e.errno(), libc::ESTALE);
        assert_eq!(old.flush().unwrap_err().errno(), libc::ESTALE);
        assert_eq!(old.discard(0, 4096).unwrap_err().errno(), libc::ESTALE);
        assert_eq!(
            old.write_zeroes(0, 4096, ZeroFlags::default())
                .unwrap_err()
                .errno(),
            libc::ESTALE
        );
        assert_eq!(old.fence().refused(), 4);
        assert!(disk.contents()[..4096].iter().all(|&b| b == 2));
        // Reads still pass; the new generation keeps writing.
        let mut b = [0u8; 16];
        old.read_at(&mut b, 0).unwrap();
        new.write_at(&[3; 4096], 4096, WriteFlags::default())
            .unwrap();
        // An older generation cannot take the storage back.
        let e = Fence::take_over(&rec, 4, |_| {}).unwrap_err();
        assert!(
            matches!(e, FenceError::Superseded { current: 6, .. }),
            "{e}"
        );
        assert_eq!(read_generation(&File::open(&rec).unwrap()).unwrap(), 6);
    }

    /// A takeover waits for a write section in progress: the old write lands before the new
    /// generation is recorded, never after.
    #[test]
    fn takeover_waits_for_a_section_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("x.fence");
        let old = Arc::new(Fence::take_over(&rec, 1, |_| {}).unwrap());
        let (in_tx, in_rx) = crossbeam_channel::bounded::<()>(0);
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
        let o = old.clone();
        let writer = std::thread::spawn(move || {
            o.section(|| {
                in_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Ok(())
            })
        });
        in_rx.recv().unwrap();
        let (done_tx, done_rx) = crossbeam_channel::bounded::<u64>(1);
        let rec2 = rec.clone();
        let taker = std::thread::spawn(move || {
            let f = Fence::take_over(&rec2, 2, |_| {}).unwrap();
            done_tx.send(f.generation()).unwrap();
            f
        });
        // The takeover cannot complete while the section is open.
        assert!(done_rx.recv_timeout(Duration::from_millis(200)).is_err());
        go_tx.send(()).unwrap();
        writer.join().unwrap().unwrap();
        assert_eq!(done_rx.recv().unwrap(), 2);
        let _new = taker.join().unwrap();
        assert_eq!(old.section(|| Ok(())).unwrap_err().errno(), libc::ESTALE);
    }

    /// A section held across several writes nests them (the takeover waits for the whole
    /// hold), and a superseded fence gives no hold.
    #[test]
    fn a_held_section_covers_the_writes_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("x.fence");
        let disk = Arc::new(MemDisk::new(1 << 16));
        let old = Arc::new(fenced(&disk, &rec, 1));
        let (held_tx, held_rx) = crossbeam_channel::bounded::<()>(0);
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
        let o = old.clone();
        let writer = std::thread::spawn(move || {
            let hold = o.fence().hold().expect("a hold");
            o.write_at(&[1; 4096], 0, WriteFlags::default()).unwrap();
            held_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            o.write_at(&[1; 4096], 4096, WriteFlags::default()).unwrap();
            drop(hold);
        });
        held_rx.recv().unwrap();
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let rec2 = rec.clone();
        let taker = std::thread::spawn(move || {
            let f = Fence::take_over(&rec2, 2, |_| {}).unwrap();
            done_tx.send(()).unwrap();
            f
        });
        assert!(done_rx.recv_timeout(Duration::from_millis(200)).is_err());
        go_tx.send(()).unwrap();
        writer.join().unwrap();
        done_rx.recv().unwrap();
        let _new = taker.join().unwrap();
        assert!(disk.contents()[..8192].iter().all(|&b| b == 1));
        assert!(old.fence().hold().is_none());
        let e = old
            .write_at(&[9; 16], 0, WriteFlags::default())
            .unwrap_err();
        assert_eq!(e.errno(), libc::ESTALE);
        assert_eq!(disk.contents()[0], 1);
    }

    #[test]
    fn read_only_exports_have_no_fence() {
        let mut c = ExportConfig {
            name: "vm".into(),
            template: "/t.raw".into(),
            overlay: Some("/o/vm.ovl".into()),
            read_only: false,
            min_block: 1,
        };
        assert_eq!(record_for(&c), Some(PathBuf::from("/o/vm.ovl.fence")));
        c.overlay = None;
        assert_eq!(record_for(&c), Some(PathBuf::from("/t.raw.fence")));
        c.read_only = true;
        assert_eq!(record_for(&c), None);
    }
}
