//! Shared by the `blkback_*` system tests: start `remoca blkback` as a real process, run the
//! real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy), make test images.
#![allow(dead_code)]

pub mod guest;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub fn remoca() -> Command {
    Command::new(env!("CARGO_BIN_EXE_remoca"))
}

/// Fail clearly (never skip) when a client tool is missing.
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: apt-get install qemu-utils libnbd-bin"
    );
}

/// Run a command, assert it succeeded, return stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command expected to fail; return its stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out: Output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(!out.status.success(), "{cmd:?} unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A deterministic non-zero test pattern.
pub fn pattern(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| ((i / 512) as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

pub fn sha(path: &Path) -> String {
    run_ok(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// A running `remoca blkback`.
pub struct Server {
    pub child: Child,
    /// `host:port` or the socket path.
    pub addr: String,
    pub unix: bool,
}

impl Server {
    /// Start with these extra arguments (`--listen`/`--socket` and `--export`s).
    pub fn start(args: &[String]) -> Server {
        Server::start_with_stderr(args, Stdio::inherit())
    }

    /// As [`Server::start`], with the server's stderr going to `stderr` (a file, to read its
    /// shutdown counters).
    pub fn start_with_stderr(args: &[String], stderr: Stdio) -> Server {
        let mut child = remoca()
            .arg("blkback")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn remoca blkback");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("remoca blkback did not start: {line:?}")
            })
            .to_owned();
        let unix = addr.starts_with('/');
        Server { child, addr, unix }
    }

    pub fn tcp(exports: &[String]) -> Server {
        let mut a = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
        for e in exports {
            a.push("--export".into());
            a.push(e.clone());
        }
        Server::start(&a)
    }

    pub fn uri(&self, export: &str) -> String {
        if self.unix {
            format!("nbd+unix:///{export}?socket={}", self.addr)
        } else {
            format!("nbd://{}/{export}", self.addr)
        }
    }

    /// Graceful stop (SIGTERM), waiting for exit.
    pub fn stop(mut self) {
        run_ok(Command::new("kill").args(["-TERM", &self.child.id().to_string()]));
        let st = self.child.wait().unwrap();
        assert!(st.success(), "remoca blkback exited with {st}");
    }

    /// kill -9.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Make a template of `size` bytes with a pattern, and an overlay for it with the CLI.
pub fn template_and_overlay(dir: &Path, size: usize) -> (PathBuf, PathBuf) {
    let t = dir.join("template.raw");
    std::fs::write(&t, pattern(size, 3)).unwrap();
    let o = dir.join("vm.ovl");
    run_ok(
        remoca()
            .args(["image", "create", "--template"])
            .arg(&t)
            .arg("--overlay")
            .arg(&o),
    );
    (t, o)
}

pub fn spec(name: &str, template: &Path, overlay: Option<&Path>) -> String {
    let mut s = format!("name={name},template={}", template.display());
    if let Some(o) = overlay {
        s.push_str(&format!(",overlay={}", o.display()));
    }
    s
}
