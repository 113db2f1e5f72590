//! One store version as a read-only [`crate::Disk`]: a [`ChunkTemplate`] (the same template
//! layer a node serves images with) over a [`VersionChunks`] source, so an overlay made over
//! an export of that version can be opened (and its template fingerprint checked) against
//! the store itself.
//!
//! The source owns the version's chunk locations and readers of the arenas holding them
//! (files, or ranged gets of a remote store's arena objects): it does not borrow the
//! [`super::Store`], which may be appended to while it is open (the store's writer lock is
//! held by whoever made it, so no gc can move the chunks meanwhile).

use std::collections::HashMap;
use std::sync::Arc;

use super::arena::Location;
use super::backend::ArenaRead;
use super::{log, Store, StoreError, VersionRef};
use crate::images::chunk::{ChunkError, ChunkId, ChunkSource};
use crate::images::template::ChunkTemplate;

/// The chunks of one store version, read straight from the arenas that hold them (local
/// files, or arena objects of a remote store read with ranged gets).
#[derive(Debug)]
pub struct VersionChunks {
    location: String,
    locs: HashMap<ChunkId, Location>,
    arenas: HashMap<u32, Arc<dyn ArenaRead>>,
}

impl VersionChunks {
    fn name(&self) -> String {
        format!("store {}", self.location)
    }
}

impl ChunkSource for VersionChunks {
    fn fetch(&self, id: &ChunkId, len: usize) -> Result<Vec<u8>, ChunkError> {
        let loc = self.locs.get(id).ok_or(ChunkError::NotFound(*id))?;
        if loc.raw_len as usize != len {
            return Err(ChunkError::Corrupt {
                id: *id,
                source_name: format!("{} (chunk is {} bytes)", self.name(), loc.raw_len),
            });
        }
        let file = self
            .arenas
            .get(&loc.arena)
            .ok_or(ChunkError::NotFound(*id))?;
        log::read_chunk(&**file, id, loc).map_err(|e| match e {
            StoreError::Io { source, .. } => ChunkError::Io(source),
            // A record that does not decode or does not hash to its id: the store's bytes
            // are bad, whatever the detail.
            _ => ChunkError::Corrupt {
                id: *id,
                source_name: self.name(),
            },
        })
    }
}

impl Store {
    /// A read-only disk over version `v`, owning what it needs (it does not borrow the
    /// store, so the store can be written while it is open). A chunk that fails its hash
    /// reads as [`crate::DiskError::Corrupt`].
    ///
    /// # Errors
    /// A missing or corrupt manifest in `v`'s chain; a chunk the index does not know.
    pub fn version_disk(&self, v: &VersionRef) -> Result<ChunkTemplate, StoreError> {
        let list = self.chunk_list(v)?;
        let mut locs = HashMap::new();
        let mut arenas = HashMap::new();
        for id in list.chunks.iter().flatten() {
            let loc = self.index.get(id).ok_or(StoreError::Missing(*id))?;
            locs.insert(*id, *loc);
            if let std::collections::hash_map::Entry::Vacant(e) = arenas.entry(loc.arena) {
                // Opened now: a local file stays readable while the store appends to it.
                e.insert(self.reader(loc.arena)?);
            }
        }
        let source = VersionChunks {
            location: self.location(),
            locs,
            arenas,
        };
        ChunkTemplate::new(list, Arc::new(source)).map_err(|e| StoreError::Format(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::super::StoreOptions;
    use super::*;
    use crate::images::chunk::ChunkSize;
    use crate::{Disk, DiskError};

    fn open(dir: &std::path::Path) -> Store {
        Store::open(
            dir,
            StoreOptions {
                write: true,
                ..StoreOptions::default()
            },
        )
        .unwrap()
    }

    /// 12 pieces of 4 KiB and a 100-byte tail; pieces 2 and 7 zero.
    fn image() -> Vec<u8> {
        let mut v: Vec<u8> = (0..12 * 4096 + 100)
            .map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 7) as u8 | 1)
            .collect();
        v[2 * 4096..3 * 4096].fill(0);
        v[7 * 4096..8 * 4096].fill(0);
        v
    }

    #[test]
    fn a_version_reads_as_its_export_while_the_store_is_appended_to() {
        let d = tempfile::tempdir().unwrap();
        let mut s = open(d.path());
        let img = image();
        let cs = ChunkSize::new(4096).unwrap();
        let r = s
            .import("a", &mut Cursor::new(&img), cs, "t", &mut |_| {})
            .unwrap();
        let disk = s.version_disk(&r.version).unwrap();
        // More imports while the disk is open do not disturb it.
        let other: Vec<u8> = img.iter().map(|b| b.wrapping_add(1)).collect();
        s.import("b", &mut Cursor::new(&other), cs, "t", &mut |_| {})
            .unwrap();
        assert_eq!(disk.size(), img.len() as u64);
        assert!(disk.is_read_only());
        let mut got = vec![0xee; img.len()];
        disk.read_at(&mut got, 0).unwrap();
        assert_eq!(got, img);
        let ext = disk.block_status(2 * 4096, 4096).unwrap();
        assert!(ext.iter().all(|e| e.zero && e.hole));
    }

    #[test]
    fn a_rotten_chunk_reads_as_corrupt_not_as_other_bytes() {
        let d = tempfile::tempdir().unwrap();
        let mut s = open(d.path());
        let img = image();
        let r = s
            .import(
                "a",
                &mut Cursor::new(&img),
                ChunkSize::new(4096).unwrap(),
                "t",
                &mut |_| {},
            )
            .unwrap();
        let victim = s.chunk_list(&r.version).unwrap().chunks[5].unwrap();
        let loc = s.index()[&victim];
        let disk = s.version_disk(&r.version).unwrap();
        let p = log::arena_path(d.path(), loc.arena);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[loc.offset as usize + 40] ^= 0x40;
        std::fs::write(&p, bytes).unwrap();
        let mut b = vec![0; 4096];
        match disk.read_at(&mut b, 5 * 4096) {
            Err(DiskError::Corrupt(msg)) => assert!(msg.contains(&victim.to_string()), "{msg}"),
            other => panic!("expected a corrupt chunk, got {other:?}"),
        }
        // The other chunks still read.
        disk.read_at(&mut b, 4 * 4096).unwrap();
        assert_eq!(b, img[4 * 4096..5 * 4096]);
    }
}
