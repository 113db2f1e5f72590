//! Arena files: the append-only log chunks live in.
//!
//! ```text
//! arena   := header record* [footer trailer]
//! header  := "RMCARENA" u32:format(1) u32:arena number                        (16 bytes)
//! record  := u32:"CHNK" u8:kind u8:codec u16:0 u32:raw_len u32:stored_len
//!            [32]:id u64:check                                                 (56 bytes)
//!            payload[stored_len]
//! kind    := 1 chunk (id = BLAKE3 of the raw bytes) | 2 footer (id = BLAKE3 of the payload)
//! codec   := 0 stored raw | 1 lz4 block | 2 zstd frame (raw_len bytes once decompressed)
//! check   := the first 8 bytes of BLAKE3(the 48 bytes before it)
//! footer  := a record of kind 2 whose payload is the arena's table:
//!            entry* , entry := [32]:id u64:offset u32:raw_len u32:stored_len u8:codec [7]:0
//! trailer := "RMCSEAL1" u64:footer offset                                     (16 bytes)
//! ```
//!
//! All integers are little-endian. Every length is checked against [`MAX_RAW`] and against
//! what the file still holds before anything is allocated, so a torn or hostile arena costs an
//! error, never a huge allocation. An arena is *sealed* once its footer and trailer are written
//! (and synced); a sealed arena is never written again. The unsealed arena is scanned record
//! by record, and the scan stops at the first record that does not parse (a torn tail).

use super::StoreError;
use crate::images::chunk::{ChunkId, MAX_CHUNK_SIZE};

pub const ARENA_MAGIC: &[u8; 8] = b"RMCARENA";
pub const ARENA_FORMAT: u32 = 1;
pub const ARENA_HEADER_LEN: u64 = 16;
pub const RECORD_MAGIC: &[u8; 4] = b"CHNK";
pub const RECORD_HEADER_LEN: usize = 56;
pub const TRAILER_MAGIC: &[u8; 8] = b"RMCSEAL1";
pub const TRAILER_LEN: u64 = 16;
pub const TABLE_ENTRY_LEN: usize = 56;
/// Largest payload a chunk record may declare (a chunk is at most 64 KiB; lz4 can grow
/// incompressible data by a little, but the writer stores those raw).
pub const MAX_RAW: u32 = MAX_CHUNK_SIZE;
/// Largest footer table (an arena holds at most this many 4 KiB chunks in 4 GiB).
pub const MAX_TABLE_ENTRIES: u64 = 1 << 20;

pub const KIND_CHUNK: u8 = 1;
pub const KIND_FOOTER: u8 = 2;
pub const CODEC_RAW: u8 = 0;
pub const CODEC_LZ4: u8 = 1;
pub const CODEC_ZSTD: u8 = 2;
/// The highest codec number readers know.
pub const CODEC_MAX: u8 = CODEC_ZSTD;

/// How new chunk records are compressed (`--compress lz4|zstd[:LEVEL]|none`). Each record
/// names its own codec, so a store may hold records of every kind and reads all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Lz4,
    /// zstd at a level from 1 to 19.
    Zstd(i32),
}

/// The zstd level `--compress zstd` means.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

impl Default for Compression {
    /// zstd level 3: the store keeps images at rest, and on the dedup bench images zstd
    /// stored 4 KiB chunks in far fewer bytes than lz4 (docs/image-store.md).
    fn default() -> Self {
        Compression::Zstd(DEFAULT_ZSTD_LEVEL)
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected lz4, zstd, zstd:LEVEL (1-19) or none");
        match s {
            "none" | "raw" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd(DEFAULT_ZSTD_LEVEL)),
            _ => {
                let l = s.strip_prefix("zstd:").ok_or_else(bad)?;
                let l: i32 = l.parse().map_err(|_| bad())?;
                if (1..=19).contains(&l) {
                    Ok(Compression::Zstd(l))
                } else {
                    Err(bad())
                }
            }
        }
    }
}

/// A parsed record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: u8,
    pub codec: u8,
    pub raw_len: u32,
    pub stored_len: u32,
    pub id: ChunkId,
}

/// Where one chunk is stored: what the index maps a chunk id to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub arena: u32,
    /// Offset of the payload (just past the record header).
    pub offset: u64,
    pub raw_len: u32,
    pub stored_len: u32,
    pub codec: u8,
}

fn check_of(b: &[u8]) -> u64 {
    let h = blake3::hash(b);
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

pub fn encode_arena_header(number: u32) -> [u8; ARENA_HEADER_LEN as usize] {
    let mut b = [0u8; ARENA_HEADER_LEN as usize];
    b[..8].copy_from_slice(ARENA_MAGIC);
    b[8..12].copy_from_slice(&ARENA_FORMAT.to_le_bytes());
    b[12..16].copy_from_slice(&number.to_le_bytes());
    b
}

/// The arena number in a header, or why it is not one.
pub fn decode_arena_header(b: &[u8]) -> Result<u32, StoreError> {
    if b.len() < ARENA_HEADER_LEN as usize || &b[..8] != ARENA_MAGIC {
        return Err(StoreError::Format("not an arena (bad magic)".into()));
    }
    let format = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    if format != ARENA_FORMAT {
        return Err(StoreError::Format(format!("arena format {format} unknown")));
    }
    Ok(u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")))
}

pub fn encode_record_header(h: &RecordHeader) -> [u8; RECORD_HEADER_LEN] {
    let mut b = [0u8; RECORD_HEADER_LEN];
    b[..4].copy_from_slice(RECORD_MAGIC);
    b[4] = h.kind;
    b[5] = h.codec;
    b[8..12].copy_from_slice(&h.raw_len.to_le_bytes());
    b[12..16].copy_from_slice(&h.stored_len.to_le_bytes());
    b[16..48].copy_from_slice(h.id.as_bytes());
    let c = check_of(&b[..48]);
    b[48..56].copy_from_slice(&c.to_le_bytes());
    b
}

/// Parse a record header. `room` is how many bytes the file holds from the start of this
/// header on: a header whose payload would run past it is refused (a torn tail).
pub fn decode_record_header(b: &[u8], room: u64) -> Result<RecordHeader, StoreError> {
    let bad = |why: &str| Err(StoreError::Format(format!("bad record: {why}")));
    if b.len() < RECORD_HEADER_LEN {
        return bad("short header");
    }
    if &b[..4] != RECORD_MAGIC {
        return bad("bad magic");
    }
    let c = u64::from_le_bytes(b[48..56].try_into().expect("8 bytes"));
    if c != check_of(&b[..48]) {
        return bad("header checksum mismatch");
    }
    let kind = b[4];
    let codec = b[5];
    let raw_len = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    let stored_len = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
    let id = ChunkId(b[16..48].try_into().expect("32 bytes"));
    match kind {
        KIND_CHUNK => {
            if raw_len == 0 || raw_len > MAX_RAW || stored_len == 0 || stored_len > MAX_RAW {
                return bad("chunk length out of range");
            }
            match codec {
                CODEC_RAW if stored_len != raw_len => return bad("raw chunk with two lengths"),
                CODEC_RAW | CODEC_LZ4 | CODEC_ZSTD => {}
                _ => return bad("unknown codec"),
            }
        }
        KIND_FOOTER => {
            if codec != CODEC_RAW
                || raw_len != stored_len
                || raw_len as u64 % TABLE_ENTRY_LEN as u64 != 0
                || raw_len as u64 / TABLE_ENTRY_LEN as u64 > MAX_TABLE_ENTRIES
            {
                return bad("footer length out of range");
            }
        }
        _ => return bad("unknown kind"),
    }
    if RECORD_HEADER_LEN as u64 + stored_len as u64 > room {
        return bad("payload runs past the end of the file");
    }
    Ok(RecordHeader {
        kind,
        codec,
        raw_len,
        stored_len,
        id,
    })
}

/// The raw bytes of a chunk record's payload, checked against its id.
pub fn decode_payload(h: &RecordHeader, payload: &[u8]) -> Result<Vec<u8>, StoreError> {
    let raw = match h.codec {
        CODEC_RAW => payload.to_vec(),
        CODEC_LZ4 => {
            let mut out = vec![0u8; h.raw_len as usize];
            match lz4_flex::block::decompress_into(payload, &mut out) {
                Ok(n) if n == h.raw_len as usize => out,
                _ => return Err(StoreError::Corrupt(h.id)),
            }
        }
        CODEC_ZSTD => {
            // The output buffer is raw_len (at most MAX_RAW) bytes: a frame that would
            // decompress to more is an error, not an allocation.
            let mut out = Vec::with_capacity(h.raw_len as usize);
            let n = ZSTD_D.with(|d| {
                let mut d = d.borrow_mut();
                let d = match d.as_mut() {
                    Some(d) => d,
                    None => d.insert(zstd::bulk::Decompressor::new().ok()?),
                };
                d.decompress_to_buffer(payload, &mut out).ok()
            });
            match n {
                Some(n) if n == h.raw_len as usize && out.len() == n => out,
                _ => return Err(StoreError::Corrupt(h.id)),
            }
        }
        _ => return Err(StoreError::Corrupt(h.id)),
    };
    if !h.id.matches(&raw) {
        return Err(StoreError::Corrupt(h.id));
    }
    Ok(raw)
}

thread_local! {
    /// One zstd context per thread and level (making one per 4 KiB chunk costs more than
    /// compressing it).
    static ZSTD_C: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD_D: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn zstd_compress(raw: &[u8], level: i32) -> Option<Vec<u8>> {
    ZSTD_C.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            // One frame per record, without zstd's own checksum (its default): the id is a
            // hash of the raw bytes and is checked on every read.
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, z) = c.as_mut()?;
        z.compress(raw).ok()
    })
}

/// Encode a chunk's payload with `how`, when that saves at least an eighth; else raw.
pub fn encode_payload(raw: &[u8], how: Compression) -> (u8, Vec<u8>) {
    let (codec, c) = match how {
        Compression::None => return (CODEC_RAW, raw.to_vec()),
        Compression::Lz4 => (CODEC_LZ4, Some(lz4_flex::block::compress(raw))),
        Compression::Zstd(level) => (CODEC_ZSTD, zstd_compress(raw, level)),
    };
    match c {
        Some(c) if c.len() + raw.len() / 8 <= raw.len() && !c.is_empty() => (codec, c),
        _ => (CODEC_RAW, raw.to_vec()),
    }
}

pub fn encode_table(entries: &[(ChunkId, Location)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * TABLE_ENTRY_LEN);
    for (id, l) in entries {
        b.extend_from_slice(id.as_bytes());
        b.extend_from_slice(&l.offset.to_le_bytes());
        b.extend_from_slice(&l.raw_len.to_le_bytes());
        b.extend_from_slice(&l.stored_len.to_le_bytes());
        b.push(l.codec);
        b.extend_from_slice(&[0u8; 7]);
    }
    b
}

/// Parse a footer table of arena `arena` whose file is `file_len` bytes long; every entry's
/// lengths and offset are checked to lie inside the file.
pub fn decode_table(
    b: &[u8],
    arena: u32,
    file_len: u64,
) -> Result<Vec<(ChunkId, Location)>, StoreError> {
    if b.len() % TABLE_ENTRY_LEN != 0 || (b.len() / TABLE_ENTRY_LEN) as u64 > MAX_TABLE_ENTRIES {
        return Err(StoreError::Format("footer table length".into()));
    }
    let mut out = Vec::with_capacity(b.len() / TABLE_ENTRY_LEN);
    for e in b.chunks_exact(TABLE_ENTRY_LEN) {
        let id = ChunkId(e[..32].try_into().expect("32 bytes"));
        let offset = u64::from_le_bytes(e[32..40].try_into().expect("8 bytes"));
        let raw_len = u32::from_le_bytes(e[40..44].try_into().expect("4 bytes"));
        let stored_len = u32::from_le_bytes(e[44..48].try_into().expect("4 bytes"));
        let codec = e[48];
        let ok = raw_len > 0
            && raw_len <= MAX_RAW
            && stored_len > 0
            && stored_len <= MAX_RAW
            && codec <= CODEC_MAX
            && (codec != CODEC_RAW || raw_len == stored_len)
            && offset >= ARENA_HEADER_LEN + RECORD_HEADER_LEN as u64
            && offset
                .checked_add(stored_len as u64)
                .is_some_and(|end| end <= file_len);
        if !ok {
            return Err(StoreError::Format(format!(
                "footer entry for {id} out of range"
            )));
        }
        out.push((
            id,
            Location {
                arena,
                offset,
                raw_len,
                stored_len,
                codec,
            },
        ));
    }
    Ok(out)
}

pub fn encode_trailer(footer_offset: u64) -> [u8; TRAILER_LEN as usize] {
    let mut b = [0u8; TRAILER_LEN as usize];
    b[..8].copy_from_slice(TRAILER_MAGIC);
    b[8..].copy_from_slice(&footer_offset.to_le_bytes());
    b
}

/// The footer offset a trailer names, if `b` (the last 16 bytes of a `file_len`-byte file)
/// is a trailer whose offset leaves room for a footer header before it.
pub fn decode_trailer(b: &[u8], file_len: u64) -> Option<u64> {
    if b.len() != TRAILER_LEN as usize || &b[..8] != TRAILER_MAGIC {
        return None;
    }
    let off = u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
    let ok = off >= ARENA_HEADER_LEN
        && off
            .checked_add(RECORD_HEADER_LEN as u64 + TRAILER_LEN)
            .is_some_and(|end| end <= file_len);
    ok.then_some(off)
}

/// Run every parser in this module over arbitrary bytes (the fuzz target and a proptest call
/// this): none may panic or allocate more than the input justifies.
pub fn parse_any(data: &[u8]) {
    let room = data.len() as u64;
    let _ = decode_arena_header(data);
    if let Ok(h) = decode_record_header(data, room) {
        let end = (RECORD_HEADER_LEN + h.stored_len as usize).min(data.len());
        let payload = &data[RECORD_HEADER_LEN..end];
        if h.kind == KIND_CHUNK {
            let _ = decode_payload(&h, payload);
        } else {
            let _ = decode_table(payload, 0, room);
        }
    }
    let _ = decode_table(data, 0, room);
    if data.len() >= TRAILER_LEN as usize {
        let _ = decode_trailer(&data[data.len() - TRAILER_LEN as usize..], room);
    }
}
