//! `remoca xen ...`: hypervisor and xenstore commands.

use clap::Args;

use super::Global;

#[derive(Debug, Args)]
pub struct XenArgs {}

pub fn run(_a: XenArgs, _g: &Global) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
