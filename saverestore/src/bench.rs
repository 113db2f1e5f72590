//! `remoca bench save`: our save modes beside plain zstd -1/-3, lz4 and snappy on the same
//! bytes, in the same run; restore throughput; single-page extraction latency.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::codec::{Codec, CodecChoice, RATIO_ZSTD_LEVEL};
use crate::image::index::PageClass;
use crate::image::ImageReader;
use crate::stream::format::page_pfn;
use crate::stream::{build_stream, BuildOptions, GuestShape};
use crate::{restore_stream, save_stream, SaveOptions};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Folder holding `ram-idle.raw.zst` and `ram-work.raw.zst`.
    pub corpus: PathBuf,
    /// Images by name (`ram-work`, `ram-idle`).
    pub images: Vec<String>,
    /// Use only the first N MiB of each image (0 = all).
    pub mib: u64,
    /// Guest shape of the built stream.
    pub shape: GuestShape,
    /// Single-page extractions to time.
    pub extractions: usize,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("reading corpus image {}", .0.display())]
    Corpus(PathBuf, #[source] io::Error),
    #[error(transparent)]
    Image(#[from] crate::ImageError),
    #[error("output")]
    Io(#[from] io::Error),
}

fn load(cfg: &BenchConfig, name: &str) -> Result<Vec<u8>, BenchError> {
    let p = cfg.corpus.join(format!("{name}.raw.zst"));
    let err = |e| BenchError::Corpus(p.clone(), e);
    let f = std::fs::File::open(&p).map_err(err)?;
    let mut d = zstd::stream::read::Decoder::new(f).map_err(err)?;
    d.window_log_max(31).map_err(err)?;
    let mut raw = Vec::new();
    let limit = if cfg.mib == 0 {
        u64::MAX
    } else {
        cfg.mib << 20
    };
    d.take(limit).read_to_end(&mut raw).map_err(err)?;
    raw.truncate(raw.len() / 4096 * 4096);
    Ok(raw)
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// One baseline: the stream cut in 1 MiB chunks, each compressed on its own, in parallel.
fn baseline(stream: &[u8], threads: usize, f: &(dyn Fn(&[u8]) -> usize + Sync)) -> (f64, Duration) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let t = Instant::now();
    let out: usize = pool.install(|| stream.par_chunks(1 << 20).map(f).sum());
    (stream.len() as f64 / out as f64, t.elapsed())
}

/// Runs the benchmark and prints the table to `out`.
///
/// # Errors
/// Missing corpus, or a failure of our own pipeline.
pub fn run(cfg: &BenchConfig, out: &mut dyn Write) -> Result<(), BenchError> {
    let all = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    writeln!(out, "remoca bench save: {} thread(s) available; baselines compress the same stream in 1 MiB chunks", all)?;
    for name in &cfg.images {
        let raw = load(cfg, name)?;
        let mut stream = Vec::with_capacity(raw.len() + (raw.len() >> 8) + (1 << 20));
        build_stream(
            &raw[..],
            &mut stream,
            &BuildOptions::new(cfg.shape, raw.len() as u64),
        )?;
        drop(raw);
        writeln!(
            out,
            "\n== {name}: {:?} stream of {:.1} MiB",
            cfg.shape,
            stream.len() as f64 / 1048576.0
        )?;
        writeln!(
            out,
            "{:<28} {:>7} {:>12} {:>12}",
            "save",
            "ratio",
            "1 thr MB/s",
            format!("{all} thr MB/s")
        )?;
        let mut images = Vec::new();
        for (label, codec) in [
            ("remoca fast (snap)", CodecChoice::Fixed(Codec::Snap)),
            (
                "remoca ratio (zstd:1)",
                CodecChoice::Fixed(Codec::Zstd(RATIO_ZSTD_LEVEL)),
            ),
            ("remoca auto (to memory)", CodecChoice::Auto),
        ] {
            let mut speeds = Vec::new();
            let mut ratio = 0.0;
            for threads in [1, all] {
                let mut img = Vec::with_capacity(stream.len() / 2);
                let opts = SaveOptions {
                    codec,
                    threads,
                    ..Default::default()
                };
                let st = save_stream(&stream[..], &mut img, &opts, &|_| {})?;
                speeds.push(mbps(st.stream_bytes, st.elapsed));
                ratio = st.ratio();
                if threads == all {
                    images.push((label, img));
                }
            }
            writeln!(
                out,
                "{label:<28} {ratio:>7.2} {:>12.0} {:>12.0}",
                speeds[0], speeds[1]
            )?;
        }
        type Comp = Box<dyn Fn(&[u8]) -> usize + Sync>;
        let baselines: Vec<(&str, Comp)> = vec![
            (
                "zstd -1",
                Box::new(|c: &[u8]| zstd::bulk::compress(c, 1).expect("zstd").len()),
            ),
            (
                "zstd -3",
                Box::new(|c: &[u8]| zstd::bulk::compress(c, 3).expect("zstd").len()),
            ),
            (
                "lz4 (lz4_flex)",
                Box::new(|c: &[u8]| lz4_flex::block::compress(c).len()),
            ),
            (
                "snappy",
                Box::new(|c: &[u8]| {
                    snap::raw::Encoder::new()
                        .compress_vec(c)
                        .expect("snappy")
                        .len()
                }),
            ),
        ];
        for (label, f) in &baselines {
            let (ratio, t1) = baseline(&stream, 1, f.as_ref());
            let (_, tn) = baseline(&stream, all, f.as_ref());
            let n = stream.len() as u64;
            writeln!(
                out,
                "{label:<28} {ratio:>7.2} {:>12.0} {:>12.0}",
                mbps(n, t1),
                mbps(n, tn)
            )?;
        }

        writeln!(
            out,
            "{:<28} {:>7} {:>12} {:>12}",
            "restore",
            "",
            "1 thr MB/s",
            format!("{all} thr MB/s")
        )?;
        for (label, img) in &images {
            let r = ImageReader::open(img.as_slice())?;
            let mut speeds = Vec::new();
            for threads in [1, all] {
                let st = restore_stream(&r, &mut io::sink(), threads, &|_| {})?;
                speeds.push(mbps(st.stream_bytes, st.elapsed));
            }
            writeln!(
                out,
                "{:<28} {:>7} {:>12.0} {:>12.0}",
                label, "", speeds[0], speeds[1]
            )?;
        }

        writeln!(
            out,
            "{:<28} {:>7} {:>12} {:>12}",
            "extract one page (file)", "", "p50 us", "p99 us"
        )?;
        for (label, img) in &images {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("bench.rsv");
            std::fs::write(&path, img)?;
            let r = ImageReader::open(std::fs::File::open(&path)?)?;
            let pfns: Vec<u64> = r
                .index()
                .pages
                .iter()
                .filter(|p| matches!(p.class, PageClass::Block { .. }))
                .map(|p| page_pfn(p.word))
                .collect();
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let mut lat = Vec::with_capacity(cfg.extractions);
            for _ in 0..cfg.extractions.min(pfns.len() * 4) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let pfn = pfns[(x % pfns.len() as u64) as usize];
                let t = Instant::now();
                let page = r.extract(pfn)?;
                lat.push(t.elapsed());
                std::hint::black_box(page);
            }
            lat.sort();
            let q = |f: f64| {
                lat.get(((lat.len() as f64 - 1.0) * f) as usize)
                    .map(|d| d.as_secs_f64() * 1e6)
                    .unwrap_or(0.0)
            };
            writeln!(
                out,
                "{:<28} {:>7} {:>12.1} {:>12.1}",
                label,
                "",
                q(0.5),
                q(0.99)
            )?;
        }
    }
    Ok(())
}
