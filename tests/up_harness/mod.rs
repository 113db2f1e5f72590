//! Shared by the system tests that drive `remoca up` on the simulated host from other
//! processes, as an operator would from a second shell: the `remoca` command pointed at the
//! simulated xenstore socket, and `up` itself as a child whose output lines are read as they
//! come.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long `up` may take to print a line a test waits for.
const LINE_TIMEOUT: Duration = Duration::from_secs(120);

/// `remoca` reaching the simulated host whose xenstore socket is `sock`, unaffected by the
/// caller's `REMOCA_BACKEND` and `REMOCA_CONFIG`.
pub fn remoca(sock: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_remoca"));
    c.env("REMOCA_SIM_XENSTORE", sock)
        .env_remove("REMOCA_BACKEND")
        .env_remove("REMOCA_CONFIG");
    c
}

/// `remoca up` in the background; [`Up::terminate`] stops it with SIGTERM, dropping it kills it.
pub struct Up {
    child: Child,
    lines: Receiver<String>,
}

impl Up {
    /// Starts `remoca --backend sim up --config CONFIG` and waits until it is running.
    pub fn start(sock: &Path, config: &Path) -> Up {
        let mut child = remoca(sock)
            .args(["--backend", "sim", "up", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let up = Up { child, lines };
        up.wait_for("running; Ctrl-C stops");
        up
    }

    /// The next line that contains `needle`; panics with what was printed instead if none
    /// comes within two minutes.
    pub fn wait_for(&self, needle: &str) -> String {
        let mut seen = self.lines_until(needle);
        seen.pop().expect("the matching line")
    }

    /// SIGTERM, then the exit status and every line printed up to "stopped".
    pub fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let rest = self.lines_until("stopped");
        (self.child.wait().unwrap(), rest)
    }

    /// The lines printed up to and including the first that contains `needle`.
    fn lines_until(&self, needle: &str) -> Vec<String> {
        let deadline = Instant::now() + LINE_TIMEOUT;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => {
                    let hit = l.contains(needle);
                    seen.push(l);
                    if hit {
                        return seen;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("`remoca up` never printed {needle:?}; printed {seen:#?}");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
