//! Failover disks in `remoca up` (docs/failover.md): for every export with `failover = true`,
//! two `remoca blkback driver` child processes serve its disk stack on Unix sockets in
//! `<state_dir>/failover/`, and an endpoint in this process (a `Disk`, served by the same
//! NBD server and blkif backend as the other exports) forwards to the active one and fails
//! over to the other. A supervisor thread restarts a driver that exits (killed by the
//! endpoint, crashed, or killed by an operator); the endpoint picks it up as the new backup.
//! Each endpoint keeps a status file for `remoca blkback status`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use parking_lot::Mutex;
use remoca_blkback::failover::endpoint::{Endpoint, EndpointConfig};
use remoca_blkback::failover::status::{self, Publisher};
use remoca_blkback::failover::Addr;
use remoca_blkback::{Disk, ExportConfig};

use super::config::FailoverSection;
use super::StatusFn;

/// One driver process and where it listens.
struct Driver {
    sock: PathBuf,
    child: Child,
}

/// What the supervisor watches per export: its name, its drivers, how to restart each.
type Job = (String, Arc<Mutex<Vec<Driver>>>, Vec<Command>);

/// One export served with failover.
struct Disk1 {
    export: String,
    endpoint: Option<Endpoint>,
    publisher: Option<Publisher>,
    drivers: Arc<Mutex<Vec<Driver>>>,
}

/// Every failover export of this `up`; stops them when dropped.
#[derive(Default)]
pub(crate) struct FailoverDisks {
    disks: Vec<Disk1>,
    stop: Arc<AtomicBool>,
    supervisor: Option<std::thread::JoinHandle<()>>,
}

fn driver_command(
    exe: &Path,
    sock: &Path,
    e: &ExportConfig,
    reader_cpu: Option<usize>,
    cfg: &FailoverSection,
) -> anyhow::Result<Command> {
    let mut spec = format!("name={},template={}", e.name, e.template.display());
    if let Some(o) = &e.overlay {
        spec.push_str(&format!(",overlay={}", o.display()));
    }
    if e.read_only {
        spec.push_str(",readonly");
    }
    if spec.matches(',').count() != 1 + usize::from(e.overlay.is_some()) + usize::from(e.read_only)
    {
        bail!(
            "export {:?}: a path with a comma cannot be passed to a driver",
            e.name
        );
    }
    let mut c = Command::new(exe);
    c.args(["blkback", "driver", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--export")
        .arg(spec)
        .args(["--heartbeat-ms", &cfg.heartbeat_ms.to_string()]);
    if !cfg.fence {
        c.arg("--no-fence");
    }
    if let Some(cpu) = reader_cpu {
        c.args(["--reader-cpu", &cpu.to_string()]);
    }
    // The pipe's write end stays in `Child` for as long as `up` holds the driver; when `up`
    // dies, however it dies, the driver reads end of file and exits.
    c.arg("--exit-with-stdin");
    c.stdin(Stdio::piped()).stdout(Stdio::null());
    Ok(c)
}

fn wait_listening(sock: &Path, child: &mut Child) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Some(st) = child.try_wait()? {
            bail!("driver for {} exited at start ({st})", sock.display());
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("driver for {} did not listen within 20 s", sock.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

impl FailoverDisks {
    /// Start drivers and an endpoint for each of `exports` (with its channel readers' CPU,
    /// if pinned); the endpoints as disks to serve (name, description, disk) and a status
    /// column each.
    ///
    /// # Errors
    /// A driver that does not start, an endpoint that finds no driver.
    #[allow(clippy::type_complexity)]
    pub(crate) fn start(
        exports: &[(ExportConfig, Option<usize>)],
        cfg: &FailoverSection,
        state_dir: &Path,
        status_dir: &Path,
    ) -> anyhow::Result<(Self, Vec<(String, String, Arc<dyn Disk>)>, Vec<StatusFn>)> {
        let mut me = Self::default();
        if exports.is_empty() {
            return Ok((me, Vec::new(), Vec::new()));
        }
        let exe = std::env::current_exe().context("locating the remoca binary")?;
        let dir = state_dir.join("failover");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut served = Vec::new();
        let mut columns: Vec<StatusFn> = Vec::new();
        for (e, reader_cpu) in exports {
            let mut drivers = Vec::new();
            for tag in ["a", "b"] {
                let sock = dir.join(format!("{}-{tag}.sock", sanitize(&e.name)));
                let mut child = driver_command(&exe, &sock, e, *reader_cpu, cfg)?
                    .spawn()
                    .with_context(|| format!("starting a driver for {:?}", e.name))?;
                let ready = wait_listening(&sock, &mut child);
                drivers.push(Driver { sock, child });
                if let Err(err) = ready {
                    me.disks.push(Disk1::stub(&e.name, drivers));
                    return Err(err);
                }
            }
            let addrs = drivers.iter().map(|d| Addr::Unix(d.sock.clone())).collect();
            let mut ec = EndpointConfig::new(&e.name, addrs);
            ec.connect_timeout = Duration::from_secs(20);
            ec.monitor.heartbeat_timeout = Duration::from_millis(cfg.heartbeat_timeout_ms);
            ec.monitor.floor = Duration::from_millis(cfg.bound_floor_ms);
            ec.kill_local = cfg.kill_local;
            ec.reader_cpu = *reader_cpu;
            let endpoint = match Endpoint::start(ec) {
                Ok(ep) => ep,
                Err(err) => {
                    me.disks.push(Disk1::stub(&e.name, drivers));
                    return Err(anyhow::Error::from(err))
                        .with_context(|| format!("failover endpoint for {:?}", e.name));
                }
            };
            let path = status::path_for(status_dir, &e.name);
            let publisher = Publisher::start(endpoint.clone(), e.name.clone(), path.clone())
                .with_context(|| format!("cannot write the status file {}", path.display()));
            let drivers = Arc::new(Mutex::new(drivers));
            me.disks.push(Disk1 {
                export: e.name.clone(),
                endpoint: Some(endpoint.clone()),
                publisher: None,
                drivers: drivers.clone(),
            });
            me.disks.last_mut().expect("pushed").publisher = Some(publisher?);
            served.push((
                e.name.clone(),
                format!("failover endpoint over 2 drivers ({})", describe(e)),
                Arc::new(endpoint.clone()) as Arc<dyn Disk>,
            ));
            let name = e.name.clone();
            columns.push(Box::new(move || {
                let st = endpoint.status();
                format!(
                    "failover {name}: driver pid {}, generation {}, {} failovers",
                    st.active_pid.map_or("-".into(), |p| p.to_string()),
                    st.generation,
                    st.failovers
                )
            }));
        }
        let jobs: Vec<Job> = me
            .disks
            .iter()
            .zip(exports)
            .map(|(d, (e, reader_cpu))| {
                let cmds = d
                    .drivers
                    .lock()
                    .iter()
                    .map(|dr| driver_command(&exe, &dr.sock, e, *reader_cpu, cfg))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok((d.export.clone(), d.drivers.clone(), cmds))
            })
            .collect::<anyhow::Result<_>>()?;
        let stop = me.stop.clone();
        me.supervisor = Some(
            std::thread::Builder::new()
                .name("failover-supervisor".into())
                .spawn(move || supervise(jobs, &stop))?,
        );
        Ok((me, served, columns))
    }

    /// Stop the supervisor, the endpoints (their status files go) and the drivers.
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
        for d in self.disks.drain(..) {
            if let Some(p) = d.publisher {
                p.stop();
            }
            if let Some(ep) = d.endpoint {
                ep.close();
            }
            for mut dr in d.drivers.lock().drain(..) {
                let _ = dr.child.kill();
                let _ = dr.child.wait();
                let _ = std::fs::remove_file(&dr.sock);
            }
        }
    }
}

impl Drop for FailoverDisks {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Disk1 {
    /// A disk whose endpoint never started: only its drivers, to be stopped.
    fn stub(export: &str, drivers: Vec<Driver>) -> Self {
        Self {
            export: export.to_owned(),
            endpoint: None,
            publisher: None,
            drivers: Arc::new(Mutex::new(drivers)),
        }
    }
}

/// Restart every driver that exited, until stopped.
fn supervise(jobs: Vec<Job>, stop: &AtomicBool) {
    let mut jobs = jobs;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
        for (export, drivers, cmds) in &mut jobs {
            let mut ds = drivers.lock();
            for (d, cmd) in ds.iter_mut().zip(cmds.iter_mut()) {
                let Ok(Some(st)) = d.child.try_wait() else {
                    continue;
                };
                if stop.load(Ordering::Acquire) {
                    return;
                }
                match cmd.spawn() {
                    Ok(c) => {
                        eprintln!(
                            "failover {export:?}: driver {} exited ({st}); restarted as pid {}",
                            d.sock.display(),
                            c.id()
                        );
                        d.child = c;
                    }
                    Err(e) => {
                        eprintln!(
                            "failover {export:?}: driver {} exited ({st}) and cannot restart: {e}",
                            d.sock.display()
                        );
                    }
                }
            }
        }
    }
}

fn describe(e: &ExportConfig) -> String {
    match &e.overlay {
        Some(o) => format!("overlay {} over {}", o.display(), e.template.display()),
        None => format!("raw {}", e.template.display()),
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
