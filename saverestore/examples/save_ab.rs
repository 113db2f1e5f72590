//! A/B helper for save-pipeline work: builds an HVM `xl save` stream around a corpus image
//! in memory and times several modes, taking turns within each round, so that load bursts
//! on a shared machine hit them alike; prints the median of each mode's rounds.
//!
//! ```text
//! cargo run --release -p remoca-saverestore --example save_ab -- \
//!     ../shared/corpus/ram-work.raw.zst ROUNDS THREADS MODE...
//! ```
//! MODE: a `--codec` value (`fast`, `snap`, `lz4:2`, `zstd`, ...) for a save from memory
//! (pages borrowed) to memory (`CODEC@N`: with N-page blocks, `CODEC#W`: windows of W data
//! pages, `copy:CODEC`: through the copying reader path, as from a pipe, `sink:CODEC`: the
//! image discarded, as the baselines discard theirs),
//! `restore:CODEC` for a restore of that codec's image to a sink, or a baseline over the
//! same stream in 1 MiB chunks: `base:snappy`, `base:lz4:ACCEL` (the C LZ4), `base:zstd:N`.
//! Throughput is stream MB per wall second and per CPU-second of the process (all threads).

use std::io::Read;
use std::time::Instant;

use rayon::prelude::*;
use remoca_saverestore::bench::cpu_time;
use remoca_saverestore::stream::{build_stream, BuildOptions, GuestShape};
use remoca_saverestore::{restore_stream, save_slice, save_stream, ImageReader, SaveOptions};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

thread_local! {
    static OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static SNAP: std::cell::RefCell<snap::raw::Encoder> = std::cell::RefCell::new(snap::raw::Encoder::new());
}

fn with_out(bound: usize, f: impl FnOnce(&mut [u8]) -> usize) -> usize {
    OUT.with(|o| {
        let mut o = o.borrow_mut();
        if o.len() < bound {
            o.resize(bound, 0);
        }
        f(&mut o[..bound])
    })
}

fn base_chunk(mode: &str, c: &[u8]) -> usize {
    if mode == "snappy" {
        SNAP.with(|e| {
            with_out(snap::raw::max_compress_len(c.len()), |o| {
                e.borrow_mut().compress(c, o).expect("snappy")
            })
        })
    } else if let Some(a) = mode.strip_prefix("lz4:") {
        let a: i32 = a.parse().expect("acceleration");
        with_out(lz4::block::compress_bound(c.len()).expect("bound"), |o| {
            lz4::block::compress_to_buffer(c, Some(lz4::block::CompressionMode::FAST(a)), false, o)
                .expect("lz4")
        })
    } else if let Some(l) = mode.strip_prefix("zstd:") {
        let l: i32 = l.parse().expect("level");
        with_out(zstd::zstd_safe::compress_bound(c.len()), |o| {
            zstd::bulk::compress_to_buffer(c, o, l).expect("zstd")
        })
    } else {
        panic!("unknown baseline {mode}")
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        return Err("usage: save_ab RAM.zst ROUNDS THREADS MODE...".into());
    }
    let rounds: usize = args[2].parse()?;
    let threads: usize = args[3].parse()?;
    let modes = &args[4..];
    let mut d = zstd::stream::read::Decoder::new(std::fs::File::open(&args[1])?)?;
    d.window_log_max(31)?;
    let mut raw = Vec::new();
    d.read_to_end(&mut raw)?;
    raw.truncate(raw.len() / 4096 * 4096);
    let mut stream = Vec::new();
    build_stream(
        &raw[..],
        &mut stream,
        &BuildOptions::new(GuestShape::Hvm, raw.len() as u64),
    )?;
    drop(raw);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let mut img: Vec<u8> = vec![1; stream.len() / 2];
    let mut images: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let mut results: Vec<(Vec<f64>, Vec<f64>, f64)> =
        vec![(Vec::new(), Vec::new(), 0.0); modes.len()];
    // A warm-up pass of every mode first (and the images restore modes need).
    for round in 0..=rounds {
        for (m, res) in modes.iter().zip(&mut results) {
            let (t, c) = (Instant::now(), cpu_time());
            let ratio = if let Some(b) = m.strip_prefix("base:") {
                let out: usize =
                    pool.install(|| stream.par_chunks(1 << 20).map(|c| base_chunk(b, c)).sum());
                stream.len() as f64 / out as f64
            } else if let Some(codec) = m.strip_prefix("restore:") {
                if !images.contains_key(codec) {
                    let mut i = Vec::new();
                    let (c, bp) = codec.split_once('@').unwrap_or((codec, "0"));
                    let opts = SaveOptions {
                        codec: c.parse()?,
                        block_pages: bp.parse()?,
                        ..Default::default()
                    };
                    save_stream(&stream[..], &mut i, &opts, &|_| {})?;
                    images.insert(codec.to_string(), i);
                }
                let r = ImageReader::open(images[codec].as_slice())?;
                let (t, c) = (Instant::now(), cpu_time());
                restore_stream(&r, &mut std::io::sink(), threads, &|_| {})?;
                if round > 0 {
                    let (w, cp) = (t.elapsed(), cpu_time() - c);
                    res.0.push(stream.len() as f64 / w.as_secs_f64() / 1e6);
                    res.1.push(stream.len() as f64 / cp.as_secs_f64() / 1e6);
                }
                continue;
            } else {
                // [copy:]CODEC, CODEC@BLOCK_PAGES, CODEC#WINDOW_PAGES
                let (copy, m) = match m.strip_prefix("copy:") {
                    Some(m) => (true, m),
                    None => (false, &m[..]),
                };
                let (sink, m) = match m.strip_prefix("sink:") {
                    Some(m) => (true, m),
                    None => (false, m),
                };
                let (m, win) = m.split_once('#').unwrap_or((m, "4096"));
                let (c, bp) = m.split_once('@').unwrap_or((m, "0"));
                let opts = SaveOptions {
                    codec: c.parse()?,
                    threads,
                    block_pages: bp.parse()?,
                    window_pages: win.parse()?,
                };
                img.clear();
                if copy {
                    save_stream(&stream[..], &mut img, &opts, &|_| {})?.ratio()
                } else if sink {
                    save_slice(&stream, &mut std::io::sink(), &opts, &|_| {})?.ratio()
                } else {
                    save_slice(&stream, &mut img, &opts, &|_| {})?.ratio()
                }
            };
            let (w, cp) = (t.elapsed(), cpu_time() - c);
            if round > 0 {
                res.0.push(stream.len() as f64 / w.as_secs_f64() / 1e6);
                res.1.push(stream.len() as f64 / cp.as_secs_f64() / 1e6);
            }
            res.2 = ratio;
        }
    }
    println!(
        "{:<18} {:>6} {:>9} {:>9}   ({rounds} rounds, {threads} thread(s), medians; all wall MB/s)",
        "mode", "ratio", "MB/s", "MB/cpu-s"
    );
    for (m, (w, c, ratio)) in modes.iter().zip(results) {
        let mut ws = w.clone();
        ws.sort_by(f64::total_cmp);
        println!(
            "{m:<18} {ratio:>6.3} {:>9.0} {:>9.0}   {:?}",
            median(w),
            median(c),
            ws.iter().map(|x| x.round() as u64).collect::<Vec<_>>()
        );
    }
    Ok(())
}
