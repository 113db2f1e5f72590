//! `remoca save|restore|extract|inspect` and `remoca bench save`: compressed save images of
//! `xl save` streams. Thin: parse arguments, open locations, call `remoca_saverestore`.

use std::fs::File;
use std::io::{self, Read, Write};

use anyhow::{bail, Context};
use clap::Args;
use remoca_saverestore::dest::{create_sink, open_source, Location};
use remoca_saverestore::progress::Progress;
use remoca_saverestore::stream::GuestShape;
use remoca_saverestore::xl::XlRun;
use remoca_saverestore::{
    bench, inspect, restore_stream, save_slice, save_stream, CodecChoice, ImageReader, MappedFile,
    SaveOptions,
};

use super::Global;

#[derive(Debug, Args)]
pub struct SaveArgs {
    /// An `xl save` file to transform, or `-` for stdin.
    #[arg(long, conflicts_with = "domain", required_unless_present = "domain")]
    from: Option<String>,
    /// Save a running domain directly: runs `xl save DOM` into a FIFO (Xen dom0 only).
    #[arg(long)]
    domain: Option<String>,
    /// Image destination: a path, `-` for stdout, or nfs://host[:port]/export/path.
    #[arg(long)]
    to: String,
    /// Block codec: auto (by measured output bandwidth), fast (= lz4:4), ratio (= zstd:-1),
    /// snap, lz4, lz4:ACCEL (1..=64), zstd (= ratio), zstd:LEVEL (-7..=22).
    #[arg(long, default_value = "auto")]
    codec: CodecChoice,
    /// Worker threads (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Pages per compressed block (0 = the codec's default: 16 = 64 KiB for lz4 and snap,
    /// 8 for zstd).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
    block_pages: u16,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The image: a path or nfs://host[:port]/export/path.
    image: String,
    /// Where the regenerated `xl save` stream goes: a path or `-` for stdout.
    #[arg(long, conflicts_with = "domain", required_unless_present = "domain")]
    to: Option<String>,
    /// Restore the domain: feeds `xl restore` through a FIFO (Xen dom0 only).
    #[arg(long)]
    domain: bool,
    /// Worker threads (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// The image: a path or nfs://host[:port]/export/path.
    image: String,
    /// Guest pfn (decimal or 0x-hex).
    #[arg(long, value_parser = parse_pfn)]
    pfn: u64,
    /// Output file (default: stdout).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The image: a path or nfs://host[:port]/export/path.
    image: String,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Folder with ram-idle.raw.zst and ram-work.raw.zst (default: ../shared/corpus or
    /// /work/shared/corpus).
    #[arg(long, env = "REMOCA_CORPUS")]
    corpus: Option<std::path::PathBuf>,
    /// Corpus images to use.
    #[arg(long, value_delimiter = ',', default_value = "ram-work,ram-idle")]
    images: Vec<String>,
    /// Use only the first N MiB of each image (0 = all).
    #[arg(long, default_value_t = 0)]
    mib: u64,
    /// Guest shape of the built stream: pv or hvm.
    #[arg(long, default_value = "hvm")]
    shape: String,
    /// Single-page extractions to time.
    #[arg(long, default_value_t = 2000)]
    extractions: usize,
    /// Rounds of the save and restore tables; in each, every save and baseline runs once,
    /// in turn, and the tables show medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Second mode: save over a shaped link to nfs-ganesha in a network namespace and
    /// compare with libnfs `nfs-cp` of the raw stream (root; first image only).
    #[arg(long)]
    nfs: bool,
    /// tbf rate of the NFS link.
    #[arg(long, default_value = "1gbit")]
    rate: String,
}

fn parse_pfn(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("bad pfn {s:?}: {e}"))
}

fn location(s: &str) -> anyhow::Result<Location> {
    s.parse::<Location>()
        .with_context(|| format!("bad location {s:?}"))
}

pub fn save(a: SaveArgs, g: &Global) -> anyhow::Result<()> {
    super::init_tracing(g.verbose);
    let to = location(&a.to)?;
    let opts = SaveOptions {
        codec: a.codec,
        block_pages: a.block_pages as usize,
        threads: a.threads,
        ..Default::default()
    };
    // A regular file is mapped and its pages read in place; pipes, FIFOs and stdin are read.
    let mut mapped = None;
    let (input, total, xl): (Box<dyn Read + Send>, Option<u64>, Option<XlRun>) =
        match (&a.from, &a.domain) {
            (Some(f), _) if f == "-" => (
                Box::new(io::BufReader::with_capacity(4 << 20, io::stdin())),
                None,
                None,
            ),
            (Some(f), _) => {
                let file = File::open(f).with_context(|| format!("opening {f}"))?;
                let len = file.metadata().map(|m| m.len()).ok();
                let reader = file.try_clone().with_context(|| format!("opening {f}"))?;
                mapped = MappedFile::map(file).with_context(|| format!("mapping {f}"))?;
                (
                    Box::new(io::BufReader::with_capacity(4 << 20, reader)),
                    len,
                    None,
                )
            }
            (None, Some(dom)) => {
                let (run, fifo) =
                    XlRun::save(dom).with_context(|| format!("saving domain {dom}"))?;
                (
                    Box::new(io::BufReader::with_capacity(4 << 20, fifo)),
                    None,
                    Some(run),
                )
            }
            (None, None) => bail!("give --from FILE|- or --domain DOM"),
        };
    let mut sink = create_sink(&to).with_context(|| format!("opening destination {to}"))?;
    let bar = Progress::new("save", total, !a.quiet);
    let res: anyhow::Result<_> = match &mapped {
        Some(m) => save_slice(m.bytes(), &mut *sink, &opts, &|n| bar.set(n))
            .map_err(anyhow::Error::from)
            .and_then(|st| {
                m.check_unchanged().context("reading the input")?;
                Ok(st)
            }),
        None => save_stream(input, &mut *sink, &opts, &|n| bar.set(n)).map_err(Into::into),
    };
    bar.finish();
    if let Some(run) = xl {
        run.wait().context("xl save")?;
    }
    let stats = res.with_context(|| format!("saving to {to}"))?;
    sink.commit().with_context(|| format!("finishing {to}"))?;
    eprintln!(
        "saved {} stream bytes into {} image bytes (ratio {:.2}) in {:.2?}: {} zero, {} one-word, {} duplicate, {} compressed pages; {} snap + {} zstd + {} lz4 blocks",
        stats.stream_bytes,
        stats.image_bytes,
        stats.ratio(),
        stats.elapsed,
        stats.counts.zero,
        stats.counts.word,
        stats.counts.dup,
        stats.counts.block,
        stats.snap_blocks,
        stats.zstd_blocks,
        stats.lz4_blocks
    );
    Ok(())
}

fn open_image(
    s: &str,
) -> anyhow::Result<ImageReader<Box<dyn remoca_saverestore::ReadAt + Send + Sync>>> {
    let loc = location(s)?;
    let src = open_source(&loc).with_context(|| format!("opening image {loc}"))?;
    ImageReader::open(src).with_context(|| format!("reading image {loc}"))
}

pub fn restore(a: RestoreArgs, g: &Global) -> anyhow::Result<()> {
    super::init_tracing(g.verbose);
    let img = open_image(&a.image)?;
    let total = Some(img.index().stream_len);
    let bar = Progress::new("restore", total, !a.quiet);
    if a.domain {
        let (run, fifo) = XlRun::restore().context("restoring the domain")?;
        let mut w = io::BufWriter::with_capacity(4 << 20, fifo);
        let res = restore_stream(&img, &mut w, a.threads, &|n| bar.set(n));
        drop(w);
        bar.finish();
        let waited = run.wait().context("xl restore");
        res.with_context(|| format!("restoring {}", a.image))?;
        waited?;
        eprintln!("restored the domain from {}", a.image);
        return Ok(());
    }
    let to = location(a.to.as_deref().unwrap_or("-"))?;
    let mut sink = create_sink(&to).with_context(|| format!("opening destination {to}"))?;
    let res = restore_stream(&img, &mut *sink, a.threads, &|n| bar.set(n));
    bar.finish();
    let stats = res.with_context(|| format!("restoring {} to {to}", a.image))?;
    sink.commit().with_context(|| format!("finishing {to}"))?;
    if !matches!(to, Location::Std) {
        eprintln!(
            "restored {} stream bytes in {:.2?}",
            stats.stream_bytes, stats.elapsed
        );
    }
    Ok(())
}

pub fn extract(a: ExtractArgs, g: &Global) -> anyhow::Result<()> {
    super::init_tracing(g.verbose);
    let img = open_image(&a.image)?;
    let page = img
        .extract(a.pfn)
        .with_context(|| format!("extracting pfn {:#x} from {}", a.pfn, a.image))?;
    match a.out {
        Some(p) => std::fs::write(&p, &page).with_context(|| format!("writing {}", p.display()))?,
        None => io::stdout()
            .lock()
            .write_all(&page)
            .context("writing stdout")?,
    }
    Ok(())
}

pub fn inspect(a: InspectArgs, g: &Global) -> anyhow::Result<()> {
    super::init_tracing(g.verbose);
    let img = open_image(&a.image)?;
    let text = inspect::describe(&img).with_context(|| format!("reading image {}", a.image))?;
    out!("{text}")
}

pub fn bench(a: BenchArgs, g: &Global) -> anyhow::Result<()> {
    super::init_tracing(g.verbose);
    let corpus = match a.corpus {
        Some(c) => c,
        None => ["../shared/corpus", "/work/shared/corpus"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.join("ram-work.raw.zst").exists())
            .context("corpus not found: pass --corpus DIR or set REMOCA_CORPUS")?,
    };
    let shape = match a.shape.as_str() {
        "pv" => GuestShape::Pv,
        "hvm" => GuestShape::Hvm,
        s => bail!("unknown shape {s:?}: pv or hvm"),
    };
    if a.nfs {
        let cfg = bench::NfsBenchConfig {
            corpus,
            image: a
                .images
                .first()
                .cloned()
                .unwrap_or_else(|| "ram-work".into()),
            mib: a.mib,
            rate: a.rate,
            exe: std::env::current_exe().context("locating the remoca binary")?,
        };
        return bench::run_nfs(&cfg, &mut io::stdout().lock()).context("bench save --nfs");
    }
    let cfg = bench::BenchConfig {
        corpus,
        images: a.images,
        mib: a.mib,
        shape,
        extractions: a.extractions,
        rounds: a.rounds as usize,
    };
    bench::run(&cfg, &mut io::stdout().lock()).context("bench save")
}
