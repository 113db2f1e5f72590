//! Running the `xl` toolstack through a FIFO: `xl save DOM FIFO` feeds the save pipeline and
//! `xl restore FIFO` reads the regenerated stream, so no uncompressed copy touches disk.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Errors of running `xl`.
#[derive(Debug, thiserror::Error)]
pub enum XlError {
    #[error("`xl` was not found on PATH: --domain needs a Xen dom0 with the xl toolstack")]
    NotInstalled,
    #[error("starting `xl`")]
    Spawn(#[source] io::Error),
    #[error("creating the FIFO {}", .0.display())]
    Fifo(PathBuf, #[source] io::Error),
    #[error("`xl {cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: ExitStatus,
        stderr: String,
    },
}

/// A running `xl` and the FIFO it talks through.
#[derive(Debug)]
pub struct XlRun {
    child: Child,
    cmd: String,
    dir: tempfile::TempDir,
}

fn mkfifo(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call; mkfifo only reads it.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn spawn(args: &[&str], dir: &Path) -> Result<Child, XlError> {
    let log = File::create(dir.join("xl.log")).map_err(XlError::Spawn)?;
    Command::new("xl")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                XlError::NotInstalled
            } else {
                XlError::Spawn(e)
            }
        })
}

impl XlRun {
    /// Starts `xl save DOMAIN FIFO` and returns it with the read end of the FIFO.
    ///
    /// # Errors
    /// `xl` missing, or it failed before opening the FIFO (unknown domain...).
    pub fn save(domain: &str) -> Result<(XlRun, File), XlError> {
        Self::start(&["save", domain], false)
    }

    /// Starts `xl restore FIFO` and returns it with the write end of the FIFO.
    ///
    /// # Errors
    /// `xl` missing, or it failed before opening the FIFO.
    pub fn restore() -> Result<(XlRun, File), XlError> {
        Self::start(&["restore"], true)
    }

    fn start(args: &[&str], we_write: bool) -> Result<(XlRun, File), XlError> {
        let dir = tempfile::Builder::new()
            .prefix("remoca-xl-")
            .tempdir()
            .map_err(XlError::Spawn)?;
        let fifo = dir.path().join("stream");
        mkfifo(&fifo).map_err(|e| XlError::Fifo(fifo.clone(), e))?;
        let fifo_s = fifo.to_string_lossy().into_owned();
        let mut all: Vec<&str> = args.to_vec();
        all.push(&fifo_s);
        let child = spawn(&all, dir.path())?;
        let mut run = XlRun {
            child,
            cmd: all.join(" "),
            dir,
        };
        // Open our end in a thread: it blocks until xl opens its end. If xl exits first,
        // open the other end ourselves to release the thread, and report xl's failure.
        let (tx, rx) = mpsc::channel();
        let f2 = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(OpenOptions::new().read(!we_write).write(we_write).open(&f2));
        });
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(f)) => return Ok((run, f)),
                Ok(Err(e)) => return Err(XlError::Fifo(fifo, e)),
                Err(_) => {
                    if let Ok(Some(status)) = run.child.try_wait() {
                        let _ = OpenOptions::new()
                            .read(we_write)
                            .write(!we_write)
                            .custom_flags(libc::O_NONBLOCK)
                            .open(&fifo);
                        let _ = rx.recv_timeout(Duration::from_secs(1));
                        return Err(run.failure(status));
                    }
                }
            }
        }
    }

    fn failure(&self, status: ExitStatus) -> XlError {
        let log = std::fs::read_to_string(self.dir.path().join("xl.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        let stderr = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
        XlError::Failed {
            cmd: self.cmd.clone(),
            status,
            stderr,
        }
    }

    /// Waits for `xl` to finish.
    ///
    /// # Errors
    /// `xl` exited with a failure.
    pub fn wait(mut self) -> Result<(), XlError> {
        let status = self.child.wait().map_err(XlError::Spawn)?;
        if status.success() {
            Ok(())
        } else {
            Err(self.failure(status))
        }
    }
}
