//! Save to and restore from a real nfs-ganesha over `nfs://`, inside a network namespace
//! this test creates (loopback only), with rpcbind in a private /run. Needs root and the
//! packages nfs-ganesha, nfs-ganesha-vfs, rpcbind, iproute2; fails with a message if absent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use remoca_saverestore::stream::{build_stream, BuildOptions, GuestShape, PAGE_SIZE};

struct Netns {
    name: String,
    server: Option<Child>,
}

impl Netns {
    fn new() -> Netns {
        let name = format!("rsr-nfs-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("`ip` (iproute2) is needed");
        assert!(
            ok.success(),
            "cannot create network namespace {name} (needs root)"
        );
        let ns = Netns { name, server: None };
        assert!(ns
            .cmd("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        // ganesha resolves its bind address with AI_ADDRCONFIG, which needs one
        // non-loopback address: a veth pair that exists only in this namespace.
        for args in [
            &["link", "add", "v0", "type", "veth", "peer", "name", "v1"][..],
            &["addr", "add", "10.213.77.1/24", "dev", "v0"],
            &["link", "set", "v0", "up"],
            &["link", "set", "v1", "up"],
        ] {
            assert!(ns.cmd("ip").args(args).status().unwrap().success());
        }
        ns
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }

    fn start_ganesha(&mut self, w: &Path) {
        for tool in ["ganesha.nfsd", "rpcbind"] {
            let found = ["/usr/bin", "/usr/sbin", "/sbin", "/bin"]
                .iter()
                .any(|d| Path::new(d).join(tool).exists());
            assert!(
                found,
                "{tool} is not installed: apt-get install nfs-ganesha nfs-ganesha-vfs rpcbind"
            );
        }
        let conf = format!(
            r#"NFS_CORE_PARAM {{ Bind_addr = 0.0.0.0; NFS_Port = 2049; MNT_Port = 20048; Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false; Protocols = 3; }}
NFSV4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = {w}/recov; Only_Numeric_Owners = true; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{ Export_Id = 1; Path = {w}/export; Pseudo = /export; Access_Type = RW; Squash = No_Root_Squash; Protocols = 3; Transports = TCP; SecType = sys; FSAL {{ Name = VFS; }} }}
LOG {{ Default_Log_Level = EVENT; }}
"#,
            w = w.display()
        );
        std::fs::create_dir_all(w.join("export")).unwrap();
        std::fs::create_dir_all(w.join("recov")).unwrap();
        std::fs::write(w.join("ganesha.conf"), conf).unwrap();
        let script = format!(
            r#"#!/bin/bash
mount -t tmpfs -o size=8m tmpfs /run
mkdir -p /run/rpcbind
rpcbind -f -w & RPCB=$!
sleep 0.5
ganesha.nfsd -F -L {w}/ganesha.log -f {w}/ganesha.conf -p /run/ganesha.pid -N NIV_EVENT & GAN=$!
trap 'kill $GAN; sleep 1; kill $RPCB; exit 0' TERM INT
( sleep 600; kill $GAN ) & 
wait $GAN; kill $RPCB
"#,
            w = w.display()
        );
        std::fs::write(w.join("run.sh"), script).unwrap();
        let child = self
            .cmd("unshare")
            .args(["--mount", "--propagation", "private", "bash"])
            .arg(w.join("run.sh"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.server = Some(child);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            let log = std::fs::read_to_string(w.join("ganesha.log")).unwrap_or_default();
            if log.contains("NFS SERVER INITIALIZED") {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "ganesha did not start: {}",
            std::fs::read_to_string(w.join("ganesha.log")).unwrap_or_default()
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if let Ok(o) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn stream(pages: usize) -> Vec<u8> {
    let mut ram = Vec::with_capacity(pages * PAGE_SIZE);
    let mut x = 0x1234_5678_9abc_def1u64;
    for p in 0..pages {
        if p % 3 == 0 {
            ram.resize(ram.len() + PAGE_SIZE, 0);
        } else {
            for _ in 0..PAGE_SIZE / 8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ram.extend_from_slice(&(x & 0x0f0f_0f0f_0f0f_0f0f).to_le_bytes());
            }
        }
    }
    let mut s = Vec::new();
    build_stream(
        &ram[..],
        &mut s,
        &BuildOptions::new(GuestShape::Pv, ram.len() as u64),
    )
    .unwrap();
    s
}

fn run(ns: &Netns, args: &[&str]) -> (bool, String) {
    let o = ns
        .cmd(env!("CARGO_BIN_EXE_remoca"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    v.sort();
    v
}

#[test]
fn save_to_and_restore_from_ganesha() {
    let w = tempfile::tempdir().unwrap();
    let mut ns = Netns::new();
    let s = stream(20_000);
    let xl: PathBuf = w.path().join("g.xl");
    std::fs::write(&xl, &s).unwrap();
    let xl_s = xl.to_str().unwrap();
    let export = w.path().join("export");
    let url = format!("nfs://127.0.0.1{}/g.rsv", export.display());

    // No server yet: a clear "unreachable" error.
    let (ok, err) = run(&ns, &["save", "--from", xl_s, "--to", &url]);
    assert!(!ok && err.contains("unreachable"), "{err}");

    ns.start_ganesha(w.path());
    let (ok, err) = run(&ns, &["save", "--quiet", "--from", xl_s, "--to", &url]);
    assert!(ok, "save to NFS failed: {err}");
    assert_eq!(
        listing(&export),
        vec!["g.rsv".to_string()],
        "temporary file left or image missing"
    );

    let back = w.path().join("back.xl");
    let (ok, err) = run(
        &ns,
        &["restore", "--quiet", &url, "--to", back.to_str().unwrap()],
    );
    assert!(ok, "restore from NFS failed: {err}");
    assert!(std::fs::read(&back).unwrap() == s, "NFS round trip differs");

    let o = ns
        .cmd(env!("CARGO_BIN_EXE_remoca"))
        .args(["extract", &url, "--pfn", "7"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let local = w.path().join("local.rsv");
    std::fs::copy(export.join("g.rsv"), &local).unwrap();
    let o2 = Command::new(env!("CARGO_BIN_EXE_remoca"))
        .args(["extract", local.to_str().unwrap(), "--pfn", "7"])
        .output()
        .unwrap();
    assert!(o.stdout.len() == 4096 && o.stdout == o2.stdout);

    // A save that fails half way (truncated input) leaves nothing on the server.
    let cut = w.path().join("cut.xl");
    std::fs::write(&cut, &s[..s.len() / 2]).unwrap();
    let url2 = format!("nfs://127.0.0.1{}/h.rsv", export.display());
    let (ok, err) = run(
        &ns,
        &[
            "save",
            "--quiet",
            "--from",
            cut.to_str().unwrap(),
            "--to",
            &url2,
        ],
    );
    assert!(!ok && err.contains("truncated"), "{err}");
    assert_eq!(listing(&export), vec!["g.rsv".to_string()]);

    // A path the server does not export.
    let (ok, err) = run(
        &ns,
        &[
            "save",
            "--quiet",
            "--from",
            xl_s,
            "--to",
            "nfs://127.0.0.1/nonexistent-export/x.rsv",
        ],
    );
    assert!(!ok && err.contains("exports no directory"), "{err}");
}
