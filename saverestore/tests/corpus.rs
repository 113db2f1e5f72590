//! Round trips on the real guest RAM corpus (`shared/corpus`), PV and HVM shapes: the
//! regenerated stream is byte-identical to the built one (length and xxh3-128 compared).
//! The corpus is found through `REMOCA_CORPUS`, `../shared/corpus` beside the repository,
//! or `/work/shared/corpus`; a missing corpus fails the test with a message.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use remoca_saverestore::image::ImageReader;
use remoca_saverestore::stream::{build_stream, BuildOptions, GuestShape};
use remoca_saverestore::{restore_stream, save_stream, CodecChoice, SaveOptions};
use xxhash_rust::xxh3::Xxh3;

fn corpus() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("REMOCA_CORPUS").map(PathBuf::from),
        Some(here.join("../../shared/corpus")),
        Some(PathBuf::from("/work/shared/corpus")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("ram-work.raw.zst").exists())
        .expect("corpus not found: set REMOCA_CORPUS to the folder with ram-work.raw.zst")
}

struct Hashing<W> {
    inner: W,
    h: Xxh3,
    n: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.h.update(&b[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A bounded in-memory pipe between the builder thread and the save pipeline.
struct ChanWriter(std::sync::mpsc::SyncSender<Vec<u8>>);
struct ChanReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Write for ChanWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0
            .send(b.to_vec())
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for ChanReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(v) => {
                    self.cur = v;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn round_trip(name: &str, shape: GuestShape, codec: CodecChoice) {
    let path = corpus().join(format!("{name}.raw.zst"));
    let (tx, rx) = std::sync::mpsc::sync_channel(16);
    let (reader, writer) = (
        ChanReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        },
        ChanWriter(tx),
    );
    let builder = std::thread::spawn(move || {
        let f = std::fs::File::open(path).unwrap();
        let mut d = zstd::stream::read::Decoder::new(f).unwrap();
        d.window_log_max(31).unwrap();
        let mut w = Hashing {
            inner: io::BufWriter::with_capacity(1 << 20, writer),
            h: Xxh3::new(),
            n: 0,
        };
        build_stream(
            &mut d as &mut dyn Read,
            &mut w,
            &BuildOptions::new(shape, 512 << 20),
        )
        .unwrap();
        w.flush().unwrap();
        (w.n, w.h.digest128())
    });
    let mut img = Vec::new();
    let opts = SaveOptions {
        codec,
        ..Default::default()
    };
    let st = save_stream(
        io::BufReader::with_capacity(1 << 20, reader),
        &mut img,
        &opts,
        &|_| {},
    )
    .unwrap();
    let (n, want) = builder.join().unwrap();
    assert_eq!(st.stream_bytes, n);
    let r = ImageReader::open(img).unwrap();
    let mut out = Hashing {
        inner: io::sink(),
        h: Xxh3::new(),
        n: 0,
    };
    restore_stream(&r, &mut out, 0, &|_| {}).unwrap();
    assert_eq!(out.n, n, "{name} {shape:?}: length differs");
    assert!(
        out.h.digest128() == want,
        "{name} {shape:?}: restored stream differs"
    );
    let c = r.index().counts();
    eprintln!("{name} {shape:?} {codec}: ratio {:.2}, {c:?}", st.ratio());
    assert!(c.nodata > 0 && c.zero > 0 && c.dup > 0 && c.block > 0);
}

#[test]
fn ram_work_pv_and_hvm_round_trip() {
    round_trip("ram-work", GuestShape::Pv, CodecChoice::Auto);
    round_trip("ram-work", GuestShape::Hvm, "snap".parse().unwrap());
    round_trip("ram-work", GuestShape::Hvm, "fast".parse().unwrap());
}

#[test]
fn ram_idle_pv_and_hvm_round_trip() {
    round_trip("ram-idle", GuestShape::Pv, "zstd".parse().unwrap());
    round_trip("ram-idle", GuestShape::Hvm, CodecChoice::Auto);
}
