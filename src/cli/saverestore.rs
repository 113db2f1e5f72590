//! `remoca save|restore|extract|inspect`: compressed save images of `xl save` streams.

use clap::Args;

use super::Global;

#[derive(Debug, Args)]
pub struct SaveArgs {}
#[derive(Debug, Args)]
pub struct RestoreArgs {}
#[derive(Debug, Args)]
pub struct ExtractArgs {}
#[derive(Debug, Args)]
pub struct InspectArgs {}
#[derive(Debug, Args)]
pub struct BenchArgs {}

fn not_yet() -> anyhow::Result<()> {
    anyhow::bail!("save/restore is not built yet")
}

pub fn save(_a: SaveArgs, _g: &Global) -> anyhow::Result<()> {
    not_yet()
}
pub fn restore(_a: RestoreArgs, _g: &Global) -> anyhow::Result<()> {
    not_yet()
}
pub fn extract(_a: ExtractArgs, _g: &Global) -> anyhow::Result<()> {
    not_yet()
}
pub fn inspect(_a: InspectArgs, _g: &Global) -> anyhow::Result<()> {
    not_yet()
}
pub fn bench(_a: BenchArgs, _g: &Global) -> anyhow::Result<()> {
    not_yet()
}
