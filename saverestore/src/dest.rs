//! Where images (and regenerated streams) go and come from: a local path (written under a
//! temporary name and renamed when complete), `-` for stdout, or `nfs://host[:port]/path`.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::image::ReadAt;
use crate::nfs::{NfsError, NfsUrl};

/// A destination or source named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Path(PathBuf),
    /// `-`: stdout (as a destination) or stdin (as a stream source).
    Std,
    Nfs(NfsUrl),
}

impl FromStr for Location {
    type Err = NfsError;
    fn from_str(s: &str) -> Result<Self, NfsError> {
        if s == "-" {
            Ok(Location::Std)
        } else if s.starts_with("nfs://") {
            Ok(Location::Nfs(s.parse()?))
        } else {
            Ok(Location::Path(PathBuf::from(s)))
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Path(p) => write!(f, "{}", p.display()),
            Location::Std => f.write_str("-"),
            Location::Nfs(u) => u.fmt(f),
        }
    }
}

/// Errors of opening or finishing a destination.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    #[error("creating temporary file {}", .0.display())]
    Create(PathBuf, #[source] io::Error),
    #[error("finishing {}", .0.display())]
    Commit(PathBuf, #[source] io::Error),
    #[error("opening {}", .0.display())]
    Open(PathBuf, #[source] io::Error),
    #[error("stdin is not random-access: give the image as a file or an nfs:// URL")]
    StdinNotSeekable,
    #[error(transparent)]
    Nfs(#[from] NfsError),
}

/// A sink that becomes visible under its final name only on [`Sink::commit`]; dropping it
/// uncommitted removes the temporary file.
pub trait Sink: Write + Send {
    /// Flushes, makes the data durable and renames it to the final name.
    ///
    /// # Errors
    /// Flush, sync or rename failures; the temporary is removed.
    fn commit(self: Box<Self>) -> Result<(), DestError>;
}

/// Turns "no space left" into an error that says so plainly.
pub fn explain_full(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => io::Error::new(
            io::ErrorKind::StorageFull,
            "destination is full (no space left on device)",
        ),
        _ => e,
    }
}

/// Local file written as `.NAME.remoca-tmp-PID` beside the final name.
#[derive(Debug)]
pub struct LocalSink {
    file: Option<io::BufWriter<File>>,
    tmp: PathBuf,
    dest: PathBuf,
    renamed: bool,
}

/// Temporary name used beside `dest`.
pub fn temp_name(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    dest.with_file_name(format!(".{name}.remoca-tmp-{}", std::process::id()))
}

impl LocalSink {
    /// # Errors
    /// The temporary file cannot be created.
    pub fn create(dest: &Path) -> Result<Self, DestError> {
        let tmp = temp_name(dest);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| DestError::Create(tmp.clone(), e))?;
        Ok(LocalSink {
            file: Some(io::BufWriter::with_capacity(4 << 20, file)),
            tmp,
            dest: dest.to_path_buf(),
            renamed: false,
        })
    }
}

impl Write for LocalSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file
            .as_mut()
            .expect("open until commit")
            .write(buf)
            .map_err(explain_full)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file
            .as_mut()
            .expect("open until commit")
            .write_all(buf)
            .map_err(explain_full)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file
            .as_mut()
            .expect("open until commit")
            .flush()
            .map_err(explain_full)
    }
}

impl Sink for LocalSink {
    fn commit(mut self: Box<Self>) -> Result<(), DestError> {
        let w = self.file.take().expect("open until commit");
        let dest = self.dest.clone();
        let done = (|| {
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            fs::rename(&self.tmp, &self.dest)?;
            self.renamed = true;
            if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
                // Make the rename durable too; not every filesystem allows it.
                let _ = File::open(dir).and_then(|d| d.sync_all());
            }
            Ok(())
        })();
        done.map_err(|e| DestError::Commit(dest, explain_full(e)))
    }
}

impl Drop for LocalSink {
    fn drop(&mut self) {
        if !self.renamed {
            self.file.take();
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// An existing device, FIFO or socket (`/dev/null`, a pipe to another program, a block
/// device): written in place. A temporary-and-rename would replace the node with a regular
/// file (`--to /dev/null` used to turn `/dev/null` into one).
#[derive(Debug)]
pub struct NodeSink {
    file: io::BufWriter<File>,
    path: PathBuf,
    block_device: bool,
}

impl NodeSink {
    /// # Errors
    /// The node cannot be opened for writing.
    pub fn open(path: &Path, block_device: bool) -> Result<Self, DestError> {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| DestError::Open(path.to_path_buf(), e))?;
        Ok(NodeSink {
            file: io::BufWriter::with_capacity(4 << 20, file),
            path: path.to_path_buf(),
            block_device,
        })
    }
}

impl Write for NodeSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf).map_err(explain_full)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf).map_err(explain_full)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush().map_err(explain_full)
    }
}

impl Sink for NodeSink {
    fn commit(mut self: Box<Self>) -> Result<(), DestError> {
        let done = self.file.flush().and_then(|()| {
            if self.block_device {
                self.file.get_ref().sync_all()
            } else {
                Ok(())
            }
        });
        done.map_err(|e| DestError::Commit(self.path.clone(), explain_full(e)))
    }
}

/// stdout: nothing to rename.
#[derive(Debug)]
pub struct StdoutSink(io::BufWriter<io::Stdout>);

impl Write for StdoutSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Sink for StdoutSink {
    fn commit(mut self: Box<Self>) -> Result<(), DestError> {
        self.0
            .flush()
            .map_err(|e| DestError::Commit(PathBuf::from("-"), e))
    }
}

/// Opens a destination for writing.
///
/// # Errors
/// The temporary file cannot be created, or the NFS server cannot be reached.
pub fn create_sink(loc: &Location) -> Result<Box<dyn Sink>, DestError> {
    Ok(match loc {
        Location::Path(p) => match fs::metadata(p) {
            // Follows symlinks: a link to /dev/null is written through, not replaced.
            Ok(m) if !m.is_file() && !m.is_dir() => {
                use std::os::unix::fs::FileTypeExt;
                Box::new(NodeSink::open(p, m.file_type().is_block_device())?)
            }
            _ => Box::new(LocalSink::create(p)?),
        },
        Location::Std => Box::new(StdoutSink(io::BufWriter::with_capacity(
            4 << 20,
            io::stdout(),
        ))),
        Location::Nfs(u) => Box::new(crate::nfs::NfsSink::create(u)?),
    })
}

/// Opens an image for random access: a local regular file is mapped.
///
/// # Errors
/// The file cannot be opened, stdin was named, or the NFS server cannot be reached.
pub fn open_source(loc: &Location) -> Result<Box<dyn ReadAt + Send + Sync>, DestError> {
    Ok(match loc {
        Location::Path(p) => {
            let open = |e| DestError::Open(p.clone(), e);
            let file = File::open(p).map_err(open)?;
            // A regular file is mapped, so restore decodes blocks where they lie (see
            // `crate::mapped` for a file changed meanwhile); anything else is read.
            match crate::MappedFile::map(file.try_clone().map_err(open)?).map_err(open)? {
                Some(mapped) => Box::new(mapped),
                None => Box::new(file),
            }
        }
        Location::Std => return Err(DestError::StdinNotSeekable),
        Location::Nfs(u) => Box::new(crate::nfs::NfsFile::open(u)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_under_the_final_name_until_commit() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("g.rsv");
        let mut s = Box::new(LocalSink::create(&dest).unwrap());
        s.write_all(b"partial").unwrap();
        assert!(!dest.exists());
        drop(s);
        assert!(!dest.exists());
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            0,
            "temporary left behind"
        );
        let mut s: Box<dyn Sink> = Box::new(LocalSink::create(&dest).unwrap());
        s.write_all(b"whole").unwrap();
        s.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"whole");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_fifo_destination_is_written_through_not_replaced() {
        use std::os::unix::fs::FileTypeExt;
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("pipe");
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(st.success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || fs::read(fifo).unwrap())
        };
        let mut s = create_sink(&Location::Path(fifo.clone())).unwrap();
        s.write_all(b"through the pipe").unwrap();
        s.commit().unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "temporary left behind"
        );
    }

    #[test]
    fn parses_locations() {
        assert_eq!("-".parse::<Location>().unwrap(), Location::Std);
        assert_eq!(
            "/a/b".parse::<Location>().unwrap(),
            Location::Path("/a/b".into())
        );
        assert!(matches!(
            "nfs://h:2049/x/y".parse::<Location>().unwrap(),
            Location::Nfs(_)
        ));
        assert!("nfs://".parse::<Location>().is_err());
    }
}
