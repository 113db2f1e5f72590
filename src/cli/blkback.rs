//! `remoca blkback` and `remoca image`: the block backend and its image tools.

use clap::Args;

use super::Global;

#[derive(Debug, Args)]
pub struct BlkbackArgs {}
#[derive(Debug, Args)]
pub struct ImageArgs {}
#[derive(Debug, Args)]
pub struct BenchArgs {}

fn not_yet() -> anyhow::Result<()> {
    anyhow::bail!("the block backend is not built yet")
}

pub fn run(_a: BlkbackArgs, _g: &Global) -> anyhow::Result<()> {
    not_yet()
}
pub fn image(_a: ImageArgs, _g: &Global) -> anyhow::Result<()> {
    not_yet()
}
pub fn bench(_a: BenchArgs, _g: &Global) -> anyhow::Result<()> {
    not_yet()
}
