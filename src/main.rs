//! `remoca`: one command for every remoca service and tool.
//!
//! Each subcommand lives in its own module under `cli/`; it parses arguments, sets up what
//! the library needs and calls a library `run`. No logic lives here.

mod cli;
mod up;

use clap::Parser;

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = cli::Cli::parse();
    cli::init_tracing(cli.global.verbose);
    match cli::dispatch(cli) {
        // A closed stdout (`remoca xen store ls | head`) already ended as success in
        // dispatch; any other broken pipe (a socket, a child's stdin) is an error to report.
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("remoca: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Keep large I/O buffers in glibc's heap. A 256 KiB read or write buffer is allocated on one
/// thread (a channel reader, an NBD connection) and freed on another once its reply is sent;
/// with glibc's defaults each such buffer was a fresh `mmap` or landed in an arena that was
/// trimmed right after the free, so every request paid page faults and page clearing for
/// its buffer (about 5 % of the CPU of a split backend's 256 KiB reads, by `perf`). Buffers
/// up to 4 MiB now come from the heap, and an arena returns memory to the system once it
/// has 32 MiB free at its top. Measured: docs/failover.md, "Allocator settings".
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only sets a glibc allocator parameter (valid at any time; a value it
    // refuses leaves the default); called first thing in main, before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
    // SAFETY: as above.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

/// Other C libraries: their own defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}
