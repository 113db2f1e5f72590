//! Three `remoca memserver` processes, a replicated persistent workload, and a `kill -9` of one
//! server in the middle of it: no acknowledged page is lost, every page is readable from its
//! replica, and after re-replication a second server can die too.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use remoca_memserver::client::{BlockingClient, ClientConfig, PageSecret};
use remoca_memserver::protocol::auth::AuthKey;
use remoca_memserver::protocol::Pool;

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(key_file: &std::path::Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_remoca"))
            .args(["memserver", "--listen", "127.0.0.1:0", "--capacity", "256M"])
            .args(["--headroom", "0", "--threads", "1", "--key-file"])
            .arg(key_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start remoca memserver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Server { child, addr }
    }

    /// SIGKILL, as `kill -9` does.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn page(k: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| (i ^ k.wrapping_mul(2_654_435_761)) as u8)
        .collect()
}

#[test]
fn kill_9_during_replicated_workload_loses_no_page() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("memserver.key");
    std::fs::write(&key_file, "a pre-shared key for the failover test\n").unwrap();
    let mut servers: Vec<Server> = (0..3).map(|_| Server::start(&key_file)).collect();

    let mut cfg = ClientConfig::new(
        servers.iter().map(|s| s.addr).collect(),
        Some(AuthKey::from_secret(&std::fs::read(&key_file).unwrap()).unwrap()),
        PageSecret::random(),
    );
    cfg.replicas = 2;
    cfg.auto_repair = true;
    cfg.request_timeout = Duration::from_secs(5);
    let client = Arc::new(BlockingClient::connect(cfg, 2).unwrap());

    let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let c = Arc::clone(&client);
        let progress = Arc::clone(&progress);
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            for k in 0..3000u64 {
                if c.put(Pool::Persistent, 42, k, &page(k)).is_ok() {
                    acked.push(k);
                }
                progress.store(acked.len(), std::sync::atomic::Ordering::Relaxed);
            }
            acked
        })
    };
    // kill -9 once the workload is well under way.
    while progress.load(std::sync::atomic::Ordering::Relaxed) < 200 && !writer.is_finished() {
        std::thread::sleep(Duration::from_millis(2));
    }
    let victim = servers[0].addr;
    servers[0].kill9();
    let acked = writer.join().unwrap();
    assert!(
        acked.len() > 2500,
        "the workload continued: {} acked",
        acked.len()
    );

    // Every acknowledged page reads back intact (from the replica where needed).
    for chunk in acked.chunks(256) {
        let got = client.get_batch(Pool::Persistent, 42, chunk).unwrap();
        for (k, g) in chunk.iter().zip(got) {
            assert_eq!(g.as_deref(), Some(&page(*k)[..]), "page {k}");
        }
    }
    let health = client.health();
    assert!(!health.iter().find(|h| h.addr == victim).unwrap().up);

    // Re-replication (automatic, and once more explicitly to wait for it).
    let report = client.repair();
    assert_eq!(report.lost, 0);
    for k in &acked {
        let r = client.client().replicas_of(Pool::Persistent, 42, *k);
        assert_eq!(r.len(), 2, "page {k} has {r:?}");
        assert!(!r.contains(&victim));
    }

    // `remoca memserver stats` shows a person what a survivor holds.
    let out = Command::new(env!("CARGO_BIN_EXE_remoca"))
        .args([
            "memserver",
            "stats",
            &servers[2].addr.to_string(),
            "--key-file",
        ])
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("persistent"), "{table}");
    assert!(table.contains("42 / persistent"), "{table}");
    // Without the key the server refuses to answer.
    let out = Command::new(env!("CARGO_BIN_EXE_remoca"))
        .args(["memserver", "stats", &servers[2].addr.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("authentication"));

    // A second server dies: the re-replicated copies carry everything.
    servers[1].kill9();
    for chunk in acked.chunks(256) {
        let got = client.get_batch(Pool::Persistent, 42, chunk).unwrap();
        for (k, g) in chunk.iter().zip(got) {
            assert_eq!(
                g.as_deref(),
                Some(&page(*k)[..]),
                "page {k} after a second kill"
            );
        }
    }

    // SIGTERM stops the last server gracefully (exit status 0).
    let pid = servers[2].child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let st = servers[2].child.wait().unwrap();
    assert!(st.success(), "memserver exited with {st}");
}
