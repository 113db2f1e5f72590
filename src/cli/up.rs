//! `remoca up`: the long-running Dom0 service set (logic in `crate::up`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::Global;
use crate::up::{self, Config, Options};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Config file (TOML; see `--print-config`). Without one the embedded defaults run.
    #[arg(long, short = 'c', env = "REMOCA_CONFIG")]
    config: Option<PathBuf>,
    /// Print the embedded default config, with every key documented, and exit.
    #[arg(long)]
    print_config: bool,
    /// Stop after this many seconds instead of waiting for Ctrl-C / SIGTERM.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
}

pub fn run(a: UpArgs, g: &Global) -> anyhow::Result<()> {
    if a.print_config {
        out!("{}", up::config::DEFAULT)?;
        return Ok(());
    }
    let config = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default_config()?,
    };
    let backend = match g.backend.as_str() {
        // `auto` is also clap's default: let the config decide.
        "auto" => None,
        other => Some(other.parse()?),
    };
    let duration = match a.duration {
        Some(s) if !(s > 0.0 && s.is_finite()) => {
            anyhow::bail!("--duration must be a positive number of seconds")
        }
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => None,
    };
    up::run(Options {
        config,
        backend,
        duration,
    })
}
