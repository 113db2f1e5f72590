//! Manifests: one image version each, in `images/NAME/VERSION.manifest`.
//!
//! ```text
//! manifest := magic u32:version u64:created (unix seconds) u32:chunk_size u64:size
//!             u64:new_bytes  str:parent  str:note  u64:count  entry*count  [32]:BLAKE3
//! magic    := "RMCMANI2" (written) | "RMCMANI1" (still read)
//! str      := u16:len bytes[len]  (UTF-8; parent is "" or "NAME@VERSION")
//! entry    := RMCMANI2: varint:(gap << 1 | tag) [[32]:id if tag = 1]
//!             RMCMANI1: u64:index u8:tag [[32]:id if tag = 1]
//! tag      := 0 zeroes | 1 chunk
//! gap      := index - (previous index + 1), the first entry's previous index being -1
//! varint   := LEB128, at most 10 bytes
//! ```
//!
//! Format 2 spends 33 bytes on a chunk that follows the previous entry (the usual case: an
//! image's non-zero pieces are mostly contiguous) where format 1 spent 41.
//!
//! A version without a parent lists its non-zero chunks (missing indices read as zeroes); a
//! layer lists only the chunks it changes over its parent (tag 0 = the layer zeroed that
//! piece). Entries are sorted by index, without repeats, and inside the image. The checksum
//! covers everything before it. Every count is checked against the bytes that remain before
//! anything is allocated.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use super::StoreError;
use crate::images::chunk::{ChunkId, ChunkList, ChunkSize};

/// The format written.
pub const MANIFEST_MAGIC: &[u8; 8] = b"RMCMANI2";
/// The first format, still read.
pub const MANIFEST_MAGIC_V1: &[u8; 8] = b"RMCMANI1";
/// Largest image a manifest may describe (16 TiB).
pub const MAX_IMAGE_SIZE: u64 = 1 << 44;
const MAX_STR: usize = 1024;

/// `NAME@VERSION`: one version of one image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VersionRef {
    pub image: String,
    pub version: u32,
}

impl fmt::Display for VersionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.image, self.version)
    }
}

impl FromStr for VersionRef {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        let (name, v) = s
            .rsplit_once('@')
            .ok_or_else(|| StoreError::BadName(format!("{s:?} is not NAME@VERSION")))?;
        check_name(name)?;
        let version = v
            .strip_prefix('v')
            .unwrap_or(v)
            .parse::<u32>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| StoreError::BadName(format!("{s:?}: version is a number from 1")))?;
        Ok(VersionRef {
            image: name.to_string(),
            version,
        })
    }
}

/// Image names: 1-128 of `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(format!(
            "{name:?}: an image name is 1-128 of A-Z a-z 0-9 . _ - and does not start with a dot"
        )))
    }
}

/// One image version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    pub created: u64,
    pub chunk_size: ChunkSize,
    pub size: u64,
    /// Bytes of chunks this version added to the store when it was made.
    pub new_bytes: u64,
    pub parent: Option<VersionRef>,
    /// Where the version came from (for `image log`).
    pub note: String,
    /// Sorted by index: the pieces this version sets (`None`: zeroes).
    pub entries: BTreeMap<u64, Option<ChunkId>>,
}

impl Manifest {
    pub fn chunk_count(&self) -> u64 {
        ChunkList::count_for(self.size, self.chunk_size)
    }

    /// The chunk ids this manifest itself names (not its parent's).
    pub fn own_chunks(&self) -> impl Iterator<Item = &ChunkId> {
        self.entries.values().flatten()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(80 + self.entries.len() * 41);
        b.extend_from_slice(MANIFEST_MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.created.to_le_bytes());
        b.extend_from_slice(&self.chunk_size.bytes().to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.new_bytes.to_le_bytes());
        let parent = self
            .parent
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default();
        for s in [parent.as_str(), self.note.as_str()] {
            let s = &s.as_bytes()[..s.len().min(MAX_STR)];
            b.extend_from_slice(&(s.len() as u16).to_le_bytes());
            b.extend_from_slice(s);
        }
        b.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        let mut next = 0u64;
        for (&i, e) in &self.entries {
            // Entries are sorted, so i >= next; indices are below 2^32 (16 TiB of 4 KiB
            // pieces), so the shift cannot overflow.
            let gap = i - next;
            put_varint(&mut b, (gap << 1) | u64::from(e.is_some()));
            if let Some(id) = e {
                b.extend_from_slice(id.as_bytes());
            }
            next = i + 1;
        }
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Manifest, StoreError> {
        let bad = |why: &str| StoreError::Format(format!("bad manifest: {why}"));
        if b.len() < MANIFEST_MAGIC.len() + 32 {
            return Err(bad("too short"));
        }
        let v1 = match &b[..8] {
            m if m == MANIFEST_MAGIC => false,
            m if m == MANIFEST_MAGIC_V1 => true,
            _ => return Err(bad("bad magic")),
        };
        let (body, sum) = b.split_at(b.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(bad("checksum mismatch"));
        }
        let mut r = Reader { b: body, pos: 8 };
        let version = r.u32()?;
        let created = r.u64()?;
        let chunk_size = ChunkSize::new(r.u32()? as u64).map_err(|e| bad(&e.to_string()))?;
        let size = r.u64()?;
        if size > MAX_IMAGE_SIZE {
            return Err(bad("image size out of range"));
        }
        let new_bytes = r.u64()?;
        let parent = r.string()?;
        let parent = if parent.is_empty() {
            None
        } else {
            Some(parent.parse::<VersionRef>()?)
        };
        let note = r.string()?;
        let count = r.u64()?;
        // Each entry takes at least 9 bytes (format 1) or 1 byte (format 2): refuse counts
        // the rest cannot hold.
        let least = if v1 { 9 } else { 1 };
        if count > (body.len() - r.pos) as u64 / least {
            return Err(bad("entry count larger than the file"));
        }
        let pieces = ChunkList::count_for(size, chunk_size);
        let mut entries = BTreeMap::new();
        let mut next = 0u64;
        for _ in 0..count {
            let (index, tag) = if v1 {
                let index = r.u64()?;
                (index, r.u8()?)
            } else {
                let v = r.varint()?;
                let index = next
                    .checked_add(v >> 1)
                    .ok_or_else(|| bad("entry index past the end"))?;
                (index, (v & 1) as u8)
            };
            if index >= pieces || index < next {
                return Err(bad("entry index out of order or past the end"));
            }
            next = index + 1;
            let e = match tag {
                0 => None,
                1 => Some(ChunkId(r.take(32)?.try_into().expect("32 bytes"))),
                _ => return Err(bad("unknown entry tag")),
            };
            entries.insert(index, e);
        }
        if r.pos != body.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Manifest {
            version,
            created,
            chunk_size,
            size,
            new_bytes,
            parent,
            note,
            entries,
        })
    }
}

/// Run the manifest parser over arbitrary bytes (the fuzz target and a proptest call this):
/// as they are, and sealed with a valid checksum behind both magics so the fields past the
/// checksum check are reached. Must not panic or allocate more than the input justifies;
/// whatever decodes must encode back to the same manifest.
pub fn parse_any(data: &[u8]) {
    let _ = Manifest::decode(data);
    for magic in [MANIFEST_MAGIC, MANIFEST_MAGIC_V1] {
        let mut b = magic.to_vec();
        b.extend_from_slice(data.get(8..).unwrap_or_default());
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        if let Ok(m) = Manifest::decode(&b) {
            assert_eq!(Manifest::decode(&m.encode()).ok(), Some(m));
        }
    }
}

fn put_varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push(v as u8 | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

/// Manifest format 1, as written before format 2 (kept to test that old stores still read).
#[cfg(test)]
pub(crate) fn encode_v1(m: &Manifest) -> Vec<u8> {
    let v2 = m.encode();
    // Same header up to and including the count; entries re-encoded; new checksum.
    let head = 8 + 4 + 8 + 4 + 8 + 8;
    let mut pos = head;
    for _ in 0..2 {
        let n = u16::from_le_bytes([v2[pos], v2[pos + 1]]) as usize;
        pos += 2 + n;
    }
    let mut b = v2[..pos + 8].to_vec();
    b[..8].copy_from_slice(MANIFEST_MAGIC_V1);
    for (i, e) in &m.entries {
        b.extend_from_slice(&i.to_le_bytes());
        match e {
            None => b.push(0),
            Some(id) => {
                b.push(1);
                b.extend_from_slice(id.as_bytes());
            }
        }
    }
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    b
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], StoreError> {
        if self.b.len() - self.pos < n {
            return Err(StoreError::Format("bad manifest: truncated".into()));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    /// LEB128, at most 10 bytes, no bits past 64.
    fn varint(&mut self) -> Result<u64, StoreError> {
        let mut v = 0u64;
        for k in 0..10 {
            let byte = self.u8()?;
            let part = u64::from(byte & 0x7f);
            if k == 9 && part > 1 {
                break;
            }
            v |= part << (7 * k);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(StoreError::Format("bad manifest: varint too long".into()))
    }
    fn string(&mut self) -> Result<String, StoreError> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as usize;
        if n > MAX_STR {
            return Err(StoreError::Format("bad manifest: string too long".into()));
        }
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| StoreError::Format("bad manifest: string not UTF-8".into()))
    }
}
