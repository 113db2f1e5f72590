//! The restore pipeline: image in, the original `xl save` stream out, byte for byte.
//!
//! The frames are read in order. Each window's blocks come before its records, so once a
//! window's frames are in, its records are regenerated in one parallel (rayon) pass: every
//! block decompressed once into its place, zero and one-word pages filled, duplicates copied
//! (from their first copy's block in the same window, or from a cache that keeps a first copy
//! of an earlier window only until its last duplicate is written), and each run's check
//! (its pages' fingerprints in format 3, its CRC32C before) taken while it is hot; then
//! handed to a writer thread. The whole regenerated stream is checked against the length and
//! the digest (or CRC32C) saved in the index.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::digest::{push_fingerprints, StreamDigest, FINGERPRINT_LEN};
use crate::image::frame::{FrameHeader, FrameKind};
use crate::image::index::PageClass;
use crate::image::reader::decode_block_payload;
use crate::image::{ImageError, ImageReader, ReadAt, StreamCheck};
use crate::stream::format::{LIBXC_PAGE_DATA, PAGE_SIZE};

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreStats {
    pub stream_bytes: u64,
    pub elapsed: Duration,
}

/// Regenerates the saved stream into `out`. `threads` 0 = one per CPU. `progress` gets the
/// number of stream bytes produced so far.
///
/// # Errors
/// A damaged image (checksum, decompression, index mismatch), an output error, or a
/// regenerated stream whose length or digest (CRC32C) differs from the saved one.
pub fn restore_stream<R, W>(
    img: &ImageReader<R>,
    out: &mut W,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<RestoreStats, ImageError>
where
    R: ReadAt + Sync,
    W: Write + Send + ?Sized,
{
    let start = Instant::now();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(ImageError::ThreadPool)?;
    let index = img.index();
    let dup_last = DupLast::new(&index.pages);
    let check = StreamCheck::of_version(img.header().version);
    let (tx, rx) = sync_channel::<(Vec<u8>, BufSum)>(4);
    // Record buffers come back from the writer for reuse: no fresh (zeroed, faulted-in)
    // memory per record.
    let (spare_tx, spare_rx) = std::sync::mpsc::channel::<Vec<u8>>();

    let budget = ReadBudget::default();
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> io::Result<(u64, u64)> {
            let (mut n, mut crc, mut digest) = (0u64, 0u32, StreamDigest::new());
            for (buf, sum) in rx {
                // The workers took each buffer's CRC32C or its pages' fingerprints: only
                // combined here.
                match &sum {
                    BufSum::Crc(c) => crc = crate::crc::combine(crc, *c, buf.len()),
                    BufSum::Digest { head, fps } => {
                        digest.update(&buf[..*head]);
                        digest.update(fps);
                    }
                }
                n += buf.len() as u64;
                out.write_all(&buf)?;
                progress(n);
                if buf.capacity() <= MAX_RECYCLED {
                    let _ = spare_tx.send(buf);
                }
            }
            out.flush()?;
            Ok((
                n,
                match check {
                    StreamCheck::Crc32c => u64::from(crc),
                    StreamCheck::Digest => digest.value(),
                },
            ))
        });

        let mut st = Restorer {
            img,
            dup_last: &dup_last,
            pending: Vec::new(),
            first_pending: 0,
            frames: Vec::new(),
            frames_bytes: 0,
            after_records: false,
            dup_cache: HashMap::new(),
            next_block: 0,
            entry: 0,
            spare: spare_rx,
            check,
        };
        let send = |buf: (Vec<u8>, BufSum)| {
            tx.send(buf)
                .map_err(|_| ImageError::Output(io::Error::other("writer stopped")))
        };

        // A reader thread walks the frames (positioned reads, frame checksums) while this
        // thread regenerates the previous window, so reading never waits for decompression.
        let (fr_tx, fr_rx) =
            sync_channel::<Result<(FrameHeader, u64, Cow<'_, [u8]>), ImageError>>(FRAMES_AHEAD);
        let reader = {
            let budget = &budget;
            s.spawn(move || {
                let walked = img.walk_frames(|fh, off, payload| {
                    budget.take(payload.len());
                    fr_tx
                        .send(Ok((*fh, off, payload)))
                        .map_err(|_| ImageError::Output(io::Error::other("restore stopped")))
                });
                if let Err(e) = walked {
                    let _ = fr_tx.send(Err(e));
                }
            })
        };
        let walked = (|| {
            for frame in &fr_rx {
                let (fh, off, payload) = frame?;
                budget.give(payload.len());
                let fh = &fh;
                if fh.kind == FrameKind::Block {
                    let b = index.blocks.get(st.next_block as usize);
                    if b.map(|b| b.offset) != Some(off) {
                        return Err(ImageError::BadIndex(format!(
                            "block frame at {off} is not block {}",
                            st.next_block
                        )));
                    }
                    if st.after_records {
                        // A new window starts: the previous one is complete.
                        st.flush(&pool, &send)?;
                        st.pending.clear();
                        st.after_records = false;
                    }
                    if st.pending.is_empty() {
                        st.first_pending = st.next_block;
                    }
                    st.pending.push((*fh, payload));
                    st.next_block += 1;
                    continue;
                }
                if matches!(fh.kind, FrameKind::Index) {
                    return Err(ImageError::Corrupt {
                        offset: off,
                        what: "index frame among the records".into(),
                    });
                }
                st.after_records = true;
                st.frames_bytes += payload.len() + fh.aux as usize * PAGE_SIZE;
                st.frames.push((*fh, off, payload));
                if st.frames_bytes > FLUSH_BYTES {
                    st.flush(&pool, &send)?;
                }
            }
            st.flush(&pool, &send)
        })();
        // Stops the reader if we stopped early (its next send fails).
        drop(fr_rx);
        budget.close();
        reader.join().expect("frame reader thread panicked");
        drop(tx);
        let written = writer.join().expect("writer thread panicked");
        let (n, sum) = written.map_err(ImageError::Output)?;
        walked?;
        let (entry, next_block) = (st.entry, st.next_block);
        if entry != index.pages.len() || next_block != index.blocks.len() as u64 {
            return Err(ImageError::Truncated(format!(
                "frames hold {entry} of {} pages and {next_block} of {} blocks",
                index.pages.len(),
                index.blocks.len()
            )));
        }
        if n != index.stream_len || sum != index.stream_check {
            return Err(ImageError::StreamMismatch {
                what: format!(
                    "{n} bytes {}, saved {} bytes {}",
                    check.show(sum),
                    index.stream_len,
                    check.show(index.stream_check)
                ),
            });
        }
        Ok(RestoreStats {
            stream_bytes: n,
            elapsed: start.elapsed(),
        })
    })
}

/// Frames the reader thread may read ahead of regeneration (also bounded by
/// [`READ_AHEAD_BYTES`]).
const FRAMES_AHEAD: usize = 1024;

/// Frame payload bytes the reader thread may hold ahead of regeneration (about two windows
/// of compressed blocks); one frame more is allowed when nothing is held.
const READ_AHEAD_BYTES: usize = 32 << 20;

/// Bytes read ahead by the frame reader, so a run of large frames cannot pile up in memory.
#[derive(Default)]
struct ReadBudget {
    held: std::sync::Mutex<(usize, bool)>,
    freed: std::sync::Condvar,
}

impl ReadBudget {
    /// Waits until `n` more bytes fit (or nothing is held, or the consumer is gone).
    fn take(&self, n: usize) {
        let mut g = self.held.lock().expect("budget lock");
        while g.0 > 0 && g.0 + n > READ_AHEAD_BYTES && !g.1 {
            g = self.freed.wait(g).expect("budget lock");
        }
        g.0 += n;
    }

    fn give(&self, n: usize) {
        let mut g = self.held.lock().expect("budget lock");
        g.0 = g.0.saturating_sub(n);
        self.freed.notify_all();
    }

    /// The consumer stopped: never wait again.
    fn close(&self) {
        self.held.lock().expect("budget lock").1 = true;
        self.freed.notify_all();
    }
}

/// Largest written buffer handed back for reuse (a PAGE_DATA record from Xen is at most
/// 1024 pages, about 4 MiB).
const MAX_RECYCLED: usize = 8 << 20;

/// Regenerated bytes gathered before a window is flushed even if its next block frame has
/// not arrived (a window is normally about 16 MiB; this bounds windows without blocks).
const FLUSH_BYTES: usize = 64 << 20;

thread_local! {
    /// Per-thread block scratch: decompressed once, its pages copied to their places.
    static BLOCK_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

struct Restorer<'a, R> {
    img: &'a ImageReader<R>,
    /// For every page that has duplicates: the entry of its last duplicate.
    dup_last: &'a DupLast,
    /// The current window's block frames, blocks `first_pending..`.
    pending: Vec<(FrameHeader, Cow<'a, [u8]>)>,
    first_pending: u64,
    /// The current window's other frames, in stream order.
    frames: Vec<(FrameHeader, u64, Cow<'a, [u8]>)>,
    frames_bytes: usize,
    /// Frames other than blocks arrived since the last block frame.
    after_records: bool,
    dup_cache: HashMap<u64, Vec<u8>>,
    next_block: u64,
    entry: usize,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    check: StreamCheck,
}

/// A filled run's share of the stream check, taken by the worker that filled it.
enum RunSum {
    /// Not filled yet.
    None,
    Crc(u32),
    /// The fingerprints of its pages, in order.
    Fingerprints(Vec<u8>),
}

impl RunSum {
    fn of(check: StreamCheck, run: &[u8]) -> Self {
        match check {
            StreamCheck::Crc32c => RunSum::Crc(crate::crc::crc32c(run)),
            StreamCheck::Digest => {
                let mut v = Vec::with_capacity(run.len() / PAGE_SIZE * FINGERPRINT_LEN);
                push_fingerprints(run, &mut v);
                RunSum::Fingerprints(v)
            }
        }
    }
}

/// A regenerated buffer's share of the stream check, combined by the writer.
enum BufSum {
    /// The buffer's CRC32C.
    Crc(u32),
    /// The digest takes the buffer's first `head` bytes (all of a verbatim record's) and
    /// then these fingerprints of its pages.
    Digest { head: usize, fps: Vec<u8> },
}

/// Where a data page of the window goes: output buffer, byte offset.
type Loc = (usize, usize);

/// How a run of data pages is filled.
#[derive(Clone, Copy)]
enum Fill {
    /// Every u64 is this word (zero pages too).
    Word(u64),
    /// From this block, starting at this slot.
    Block(u64, usize),
    /// A duplicate of a page of an earlier window, copied from the cache.
    Cached(u64),
}

/// For every page that has duplicates, the entry of its last duplicate: (page, last),
/// sorted by page.
struct DupLast(Vec<(u64, u64)>);

impl DupLast {
    fn new(pages: &[crate::image::index::PageEntry]) -> Self {
        let mut v: Vec<(u64, u64)> = pages
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e.class {
                PageClass::Dup(src) => Some((src, i as u64)),
                _ => None,
            })
            .collect();
        // Entries are in order: the last pair of each page after a stable sort is its last.
        v.sort_by_key(|&(src, _)| src);
        v.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                earlier.1 = later.1;
            }
            same
        });
        DupLast(v)
    }

    fn get(&self, src: u64) -> Option<u64> {
        let k = self.0.partition_point(|&(s, _)| s < src);
        self.0.get(k).filter(|&&(s, _)| s == src).map(|&(_, l)| l)
    }

    /// The pages in `from..to` that have duplicates, with their last duplicate.
    fn range(&self, from: u64, to: u64) -> &[(u64, u64)] {
        let a = self.0.partition_point(|&(s, _)| s < from);
        let b = self.0.partition_point(|&(s, _)| s < to);
        &self.0[a..b]
    }
}

/// One piece of a window's parallel fill; each writes its pages and their check.
enum Task<'b> {
    Word(u64, &'b mut [u8], &'b mut RunSum),
    Cached(&'b [u8], &'b mut [u8], &'b mut RunSum),
    /// Pending block `b` of the window and its runs: (first slot, pages, check).
    Block(usize, Vec<(usize, &'b mut [u8], &'b mut RunSum)>),
}

/// Copies the pages of `raw` (a decoded block) from `slot` on into `run`.
fn copy_slots(block: u64, raw: &[u8], slot: usize, run: &mut [u8]) -> Result<(), ImageError> {
    let src = raw.get(slot * PAGE_SIZE..slot * PAGE_SIZE + run.len());
    run.copy_from_slice(
        src.ok_or_else(|| ImageError::BadIndex(format!("block {block} has no slot {slot}")))?,
    );
    Ok(())
}

/// Decompresses a whole checked block payload straight into `dst` (its exact raw size).
fn decode_block_into(
    block: u64,
    fh: &FrameHeader,
    payload: &[u8],
    pages: u16,
    dst: &mut [u8],
) -> Result<(), ImageError> {
    let raw = pages as usize * PAGE_SIZE;
    if fh.aux as usize != raw || raw > crate::codec::MAX_BLOCK_RAW || dst.len() != raw {
        return Err(ImageError::Corrupt {
            offset: 0,
            what: format!("block {block} raw length {}", fh.aux),
        });
    }
    crate::codec::decompress(fh.sub, payload, dst)
        .map_err(|source| ImageError::Decompress { block, source })
}

impl<R: ReadAt + Sync> Restorer<'_, R> {
    /// Regenerates the gathered frames: builds every record's header, then fills all its
    /// pages in parallel (each block decompressed once, its pages copied straight into the
    /// records), then duplicates, and hands the buffers to the writer in order.
    fn flush(
        &mut self,
        pool: &rayon::ThreadPool,
        send: &dyn Fn((Vec<u8>, BufSum)) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let index = self.img.index();
        let frames = std::mem::take(&mut self.frames);
        self.frames_bytes = 0;
        let mut bufs: Vec<Vec<u8>> = Vec::with_capacity(frames.len());
        // Per buffer: the bytes before its pages (all of a verbatim record's).
        let mut heads: Vec<usize> = Vec::with_capacity(frames.len());
        // Per buffer: its length; per page record: its buffer, length and frame payload.
        let mut lens: Vec<usize> = Vec::with_capacity(frames.len());
        let mut records = Vec::with_capacity(frames.len());
        // Per data page of the window: its entry and where it goes.
        let mut locs: Vec<(u64, Loc)> = Vec::new();
        let win_first = self.entry;
        for (fh, off, payload) in frames {
            match fh.kind {
                FrameKind::Verbatim => {
                    heads.push(payload.len());
                    lens.push(payload.len());
                    bufs.push(payload.into_owned());
                }
                _ => {
                    let count = fh.aux as usize;
                    if payload.len() != 8 + 8 * count || count == 0 {
                        return Err(ImageError::Corrupt {
                            offset: off,
                            what: "page record length".into(),
                        });
                    }
                    let words = &payload[8..];
                    let entries =
                        index
                            .pages
                            .get(self.entry..self.entry + count)
                            .ok_or_else(|| {
                                ImageError::BadIndex(format!(
                                    "page record at {off} runs past the index"
                                ))
                            })?;
                    let data = entries
                        .iter()
                        .filter(|e| e.class != PageClass::NoData)
                        .count();
                    let len = 8 + 8 * count + data * PAGE_SIZE;
                    lens.push(8 + len);
                    let mut at = 16 + words.len();
                    for (k, e) in entries.iter().enumerate() {
                        let w = u64::from_le_bytes(
                            words[8 * k..8 * k + 8].try_into().expect("8 bytes"),
                        );
                        if w != e.word {
                            return Err(ImageError::BadIndex(format!(
                                "entry {} word differs from its record",
                                self.entry + k
                            )));
                        }
                        if e.class != PageClass::NoData {
                            locs.push(((self.entry + k) as u64, (bufs.len(), at)));
                            at += PAGE_SIZE;
                        }
                    }
                    heads.push(16 + words.len());
                    // A recycled buffer keeps its initialised length: resizing it below
                    // zero-fills only growth, and every byte is overwritten.
                    bufs.push(self.spare.try_recv().unwrap_or_default());
                    records.push((bufs.len() - 1, len, payload));
                    self.entry += count;
                }
            }
        }
        // Sized in parallel: zeroing and faulting in fresh memory is most of a window's
        // set-up until the writer gives buffers back.
        pool.install(|| {
            bufs.par_iter_mut()
                .zip(&lens)
                .for_each(|(b, &n)| b.resize(n, 0))
        });
        for (bi, len, payload) in records {
            let buf = &mut bufs[bi];
            let words = &payload[8..];
            buf[0..4].copy_from_slice(&LIBXC_PAGE_DATA.to_le_bytes());
            buf[4..8].copy_from_slice(&(len as u32).to_le_bytes());
            buf[8..12].copy_from_slice(&((words.len() / 8) as u32).to_le_bytes());
            buf[12..16].copy_from_slice(&payload[..4]);
            buf[16..16 + words.len()].copy_from_slice(words);
        }

        // Runs of data pages filled the same way: a block's consecutive slots that sit next
        // to each other in one record are one run (usually the whole block, which is then
        // decompressed straight into the record). A duplicate of a page of this window is
        // filled from that page's block slot like the page itself, one of an earlier window
        // from the cache.
        let first = self.first_pending;
        let nblocks = self.pending.len();
        let mut runs: Vec<(Fill, usize, usize)> = Vec::new(); // (fill, buffer, pages)
        let mut cached_used: Vec<u64> = Vec::new();
        for &(i, loc) in &locs {
            let fill = match index.pages[i as usize].class {
                PageClass::NoData => unreachable!("pages without data have no place"),
                PageClass::Zero => Fill::Word(0),
                PageClass::Word(v) => Fill::Word(v),
                PageClass::Block { block, slot } => Fill::Block(block, slot as usize),
                PageClass::Dup(src) => {
                    let missing = || {
                        ImageError::BadIndex(format!(
                            "entry {i} duplicates {src}, not yet restored"
                        ))
                    };
                    if self.dup_cache.contains_key(&src) {
                        cached_used.push(src);
                        Fill::Cached(src)
                    } else if src >= i || (src as usize) < win_first {
                        return Err(missing());
                    } else {
                        match index.pages[src as usize].class {
                            PageClass::Block { block, slot } => Fill::Block(block, slot as usize),
                            _ => return Err(missing()),
                        }
                    }
                }
            };
            if let Some((Fill::Block(b, s0), buf, n)) = runs.last_mut() {
                if let Fill::Block(block, slot) = fill {
                    if *buf == loc.0 && *b == block && *s0 + *n == slot {
                        *n += 1;
                        continue;
                    }
                }
            }
            runs.push((fill, loc.0, 1));
        }
        // Carve the buffers into the runs' slices, in order, each with its check's place.
        let mut run_sums: Vec<RunSum> = (0..runs.len()).map(|_| RunSum::None).collect();
        let mut per_block: Vec<Vec<(usize, &mut [u8], &mut RunSum)>> =
            (0..nblocks).map(|_| Vec::new()).collect();
        let mut tasks: Vec<Task<'_>> = Vec::new();
        let mut elsewhere: Vec<(u64, usize, &mut [u8], &mut RunSum)> = Vec::new();
        {
            let mut ri = 0;
            let mut sum_slots = run_sums.iter_mut();
            for (bi, buf) in bufs.iter_mut().enumerate() {
                let Some(&(_, rb, _)) = runs.get(ri) else {
                    break;
                };
                if rb != bi {
                    continue;
                }
                let mut rest = &mut buf[heads[bi]..];
                while let Some(&(fill, rb, n)) = runs.get(ri) {
                    if rb != bi {
                        break;
                    }
                    let (run, tail) = rest.split_at_mut(n * PAGE_SIZE);
                    rest = tail;
                    ri += 1;
                    let sum = sum_slots.next().expect("one check per run");
                    match fill {
                        Fill::Word(v) => tasks.push(Task::Word(v, run, sum)),
                        Fill::Cached(src) => {
                            let page = &self.dup_cache[&src];
                            tasks.push(Task::Cached(page, run, sum));
                        }
                        Fill::Block(block, slot) => {
                            let b = block.wrapping_sub(first);
                            if b < nblocks as u64 {
                                per_block[b as usize].push((slot, run, sum));
                            } else {
                                elsewhere.push((block, slot, run, sum));
                            }
                        }
                    }
                }
            }
        }
        tasks.extend(
            per_block
                .into_iter()
                .enumerate()
                .filter(|(_, runs)| !runs.is_empty())
                .map(|(b, runs)| Task::Block(b, runs)),
        );
        let pending = &self.pending;
        let check = self.check;
        pool.install(|| {
            tasks
                .into_par_iter()
                .try_for_each(|task| -> Result<(), ImageError> {
                    match task {
                        Task::Word(v, run, sum) => {
                            if v == 0 {
                                run.fill(0);
                            } else {
                                for c in run.chunks_exact_mut(8) {
                                    c.copy_from_slice(&v.to_le_bytes());
                                }
                            }
                            *sum = RunSum::of(check, run);
                            Ok(())
                        }
                        Task::Cached(page, run, sum) => {
                            run.copy_from_slice(page);
                            *sum = RunSum::of(check, run);
                            Ok(())
                        }
                        Task::Block(b, mut runs) => {
                            let block = first + b as u64;
                            let (fh, payload) = &pending[b];
                            let pages = index.blocks[block as usize].pages;
                            let raw = pages as usize * PAGE_SIZE;
                            // The whole block in one run: decompressed in place, the other runs
                            // (duplicates of its pages) copied from there.
                            if let Some(w) =
                                runs.iter().position(|(s, r, _)| *s == 0 && r.len() == raw)
                            {
                                let (_, whole, sum) = runs.swap_remove(w);
                                decode_block_into(block, fh, payload, pages, whole)?;
                                *sum = RunSum::of(check, whole);
                                for (slot, run, sum) in runs {
                                    copy_slots(block, whole, slot, run)?;
                                    *sum = RunSum::of(check, run);
                                }
                                return Ok(());
                            }
                            BLOCK_SCRATCH.with(|scratch| {
                                let mut scratch = scratch.borrow_mut();
                                decode_block_payload(block, fh, payload, pages, &mut scratch)?;
                                for (slot, run, sum) in runs {
                                    copy_slots(block, &scratch, slot, run)?;
                                    *sum = RunSum::of(check, run);
                                }
                                Ok(())
                            })
                        }
                    }
                })
        })?;
        for (block, slot, run, sum) in elsewhere {
            let mut raw = Vec::new();
            self.img.read_block(block, &mut raw)?;
            copy_slots(block, &raw, slot, run)?;
            *sum = RunSum::of(check, run);
        }

        // Cached first copies whose last duplicate has been written are dropped; first
        // copies of this window whose duplicates come in later windows are kept.
        let last = self.entry as u64;
        for src in cached_used {
            if self.dup_last.get(src).is_none_or(|l| l < last) {
                self.dup_cache.remove(&src);
            }
        }
        for &(i, l) in self.dup_last.range(win_first as u64, last) {
            if l >= last && matches!(index.pages[i as usize].class, PageClass::Block { .. }) {
                let k = locs.partition_point(|&(e, _)| e < i);
                if let Some(&(_, (b, o))) = locs.get(k).filter(|&&(e, _)| e == i) {
                    self.dup_cache.insert(i, bufs[b][o..o + PAGE_SIZE].to_vec());
                }
            }
        }
        // Each buffer's check: its head (or all of it) then its runs' checks, in order; the
        // writer combines the buffers'.
        let mut sums = Vec::with_capacity(bufs.len());
        let mut runs_sums = runs.iter().zip(run_sums).peekable();
        for (bi, buf) in bufs.iter().enumerate() {
            let head = heads[bi];
            let (mut crc, mut fps) = (0u32, Vec::new());
            if check == StreamCheck::Crc32c {
                crc = crate::crc::crc32c(&buf[..head]);
            }
            while let Some((&(_, rb, n), _)) = runs_sums.peek() {
                if rb != bi {
                    break;
                }
                let (_, sum) = runs_sums.next().expect("peeked");
                match sum {
                    RunSum::Crc(rc) => crc = crate::crc::combine(crc, rc, n * PAGE_SIZE),
                    RunSum::Fingerprints(f) if fps.is_empty() => fps = f,
                    RunSum::Fingerprints(f) => fps.extend_from_slice(&f),
                    RunSum::None => unreachable!("every run was filled"),
                }
            }
            sums.push(match check {
                StreamCheck::Crc32c => BufSum::Crc(crc),
                StreamCheck::Digest => BufSum::Digest { head, fps },
            });
        }
        for (buf, sum) in bufs.into_iter().zip(sums) {
            send((buf, sum))?;
        }
        Ok(())
    }
}
