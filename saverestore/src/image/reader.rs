//! Random-access reader of an image: opens header, trailer and index, extracts single pages
//! by decompressing one block, and walks the frames in order for restore and inspect.

use std::borrow::Cow;

use super::frame::{FileHeader, FrameHeader, FrameKind, Trailer};
use super::index::{Index, PageClass};
use super::{ImageError, ReadAt, MAX_INDEX_RAW};
use crate::codec;
use crate::stream::format::{page_pfn, page_type, page_type_name, PAGE_SIZE};

thread_local! {
    /// Per-thread frame and block buffers of [`ImageReader::extract`]: a page costs no
    /// fresh (zeroed) memory.
    static EXTRACT_SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// An open image.
#[derive(Debug)]
pub struct ImageReader<R> {
    storage: R,
    header: FileHeader,
    trailer: Trailer,
    index: Index,
    /// (pfn, entry index) sorted by pfn; the last entry of a pfn wins, as on restore.
    by_pfn: Vec<(u64, u64)>,
}

fn io_err(e: std::io::Error, what: &str) -> ImageError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ImageError::Truncated(format!("ends inside {what}"))
    } else {
        ImageError::Io(e)
    }
}

impl<R: ReadAt> ImageReader<R> {
    /// Opens and validates header, trailer and index.
    ///
    /// # Errors
    /// Bad magic or version, a missing trailer (truncated image), a damaged index.
    pub fn open(storage: R) -> Result<Self, ImageError> {
        let size = storage.size().map_err(ImageError::Io)?;
        let mut hb = [0u8; FileHeader::LEN];
        storage
            .read_exact_at(&mut hb, 0)
            .map_err(|e| io_err(e, "the file header"))?;
        let header = FileHeader::decode(&hb)?;
        if size < (FileHeader::LEN + Trailer::LEN) as u64 {
            return Err(ImageError::Truncated(format!("only {size} bytes")));
        }
        let at = size - Trailer::LEN as u64;
        let mut tb = [0u8; Trailer::LEN];
        storage
            .read_exact_at(&mut tb, at)
            .map_err(|e| io_err(e, "the trailer"))?;
        let trailer = Trailer::decode(&tb, at)?;
        let (fh, payload) = read_frame_at(&storage, trailer.index_offset)?;
        if fh.kind != FrameKind::Index || fh.aux > MAX_INDEX_RAW {
            return Err(ImageError::BadIndex(format!(
                "index frame of kind {:?}, raw length {}",
                fh.kind, fh.aux
            )));
        }
        let raw = zstd::bulk::decompress(&payload, fh.aux as usize)
            .map_err(|e| ImageError::BadIndex(format!("cannot decompress: {e}")))?;
        let index = Index::decode(&raw, header.block_pages)?;
        for (i, b) in index.blocks.iter().enumerate() {
            if b.offset < FileHeader::LEN as u64
                || b.offset + b.frame_len as u64 > trailer.index_offset
            {
                return Err(ImageError::BadIndex(format!(
                    "block {i} lies outside the frames"
                )));
            }
        }
        let mut by_pfn: Vec<(u64, u64)> = index
            .pages
            .iter()
            .enumerate()
            .map(|(i, e)| (page_pfn(e.word), i as u64))
            .collect();
        by_pfn.sort_unstable();
        by_pfn.dedup_by(|later, earlier| {
            if later.0 == earlier.0 {
                earlier.1 = later.1;
                true
            } else {
                false
            }
        });
        Ok(ImageReader {
            storage,
            header,
            trailer,
            index,
            by_pfn,
        })
    }

    pub fn header(&self) -> &FileHeader {
        &self.header
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Offset where the frames end (the index frame).
    pub fn frames_end(&self) -> u64 {
        self.trailer.index_offset
    }

    /// Total image size.
    pub fn image_len(&self) -> u64 {
        self.trailer.trailer_offset + Trailer::LEN as u64
    }

    pub fn storage(&self) -> &R {
        &self.storage
    }

    /// Decompresses block `block` into `out` (resized to the block's raw length).
    ///
    /// # Errors
    /// Checksum mismatch or a block that does not decompress.
    pub fn read_block(&self, block: u64, out: &mut Vec<u8>) -> Result<(), ImageError> {
        let mut frame = Vec::new();
        self.read_block_with(block, &mut frame, out)
    }

    /// [`read_block`](Self::read_block) with a buffer for the frame, where it must be read
    /// (storage in memory lends it).
    fn read_block_with(
        &self,
        block: u64,
        frame: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), ImageError> {
        let e = self
            .index
            .blocks
            .get(block as usize)
            .ok_or_else(|| ImageError::BadIndex(format!("no block {block}")))?;
        let len = e.frame_len as usize;
        let lent = self.storage.as_bytes().and_then(|b| {
            let at = usize::try_from(e.offset).ok()?;
            b.get(at..at.checked_add(len)?)
        });
        let bytes = match lent {
            Some(b) => b,
            None => {
                // A reused buffer keeps its initialised length: only growth is zero-filled.
                frame.resize(len, 0);
                self.storage
                    .read_exact_at(frame, e.offset)
                    .map_err(|err| io_err(err, "a block"))?;
                &frame[..]
            }
        };
        decode_block(block, e.offset, e.pages, bytes, out)
    }

    /// Entry index holding `pfn` (the last one if the stream sent it more than once).
    pub fn entry_of(&self, pfn: u64) -> Option<u64> {
        self.by_pfn
            .binary_search_by_key(&pfn, |&(p, _)| p)
            .ok()
            .map(|i| self.by_pfn[i].1)
    }

    /// The 4096 bytes of guest page `pfn`.
    ///
    /// # Errors
    /// Unknown pfn, a pfn without data (XTAB, BROKEN, XALLOC), a corrupted block.
    pub fn extract(&self, pfn: u64) -> Result<Vec<u8>, ImageError> {
        let i = self.entry_of(pfn).ok_or(ImageError::PfnNotFound(pfn))?;
        let e = self.index.pages[i as usize];
        let class = match e.class {
            PageClass::Dup(src) => self.index.pages[src as usize].class,
            c => c,
        };
        match class {
            PageClass::NoData => Err(ImageError::PfnHasNoData {
                pfn,
                kind: page_type_name(page_type(e.word)),
            }),
            PageClass::Zero => Ok(vec![0u8; PAGE_SIZE]),
            PageClass::Word(w) => Ok(w.to_le_bytes().repeat(PAGE_SIZE / 8)),
            PageClass::Block { block, slot } => EXTRACT_SCRATCH.with(|scratch| {
                let (frame, raw) = &mut *scratch.borrow_mut();
                self.read_block_with(block, frame, raw)?;
                let s = slot as usize * PAGE_SIZE;
                raw.get(s..s + PAGE_SIZE)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| {
                        ImageError::BadIndex(format!("block {block} has no slot {slot}"))
                    })
            }),
            PageClass::Dup(_) => Err(ImageError::BadIndex(format!(
                "entry {i} is a duplicate of a duplicate"
            ))),
        }
    }

    /// The xl JSON config, if the stream had one.
    ///
    /// # Errors
    /// Reading the first frame failed.
    pub fn config_json(&self) -> Result<Option<String>, ImageError> {
        // The first window's blocks come first: skip them by their headers.
        let mut off = FileHeader::LEN as u64;
        let (fh, payload) = loop {
            if off >= self.trailer.index_offset {
                return Ok(None);
            }
            let mut hb = [0u8; FrameHeader::LEN];
            self.storage
                .read_exact_at(&mut hb, off)
                .map_err(|e| io_err(e, "a frame header"))?;
            let fh = FrameHeader::decode(&hb, off)?;
            if fh.kind != FrameKind::Block {
                break read_frame_at(&self.storage, off)?;
            }
            off += FrameHeader::LEN as u64 + fh.len as u64;
        };
        if fh.kind != FrameKind::Verbatim || payload.len() < 52 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(payload[48..52].try_into().expect("4 bytes")) as usize;
        let cfg = payload.get(52..52 + len).unwrap_or(&[]);
        let cfg = cfg.strip_suffix(&[0]).unwrap_or(cfg);
        Ok(Some(String::from_utf8_lossy(cfg).into_owned()))
    }

    /// Walks the frames in order, calling `f` with each header, its offset and payload.
    /// Storage already in memory ([`ReadAt::as_bytes`]) lends its payloads; other storage is
    /// read sequentially in large chunks.
    ///
    /// # Errors
    /// A damaged frame, or the error `f` returns.
    pub fn walk_frames<'s, F>(&'s self, mut f: F) -> Result<(), ImageError>
    where
        F: FnMut(&FrameHeader, u64, Cow<'s, [u8]>) -> Result<(), ImageError>,
    {
        let end = self.trailer.index_offset;
        if let Some(all) = self.storage.as_bytes() {
            let into_index = |offset| ImageError::Corrupt {
                offset,
                what: "frame runs into the index".into(),
            };
            let frames = usize::try_from(end)
                .ok()
                .and_then(|e| all.get(..e))
                .ok_or_else(|| into_index(end))?;
            let mut pos = FileHeader::LEN;
            while pos < frames.len() {
                let off = pos as u64;
                let hb: &[u8; FrameHeader::LEN] = frames
                    .get(pos..pos + FrameHeader::LEN)
                    .and_then(|h| h.try_into().ok())
                    .ok_or_else(|| into_index(off))?;
                let fh = FrameHeader::decode(hb, off)?;
                let start = pos + FrameHeader::LEN;
                let payload = frames
                    .get(start..start + fh.len as usize)
                    .ok_or_else(|| into_index(start as u64))?;
                self.check_frame(&fh, hb, payload, off)?;
                pos = start + payload.len();
                f(&fh, off, Cow::Borrowed(payload))?;
            }
            return Ok(());
        }
        let mut seq = SeqReader::new(&self.storage, FileHeader::LEN as u64, end);
        while seq.pos < end {
            let off = seq.pos;
            let mut hb = [0u8; FrameHeader::LEN];
            seq.read(&mut hb)?;
            let fh = FrameHeader::decode(&hb, off)?;
            let payload = seq.read_vec(fh.len as usize)?;
            self.check_frame(&fh, &hb, &payload, off)?;
            f(&fh, off, Cow::Owned(payload))?;
        }
        Ok(())
    }

    /// Checks a frame's checksum; a bad block names its block number.
    fn check_frame(
        &self,
        fh: &FrameHeader,
        hb: &[u8; FrameHeader::LEN],
        payload: &[u8],
        off: u64,
    ) -> Result<(), ImageError> {
        if fh.check(hb, payload) {
            return Ok(());
        }
        Err(match fh.kind {
            FrameKind::Block => ImageError::BlockChecksum {
                block: self
                    .index
                    .blocks
                    .iter()
                    .position(|b| b.offset == off)
                    .unwrap_or(usize::MAX) as u64,
                offset: off,
            },
            k => ImageError::Corrupt {
                offset: off,
                what: format!("{k:?} frame checksum mismatch"),
            },
        })
    }
}

/// Checks and decompresses a whole block frame (header + payload) into `out`.
///
/// # Errors
/// Checksum mismatch, wrong kind or size, or undecodable data.
pub fn decode_block(
    block: u64,
    offset: u64,
    pages: u16,
    frame: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ImageError> {
    let hb: [u8; FrameHeader::LEN] = frame
        .get(..FrameHeader::LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| ImageError::Corrupt {
            offset,
            what: "short block frame".into(),
        })?;
    let fh = FrameHeader::decode(&hb, offset)?;
    let payload = &frame[FrameHeader::LEN..];
    if fh.kind != FrameKind::Block || fh.len as usize != payload.len() || !fh.check(&hb, payload) {
        return Err(ImageError::BlockChecksum { block, offset });
    }
    decode_block_payload(block, &fh, payload, pages, out)
}

/// Decompresses a block payload whose checksum was already checked.
///
/// # Errors
/// Size mismatch or undecodable data.
pub fn decode_block_payload(
    block: u64,
    fh: &FrameHeader,
    payload: &[u8],
    pages: u16,
    out: &mut Vec<u8>,
) -> Result<(), ImageError> {
    let raw = pages as usize * PAGE_SIZE;
    if fh.aux as usize != raw || raw > codec::MAX_BLOCK_RAW {
        return Err(ImageError::Corrupt {
            offset: 0,
            what: format!("block {block} raw length {}", fh.aux),
        });
    }
    out.resize(raw, 0);
    codec::decompress(fh.sub, payload, out)
        .map_err(|source| ImageError::Decompress { block, source })
}

fn read_frame_at<R: ReadAt + ?Sized>(
    s: &R,
    off: u64,
) -> Result<(FrameHeader, Vec<u8>), ImageError> {
    let mut hb = [0u8; FrameHeader::LEN];
    s.read_exact_at(&mut hb, off)
        .map_err(|e| io_err(e, "a frame header"))?;
    let fh = FrameHeader::decode(&hb, off)?;
    let mut payload = vec![0u8; fh.len as usize];
    s.read_exact_at(&mut payload, off + FrameHeader::LEN as u64)
        .map_err(|e| io_err(e, "a frame"))?;
    if !fh.check(&hb, &payload) {
        return Err(ImageError::Corrupt {
            offset: off,
            what: format!("{:?} frame checksum mismatch", fh.kind),
        });
    }
    Ok((fh, payload))
}

/// Sequential reads over positioned storage, in chunks of `CHUNK`.
struct SeqReader<'a, R: ?Sized> {
    s: &'a R,
    buf: Vec<u8>,
    buf_start: u64,
    pos: u64,
    end: u64,
}

const CHUNK: usize = 8 << 20;

impl<'a, R: ReadAt + ?Sized> SeqReader<'a, R> {
    fn new(s: &'a R, pos: u64, end: u64) -> Self {
        SeqReader {
            s,
            buf: Vec::new(),
            buf_start: pos,
            pos,
            end,
        }
    }

    /// Reads `n` bytes into a new vector (filled by copying, never zeroed first).
    fn read_vec(&mut self, n: usize) -> Result<Vec<u8>, ImageError> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            self.fill()?;
            let in_buf = (self.pos - self.buf_start) as usize;
            let take = (self.buf.len() - in_buf).min(n - v.len());
            v.extend_from_slice(&self.buf[in_buf..in_buf + take]);
            self.pos += take as u64;
        }
        Ok(v)
    }

    /// Makes sure the buffer holds the byte at `pos`.
    fn fill(&mut self) -> Result<(), ImageError> {
        if self.pos - self.buf_start < self.buf.len() as u64 && self.pos >= self.buf_start {
            return Ok(());
        }
        let left = self.end.saturating_sub(self.pos);
        if left == 0 {
            return Err(ImageError::Corrupt {
                offset: self.pos,
                what: "frame runs into the index".into(),
            });
        }
        let n = left.min(CHUNK as u64) as usize;
        self.buf.resize(n, 0);
        self.s
            .read_exact_at(&mut self.buf, self.pos)
            .map_err(|e| io_err(e, "the frames"))?;
        self.buf_start = self.pos;
        Ok(())
    }

    fn read(&mut self, out: &mut [u8]) -> Result<(), ImageError> {
        let mut done = 0;
        while done < out.len() {
            let in_buf = self.pos - self.buf_start;
            if in_buf >= self.buf.len() as u64 {
                let left = self.end.saturating_sub(self.pos);
                if left == 0 {
                    return Err(ImageError::Corrupt {
                        offset: self.pos,
                        what: "frame runs into the index".into(),
                    });
                }
                let n = left.min(CHUNK as u64) as usize;
                self.buf.resize(n, 0);
                self.s
                    .read_exact_at(&mut self.buf, self.pos)
                    .map_err(|e| io_err(e, "the frames"))?;
                self.buf_start = self.pos;
                continue;
            }
            let avail = &self.buf[in_buf as usize..];
            let n = avail.len().min(out.len() - done);
            out[done..done + n].copy_from_slice(&avail[..n]);
            done += n;
            self.pos += n as u64;
        }
        Ok(())
    }
}
