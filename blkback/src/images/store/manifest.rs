//! Manifests: one image version each, in `images/NAME/VERSION.manifest`.
//!
//! ```text
//! manifest := "RMCMANI1" u32:version u64:created (unix seconds) u32:chunk_size u64:size
//!             u64:new_bytes  str:parent  str:note  u64:count  entry*count  [32]:BLAKE3
//! str      := u16:len bytes[len]  (UTF-8; parent is "" or "NAME@VERSION")
//! entry    := u64:index u8:tag (0 zeroes, 1 chunk) [[32]:id if tag = 1]
//! ```
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

pub const MANIFEST_MAGIC: &[u8; 8] = b"RMCMANI1";
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
        for (i, e) in &self.entries {
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

    pub fn decode(b: &[u8]) -> Result<Manifest, StoreError> {
        let bad = |why: &str| StoreError::Format(format!("bad manifest: {why}"));
        if b.len() < MANIFEST_MAGIC.len() + 32 || &b[..8] != MANIFEST_MAGIC {
            return Err(bad("bad magic or too short"));
        }
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
        // Each entry takes at least 9 bytes: refuse counts the rest cannot hold.
        if count > (body.len() - r.pos) as u64 / 9 {
            return Err(bad("entry count larger than the file"));
        }
        let pieces = ChunkList::count_for(size, chunk_size);
        let mut entries = BTreeMap::new();
        let mut last = None;
        for _ in 0..count {
            let index = r.u64()?;
            if index >= pieces || last.is_some_and(|l| index <= l) {
                return Err(bad("entry index out of order or past the end"));
            }
            last = Some(index);
            let e = match r.u8()? {
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
    fn string(&mut self) -> Result<String, StoreError> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as usize;
        if n > MAX_STR {
            return Err(StoreError::Format("bad manifest: string too long".into()));
        }
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| StoreError::Format("bad manifest: string not UTF-8".into()))
    }
}
