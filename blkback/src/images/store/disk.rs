//! A read-only [`Disk`] over one store version, so an overlay made over an export of that
//! version can be opened (and its template fingerprint checked) against the store itself.
//!
//! It owns the version's chunk locations and opens arenas itself: it does not borrow the
//! [`super::Store`], which may be appended to while it is open (the store's writer lock is
//! held by whoever made it, so no gc can move the chunks meanwhile).

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use super::arena::Location;
use super::log;
use crate::disk::{check_range, push_extent, Disk, DiskError, Extent, WriteFlags, ZeroFlags};
use crate::images::chunk::{ChunkId, ChunkList};

/// One store version as a read-only disk.
#[derive(Debug)]
pub struct VersionDisk {
    dir: PathBuf,
    list: ChunkList,
    locs: Vec<Option<(ChunkId, Location)>>,
    files: Mutex<HashMap<u32, Arc<File>>>,
}

impl VersionDisk {
    pub(crate) fn new(
        dir: PathBuf,
        list: ChunkList,
        locs: Vec<Option<(ChunkId, Location)>>,
    ) -> VersionDisk {
        VersionDisk {
            dir,
            list,
            locs,
            files: Mutex::new(HashMap::new()),
        }
    }

    pub fn list(&self) -> &ChunkList {
        &self.list
    }

    fn piece(&self, i: usize) -> Result<Option<Vec<u8>>, DiskError> {
        let Some((id, loc)) = &self.locs[i] else {
            return Ok(None);
        };
        let file = {
            let mut f = self.files.lock();
            match f.get(&loc.arena) {
                Some(f) => f.clone(),
                None => {
                    let file = Arc::new(File::open(log::arena_path(&self.dir, loc.arena))?);
                    f.insert(loc.arena, file.clone());
                    file
                }
            }
        };
        log::read_chunk(&file, id, loc)
            .map(Some)
            .map_err(|e| DiskError::Corrupt(e.to_string()))
    }
}

impl Disk for VersionDisk {
    fn size(&self) -> u64 {
        self.list.size
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.list.size)?;
        let cs = self.list.chunk_size.bytes() as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let i = (pos / cs) as usize;
            let within = (pos % cs) as usize;
            let n = (self.list.len_of(i) - within).min(buf.len() - done);
            match self.piece(i)? {
                None => buf[done..done + n].fill(0),
                Some(d) => buf[done..done + n].copy_from_slice(&d[within..within + n]),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, _: &[u8], _: u64, _: WriteFlags) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }

    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }

    fn discard(&self, _: u64, _: u64) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }

    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        check_range(offset, len, self.list.size)?;
        let cs = self.list.chunk_size.bytes() as u64;
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = pos / cs;
            let n = ((i + 1) * cs).min(end) - pos;
            let data = self.locs[i as usize].is_some();
            push_extent(
                &mut out,
                Extent {
                    len: n,
                    hole: !data,
                    zero: !data,
                    depth: u32::from(data),
                },
            );
            pos += n;
        }
        Ok(out)
    }
}
