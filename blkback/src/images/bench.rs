//! `remoca bench images` (deployment part): N nodes in their own network namespaces deploy
//! one image at once from an origin behind a `tc tbf`-shaped link, first origin-only (each
//! node fetches everything from the origin), then with the peer cache (fresh caches). Per
//! run: deployment time of each node (p50, max) and the origin's egress bytes, against the
//! image's working set (its distinct non-zero chunk bytes; a deployment reads every chunk).
//!
//! Nodes are `remoca image-node` processes (`exe`), started with `ip netns exec`. Needs
//! root, `ip` and `tc`. Namespaces are named `rcbench<pid>-*`, addresses 10.78.0.0/24 exist
//! only inside them, and everything is killed and deleted when the run ends or fails.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Debug, Clone)]
pub struct DeployBenchConfig {
    /// The `remoca` binary.
    pub exe: PathBuf,
    /// Scratch directory (image, caches, deployed disks: about (2 N + 2) x the image).
    pub work: PathBuf,
    pub nodes: usize,
    /// tbf rate of the origin's link, e.g. `200mbit`.
    pub rate: String,
    pub image_mib: u64,
    pub chunk_size: u64,
}

/// One run (origin-only or with peers).
#[derive(Debug, Clone)]
pub struct RunResult {
    pub deploy_ms: Vec<u64>,
    pub origin_egress: u64,
}

impl RunResult {
    pub fn p50_ms(&self) -> u64 {
        let mut v = self.deploy_ms.clone();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    }

    pub fn max_ms(&self) -> u64 {
        self.deploy_ms.iter().copied().max().unwrap_or(0)
    }
}

/// Both runs.
#[derive(Debug, Clone)]
pub struct DeployBench {
    pub working_set: u64,
    pub origin_only: RunResult,
    pub peers: RunResult,
}

impl DeployBench {
    /// The table `remoca bench images` prints.
    pub fn table(&self, cfg: &DeployBenchConfig) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let ws = self.working_set;
        let row = |name: &str, r: &RunResult| {
            format!(
                "{name:<12} {:>9} {:>9} {:>12.1} {:>9.2}x\n",
                r.p50_ms(),
                r.max_ms(),
                mib(r.origin_egress),
                r.origin_egress as f64 / ws as f64
            )
        };
        let mut s = format!(
            "deployment: {} nodes, {} MiB image ({:.1} MiB working set, {} KiB chunks), origin link tbf {}\n",
            cfg.nodes,
            cfg.image_mib,
            mib(ws),
            cfg.chunk_size / 1024,
            cfg.rate
        );
        s.push_str("run          p50 (ms)  max (ms)  origin (MiB)  egress/ws\n");
        s.push_str(&row("origin-only", &self.origin_only));
        s.push_str(&row("peers", &self.peers));
        let sp50 = self.origin_only.p50_ms() as f64 / self.peers.p50_ms().max(1) as f64;
        let smax = self.origin_only.max_ms() as f64 / self.peers.max_ms().max(1) as f64;
        s.push_str(&format!(
            "peers vs origin-only: {sp50:.2}x faster at p50, {smax:.2}x at max (goal >= 3x); origin egress {:.2}x the working set (goal <= 1.25x)\n",
            self.peers.origin_egress as f64 / ws as f64
        ));
        s
    }
}

fn run(args: &[&str]) -> io::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

struct Bed {
    prefix: String,
    names: Vec<String>,
    children: Vec<Child>,
    exe: PathBuf,
}

impl Bed {
    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn new(exe: &Path, rate: &str, nodes: usize) -> io::Result<Bed> {
        let mut bed = Bed {
            prefix: format!("rcbench{}", std::process::id()),
            names: Vec::new(),
            children: Vec::new(),
            exe: exe.to_owned(),
        };
        let sw = bed.ns("sw");
        run(&["ip", "netns", "add", &sw])?;
        bed.names.push(sw.clone());
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        bed.add_host("o", "10.78.0.1", Some(rate))?;
        for i in 0..nodes {
            bed.add_host(&format!("n{i}"), &format!("10.78.0.{}", 11 + i), None)?;
        }
        Ok(bed)
    }

    fn add_host(&mut self, host: &str, ip: &str, rate: Option<&str>) -> io::Result<()> {
        let ns = self.ns(host);
        let sw = self.ns("sw");
        run(&["ip", "netns", "add", &ns])?;
        self.names.push(ns.clone());
        let outer = format!("rcb{}{host}", std::process::id() % 10000);
        run(&[
            "ip", "link", "add", "eth0x", "netns", &ns, "type", "veth", "peer", "name", &outer,
            "netns", &sw,
        ])?;
        run(&["ip", "-n", &ns, "link", "set", "eth0x", "name", "eth0"])?;
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ])?;
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

    fn spawn(&mut self, host: &str, args: &[String], log: &Path) -> io::Result<usize> {
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

    fn stop_all(&mut self) {
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

fn stats(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(s: &HashMap<String, String>, k: &str) -> u64 {
    s.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn wait_for(
    what: &str,
    limit: Duration,
    mut ok: impl FnMut() -> io::Result<bool>,
) -> io::Result<()> {
    let start = Instant::now();
    while !ok()? {
        if start.elapsed() > limit {
            return Err(io::Error::other(format!("timed out waiting for {what}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Write the bench image: pseudo-random chunks, every fifth chunk zero, every 13th the same
/// repeated chunk. Returns the working set (distinct non-zero chunk bytes).
fn write_image(path: &Path, mib: u64, cs: usize) -> io::Result<u64> {
    use std::io::Write;
    let mut f = io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut chunk = vec![0u8; cs];
    let mut ws = 0u64;
    let mut repeated = false;
    for i in 0..(mib << 20) / cs as u64 {
        if i % 5 == 2 {
            chunk.fill(0);
        } else if i % 13 == 7 {
            chunk.fill(0x17);
            if !repeated {
                ws += cs as u64;
                repeated = true;
            }
        } else {
            for w in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            ws += cs as u64;
        }
        f.write_all(&chunk)?;
    }
    f.flush()?;
    Ok(ws)
}

fn one_run(cfg: &DeployBenchConfig, with_peers: bool) -> io::Result<RunResult> {
    let tag = if with_peers { "peers" } else { "origin" };
    let w = cfg.work.join(tag);
    if w.exists() {
        std::fs::remove_dir_all(&w)?;
    }
    std::fs::create_dir_all(&w)?;
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let mut bed = Bed::new(&cfg.exe, &cfg.rate, cfg.nodes)?;
    let list = w.join("image.list");
    let cache_bytes = format!("{}M", cfg.image_mib * 2 + 64);
    bed.spawn(
        "o",
        &[
            "--listen".into(),
            "10.78.0.1:7000".into(),
            "--cache".into(),
            s(&w.join("origin-cache")),
            "--cache-bytes".into(),
            cache_bytes.clone(),
            "--seed-raw".into(),
            s(&cfg.work.join("image.raw")),
            "--chunk-size".into(),
            cfg.chunk_size.to_string(),
            "--chunk-list".into(),
            s(&list),
            "--stats".into(),
            s(&w.join("origin.stats")),
        ],
        &w.join("origin.log"),
    )?;
    wait_for("the origin to seed", Duration::from_secs(600), || {
        Ok(list.exists())
    })?;
    let addrs: Vec<String> = (0..cfg.nodes)
        .map(|i| format!("10.78.0.{}:7000", 11 + i))
        .collect();
    for (i, me) in addrs.iter().enumerate() {
        let mut args = vec![
            "--listen".into(),
            me.clone(),
            "--cache".into(),
            s(&w.join(format!("cache{i}"))),
            "--cache-bytes".into(),
            cache_bytes.clone(),
            "--origin".into(),
            "10.78.0.1:7000".into(),
            "--chunk-list".into(),
            s(&list),
            "--deploy".into(),
            s(&w.join(format!("disk{i}"))),
            "--stats".into(),
            s(&w.join(format!("n{i}.stats"))),
        ];
        if with_peers {
            args.push("--peers".into());
            args.push(addrs.join(","));
        }
        bed.spawn(&format!("n{i}"), &args, &w.join(format!("n{i}.log")))?;
    }
    let limit = Duration::from_secs(60 + cfg.image_mib * cfg.nodes as u64);
    wait_for("every node to deploy", limit, || {
        let mut all = true;
        for i in 0..cfg.nodes {
            let st = stats(&w.join(format!("n{i}.stats")));
            if let Some(e) = st.get("deploy_error") {
                return Err(io::Error::other(format!("node {i}: {e}")));
            }
            all &= num(&st, "deployed") == 1;
        }
        Ok(all)
    })?;
    std::thread::sleep(Duration::from_millis(400)); // a last stats rewrite
    let deploy_ms = (0..cfg.nodes)
        .map(|i| num(&stats(&w.join(format!("n{i}.stats"))), "deploy_ms"))
        .collect();
    let origin_egress = num(&stats(&w.join("origin.stats")), "served_bytes");
    // Check every node's disk against the image before the figures count.
    let image = std::fs::read(cfg.work.join("image.raw"))?;
    for i in 0..cfg.nodes {
        if std::fs::read(w.join(format!("disk{i}")))? != image {
            return Err(io::Error::other(format!(
                "{tag} run: node {i}'s disk differs"
            )));
        }
    }
    drop(image);
    bed.stop_all();
    drop(bed);
    std::fs::remove_dir_all(&w)?;
    Ok(RunResult {
        deploy_ms,
        origin_egress,
    })
}

/// Run both deployments.
///
/// # Errors
/// Missing root/`ip`/`tc`, a node failing, a deployed disk that differs from the image.
pub fn deployment(cfg: &DeployBenchConfig) -> io::Result<DeployBench> {
    std::fs::create_dir_all(&cfg.work)?;
    let working_set = write_image(
        &cfg.work.join("image.raw"),
        cfg.image_mib,
        cfg.chunk_size as usize,
    )?;
    let origin_only = one_run(cfg, false)?;
    let peers = one_run(cfg, true)?;
    let _ = std::fs::remove_file(cfg.work.join("image.raw"));
    Ok(DeployBench {
        working_set,
        origin_only,
        peers,
    })
}
