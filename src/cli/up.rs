//! `remoca up`: the long-running Dom0 service set.

use clap::Args;

use super::Global;

#[derive(Debug, Args)]
pub struct UpArgs {}

pub fn run(_a: UpArgs, _g: &Global) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
