//! The restore pipeline: image in, the original `xl save` stream out, byte for byte.
//!
//! The frames are read in order. Each window's blocks come before its records, so the
//! blocks are decompressed in parallel (rayon) as soon as the first record after them
//! arrives; the records are then regenerated and handed to a writer thread. Duplicate pages
//! are served from a cache that keeps a first copy only until its last duplicate is written.
//! The whole regenerated stream is checked against the length and CRC32C saved in the index.

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
    let (tx, rx) = sync_channel::<Vec<u8>>(4);

    std::thread::scope(|s| {
        let writer = s.spawn(move || -> io::Result<(u64, u32)> {
            let (mut n, mut crc) = (0u64, 0u32);
            for buf in rx {
                crc = crc32c::crc32c_append(crc, &buf);
                n += buf.len() as u64;
                out.write_all(&buf)?;
                progress(n);
            }
            out.flush()?;
            Ok((n, crc))
        });

        let mut pending: Vec<(u64, FrameHeader, Vec<u8>)> = Vec::new();
        let mut decoded: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut dup_cache: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut next_block = 0u64;
        let mut entry = 0usize;
        let send = |buf: Vec<u8>| {
            tx.send(buf)
                .map_err(|_| ImageError::Output(io::Error::other("writer stopped")))
        };

        let walked = img.walk_frames(|fh, off, payload| {
            if fh.kind == FrameKind::Block {
                let b = index.blocks.get(next_block as usize);
                if b.map(|b| b.offset) != Some(off) {
                    return Err(ImageError::BadIndex(format!(
                        "block frame at {off} is not block {next_block}"
                    )));
                }
                pending.push((next_block, *fh, payload));
                next_block += 1;
                return Ok(());
            }
            if !pending.is_empty() {
                let done: Result<Vec<(u64, Vec<u8>)>, ImageError> = pool.install(|| {
                    pending
                        .par_iter()
                        .map(|(b, fh, payload)| {
                            let mut raw = Vec::new();
                            decode_block_payload(
                                *b,
                                fh,
                                payload,
                                index.blocks[*b as usize].pages,
                                &mut raw,
                            )?;
                            Ok((*b, raw))
                        })
                        .collect()
                });
                decoded = done?.into_iter().collect();
                pending.clear();
            }
            match fh.kind {
                FrameKind::Verbatim => send(payload),
                FrameKind::PageRecord => {
                    let count = fh.aux as usize;
                    if payload.len() != 8 + 8 * count || count == 0 {
                        return Err(ImageError::Corrupt {
                            offset: off,
                            what: "page record length".into(),
                        });
                    }
                    let words = &payload[8..];
                    let entries = index.pages.get(entry..entry + count).ok_or_else(|| {
                        ImageError::BadIndex(format!("page record at {off} runs past the index"))
                    })?;
                    let data = entries
                        .iter()
                        .filter(|e| e.class != PageClass::NoData)
                        .count();
                    let len = 8 + 8 * count + data * PAGE_SIZE;
                    let mut buf = Vec::with_capacity(8 + len);
                    buf.extend_from_slice(&LIBXC_PAGE_DATA.to_le_bytes());
                    buf.extend_from_slice(&(len as u32).to_le_bytes());
                    buf.extend_from_slice(&(count as u32).to_le_bytes());
                    buf.extend_from_slice(&payload[..4]);
                    buf.extend_from_slice(words);
                    for (k, e) in entries.iter().enumerate() {
                        let i = (entry + k) as u64;
                        let w = u64::from_le_bytes(
                            words[8 * k..8 * k + 8].try_into().expect("8 bytes"),
                        );
                        if w != e.word {
                            return Err(ImageError::BadIndex(format!(
                                "entry {i} word differs from its record"
                            )));
                        }
                        match e.class {
                            PageClass::NoData => {}
                            PageClass::Zero => buf.resize(buf.len() + PAGE_SIZE, 0),
                            PageClass::Word(v) => {
                                for _ in 0..PAGE_SIZE / 8 {
                                    buf.extend_from_slice(&v.to_le_bytes());
                                }
                            }
                            PageClass::Block { block, slot } => {
                                let s = slot as usize * PAGE_SIZE;
                                let page_start = buf.len();
                                match decoded.get(&block) {
                                    Some(raw) => buf.extend_from_slice(&raw[s..s + PAGE_SIZE]),
                                    None => {
                                        let mut raw = Vec::new();
                                        img.read_block(block, &mut raw)?;
                                        buf.extend_from_slice(&raw[s..s + PAGE_SIZE]);
                                    }
                                }
                                if dup_last.contains_key(&i) {
                                    dup_cache.insert(i, buf[page_start..].to_vec());
                                }
                            }
                            PageClass::Dup(src) => {
                                let page = dup_cache.get(&src).ok_or_else(|| {
                                    ImageError::BadIndex(format!(
                                        "entry {i} duplicates {src}, not yet restored"
                                    ))
                                })?;
                                buf.extend_from_slice(page);
                                if dup_last.get(&src) == Some(&i) {
                                    dup_cache.remove(&src);
                                }
                            }
                        }
                    }
                    entry += count;
                    send(buf)
                }
                FrameKind::Index | FrameKind::Block => Err(ImageError::Corrupt {
                    offset: off,
                    what: "index frame among the records".into(),
                }),
            }
        });
        drop(tx);
        let written = writer.join().expect("writer thread panicked");
        let (n, crc) = written.map_err(ImageError::Output)?;
        walked?;
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
