//! The arena log on disk: reading a chunk at a location, reading an arena back (footer, or a
//! record-by-record scan), and the writer that appends to the one open arena and seals it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::arena::{self, Location, RecordHeader};
use super::backend::ArenaRead;
use super::{io_at, StoreError};
use crate::images::chunk::ChunkId;

pub fn arena_path(dir: &Path, number: u32) -> PathBuf {
    dir.join("arenas").join(format!("{number:08}.arena"))
}

/// The arena number in a file name like `00000007.arena`.
pub fn arena_number(name: &str) -> Option<u32> {
    let n = name.strip_suffix(".arena")?;
    (n.len() == 8 && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| n.parse().ok())
        .flatten()
}

/// The stored payload at `loc` (still compressed if it was stored so).
pub fn read_payload<R: ArenaRead + ?Sized>(file: &R, loc: &Location) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; loc.stored_len as usize];
    file.read_exact_at(&mut buf, loc.offset)?;
    Ok(buf)
}

/// The raw, hash-checked bytes of the chunk `id` at `loc`.
pub fn read_chunk<R: ArenaRead + ?Sized>(
    file: &R,
    id: &ChunkId,
    loc: &Location,
) -> Result<Vec<u8>, StoreError> {
    let payload = read_payload(file, loc).map_err(|e| StoreError::Io {
        path: format!("arena {}", loc.arena).into(),
        source: e,
    })?;
    let h = RecordHeader {
        kind: arena::KIND_CHUNK,
        codec: loc.codec,
        raw_len: loc.raw_len,
        stored_len: loc.stored_len,
        id: *id,
    };
    arena::decode_payload(&h, &payload)
}

/// What reading one arena back found.
#[derive(Debug, Default)]
pub struct ArenaScan {
    /// Every chunk record, in file order (repeats possible after an interrupted gc).
    pub records: Vec<(ChunkId, Location)>,
    /// Bytes from the start that hold a header and whole, valid records (and the footer and
    /// trailer when sealed): an unsealed arena is cut back to this before it is appended to.
    pub valid_len: u64,
    pub sealed: bool,
    /// Why a scan stopped before the end of the file, if it did.
    pub torn: Option<String>,
    /// Records whose header is whole but whose payload does not hash to their id (rot, or
    /// a payload that never reached the disk); the scan steps over them.
    pub corrupt: Vec<(ChunkId, Location)>,
}

/// The footer table of a sealed arena, or `None` if its trailer or footer does not check.
pub fn read_footer<R: ArenaRead + ?Sized>(
    file: &R,
    number: u32,
    len: u64,
) -> Option<Vec<(ChunkId, Location)>> {
    if len < arena::ARENA_HEADER_LEN + arena::RECORD_HEADER_LEN as u64 + arena::TRAILER_LEN {
        return None;
    }
    let mut t = [0u8; arena::TRAILER_LEN as usize];
    file.read_exact_at(&mut t, len - arena::TRAILER_LEN).ok()?;
    let off = arena::decode_trailer(&t, len)?;
    let mut hb = [0u8; arena::RECORD_HEADER_LEN];
    file.read_exact_at(&mut hb, off).ok()?;
    let h = arena::decode_record_header(&hb, len - arena::TRAILER_LEN - off).ok()?;
    if h.kind != arena::KIND_FOOTER
        || off + arena::RECORD_HEADER_LEN as u64 + h.stored_len as u64 + arena::TRAILER_LEN != len
    {
        return None;
    }
    let mut table = vec![0u8; h.stored_len as usize];
    file.read_exact_at(&mut table, off + arena::RECORD_HEADER_LEN as u64)
        .ok()?;
    if !h.id.matches(&table) {
        return None;
    }
    let entries = arena::decode_table(&table, number, off).ok()?;
    Some(entries)
}

/// Read an arena back: its footer when it is sealed, else a scan of every record. A scan
/// re-hashes every payload when `check_payloads` (an unsealed arena after a crash may hold a
/// record whose header reached the disk and whose payload did not).
pub fn scan_arena<R: ArenaRead + ?Sized>(
    file: &R,
    number: u32,
    check_payloads: bool,
) -> Result<ArenaScan, StoreError> {
    let len = file.len().map_err(|e| io_at("arena", e))?;
    if let Some(records) = read_footer(file, number, len) {
        return Ok(ArenaScan {
            records,
            valid_len: len,
            sealed: true,
            ..ArenaScan::default()
        });
    }
    // A writer killed while creating the arena may leave it without a whole header: it
    // holds nothing, and a writer resuming it writes the header again.
    let mut hdr = [0u8; arena::ARENA_HEADER_LEN as usize];
    let header = if len < arena::ARENA_HEADER_LEN {
        Err(StoreError::Format("shorter than its header".into()))
    } else {
        file.read_exact_at(&mut hdr, 0)
            .map_err(|e| io_at("arena", e))?;
        arena::decode_arena_header(&hdr)
    };
    match header {
        Ok(found) if found == number => {}
        Ok(found) => {
            return Err(StoreError::Format(format!(
                "arena file {number} says it is arena {found}"
            )))
        }
        Err(e) => {
            return Ok(ArenaScan {
                torn: Some(format!("no valid header: {e}")),
                ..ArenaScan::default()
            })
        }
    }
    let mut out = ArenaScan {
        valid_len: arena::ARENA_HEADER_LEN,
        ..ArenaScan::default()
    };
    let mut pos = arena::ARENA_HEADER_LEN;
    let mut hb = [0u8; arena::RECORD_HEADER_LEN];
    while pos < len {
        if len - pos < arena::RECORD_HEADER_LEN as u64 {
            out.torn = Some(format!("partial record header at {pos}"));
            break;
        }
        file.read_exact_at(&mut hb, pos)
            .map_err(|e| io_at("arena", e))?;
        let h = match arena::decode_record_header(&hb, len - pos) {
            Ok(h) => h,
            Err(e) => {
                out.torn = Some(format!("at {pos}: {e}"));
                break;
            }
        };
        let loc = Location {
            arena: number,
            offset: pos + arena::RECORD_HEADER_LEN as u64,
            raw_len: h.raw_len,
            stored_len: h.stored_len,
            codec: h.codec,
        };
        if h.kind == arena::KIND_FOOTER {
            // A footer without a valid trailer: sealing was interrupted; the records before
            // it are good, the footer is not.
            out.torn = Some(format!("unfinished footer at {pos}"));
            break;
        }
        pos = loc.offset + h.stored_len as u64;
        if check_payloads && read_chunk(file, &h.id, &loc).is_err() {
            out.corrupt.push((h.id, loc));
        } else {
            out.records.push((h.id, loc));
            out.valid_len = pos;
        }
    }
    // Bad records after the last good one are a torn tail (payloads that never reached the
    // disk), cut with it; bad records between good ones are rot, reported.
    let tail = out.valid_len;
    if out.corrupt.last().is_some_and(|c| c.1.offset > tail) {
        let first_torn = out
            .corrupt
            .iter()
            .position(|c| c.1.offset > tail)
            .expect("some");
        let (id, l) = out.corrupt[first_torn];
        out.torn.get_or_insert(format!(
            "record for {id} at {} does not hash to its id",
            l.offset - arena::RECORD_HEADER_LEN as u64
        ));
        out.corrupt.truncate(first_torn);
    }
    Ok(out)
}

pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_at(dir, e))
}

/// The open arena chunks are appended to.
#[derive(Debug)]
pub struct Writer {
    pub number: u32,
    path: PathBuf,
    file: File,
    pub len: u64,
    /// Records written to this arena (for its footer).
    pub table: Vec<(ChunkId, Location)>,
    dirty: bool,
}

impl Writer {
    /// Start arena `number` (a new file: header, synced, directory synced).
    pub fn create(dir: &Path, number: u32) -> Result<Writer, StoreError> {
        let path = arena_path(dir, number);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_at(&path, e))?;
        file.write_all_at(&arena::encode_arena_header(number), 0)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_at(&path, e))?;
        sync_dir(&dir.join("arenas"))?;
        Ok(Writer {
            number,
            path,
            file,
            len: arena::ARENA_HEADER_LEN,
            table: Vec::new(),
            dirty: false,
        })
    }

    /// Go on appending to an unsealed arena, first cutting off a torn tail past `valid_len`.
    pub fn resume(
        dir: &Path,
        number: u32,
        valid_len: u64,
        table: Vec<(ChunkId, Location)>,
    ) -> Result<Writer, StoreError> {
        let path = arena_path(dir, number);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_at(&path, e))?;
        let len = file.metadata().map_err(|e| io_at(&path, e))?.len();
        let valid_len = valid_len.max(arena::ARENA_HEADER_LEN);
        if len != valid_len || table.is_empty() {
            file.set_len(valid_len)
                .and_then(|()| file.write_all_at(&arena::encode_arena_header(number), 0))
                .and_then(|()| file.sync_all())
                .map_err(|e| io_at(&path, e))?;
        }
        Ok(Writer {
            number,
            path,
            file,
            len: valid_len,
            table,
            dirty: false,
        })
    }

    /// Append a record whose payload is already encoded.
    pub fn append(
        &mut self,
        id: ChunkId,
        codec: u8,
        raw_len: u32,
        payload: &[u8],
    ) -> Result<Location, StoreError> {
        let h = RecordHeader {
            kind: arena::KIND_CHUNK,
            codec,
            raw_len,
            stored_len: payload.len() as u32,
            id,
        };
        let mut rec = Vec::with_capacity(arena::RECORD_HEADER_LEN + payload.len());
        rec.extend_from_slice(&arena::encode_record_header(&h));
        rec.extend_from_slice(payload);
        self.file
            .write_all_at(&rec, self.len)
            .map_err(|e| io_at(&self.path, e))?;
        let loc = Location {
            arena: self.number,
            offset: self.len + arena::RECORD_HEADER_LEN as u64,
            raw_len,
            stored_len: h.stored_len,
            codec,
        };
        self.len += rec.len() as u64;
        self.table.push((id, loc));
        self.dirty = true;
        Ok(loc)
    }

    /// Make every appended record durable.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.dirty {
            self.file.sync_data().map_err(|e| io_at(&self.path, e))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Write the footer and trailer and sync: the arena is never written again. Returns its
    /// final length.
    pub fn seal(mut self) -> Result<u64, StoreError> {
        self.sync()?;
        let table = arena::encode_table(&self.table);
        let h = RecordHeader {
            kind: arena::KIND_FOOTER,
            codec: arena::CODEC_RAW,
            raw_len: table.len() as u32,
            stored_len: table.len() as u32,
            id: ChunkId::of(&table),
        };
        let mut b = Vec::with_capacity(arena::RECORD_HEADER_LEN + table.len() + 16);
        b.extend_from_slice(&arena::encode_record_header(&h));
        b.extend_from_slice(&table);
        b.extend_from_slice(&arena::encode_trailer(self.len));
        self.file
            .write_all_at(&b, self.len)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| io_at(&self.path, e))?;
        Ok(self.len + b.len() as u64)
    }
}
