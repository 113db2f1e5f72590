//! `remoca`: one command for every remoca service and tool.
//!
//! Each subcommand lives in its own module under `cli/`; it parses arguments, sets up what
//! the library needs and calls a library `run`. No logic lives here.

mod cli;
mod up;

use clap::Parser;

fn main() -> std::process::ExitCode {
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
