//! A multi-host test bed for image nodes in network namespaces, shared by `remoca bench
//! images` and the multi-node test (`tests/images_peers_netns.rs`): a switch namespace with
//! a bridge, one namespace per host joined to it by a veth pair (one host's link optionally
//! shaped with `tc tbf`), and `remoca image-node` processes started inside them. Addresses
//! exist only inside these namespaces. Dropping the bed kills its processes and deletes its
//! namespaces. Needs root and `ip`/`tc` (iproute2).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Run a command; its stderr in the error when it fails.
pub(crate) fn run(args: &[&str]) -> io::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Namespaces and processes of one run.
#[derive(Debug)]
pub struct Bed {
    tag: String,
    prefix: String,
    names: Vec<String>,
    children: Vec<Child>,
    exe: PathBuf,
}

impl Bed {
    /// A bed with its switch: namespaces `<tag><pid>-*`, `exe` the remoca binary. `tag`
    /// is at most 7 characters (veth names are limited to 15).
    ///
    /// # Errors
    /// From `ip`.
    pub fn new(tag: &str, exe: &Path) -> io::Result<Bed> {
        let mut bed = Bed {
            tag: tag.chars().take(7).collect(),
            prefix: format!("{tag}{}", std::process::id()),
            names: Vec::new(),
            children: Vec::new(),
            exe: exe.to_owned(),
        };
        let sw = bed.ns("sw");
        run(&["ip", "netns", "add", &sw])?;
        bed.names.push(sw.clone());
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        Ok(bed)
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Add `host` at `ip`/24 on the bridge; with `rate`, its link is shaped by
    /// `tbf rate RATE burst 64kb latency 20ms`.
    ///
    /// # Errors
    /// From `ip` and `tc`.
    pub fn add_host(&mut self, host: &str, ip: &str, rate: Option<&str>) -> io::Result<()> {
        let ns = self.ns(host);
        let sw = self.ns("sw");
        run(&["ip", "netns", "add", &ns])?;
        self.names.push(ns.clone());
        let outer = format!("{}{}{host}", self.tag, std::process::id() % 10000);
        run(&[
            "ip", "link", "add", "eth0x", "netns", &ns, "type", "veth", "peer", "name", &outer,
            "netns", &sw,
        ])?;
        run(&["ip", "-n", &ns, "link", "set", "eth0x", "name", "eth0"])?;
        let cidr = format!("{ip}/24");
        run(&["ip", "-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &sw, "link", "set", &outer, "master", "br0"])?;
        run(&["ip", "-n", &sw, "link", "set", &outer, "up"])?;
        if let Some(rate) = rate {
            run(&[
                "tc", "-n", &ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
                "burst", "64kb", "latency", "20ms",
            ])?;
        }
        Ok(())
    }

    /// Start `remoca image-node ARGS` in `host`'s namespace, output to `log`; its index for
    /// [`Bed::child`].
    ///
    /// # Errors
    /// Creating the log, spawning.
    pub fn spawn(&mut self, host: &str, args: &[String], log: &Path) -> io::Result<usize> {
        let log = std::fs::File::create(log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .arg(&self.exe)
            .arg("image-node")
            .args(args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()?;
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    /// A process [`Bed::spawn`] started.
    pub fn child(&mut self, i: usize) -> &mut Child {
        &mut self.children[i]
    }

    /// Kill and reap every process started.
    pub fn stop_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.stop_all();
        for ns in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A node's or origin's `--stats` file (`key=value` lines); empty when unreadable.
pub fn stats(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A numeric stat, 0 when missing.
pub fn num(s: &HashMap<String, String>, k: &str) -> u64 {
    s.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}
