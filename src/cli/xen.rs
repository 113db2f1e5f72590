//! `remoca xen ...`: the hypervisor and xenstore through the Xen seam, like `xl info`,
//! `xl list` and the `xenstore-*` tools, plus the seam's contract self-test.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use remoca_xen::xenstore::{self, Perm, Tx};
use remoca_xen::{contract, Host};

use super::Global;

#[derive(Debug, Args)]
pub struct XenArgs {
    #[command(subcommand)]
    command: XenCommand,
}

#[derive(Debug, Subcommand)]
enum XenCommand {
    /// Hypervisor version and capabilities, and which backend is in use.
    Info,
    /// Domains, as `xl list` shows them.
    List,
    /// Read and change xenstore.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Run the Xen seam's contract checks against this host; one `@@RESULT` line each.
    Selftest {
        /// Xenstore directory the checks may create and remove.
        #[arg(long, default_value = "/local/domain/0/remoca-selftest")]
        scratch: String,
    },
    /// Find the guest frame that starts with MARKER, reading the guest through foreign maps.
    FindMarker {
        /// Domain id or name.
        domain: String,
        marker: String,
        /// Frames to scan from 0 (machine frames for PV guests, guest frames otherwise).
        #[arg(long, default_value_t = 1 << 20)]
        frames: u64,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// List a subtree with values, like `xenstore-ls`.
    Ls {
        #[arg(default_value = "/")]
        path: String,
    },
    /// Print the value of each path, like `xenstore-read`.
    Read {
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Write PATH VALUE pairs, like `xenstore-write`.
    Write {
        #[arg(required = true, num_args = 2, value_names = ["PATH", "VALUE"])]
        pairs: Vec<String>,
    },
    /// Create a node (and its parents) with an empty value.
    Mkdir { path: String },
    /// Remove each path and everything below it, like `xenstore-rm`.
    Rm {
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Show a node's permissions, or set them (`n0 r5 b7`: owner 0 with no access for
    /// others, read for domain 5, read/write for domain 7).
    Perms {
        path: String,
        #[arg(long, num_args = 1.., value_name = "PERM")]
        set: Option<Vec<String>>,
    },
    /// Print `PATH TOKEN` for every change at or below PATH, like `xenstore-watch`.
    Watch {
        path: String,
        /// Stop after this many events (the initial firing counts).
        #[arg(long, short = 'n')]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
}

pub fn run(a: XenArgs, g: &Global) -> anyhow::Result<()> {
    let host = g.host()?;
    match a.command {
        XenCommand::Info => info(&host),
        XenCommand::List => list(&host),
        XenCommand::Store(s) => store(&host, s),
        XenCommand::Selftest { scratch } => selftest(&host, &scratch),
        XenCommand::FindMarker {
            domain,
            marker,
            frames,
        } => {
            let dom = host.find_domain(&domain)?;
            let frame = contract::find_marker(&host, dom.domid, marker.as_bytes(), frames)
                .with_context(|| format!("scanning {frames} frames of domain {}", dom.domid))?;
            outln!(
                "marker found at frame {frame:#x} of domain {} ({})",
                dom.domid,
                dom.name
            )?;
            Ok(())
        }
    }
}

fn info(host: &Host) -> anyhow::Result<()> {
    let hv = host.domains.hypervisor()?;
    outln!("backend            : {}", host.kind())?;
    if let Some(why) = host.fallback_reason() {
        outln!("why not real       : {why}")?;
    }
    if let Some(sock) = host.attached_to() {
        outln!(
            "attached to        : {} (a running `remoca up`)",
            sock.display()
        )?;
    }
    outln!("xen_version        : {}.{}{}", hv.major, hv.minor, hv.extra)?;
    outln!("xen_caps           : {}", hv.capabilities)?;
    outln!("vm_event_version   : {}", hv.vm_event_version)?;
    let doms = host.domains()?;
    outln!("domains            : {}", doms.len())?;
    Ok(())
}

fn list(host: &Host) -> anyhow::Result<()> {
    outln!(
        "{:<32} {:>5} {:>8} {:>5} {:>6} {:>10}",
        "Name",
        "ID",
        "Mem",
        "VCPUs",
        "State",
        "Time(s)"
    )?;
    for d in host.domains()? {
        outln!(
            "{:<32} {:>5} {:>8} {:>5} {:>6} {:>10.1}",
            d.name,
            d.domid,
            d.tot_pages * 4 / 1024,
            d.online_vcpus,
            d.flags.xl_state(),
            d.cpu_time_ns as f64 / 1e9
        )?;
    }
    Ok(())
}

fn store(host: &Host, cmd: StoreCommand) -> anyhow::Result<()> {
    let xs = &*host.store;
    match cmd {
        StoreCommand::Ls { path } => {
            // The path itself must exist: a typo is an error, not an empty listing.
            xs.read(Tx::NONE, &path)?;
            ls(xs, &path, 0)?;
        }
        StoreCommand::Read { paths } => {
            for p in paths {
                let v = xs.read(Tx::NONE, &p)?;
                outln!("{}", String::from_utf8_lossy(&v))?;
            }
        }
        StoreCommand::Write { pairs } => {
            for kv in pairs.chunks(2) {
                xs.write(Tx::NONE, &kv[0], kv[1].as_bytes())?;
            }
        }
        StoreCommand::Mkdir { path } => xs.mkdir(Tx::NONE, &path)?,
        StoreCommand::Rm { paths } => {
            for p in paths {
                xs.rm(Tx::NONE, &p)?;
            }
        }
        StoreCommand::Perms { path, set } => match set {
            Some(strs) => {
                let perms = strs
                    .iter()
                    .map(|s| s.parse::<Perm>())
                    .collect::<Result<Vec<_>, _>>()?;
                xs.set_perms(Tx::NONE, &path, &perms)?;
            }
            None => {
                let perms = xs.get_perms(Tx::NONE, &path)?;
                let text: Vec<String> = perms.iter().map(Perm::to_string).collect();
                outln!("{}", text.join(" "))?;
            }
        },
        StoreCommand::Watch {
            path,
            count,
            timeout,
        } => {
            let w = xs.watch(&path, "remoca")?;
            let deadline = timeout.map(|s| Instant::now() + Duration::from_secs_f64(s));
            let mut seen = 0;
            while count.is_none_or(|c| seen < c) {
                let ev = match deadline {
                    Some(d) => match w.next_timeout(d.saturating_duration_since(Instant::now())) {
                        Some(ev) => ev,
                        None => break,
                    },
                    None => w.next().context("xenstore connection closed")?,
                };
                outln!("{} {}", ev.path, ev.token)?;
                seen += 1;
            }
        }
    }
    Ok(())
}

fn ls(xs: &dyn remoca_xen::XenStore, path: &str, depth: usize) -> anyhow::Result<()> {
    let mut names = match xs.directory(Tx::NONE, path) {
        Ok(n) => n,
        // A node removed while we walk, or one we may not list, is skipped as xenstore-ls does.
        Err(e) if e.is_errno(libc::ENOENT) || e.is_errno(libc::EACCES) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    names.sort();
    for name in names {
        let child = if path == "/" {
            format!("/{name}")
        } else {
            format!("{path}/{name}")
        };
        let value = xenstore::read_string(xs, Tx::NONE, &child).unwrap_or_default();
        outln!(
            "{:indent$}{name} = \"{}\"",
            "",
            value.escape_default(),
            indent = depth
        )?;
        ls(xs, &child, depth + 1)?;
    }
    Ok(())
}

fn selftest(host: &Host, scratch: &str) -> anyhow::Result<()> {
    outln!("# Xen seam contract checks on the {} backend", host.kind())?;
    let outcomes = contract::run_all(host, scratch);
    let mut failed = 0;
    for o in &outcomes {
        match &o.result {
            Ok(()) => outln!("@@RESULT xen-{} PASS", o.name)?,
            Err(why) => {
                failed += 1;
                outln!("@@RESULT xen-{} FAIL {why}", o.name)?;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} contract checks failed", outcomes.len());
    }
    Ok(())
}
