//! `remoca memserver`: the memory-server daemon and its stats client.

use clap::Args;

use super::Global;

#[derive(Debug, Args)]
pub struct MemserverArgs {}

#[derive(Debug, Args)]
pub struct BenchArgs {}

pub fn run(_args: MemserverArgs, _g: &Global) -> anyhow::Result<()> {
    anyhow::bail!("the memory server is not built yet")
}

pub fn bench(_args: BenchArgs, _g: &Global) -> anyhow::Result<()> {
    anyhow::bail!("the memory-server benchmark is not built yet")
}
