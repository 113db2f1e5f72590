//! The restore pipeline: image in, the original `xl save` stream out, byte for byte.
//!
//! The frames are read in order. Each window's blocks come before its records, so the
//! blocks are decompressed in parallel (rayon) as soon as the first record after them
//! arrives; the records are then regenerated and handed to a writer thread. Duplicate pages
//! are served from a cache that keeps a first copy only until its last duplicate is written.
//! The whole regenerated stream is checked against the length and CRC32C saved in the index.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::image::frame::{FrameHeader, FrameKind};
use crate::image::index::PageClass;
use crate::image::reader::decode_block_payload;
use crate::image::{ImageError, ImageReader, ReadAt};
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
/// regenerated stream whose length or CRC differs from the saved one.
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
    // For every page that has duplicates: the entry of its last duplicate.
    let mut dup_last: HashMap<u64, u64> = HashMap::new();
    for (i, e) in index.pages.iter().enumerate() {
        if let PageClass::Dup(src) = e.class {
            dup_last.insert(src, i as u64);
        }
    }
    let (tx, rx) = sync_channel::<(Vec<u8>, u32)>(4);
    // Record buffers come back from the writer for reuse: no fresh (zeroed, faulted-in)
    // memory per record.
    let (spare_tx, spare_rx) = std::sync::mpsc::channel::<Vec<u8>>();

    let budget = ReadBudget::default();
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> io::Result<(u64, u32)> {
            let (mut n, mut crc) = (0u64, 0u32);
            for (buf, buf_crc) in rx {
                // Each buffer's CRC32C was taken by the workers: only combined here.
                crc = crate::crc::combine(crc, buf_crc, buf.len());
                n += buf.len() as u64;
                out.write_all(&buf)?;
                progress(n);
                if buf.capacity() <= MAX_RECYCLED {
                    let _ = spare_tx.send(buf);
                }
            }
            out.flush()?;
            Ok((n, crc))
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
        };
        let send = |buf: (Vec<u8>, u32)| {
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
        let (n, crc) = written.map_err(ImageError::Output)?;
        walked?;
        let (entry, next_block) = (st.entry, st.next_block);
        if entry != index.pages.len() || next_block != index.blocks.len() as u64 {
            return Err(ImageError::Truncated(format!(
                "frames hold {entry} of {} pages and {next_block} of {} blocks",
                index.pages.len(),
                index.blocks.len()
            )));
        }
        if n != index.stream_len || crc != index.stream_crc {
            return Err(ImageError::StreamMismatch {
                what: format!(
                    "{n} bytes crc32c {crc:#010x}, saved {} bytes crc32c {:#010x}",
                    index.stream_len, index.stream_crc
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

/// Bytes per parallel CRC32C piece of the regenerated stream.
const CRC_PIECE: usize = 1 << 20;

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
    dup_last: &'a HashMap<u64, u64>,
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
    /// A duplicate, copied once the first copies are in place.
    Later,
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
        send: &dyn Fn((Vec<u8>, u32)) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let index = self.img.index();
        let frames = std::mem::take(&mut self.frames);
        self.frames_bytes = 0;
        let mut bufs: Vec<Vec<u8>> = Vec::with_capacity(frames.len());
        // Per data page of the window: its entry and where it goes.
        let mut locs: Vec<(u64, Loc)> = Vec::new();
        let win_first = self.entry;
        for (fh, off, payload) in frames {
            match fh.kind {
                FrameKind::Verbatim => bufs.push(payload.into_owned()),
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
                    // A recycled buffer keeps its initialised length: resizing it zero-fills
                    // only growth, and every byte is overwritten below.
                    let mut buf = self.spare.try_recv().unwrap_or_default();
                    buf.resize(8 + len, 0);
                    buf[0..4].copy_from_slice(&LIBXC_PAGE_DATA.to_le_bytes());
                    buf[4..8].copy_from_slice(&(len as u32).to_le_bytes());
                    buf[8..12].copy_from_slice(&(count as u32).to_le_bytes());
                    buf[12..16].copy_from_slice(&payload[..4]);
                    buf[16..16 + words.len()].copy_from_slice(words);
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
                    bufs.push(buf);
                    self.entry += count;
                }
            }
        }

        // Runs of data pages filled the same way: a block's consecutive slots that sit next
        // to each other in one record are one run (usually the whole block, which is then
        // decompressed straight into the record).
        let first = self.first_pending;
        let nblocks = self.pending.len();
        let mut runs: Vec<(Fill, usize, usize)> = Vec::new(); // (fill, buffer, pages)
        let mut dups: Vec<(u64, u64, Loc)> = Vec::new();
        for &(i, loc) in &locs {
            let fill = match index.pages[i as usize].class {
                PageClass::NoData => unreachable!("pages without data have no place"),
                PageClass::Zero => Fill::Word(0),
                PageClass::Word(v) => Fill::Word(v),
                PageClass::Block { block, slot } => Fill::Block(block, slot as usize),
                PageClass::Dup(src) => {
                    dups.push((i, src, loc));
                    Fill::Later
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
        // Carve the buffers into the runs' slices, in order.
        let mut per_block: Vec<Vec<(usize, &mut [u8])>> =
            (0..nblocks).map(|_| Vec::new()).collect();
        let mut elsewhere: Vec<(u64, usize, &mut [u8])> = Vec::new();
        // Zero and one-word runs, filled by the workers along with the blocks.
        let mut word_runs: Vec<(u64, &mut [u8])> = Vec::new();
        {
            let mut ri = 0;
            let mut li = 0;
            for (bi, buf) in bufs.iter_mut().enumerate() {
                let Some(&(_, (b0, start))) = locs.get(li) else {
                    break;
                };
                if b0 != bi {
                    continue;
                }
                let mut rest = &mut buf[start..];
                while let Some(&(fill, rb, n)) = runs.get(ri) {
                    if rb != bi {
                        break;
                    }
                    let (run, tail) = rest.split_at_mut(n * PAGE_SIZE);
                    rest = tail;
                    ri += 1;
                    li += n;
                    match fill {
                        Fill::Word(v) => word_runs.push((v, run)),
                        Fill::Block(block, slot) => {
                            let b = block.wrapping_sub(first);
                            if b < nblocks as u64 {
                                per_block[b as usize].push((slot, run));
                            } else {
                                elsewhere.push((block, slot, run));
                            }
                        }
                        Fill::Later => {}
                    }
                }
            }
        }
        let pending = &self.pending;
        pool.install(|| {
            word_runs.into_par_iter().for_each(|(v, run)| {
                if v == 0 {
                    run.fill(0);
                } else {
                    for c in run.chunks_exact_mut(8) {
                        c.copy_from_slice(&v.to_le_bytes());
                    }
                }
            });
            per_block
                .into_par_iter()
                .enumerate()
                .try_for_each(|(b, runs)| {
                    let block = first + b as u64;
                    let (fh, payload) = &pending[b];
                    let pages = index.blocks[block as usize].pages;
                    let whole =
                        matches!(&runs[..], [(0, run)] if run.len() == pages as usize * PAGE_SIZE);
                    if whole {
                        let (_, run) = runs.into_iter().next().expect("one run");
                        return decode_block_into(block, fh, payload, pages, run);
                    }
                    if runs.is_empty() {
                        return Ok(());
                    }
                    BLOCK_SCRATCH.with(|raw| {
                        let mut raw = raw.borrow_mut();
                        decode_block_payload(block, fh, payload, pages, &mut raw)?;
                        for (slot, run) in runs {
                            copy_slots(block, &raw, slot, run)?;
                        }
                        Ok(())
                    })
                })
        })?;
        for (block, slot, run) in elsewhere {
            let mut raw = Vec::new();
            self.img.read_block(block, &mut raw)?;
            copy_slots(block, &raw, slot, run)?;
        }

        // Duplicates, from a first copy in this window or from the cache.
        let loc_of = |e: u64| -> Option<Loc> {
            let k = locs.partition_point(|&(i, _)| i < e);
            locs.get(k).filter(|&&(i, _)| i == e).map(|&(_, l)| l)
        };
        for (i, src, (bd, od)) in dups {
            let missing =
                || ImageError::BadIndex(format!("entry {i} duplicates {src}, not yet restored"));
            let mut tmp = [0u8; PAGE_SIZE];
            match self.dup_cache.get(&src) {
                Some(p) => tmp.copy_from_slice(p),
                None => {
                    if src >= i || (src as usize) < win_first {
                        return Err(missing());
                    }
                    let (bs, os) = loc_of(src).ok_or_else(missing)?;
                    if !matches!(index.pages[src as usize].class, PageClass::Block { .. }) {
                        return Err(missing());
                    }
                    tmp.copy_from_slice(&bufs[bs][os..os + PAGE_SIZE]);
                }
            }
            bufs[bd][od..od + PAGE_SIZE].copy_from_slice(&tmp);
            if self.dup_last.get(&src) == Some(&i) {
                self.dup_cache.remove(&src);
            }
        }
        // First copies whose duplicates come in later windows.
        let last = self.entry as u64;
        for &(i, (b, o)) in &locs {
            if let Some(&l) = self.dup_last.get(&i) {
                if l >= last && matches!(index.pages[i as usize].class, PageClass::Block { .. }) {
                    self.dup_cache.insert(i, bufs[b][o..o + PAGE_SIZE].to_vec());
                }
            }
        }
        // The stream CRC32C of the window's buffers, in parallel pieces of at most 1 MiB,
        // combined per buffer here and across buffers by the writer.
        let pieces: Vec<(usize, &[u8])> = bufs
            .iter()
            .enumerate()
            .flat_map(|(b, buf)| buf.chunks(CRC_PIECE).map(move |c| (b, c)))
            .collect();
        let piece_crcs: Vec<u32> = pool.install(|| {
            pieces
                .par_iter()
                .map(|(_, c)| crate::crc::crc32c(c))
                .collect()
        });
        let mut crcs = vec![0u32; bufs.len()];
        for (&(b, c), &pc) in pieces.iter().zip(&piece_crcs) {
            crcs[b] = crate::crc::combine(crcs[b], pc, c.len());
        }
        for (buf, crc) in bufs.into_iter().zip(crcs) {
            send((buf, crc))?;
        }
        Ok(())
    }
}
