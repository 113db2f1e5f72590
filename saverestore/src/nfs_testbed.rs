//! A throw-away NFS test bed for tests and `remoca bench save --nfs`: two network
//! namespaces joined by a veth pair (optionally shaped with `tbf`), nfs-ganesha (VFS FSAL
//! over a temporary directory) with rpcbind in a private `/run` in the server namespace.
//! Addresses exist only inside the namespaces. Everything is removed on drop.
//! Needs root, iproute2, nfs-ganesha, nfs-ganesha-vfs and rpcbind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Server address inside the bed.
pub const SERVER_IP: &str = "10.213.77.1";
/// Client address inside the bed.
pub const CLIENT_IP: &str = "10.213.77.2";

/// Errors of setting up the bed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("{0} is not installed (apt-get install nfs-ganesha nfs-ganesha-vfs rpcbind iproute2)")]
    Missing(&'static str),
    #[error("ganesha did not start: {0}")]
    Ganesha(String),
    #[error("test bed I/O")]
    Io(#[from] std::io::Error),
}

/// A running bed.
#[derive(Debug)]
pub struct NfsTestbed {
    pub server_ns: String,
    pub client_ns: String,
    dir: tempfile::TempDir,
    server: Option<Child>,
}

fn run(args: &[&str]) -> Result<(), TestbedError> {
    let o = Command::new(args[0]).args(&args[1..]).output()?;
    if !o.status.success() {
        return Err(TestbedError::Command {
            cmd: args.join(" "),
            detail: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn have(tool: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists())
}

impl NfsTestbed {
    /// Builds the namespaces and starts the server. `rate` (e.g. `1gbit`) shapes both ends.
    ///
    /// # Errors
    /// Missing tools, no root, or ganesha failing to start (its log is included).
    pub fn start(rate: Option<&str>) -> Result<Self, TestbedError> {
        for t in ["ip", "ganesha.nfsd", "rpcbind"] {
            if !have(t) {
                return Err(TestbedError::Missing(match t {
                    "ip" => "iproute2",
                    "rpcbind" => "rpcbind",
                    _ => "nfs-ganesha",
                }));
            }
        }
        let tag = format!(
            "{}-{}",
            std::process::id(),
            Instant::now().elapsed().subsec_nanos() % 10_000
        );
        let (s, c) = (format!("rsr-s-{tag}"), format!("rsr-c-{tag}"));
        let dir = tempfile::Builder::new()
            .prefix("remoca-nfsbed-")
            .tempdir()?;
        let mut bed = NfsTestbed {
            server_ns: s.clone(),
            client_ns: c.clone(),
            dir,
            server: None,
        };
        run(&["ip", "netns", "add", &s])?;
        run(&["ip", "netns", "add", &c])?;
        run(&[
            "ip", "-n", &s, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &c,
        ])?;
        for (ns, ip) in [(&s, SERVER_IP), (&c, CLIENT_IP)] {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            if let Some(r) = rate {
                run(&[
                    "tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", r,
                    "burst", "64kb", "latency", "5ms",
                ])?;
            }
        }
        bed.start_ganesha()?;
        Ok(bed)
    }

    /// The exported directory (a real local path; the URL uses the same path).
    pub fn export(&self) -> PathBuf {
        self.dir.path().join("export")
    }

    /// `nfs://SERVER/EXPORT/name`.
    pub fn url(&self, name: &str) -> String {
        format!("nfs://{SERVER_IP}{}/{name}", self.export().display())
    }

    /// A command run inside the client namespace.
    pub fn client_cmd(&self, prog: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.client_ns]).arg(prog);
        c
    }

    fn start_ganesha(&mut self) -> Result<(), TestbedError> {
        let w = self.dir.path();
        std::fs::create_dir_all(w.join("export"))?;
        std::fs::create_dir_all(w.join("recov"))?;
        std::fs::write(
            w.join("ganesha.conf"),
            format!(
                r#"NFS_CORE_PARAM {{ Bind_addr = 0.0.0.0; NFS_Port = 2049; MNT_Port = 20048; Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false; Protocols = 3; }}
NFSV4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = {w}/recov; Only_Numeric_Owners = true; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{ Export_Id = 1; Path = {w}/export; Pseudo = /export; Access_Type = RW; Squash = No_Root_Squash; Protocols = 3; Transports = TCP; SecType = sys; FSAL {{ Name = VFS; }} }}
LOG {{ Default_Log_Level = EVENT; }}
"#,
                w = w.display()
            ),
        )?;
        std::fs::write(
            w.join("run.sh"),
            format!(
                r#"#!/bin/bash
mount -t tmpfs -o size=8m tmpfs /run
mkdir -p /run/rpcbind
rpcbind -f -w & RPCB=$!
sleep 0.5
ganesha.nfsd -F -L {w}/ganesha.log -f {w}/ganesha.conf -p /run/ganesha.pid -N NIV_EVENT & GAN=$!
trap 'kill $GAN; sleep 1; kill $RPCB; exit 0' TERM INT
( sleep 1800; kill $GAN ) &
wait $GAN; kill $RPCB
"#,
                w = w.display()
            ),
        )?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.server_ns,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "bash",
            ])
            .arg(w.join("run.sh"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.server = Some(child);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            let log = std::fs::read_to_string(w.join("ganesha.log")).unwrap_or_default();
            if log.contains("NFS SERVER INITIALIZED") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(TestbedError::Ganesha(
            std::fs::read_to_string(w.join("ganesha.log")).unwrap_or_default(),
        ))
    }
}

impl Drop for NfsTestbed {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for ns in [&self.server_ns, &self.client_ns] {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
