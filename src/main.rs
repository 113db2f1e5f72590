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
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of our output went away (`remoca xen store ls | head`): nothing to say.
        Err(err)
            if err.chain().any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            std::process::ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("remoca: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
