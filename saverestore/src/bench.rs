//! `remoca bench save`: our save modes beside plain zstd -1/-3, lz4 and snappy on the same
//! bytes, in the same run; restore throughput; single-page extraction latency.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::codec::{Codec, CodecChoice, FAST_LZ4_ACCEL, RATIO_ZSTD_LEVEL};
use crate::image::index::PageClass;
use crate::image::ImageReader;
use crate::stream::format::page_pfn;
use crate::stream::{build_stream, BuildOptions, GuestShape};
use crate::{restore_stream, save_slice, SaveOptions};

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
    /// Rounds of the save and restore tables (each figure is the median); at least 1.
    pub rounds: usize,
}

/// The NFS mode: the same save over a shaped link to nfs-ganesha, against libnfs `nfs-cp`
/// of the raw stream.
#[derive(Debug, Clone)]
pub struct NfsBenchConfig {
    pub corpus: PathBuf,
    pub image: String,
    pub mib: u64,
    /// `tbf` rate of the link, e.g. `1gbit`.
    pub rate: String,
    /// The `remoca` binary to run inside the client namespace.
    pub exe: PathBuf,
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
    #[error(transparent)]
    Testbed(#[from] crate::nfs_testbed::TestbedError),
    #[error("`{0}` failed: {1}")]
    Tool(String, String),
}

fn load(cfg: &BenchConfig, name: &str) -> Result<Vec<u8>, BenchError> {
    load_raw(&cfg.corpus, name, cfg.mib)
}

fn load_raw(corpus: &std::path::Path, name: &str, mib: u64) -> Result<Vec<u8>, BenchError> {
    let p = corpus.join(format!("{name}.raw.zst"));
    let err = |e| BenchError::Corpus(p.clone(), e);
    let f = std::fs::File::open(&p).map_err(err)?;
    let mut d = zstd::stream::read::Decoder::new(f).map_err(err)?;
    d.window_log_max(31).map_err(err)?;
    let mut raw = Vec::new();
    let limit = if mib == 0 { u64::MAX } else { mib << 20 };
    d.take(limit).read_to_end(&mut raw).map_err(err)?;
    raw.truncate(raw.len() / 4096 * 4096);
    Ok(raw)
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// CPU time (user + system) of the whole process so far: every thread, ours and rayon's.
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Throughput of one measured run: wall clock MB/s and MB per CPU-second of the process
/// (which counts every thread a pipeline uses, so a pipeline's helper threads are not free).
#[derive(Clone, Copy)]
struct Run {
    wall: f64,
    cpu: f64,
}

/// Runs `f` (which returns the bytes it processed) `rounds` times; medians of both rates.
fn measure(
    rounds: usize,
    mut f: impl FnMut() -> Result<u64, BenchError>,
) -> Result<Run, BenchError> {
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (t, c) = (Instant::now(), cpu_time());
        let n = f()?;
        walls.push(mbps(n, t.elapsed()));
        cpus.push(mbps(n, cpu_time().saturating_sub(c)));
    }
    Ok(Run {
        wall: median(walls),
        cpu: median(cpus),
    })
}

thread_local! {
    static BASE_OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static BASE_SNAP: std::cell::RefCell<snap::raw::Encoder> = std::cell::RefCell::new(snap::raw::Encoder::new());
    static BASE_ZSTD: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { std::cell::RefCell::new(None) };
}

fn with_out(bound: usize, f: impl FnOnce(&mut [u8]) -> usize) -> usize {
    BASE_OUT.with(|o| {
        let mut o = o.borrow_mut();
        if o.len() < bound {
            o.resize(bound, 0);
        }
        f(&mut o[..bound])
    })
}

fn base_zstd(c: &[u8], level: i32) -> usize {
    BASE_ZSTD.with(|z| {
        let mut z = z.borrow_mut();
        if z.as_ref().map(|(l, _)| *l) != Some(level) {
            *z = Some((level, zstd::bulk::Compressor::new(level).expect("zstd")));
        }
        let (_, comp) = z.as_mut().expect("set above");
        with_out(zstd::zstd_safe::compress_bound(c.len()), |o| {
            comp.compress_to_buffer(c, o).expect("zstd")
        })
    })
}

/// A baseline: compresses one chunk, returns its compressed size.
type Comp = Box<dyn Fn(&[u8]) -> usize + Sync>;

/// What a row of the save table runs.
enum Contender {
    /// Our save, the image written to memory (kept for the restore and extract tables).
    Save(CodecChoice),
    /// Our save, the image discarded.
    Discard(CodecChoice),
    /// A baseline: the stream cut in 1 MiB chunks, each compressed on its own, in parallel;
    /// contexts and output buffers are kept per thread, as our pipeline does.
    Base(Comp),
}

/// One row of the save table: its runs at 1 thread and at all threads, one per round.
struct Row {
    label: String,
    contender: Contender,
    runs: [Vec<Run>; 2],
    ratio: f64,
    image: Option<Vec<u8>>,
}

impl Row {
    fn new(label: String, contender: Contender) -> Self {
        Row {
            label,
            contender,
            runs: [Vec::new(), Vec::new()],
            ratio: 0.0,
            image: None,
        }
    }
}

/// Runs the benchmark and prints the table to `out`.
///
/// # Errors
/// Missing corpus, or a failure of our own pipeline.
pub fn run(cfg: &BenchConfig, out: &mut dyn Write) -> Result<(), BenchError> {
    if cfg.rounds == 0 {
        return Err(BenchError::Tool(
            "bench save".into(),
            "--rounds must be at least 1".into(),
        ));
    }
    let all = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    writeln!(out, "remoca bench save: {} thread(s) available; baselines compress the same in-memory stream in 1 MiB chunks (contexts and buffers reused per thread); our saves read it from memory in place (as from a mapped file; pipes are copied) and write the image to memory (the fast mode also with the image discarded, as the baselines discard their output); each figure is the median of {} rounds, in each of which every save and baseline runs once, in turn; MB/cpu-s counts the CPU time of every thread of the {all}-thread run (a 1-thread save also has a writer thread)", all, cfg.rounds)?;
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
            "{:<28} {:>7} {:>12} {:>12} {:>10}",
            "save",
            "ratio",
            "1 thr MB/s",
            format!("{all} thr MB/s"),
            "MB/cpu-s"
        )?;
        // Every contender runs once per round (1 thread, then all), taking turns, so that a
        // burst of load on a shared machine hits them alike; the table shows the medians.
        let fast = CodecChoice::Fixed(Codec::Lz4(FAST_LZ4_ACCEL));
        let lz4c: Comp = Box::new(|c: &[u8]| {
            with_out(lz4::block::compress_bound(c.len()).expect("lz4"), |o| {
                lz4::block::compress_to_buffer(
                    c,
                    Some(lz4::block::CompressionMode::FAST(FAST_LZ4_ACCEL)),
                    false,
                    o,
                )
                .expect("lz4")
            })
        });
        let mut rows = vec![
            Row::new(
                format!("remoca fast (lz4:{FAST_LZ4_ACCEL})"),
                Contender::Save(fast),
            ),
            // Like with like: the baselines keep no output either (each chunk's is
            // overwritten by the next), so this row leaves out the image's copy.
            Row::new("  same, image discarded".into(), Contender::Discard(fast)),
            Row::new(
                "remoca snap".into(),
                Contender::Save(CodecChoice::Fixed(Codec::Snap)),
            ),
            Row::new(
                format!("remoca ratio (zstd:{RATIO_ZSTD_LEVEL})"),
                Contender::Save(CodecChoice::Fixed(Codec::Zstd(RATIO_ZSTD_LEVEL))),
            ),
            Row::new(
                "remoca zstd:1".into(),
                Contender::Save(CodecChoice::Fixed(Codec::Zstd(1))),
            ),
            Row::new(
                "remoca auto (to memory)".into(),
                Contender::Save(CodecChoice::Auto),
            ),
            Row::new(
                "zstd -1".into(),
                Contender::Base(Box::new(|c: &[u8]| base_zstd(c, 1))),
            ),
            Row::new(
                "zstd -3".into(),
                Contender::Base(Box::new(|c: &[u8]| base_zstd(c, 3))),
            ),
            Row::new(
                "lz4 (lz4_flex)".into(),
                Contender::Base(Box::new(|c: &[u8]| {
                    with_out(lz4_flex::block::get_maximum_output_size(c.len()), |o| {
                        lz4_flex::block::compress_into(c, o).expect("lz4")
                    })
                })),
            ),
            // The C LZ4 at the fast mode's acceleration: like with like for `fast`.
            Row::new(
                format!("lz4 (C, accel {FAST_LZ4_ACCEL})"),
                Contender::Base(lz4c),
            ),
            Row::new(
                "snappy".into(),
                Contender::Base(Box::new(|c: &[u8]| {
                    BASE_SNAP.with(|e| {
                        with_out(snap::raw::max_compress_len(c.len()), |o| {
                            e.borrow_mut().compress(c, o).expect("snappy")
                        })
                    })
                })),
            ),
        ];
        let threads = [1, all];
        let pools = threads.map(|n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .expect("pool")
        });
        // One output buffer, faulted in once, for every save: the baselines do not pay for
        // fresh output memory either.
        let mut img: Vec<u8> = vec![1; stream.len() / 2];
        for round in 0..cfg.rounds {
            eprint!("\r  save round {}/{}", round + 1, cfg.rounds);
            for row in &mut rows {
                for (ti, &n) in threads.iter().enumerate() {
                    let (t, c) = (Instant::now(), cpu_time());
                    let bytes = match &row.contender {
                        Contender::Save(codec) | Contender::Discard(codec) => {
                            let opts = SaveOptions {
                                codec: *codec,
                                threads: n,
                                ..Default::default()
                            };
                            let st = if matches!(row.contender, Contender::Save(_)) {
                                img.clear();
                                save_slice(&stream, &mut img, &opts, &|_| {})?
                            } else {
                                save_slice(&stream, &mut io::sink(), &opts, &|_| {})?
                            };
                            row.ratio = st.ratio();
                            st.stream_bytes
                        }
                        Contender::Base(f) => {
                            let z: usize =
                                pools[ti].install(|| stream.par_chunks(1 << 20).map(f).sum());
                            row.ratio = stream.len() as f64 / z as f64;
                            stream.len() as u64
                        }
                    };
                    row.runs[ti].push(Run {
                        wall: mbps(bytes, t.elapsed()),
                        cpu: mbps(bytes, cpu_time().saturating_sub(c)),
                    });
                }
                if matches!(row.contender, Contender::Save(_)) && row.image.is_none() {
                    row.image = Some(img.clone());
                }
            }
        }
        eprintln!();
        drop(img);
        for row in &rows {
            let med = |ti: usize, f: fn(&Run) -> f64| median(row.runs[ti].iter().map(f).collect());
            writeln!(
                out,
                "{:<28} {:>7.2} {:>12.0} {:>12.0} {:>10.0}",
                row.label,
                row.ratio,
                med(0, |r| r.wall),
                med(1, |r| r.wall),
                med(1, |r| r.cpu)
            )?;
        }
        // The fast mode's goal is snappy's speed: each round's ratio, so the spread shows.
        let snappy = rows.last().expect("snappy is the last row");
        for row in &rows[..2] {
            let spread = |ti: usize| {
                let r: Vec<f64> = row.runs[ti]
                    .iter()
                    .zip(&snappy.runs[ti])
                    .map(|(a, b)| a.wall / b.wall)
                    .collect();
                let (lo, hi) = r
                    .iter()
                    .fold((f64::MAX, 0f64), |(l, h), &x| (l.min(x), h.max(x)));
                format!("{:.2} (min {lo:.2}, max {hi:.2})", median(r))
            };
            writeln!(
                out,
                "{:<40} 1 thr {}   {all} thr {}",
                format!("{} / snappy, per round:", row.label.trim()),
                spread(0),
                spread(1)
            )?;
        }
        let images: Vec<(String, Vec<u8>)> = rows
            .into_iter()
            .filter_map(|r| r.image.map(|i| (r.label, i)))
            .collect();

        writeln!(
            out,
            "{:<28} {:>7} {:>12} {:>12} {:>10}",
            "restore",
            "",
            "1 thr MB/s",
            format!("{all} thr MB/s"),
            "MB/cpu-s"
        )?;
        for (label, img) in &images {
            let r = ImageReader::open(img.as_slice())?;
            let mut runs = Vec::new();
            for threads in [1, all] {
                runs.push(measure(cfg.rounds, || {
                    Ok(restore_stream(&r, &mut io::sink(), threads, &|_| {})?.stream_bytes)
                })?);
            }
            writeln!(
                out,
                "{:<28} {:>7} {:>12.0} {:>12.0} {:>10.0}",
                label, "", runs[0].wall, runs[1].wall, runs[1].cpu
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

fn timed(mut c: std::process::Command, what: &str) -> Result<Duration, BenchError> {
    let t = Instant::now();
    let o = c.output()?;
    if !o.status.success() {
        return Err(BenchError::Tool(
            what.to_string(),
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        ));
    }
    Ok(t.elapsed())
}

/// Rounds of the NFS mode.
const NFS_ROUNDS: usize = 3;

/// Runs the NFS mode and prints its table to `out`.
///
/// # Errors
/// Test bed, corpus, `nfs-cp` or remoca failures.
pub fn run_nfs(cfg: &NfsBenchConfig, out: &mut dyn Write) -> Result<(), BenchError> {
    let raw = load_raw(&cfg.corpus, &cfg.image, cfg.mib)?;
    let dir = tempfile::tempdir()?;
    let xl = dir.path().join("stream.xl");
    let mut f = io::BufWriter::new(std::fs::File::create(&xl)?);
    let n = build_stream(
        &raw[..],
        &mut f,
        &BuildOptions::new(GuestShape::Hvm, raw.len() as u64),
    )?;
    f.flush()?;
    drop(f);
    drop(raw);
    let bed = crate::nfs_testbed::NfsTestbed::start(Some(&cfg.rate))?;
    writeln!(
        out,
        "remoca bench save --nfs: {} as an HVM stream of {:.1} MiB, client and nfs-ganesha in two namespaces, veth shaped with tbf {}",
        cfg.image,
        n as f64 / 1048576.0,
        cfg.rate
    )?;
    writeln!(
        out,
        "{:<34} {:>9} {:>10} {:>9} {:>9}",
        "to the server", "seconds", "MB/s", "on wire", "vs nfs-cp"
    )?;
    // Every transfer runs NFS_ROUNDS times, the systems taking turns within each round, so
    // a warm-up or a burst of load on the shared machine hits them alike; medians shown.
    let codecs = [
        ("remoca save --codec auto", "auto"),
        ("remoca save --codec zstd", "zstd"),
        ("remoca save --codec fast", "fast"),
        ("remoca save --codec snap", "snap"),
    ];
    let mut base_t = Vec::new();
    let mut ours_t = vec![Vec::new(); codecs.len()];
    // A new name per round and system: nfs-cp does not overwrite, and replacing a file would
    // add a removal to some transfers only.
    for round in 0..NFS_ROUNDS {
        let mut c = bed.client_cmd(std::path::Path::new("nfs-cp"));
        c.arg(&xl).arg(bed.url(&format!("raw-{round}.xl")));
        base_t.push(timed(c, "nfs-cp (apt-get install libnfs-utils)")?.as_secs_f64());
        for ((label, codec), times) in codecs.iter().zip(&mut ours_t) {
            let name = format!("{codec}-{round}.rsv");
            let mut c = bed.client_cmd(&cfg.exe);
            c.args(["save", "--quiet", "--codec", codec, "--from"])
                .arg(&xl)
                .args(["--to", &bed.url(&name)]);
            times.push(timed(c, label)?.as_secs_f64());
        }
    }
    let base = median(base_t);
    let wire = std::fs::metadata(bed.export().join("raw-0.xl"))?.len();
    writeln!(
        out,
        "{:<34} {:>9.2} {:>10.0} {:>8.1}M {:>9}",
        "libnfs nfs-cp, raw stream",
        base,
        n as f64 / base / 1e6,
        wire as f64 / 1e6,
        "1.00x"
    )?;
    for ((label, codec), times) in codecs.iter().zip(ours_t) {
        let t = median(times);
        let wire = std::fs::metadata(bed.export().join(format!("{codec}-0.rsv")))?.len();
        writeln!(
            out,
            "{label:<34} {:>9.2} {:>10.0} {:>8.1}M {:>8.2}x",
            t,
            n as f64 / t / 1e6,
            wire as f64 / 1e6,
            base / t
        )?;
    }
    writeln!(
        out,
        "{:<34} {:>9} {:>10}",
        "from the server", "seconds", "MB/s"
    )?;
    let back = dir.path().join("raw-back.xl");
    let (mut cp_t, mut ours_t) = (Vec::new(), Vec::new());
    for _ in 0..NFS_ROUNDS {
        let mut c = bed.client_cmd(std::path::Path::new("nfs-cp"));
        c.arg(bed.url("raw-0.xl")).arg(&back);
        cp_t.push(timed(c, "nfs-cp read")?.as_secs_f64());
        std::fs::remove_file(&back)?;
        let mut c = bed.client_cmd(&cfg.exe);
        c.args(["restore", "--quiet", &bed.url("auto-0.rsv"), "--to", "-"])
            .stdout(std::process::Stdio::null());
        ours_t.push(timed(c, "remoca restore")?.as_secs_f64());
    }
    for (label, t) in [
        ("libnfs nfs-cp, raw stream", median(cp_t)),
        ("remoca restore (auto image)", median(ours_t)),
    ] {
        writeln!(out, "{label:<34} {t:>9.2} {:>10.0}", n as f64 / t / 1e6)?;
    }
    Ok(())
}
