//! The save pipeline: `xl save` stream in, image out, in one streaming pass.
//!
//! ```text
//!  parser thread ──events (≤8 records)──▶ main: windows of pages ──frames (≤2 windows)──▶ writer thread
//!                                          │ window N+1: rayon: classify + hash pages
//!                                          │             rayon: dedup, one task per table shard
//!                                          │             sequential: assign block slots
//!                                          │ window N, meanwhile (a rayon task):
//!                                          │             rayon: compress blocks into frames
//! ```
//! Window N's blocks are compressed while window N+1 is classified, so the workers always
//! have compression to pick up while one of them does the sequential part.
//! Memory is bounded by the channel depths and the window size, never by the image size
//! (apart from the dedup table, 16 B of hash + 8 B per distinct page, and the index).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::classify::{classify, Content};
use crate::codec::{Codec, CodecChoice, FAST_LZ4_ACCEL, RATIO_ZSTD_LEVEL};
use crate::digest::{StreamDigest, FINGERPRINT_LEN};
use crate::image::frame::{FileHeader, FrameHeader, FrameKind, Trailer};
use crate::image::index::{BlockEntry, ClassCounts, Index, PageClass, PageEntry};
use crate::image::{ImageError, DEFAULT_BLOCK_PAGES};
use crate::stream::format::{page_has_data, page_type, LIBXC_PAGE_DATA, PAGE_SIZE};
use crate::stream::{Event, StreamError, StreamParser};

/// How to save.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    pub codec: CodecChoice,
    /// Pages per compressed block (1..=256); 0 = [`DEFAULT_BLOCK_PAGES`] (16, 64 KiB).
    pub block_pages: usize,
    /// Data pages gathered before a parallel step; blocks never span windows.
    pub window_pages: usize,
    /// Worker threads; 0 = one per CPU.
    pub threads: usize,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            codec: CodecChoice::Auto,
            block_pages: 0,
            window_pages: 4096,
            threads: 0,
        }
    }
}

/// What a save did.
#[derive(Debug, Clone, Default)]
pub struct SaveStats {
    pub stream_bytes: u64,
    pub image_bytes: u64,
    pub counts: ClassCounts,
    pub blocks: u64,
    pub snap_blocks: u64,
    pub zstd_blocks: u64,
    pub lz4_blocks: u64,
    pub elapsed: Duration,
}

impl SaveStats {
    /// Stream bytes per image byte.
    pub fn ratio(&self) -> f64 {
        self.stream_bytes as f64 / self.image_bytes.max(1) as f64
    }
}

struct CountingReader<'a, R> {
    inner: R,
    seen: &'a AtomicU64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A parsed piece of the stream held until its window is written: the event, and its page
/// data when that is borrowed from an in-memory source instead of held by the event.
struct Held<'a> {
    ev: Event,
    borrowed: Option<&'a [u8]>,
}

impl Held<'_> {
    /// The page data of a PAGE_DATA record (empty for other events).
    fn pages(&self) -> &[u8] {
        match (&self.ev, self.borrowed) {
            (_, Some(b)) => b,
            (Event::Pages(r), None) => &r.pages,
            _ => &[],
        }
    }
}

/// Where the stream comes from.
enum Input<'a, R> {
    /// Any reader: a parser thread copies each record out of it.
    Reader(R),
    /// The whole stream in memory (or mapped): records borrow their pages from it.
    Slice(&'a [u8]),
}

/// Transforms an `xl save` stream into an image written to `out`. `progress` is called with
/// the number of stream bytes consumed so far.
///
/// # Errors
/// A bad input stream ([`ImageError::Stream`]), an output error ([`ImageError::Output`]).
/// On error the output holds a partial image without a trailer, which readers reject.
pub fn save_stream<R, W>(
    input: R,
    out: &mut W,
    opts: &SaveOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<SaveStats, ImageError>
where
    R: Read + Send,
    W: Write + Send + ?Sized,
{
    save_input(Input::Reader(input), out, opts, progress)
}

/// [`save_stream`] of a stream held in memory or mapped from a file (see
/// [`crate::mapped::MappedFile`]): the same image, without copying the page data out of
/// `stream` (the parser only reads headers and pfn arrays; the workers read the pages where
/// they are).
///
/// # Errors
/// As [`save_stream`].
pub fn save_slice<W>(
    stream: &[u8],
    out: &mut W,
    opts: &SaveOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<SaveStats, ImageError>
where
    W: Write + Send + ?Sized,
{
    save_input(Input::Slice::<io::Empty>(stream), out, opts, progress)
}

fn save_input<R, W>(
    input: Input<'_, R>,
    out: &mut W,
    opts: &SaveOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<SaveStats, ImageError>
where
    R: Read + Send,
    W: Write + Send + ?Sized,
{
    let start = Instant::now();
    let bp = match opts.block_pages {
        0 => DEFAULT_BLOCK_PAGES,
        n => n.clamp(1, 256),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(ImageError::ThreadPool)?;
    let seen = AtomicU64::new(0);
    let writer_wait = AtomicU64::new(0);
    let (out_tx, out_rx) = sync_channel::<Vec<OutFrame>>(2);
    let (written_tx, written_rx) = std::sync::mpsc::channel::<Vec<OutFrame>>();
    // Page buffers of processed records go back to the parser for reuse.
    let (spare_tx, spare_rx) = std::sync::mpsc::channel::<Vec<u8>>();

    std::thread::scope(|s| {
        let seen = &seen;
        type Next<'n> = Box<dyn FnMut() -> Option<Result<Held<'n>, StreamError>> + 'n>;
        let (mut next, parser): (Next<'_>, _) = match input {
            Input::Reader(input) => {
                let (ev_tx, ev_rx) = sync_channel::<Result<Event, StreamError>>(8);
                let parser = s.spawn(move || {
                    let mut p = StreamParser::new(CountingReader { inner: input, seen });
                    loop {
                        while let Ok(b) = spare_rx.try_recv() {
                            p.recycle(b);
                        }
                        let ev = p.next_event().transpose();
                        let stop = !matches!(ev, Some(Ok(_)));
                        if let Some(ev) = ev {
                            if ev_tx.send(ev).is_err() {
                                break;
                            }
                        }
                        if stop {
                            break;
                        }
                    }
                });
                let next = move || {
                    let ev = ev_rx.recv().ok()?;
                    Some(ev.map(|ev| Held { ev, borrowed: None }))
                };
                (Box::new(next) as Next<'_>, Some(parser))
            }
            Input::Slice(data) => {
                // Parsing headers and pfn arrays is cheap: no thread of its own.
                let mut p = StreamParser::new(io::Cursor::new(data));
                let next = move || {
                    let r = p.next_event_borrowed().transpose()?;
                    seen.store(p.offset(), Ordering::Relaxed);
                    Some(r.map(|(ev, pages)| Held {
                        ev,
                        borrowed: Some(pages),
                    }))
                };
                (Box::new(next) as Next<'_>, None)
            }
        };
        let writer = s.spawn(|| write_loop(out, out_rx, written_tx, &writer_wait));

        let mut st = SaveState {
            bp,
            codec: match opts.codec {
                CodecChoice::Fixed(c) => c,
                CodecChoice::Auto => Codec::Zstd(RATIO_ZSTD_LEVEL),
            },
            auto: opts.codec == CodecChoice::Auto,
            offset: 0,
            index: Index::default(),
            // One table when one thread works (no shard scans to pay for).
            dedup: (0..match pool.current_num_threads() {
                1 => 1,
                n => n * SHARDS_PER_THREAD,
            })
                .map(|_| HashMap::default())
                .collect(),
            spare: Vec::new(),
            spare_bytes: 0,
            spare_rx: written_rx,
            stats: SaveStats::default(),
            digest: StreamDigest::new(),
            stream_len: 0,
            head: Vec::new(),
            next_block: 0,
        };
        let header = FileHeader {
            version: crate::image::VERSION,
            codec_choice: match opts.codec {
                CodecChoice::Auto => 0,
                CodecChoice::Fixed(c) => c.id(),
            },
            level: match opts.codec {
                CodecChoice::Fixed(Codec::Zstd(l)) => l as i8,
                CodecChoice::Fixed(Codec::Lz4(a)) => a.clamp(1, 127) as i8,
                _ => 0,
            },
            block_pages: bp as u16,
        };
        let result = (|| {
            st.send(
                &out_tx,
                vec![OutFrame::whole(header.encode().to_vec())],
                &writer_wait,
            )?;
            // One window is compressed while the next is classified and deduplicated, so
            // the workers never wait for the sequential part of a window.
            let mut ready: Option<(Vec<Held<'_>>, Prepared)> = None;
            let one_thread = pool.current_num_threads() == 1;
            let mut step = |cur: Vec<_>| -> Result<(), ImageError> {
                let codec = st.codec;
                let bufs = match &ready {
                    Some((_, p)) => st.take_buffers(p.unique.len().div_ceil(bp)),
                    None => Vec::new(),
                };
                let mut blocks = None;
                let prep = pool.install(|| {
                    rayon::scope(|s| {
                        if let Some((held, prep)) = &ready {
                            let blocks = &mut blocks;
                            let compress = move || {
                                *blocks = Some(compress_blocks(held, &prep.unique, bp, codec, bufs))
                            };
                            // One thread gains nothing from the overlap, and compresses
                            // the window while its pages are still in cache.
                            if one_thread {
                                compress();
                            } else {
                                s.spawn(move |_| compress());
                            }
                        }
                        (!cur.is_empty()).then(|| st.prepare(&cur))
                    })
                });
                if let Some((held, prep)) = ready.take() {
                    let blocks = blocks.expect("the ready window was compressed")?;
                    let frames = st.finish_window(&held, &prep, blocks, codec);
                    st.send(&out_tx, frames, &writer_wait)?;
                    progress(seen.load(Ordering::Relaxed));
                    for h in held {
                        if let Event::Pages(r) = h.ev {
                            if r.pages.capacity() > 0 {
                                let _ = spare_tx.send(r.pages);
                            }
                        }
                    }
                }
                ready = prep.map(|p| (cur, p));
                Ok(())
            };
            let mut window: Vec<Held<'_>> = Vec::new();
            let mut pages = 0usize;
            loop {
                let held = next().transpose()?;
                let eof = held.is_none();
                if let Some(h) = held {
                    pages += h.pages().len() / PAGE_SIZE;
                    window.push(h);
                }
                if (pages >= opts.window_pages || eof) && !window.is_empty() {
                    step(std::mem::take(&mut window))?;
                    pages = 0;
                }
                if eof {
                    // The last window's blocks.
                    return step(Vec::new());
                }
            }
        })();
        // Stops the parser thread (its next send fails) before joining it.
        drop(next);
        if let Some(parser) = parser {
            parser.join().expect("parser thread panicked");
        }
        let len = st.stream_len;
        let result = result.and_then(|()| {
            st.index.stream_check = st.digest.value();
            st.index.stream_len = len;
            pool.install(|| st.finish(&out_tx, &writer_wait))
        });
        drop(out_tx);
        let written = writer.join().expect("writer thread panicked");
        // An output error explains a failed send better than the send itself.
        written.map_err(ImageError::Output)?;
        result?;
        st.stats.stream_bytes = len;
        st.stats.elapsed = start.elapsed();
        st.stats.counts = st.index.counts();
        progress(len);
        Ok(st.stats)
    })
}

fn write_loop<W: Write + ?Sized>(
    out: &mut W,
    rx: Receiver<Vec<OutFrame>>,
    written: std::sync::mpsc::Sender<Vec<OutFrame>>,
    wait: &AtomicU64,
) -> io::Result<()> {
    loop {
        let t = Instant::now();
        let Ok(frames) = rx.recv() else { break };
        wait.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        for f in &frames {
            out.write_all(f.bytes())?;
        }
        let _ = written.send(frames);
    }
    out.flush()
}

/// A frame on its way to the writer: `buf[..len]` is written. The rest of `buf` is
/// initialized room kept with the buffer, so that a reused buffer takes the next block's
/// compressed bytes straight from the codec, without zeroing or copying them.
struct OutFrame {
    buf: Vec<u8>,
    len: usize,
}

impl OutFrame {
    fn whole(buf: Vec<u8>) -> Self {
        OutFrame {
            len: buf.len(),
            buf,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

thread_local! {
    /// Pages of a block that are not contiguous in their record, gathered for the codec.
    static GATHER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A window whose pages are classified, deduplicated and in the index: its unique pages in
/// block order, as (event of the window, page of that record).
struct Prepared {
    unique: Vec<(usize, usize)>,
}

/// Pages that are consecutive in one record, as one slice of that record.
fn contiguous<'a>(held: &'a [Held<'_>], pages: &[(usize, usize)]) -> Option<&'a [u8]> {
    let (h, first) = pages[0];
    let ok = pages
        .iter()
        .enumerate()
        .all(|(k, &(hh, i))| hh == h && i == first + k);
    ok.then(|| &held[h].pages()[first * PAGE_SIZE..(first + pages.len()) * PAGE_SIZE])
}

/// Compresses a prepared window's unique pages into block frames, `bp` pages each, in
/// parallel, into the given buffers (one per block).
fn compress_blocks(
    held: &[Held<'_>],
    unique: &[(usize, usize)],
    bp: usize,
    codec: Codec,
    bufs: Vec<Vec<u8>>,
) -> Result<Vec<OutFrame>, ImageError> {
    unique
        .par_chunks(bp)
        .zip(bufs)
        .map(|(chunk, mut f)| {
            let raw = chunk.len() * PAGE_SIZE;
            // Compress straight into the frame buffer behind its header; a reused buffer is
            // already initialized that far, so this costs no zeroing.
            let room = FrameHeader::LEN + codec.bound(raw);
            if f.len() < room {
                f.resize(room, 0);
            }
            let dst = &mut f[FrameHeader::LEN..room];
            // Most unique pages sit next to each other in their record: compress them in
            // place; gather only blocks that straddle gaps (zero, duplicate, no-data pages).
            let n = match contiguous(held, chunk) {
                Some(run) => codec.compress_to(run, dst),
                None => GATHER.with(|g| {
                    let mut g = g.borrow_mut();
                    g.clear();
                    for &(h, i) in chunk {
                        g.extend_from_slice(&held[h].pages()[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
                    }
                    codec.compress_to(&g, dst)
                }),
            }
            .map_err(ImageError::Compress)?;
            let len = FrameHeader::LEN + n;
            FrameHeader::seal(&mut f[..len], FrameKind::Block, codec.id(), raw as u32);
            Ok(OutFrame { buf: f, len })
        })
        .collect()
}

/// The dedup table's keys are xxh3-128 hashes already: their low 64 bits are the bucket hash
/// (SipHash over them again cost about 1.5 % of a save).
#[derive(Default)]
struct HashIsKey(u64);

impl Hasher for HashIsKey {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 ^= v as u64;
    }
}

/// Shards of the duplicate table per worker thread. Each shard is searched by one task that
/// goes through the window's pages in stream order, so every page finds the same first copy
/// as with one table; its bits of the hash (64..) are not the ones the table's buckets use.
const SHARDS_PER_THREAD: usize = 4;

fn dedup_shard(h: u128, shards: usize) -> usize {
    (h >> 64) as usize % shards
}

/// Bytes of the encoded index per zstd frame (compressed in parallel at the end of a save).
const INDEX_PIECE: usize = 512 << 10;
/// zstd level of the index: under `perf`, level 3 took 1.25 % of a one-thread fast save of
/// ram-work and level 1 0.9 %, with the same ratio to three decimals (2.447).
const INDEX_ZSTD_LEVEL: i32 = 1;

/// Pages per parallel classification task (1 MiB): enough tasks for the workers to share
/// a window, few enough that handing them out costs nothing measurable.
const PIECE_PAGES: usize = 256;

/// Capacity of written frame buffers kept for reuse (a window of blocks is about 6-16 MiB).
const MAX_SPARE_BYTES: usize = 48 << 20;

struct SaveState {
    /// Pages per block (the last block of a window may have fewer).
    bp: usize,
    codec: Codec,
    auto: bool,
    offset: u64,
    index: Index,
    /// The first entry of every distinct page content, in shards by hash ([`SHARDS_PER_THREAD`]).
    dedup: Vec<HashMap<u128, u64, BuildHasherDefault<HashIsKey>>>,
    /// Frame buffers the writer has written, reused for the next blocks (fresh ones cost
    /// page faults: about 4 % of a fast save).
    spare: Vec<Vec<u8>>,
    spare_bytes: usize,
    spare_rx: Receiver<Vec<OutFrame>>,
    stats: SaveStats,
    /// Digest ([`crate::digest`]) and length of the stream so far (the events regenerate it
    /// byte for byte).
    digest: StreamDigest,
    stream_len: u64,
    /// Reused buffer for a PAGE_DATA record's header bytes.
    head: Vec<u8>,
    /// Number of the next window's first block.
    next_block: u64,
}

impl SaveState {
    fn send(
        &mut self,
        tx: &std::sync::mpsc::SyncSender<Vec<OutFrame>>,
        frames: Vec<OutFrame>,
        writer_wait: &AtomicU64,
    ) -> Result<(), ImageError> {
        let n: u64 = frames.iter().map(|f| f.len as u64).sum();
        let before = writer_wait.load(Ordering::Relaxed);
        let t = Instant::now();
        tx.send(frames)
            .map_err(|_| ImageError::Output(io::Error::other("writer stopped")))?;
        let blocked = t.elapsed().as_nanos() as u64;
        let starved = writer_wait.load(Ordering::Relaxed) - before;
        if self.auto {
            // The compressor waited for the writer: the output is the bottleneck, spend CPU on
            // ratio. The writer waited for us: compression is the bottleneck, go faster.
            if blocked > 2 * starved + 1_000_000 {
                self.codec = Codec::Zstd(RATIO_ZSTD_LEVEL);
            } else if starved > 2 * blocked + 1_000_000 {
                self.codec = Codec::Lz4(FAST_LZ4_ACCEL);
            }
        }
        self.offset += n;
        self.stats.image_bytes = self.offset;
        Ok(())
    }

    /// Buffers for `n` block frames: written ones given back by the writer, or new.
    fn take_buffers(&mut self, n: usize) -> Vec<Vec<u8>> {
        while let Ok(frames) = self.spare_rx.try_recv() {
            for OutFrame { buf: f, .. } in frames {
                let cap = f.capacity();
                if cap >= 4096 && self.spare_bytes + cap <= MAX_SPARE_BYTES {
                    self.spare_bytes += cap;
                    self.spare.push(f);
                }
            }
        }
        (0..n)
            .map(|_| {
                let f = self.spare.pop().unwrap_or_default();
                self.spare_bytes -= f.capacity();
                f
            })
            .collect()
    }

    /// Classifies a window's pages, adds them to the stream digest and the index (finding
    /// duplicates) and assigns the unique ones to blocks, numbered from `next_block`.
    fn prepare(&mut self, held: &[Held<'_>]) -> Prepared {
        let data_pages: usize = held.iter().map(|h| h.pages().len() / PAGE_SIZE).sum();

        // In parallel: classify every data page (zero / one word / xxh3-128), which also
        // gives its fingerprint for the stream digest.
        let mut contents = vec![Content::Zero; data_pages];
        let mut fps = vec![0u128; data_pages];
        {
            let mut jobs = Vec::with_capacity(data_pages.div_ceil(PIECE_PAGES));
            let (mut cs, mut fs) = (&mut contents[..], &mut fps[..]);
            for piece in held
                .iter()
                .flat_map(|h| h.pages().chunks(PIECE_PAGES * PAGE_SIZE))
            {
                let n = piece.len() / PAGE_SIZE;
                let (c, c_tail) = std::mem::take(&mut cs).split_at_mut(n);
                let (f, f_tail) = std::mem::take(&mut fs).split_at_mut(n);
                (cs, fs) = (c_tail, f_tail);
                jobs.push((piece, c, f));
            }
            jobs.into_par_iter().for_each(|(piece, cs, fs)| {
                for ((page, c), f) in piece.chunks_exact(PAGE_SIZE).zip(cs).zip(fs) {
                    (*c, *f) = classify(page);
                }
            });
        }
        // In stream order: the digest gets every byte that is not page data, and the pages'
        // fingerprints in their place.
        let mut ci = 0;
        for h in held {
            match &h.ev {
                Event::Verbatim { bytes, .. } => {
                    self.digest.update(bytes);
                    self.stream_len += bytes.len() as u64;
                }
                Event::Pages(rec) => {
                    let n = h.pages().len() / PAGE_SIZE;
                    self.head.clear();
                    self.head.extend_from_slice(&LIBXC_PAGE_DATA.to_le_bytes());
                    let len = 8 + 8 * rec.words.len() + n * PAGE_SIZE;
                    self.head.extend_from_slice(&(len as u32).to_le_bytes());
                    self.head
                        .extend_from_slice(&(rec.words.len() as u32).to_le_bytes());
                    self.head.extend_from_slice(&rec.reserved.to_le_bytes());
                    for w in &rec.words {
                        self.head.extend_from_slice(&w.to_le_bytes());
                    }
                    self.head.reserve(n * FINGERPRINT_LEN);
                    for fp in &fps[ci..ci + n] {
                        self.head.extend_from_slice(&fp.to_le_bytes());
                    }
                    ci += n;
                    self.digest.update(&self.head);
                    self.stream_len += (8 + len) as u64;
                }
            }
        }
        debug_assert_eq!(ci, data_pages);

        // Duplicates, found in parallel (a task per shard of the table): for each data page
        // of the window that repeats an earlier one, that one's entry.
        let mut entries = Vec::with_capacity(contents.len());
        let mut e = self.index.pages.len() as u64;
        for h in held {
            if let Event::Pages(rec) = &h.ev {
                for &word in &rec.words {
                    if page_has_data(page_type(word)) {
                        entries.push(e);
                    }
                    e += 1;
                }
            }
        }
        debug_assert_eq!(entries.len(), contents.len());
        let shards = self.dedup.len();
        let found: Vec<Vec<(usize, u64)>> = self
            .dedup
            .par_iter_mut()
            .enumerate()
            .map(|(shard, table)| {
                let mut dups = Vec::new();
                for (ci, c) in contents.iter().enumerate() {
                    let Content::Hashed(h) = *c else { continue };
                    if dedup_shard(h, shards) != shard {
                        continue;
                    }
                    match table.entry(h) {
                        std::collections::hash_map::Entry::Occupied(o) => dups.push((ci, *o.get())),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(entries[ci]);
                        }
                    }
                }
                dups
            })
            .collect();
        let mut dup_of = vec![u64::MAX; contents.len()];
        for (ci, src) in found.into_iter().flatten() {
            dup_of[ci] = src;
        }

        let first_block = self.next_block;
        let mut unique: Vec<(usize, usize)> = Vec::new();
        let mut ci = 0usize;
        for (hi, h) in held.iter().enumerate() {
            let Event::Pages(rec) = &h.ev else { continue };
            self.index.records += 1;
            let mut pi = 0;
            for &word in &rec.words {
                let class = if !page_has_data(page_type(word)) {
                    PageClass::NoData
                } else {
                    let (c, page, dup) = (contents[ci], (hi, pi), dup_of[ci]);
                    ci += 1;
                    pi += 1;
                    match c {
                        Content::Zero => PageClass::Zero,
                        Content::Word(w) => PageClass::Word(w),
                        Content::Hashed(_) if dup != u64::MAX => PageClass::Dup(dup),
                        Content::Hashed(_) => {
                            unique.push(page);
                            let n = unique.len() - 1;
                            PageClass::Block {
                                block: first_block + (n / self.bp) as u64,
                                slot: (n % self.bp) as u16,
                            }
                        }
                    }
                };
                self.index.pages.push(PageEntry { word, class });
            }
        }

        self.next_block += unique.len().div_ceil(self.bp) as u64;
        Prepared { unique }
    }

    /// The frames of a prepared window: its compressed `blocks`, then its records in order.
    fn finish_window(
        &mut self,
        held: &[Held<'_>],
        prep: &Prepared,
        mut frames: Vec<OutFrame>,
        codec: Codec,
    ) -> Vec<OutFrame> {
        let mut off = self.offset;
        for (f, chunk) in frames.iter().zip(prep.unique.chunks(self.bp)) {
            self.index.blocks.push(BlockEntry {
                offset: off,
                frame_len: f.len as u32,
                pages: chunk.len() as u16,
                codec: codec.id(),
            });
            off += f.len as u64;
            match codec {
                Codec::Snap => self.stats.snap_blocks += 1,
                Codec::Zstd(_) => self.stats.zstd_blocks += 1,
                Codec::Lz4(_) => self.stats.lz4_blocks += 1,
            }
        }
        self.stats.blocks += frames.len() as u64;

        for h in held {
            let mut f = Vec::new();
            match &h.ev {
                Event::Verbatim { part, rtype, bytes } => {
                    FrameHeader::write_frame(
                        &mut f,
                        FrameKind::Verbatim,
                        part.code(),
                        *rtype,
                        bytes,
                    );
                }
                Event::Pages(rec) => {
                    let mut head = Vec::with_capacity(8 + 8 * rec.words.len());
                    head.extend_from_slice(&rec.reserved.to_le_bytes());
                    head.extend_from_slice(&0u32.to_le_bytes());
                    for w in &rec.words {
                        head.extend_from_slice(&w.to_le_bytes());
                    }
                    FrameHeader::write_frame(
                        &mut f,
                        FrameKind::PageRecord,
                        0,
                        rec.words.len() as u32,
                        &head,
                    );
                }
            }
            frames.push(OutFrame::whole(f));
        }
        frames
    }

    fn finish(
        &mut self,
        tx: &std::sync::mpsc::SyncSender<Vec<OutFrame>>,
        writer_wait: &AtomicU64,
    ) -> Result<(), ImageError> {
        // The index (about 24 B per page) in pieces compressed in parallel: concatenated
        // zstd frames decompress as one.
        let raw = self.index.encode();
        let pieces: Vec<Vec<u8>> = raw
            .par_chunks(INDEX_PIECE)
            .map(|piece| zstd::bulk::compress(piece, INDEX_ZSTD_LEVEL))
            .collect::<Result<_, _>>()
            .map_err(|e| ImageError::Compress(crate::codec::CodecError::Zstd(e)))?;
        let z = pieces.concat();
        let mut f = Vec::new();
        FrameHeader::write_frame(&mut f, FrameKind::Index, 0, raw.len() as u32, &z);
        let index_offset = self.offset;
        let trailer = Trailer {
            index_offset,
            trailer_offset: index_offset + f.len() as u64,
        };
        self.send(
            tx,
            vec![
                OutFrame::whole(f),
                OutFrame::whole(trailer.encode().to_vec()),
            ],
            writer_wait,
        )
    }
}
