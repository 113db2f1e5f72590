//! Command-line surface: one module per subcommand group, each a thin wrapper over a library.
//!
//! Output on stdout goes through [`write_stdout`]: `outln!`/`out!` (like `println!`/`print!`,
//! but returning a `Result` to `?`) for a command's output, [`announce`] for a daemon's
//! start-up lines. `println!` would panic on a closed pipe (`remoca image ls | head -1`).

/// `println!` for a command's output on stdout: `outln!("{x}")?;`. A closed stdout ends the
/// command quietly with status 0 (see [`write_stdout`]).
macro_rules! outln {
    () => {
        $crate::cli::write_stdout(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*), true)
    };
}

/// `print!` for a command's output on stdout: `out!("{report}")?;` (see [`outln!`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*), false)
    };
}

mod bench;
mod blkback;
mod image;
mod image_node;
mod memserver;
mod paging;
mod saverestore;
mod up;
mod xen;

use clap::{Args, Parser, Subcommand};

/// Options every subcommand understands.
#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Which Xen backend to use: `auto` picks `real` where /dev/xen/privcmd and the Xen
    /// libraries exist, else the built-in simulated host.
    #[arg(long, global = true, default_value = "auto", env = "REMOCA_BACKEND")]
    pub backend: String,
    /// More log output (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl Global {
    /// Open the Xen host this command works on.
    ///
    /// # Errors
    /// A bad `--backend` value, or `real` forced on a host without Xen (naming what is missing).
    pub fn host(&self) -> anyhow::Result<remoca_xen::Host> {
        let choice: remoca_xen::BackendChoice = self.backend.parse()?;
        let host = remoca_xen::open(choice)?;
        if let Some(why) = host.fallback_reason() {
            tracing::info!("Xen is not available ({why}); using the simulated host");
        }
        Ok(host)
    }
}

#[derive(Debug, Parser)]
#[command(name = "remoca", version, about = "Dom0 toolkit for Xen hosts", long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Dom0 service set from one config file (defaults embedded) with a live status.
    Up(up::UpArgs),
    /// Talk to the hypervisor and xenstore through the Xen seam.
    Xen(xen::XenArgs),
    /// Memory server: lend this host's RAM to other hosts' guests.
    Memserver(memserver::MemserverArgs),
    /// Save an `xl save` stream as a compressed remoca image.
    Save(saverestore::SaveArgs),
    /// Regenerate the original `xl save` stream from a remoca image.
    Restore(saverestore::RestoreArgs),
    /// Extract one guest page from a remoca image.
    Extract(saverestore::ExtractArgs),
    /// Describe a remoca save image.
    Inspect(saverestore::InspectArgs),
    /// Page a domain's memory out to memory servers (hypervisor mem_paging) and back.
    Pager(paging::PagerArgs),
    /// Miss-ratio curve of a page-reference trace, drawn in the terminal, with the memory
    /// size it recommends.
    Mrc(paging::MrcArgs),
    /// Serve disks over NBD and, on a Xen host, as blkif backends.
    Blkback(blkback::BlkbackArgs),
    /// Manage disk images and copy-on-write overlays.
    Image(image::ImageArgs),
    /// One node of the cooperative chunk cache: serve, fetch from peers and origin, deploy.
    ImageNode(image_node::NodeArgs),
    /// Benchmarks that print remoca's figures beside a baseline measured in the same run.
    Bench(bench::BenchArgs),
}

/// The reader of our stdout has gone (a closed pipe, `remoca xen store ls | head -1`): the
/// normal end of a command's output, as for `cat | head`. [`dispatch`] turns it into success.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Write `args` (and a newline with `newline`) to stdout and flush: the one writer behind
/// `outln!`, `out!` and [`announce`].
///
/// # Errors
/// [`StdoutClosed`] when the reader has gone (EPIPE), which [`dispatch`] turns into a quiet
/// exit 0 where `println!` would panic; any other write error as such.
pub fn write_stdout(args: std::fmt::Arguments<'_>, newline: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let r = out
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to standard output")),
    }
}

/// Stdout as a byte stream, for a command that copies data to it (`image export NAME -`): a
/// closed pipe comes back as an `io::Error` carrying [`StdoutClosed`], which [`dispatch`]
/// takes for the end of the output as it does for `outln!`.
pub struct StdoutStream(std::io::StdoutLock<'static>);

impl StdoutStream {
    pub fn lock() -> StdoutStream {
        StdoutStream(std::io::stdout().lock())
    }
}

fn mark_closed(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        e
    }
}

impl std::io::Write for StdoutStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(mark_closed)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(mark_closed)
    }
}

/// Whether `e` is, or was caused by, our stdout's reader going away.
fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<StdoutClosed>()
            || c.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .is_some_and(|i| i.is::<StdoutClosed>())
    })
}

/// Print a daemon's start-up line on stdout. A reader that has gone (a supervisor that read
/// the address and closed its pipe) must not stop the daemon, so write errors are ignored.
pub fn announce(line: std::fmt::Arguments<'_>) {
    let _ = write_stdout(line, true);
}

pub fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let g = cli.global;
    let r = match cli.command {
        Command::Up(a) => up::run(a, &g),
        Command::Xen(a) => xen::run(a, &g),
        Command::Memserver(a) => memserver::run(a, &g),
        Command::Save(a) => saverestore::save(a, &g),
        Command::Restore(a) => saverestore::restore(a, &g),
        Command::Extract(a) => saverestore::extract(a, &g),
        Command::Inspect(a) => saverestore::inspect(a, &g),
        Command::Pager(a) => paging::pager(a, &g),
        Command::Mrc(a) => paging::mrc(a, &g),
        Command::Blkback(a) => blkback::run(a, &g),
        Command::Image(a) => image::image(a, &g),
        Command::ImageNode(a) => image_node::image_node(a, &g),
        Command::Bench(a) => bench::run(a, &g),
    };
    match r {
        // Our reader went away: the output ends there, like `cat` under `head`.
        Err(e) if is_stdout_closed(&e) => Ok(()),
        r => r,
    }
}
