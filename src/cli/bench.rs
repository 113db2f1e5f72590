//! `remoca bench ...`: each benchmark measures remoca and its baseline in the same run.

use clap::{Args, Subcommand};

use super::Global;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Memory server against memcached over loopback, with the raw TCP ceiling.
    Memserver(super::memserver::BenchArgs),
    /// Save/restore modes against zstd, lz4 and snappy on the corpus.
    Save(super::saverestore::BenchArgs),
    /// The block backend against qemu-nbd with the same clients.
    Blkback(super::blkback::BenchArgs),
}

pub fn run(args: BenchArgs, g: &Global) -> anyhow::Result<()> {
    match args.which {
        Which::Memserver(a) => super::memserver::bench(a, g),
        Which::Save(a) => super::saverestore::bench(a, g),
        Which::Blkback(a) => super::blkback::bench(a, g),
    }
}
