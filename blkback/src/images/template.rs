//! The template layer: a read-only [`Disk`] over one image version's [`ChunkList`], reading
//! chunks through a [`ChunkSource`] (normally the node's [`crate::images::fetch::Fetcher`]:
//! cache, then peers, then origin). Zero chunks are served without asking anyone and reported
//! as zero holes by `block_status`. It sits under the per-VM copy-on-write overlay like a raw
//! template file.
//!
//! **Boot access profile.** When asked, the layer records the order in which each chunk was
//! first read. [`ChunkTemplate::save_profile`] writes it as text, one chunk index per line
//! after a header line:
//!
//! ```text
//! remoca-access-profile v1 <chunk count>
//! 17
//! 0
//! 18
//! ...
//! ```
//!
//! A later deployment of the same image version prefetches in that order
//! ([`AccessProfile::order`] gives the chunk ids).

use std::io;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use super::chunk::{ChunkError, ChunkId, ChunkList, ChunkSource};
use crate::disk::{check_range, push_extent, Disk, DiskError, Extent, WriteFlags, ZeroFlags};

const PROFILE_MAGIC: &str = "remoca-access-profile v1";

#[derive(Debug, Default)]
struct Recorder {
    seen: Vec<bool>,
    order: Vec<u32>,
}

/// A read-only disk over a chunk list. See the module docs.
pub struct ChunkTemplate {
    list: ChunkList,
    source: Arc<dyn ChunkSource>,
    recorder: Option<Mutex<Recorder>>,
}

impl std::fmt::Debug for ChunkTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkTemplate")
            .field("size", &self.list.size)
            .field("chunk_size", &self.list.chunk_size)
            .field("chunks", &self.list.chunks.len())
            .finish()
    }
}

/// A chunk that could not be had as a disk error: bytes that do not hash to their id say
/// corrupt (whoever returned them), everything else is an I/O error.
fn chunk_err(e: ChunkError) -> DiskError {
    match e {
        ChunkError::Io(e) => DiskError::Io(e),
        e @ ChunkError::Corrupt { .. } => DiskError::Corrupt(e.to_string()),
        other => DiskError::Io(io::Error::other(other.to_string())),
    }
}

impl ChunkTemplate {
    /// A template over `list`, reading chunks from `source`.
    ///
    /// # Errors
    /// [`DiskError::Corrupt`] when the list does not have as many chunks as its size needs.
    pub fn new(list: ChunkList, source: Arc<dyn ChunkSource>) -> Result<Self, DiskError> {
        if !list.is_consistent() {
            return Err(DiskError::Corrupt(format!(
                "chunk list of {} bytes at {} bytes per chunk has {} entries",
                list.size,
                list.chunk_size.bytes(),
                list.chunks.len()
            )));
        }
        Ok(ChunkTemplate {
            list,
            source,
            recorder: None,
        })
    }

    /// Record the order of first access of each chunk from now on.
    pub fn recording(mut self) -> Self {
        self.recorder = Some(Mutex::new(Recorder {
            seen: vec![false; self.list.chunks.len()],
            order: Vec::new(),
        }));
        self
    }

    pub fn chunk_list(&self) -> &ChunkList {
        &self.list
    }

    /// The access profile recorded so far (empty when not recording).
    pub fn profile(&self) -> AccessProfile {
        AccessProfile {
            chunks: self.list.chunks.len(),
            order: self
                .recorder
                .as_ref()
                .map(|r| r.lock().order.clone())
                .unwrap_or_default(),
        }
    }

    /// Write the recorded profile to `path` (atomically: a temporary file renamed over it).
    ///
    /// # Errors
    /// I/O errors.
    pub fn save_profile(&self, path: &Path) -> io::Result<()> {
        self.profile().save(path)
    }

    fn record(&self, index: usize) {
        if let Some(r) = &self.recorder {
            let mut r = r.lock();
            if !r.seen[index] {
                r.seen[index] = true;
                r.order.push(index as u32);
            }
        }
    }
}

impl Disk for ChunkTemplate {
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
            let index = (pos / cs) as usize;
            let within = (pos % cs) as usize;
            let len = self.list.len_of(index);
            let take = (len - within).min(buf.len() - done);
            let out = &mut buf[done..done + take];
            self.record(index);
            match &self.list.chunks[index] {
                None => out.fill(0),
                Some(id) => {
                    let data = self.source.fetch(id, len).map_err(chunk_err)?;
                    // Sources promise bytes that hash to the id; the length is ours to check.
                    if data.len() != len {
                        return Err(DiskError::Corrupt(format!(
                            "chunk {id} is {} bytes, the chunk list says {len}",
                            data.len()
                        )));
                    }
                    out.copy_from_slice(&data[within..within + take]);
                }
            }
            done += take;
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
            let index = (pos / cs) as usize;
            let next = ((index as u64 + 1) * cs).min(end);
            let zero = self.list.chunks[index].is_none();
            push_extent(
                &mut out,
                Extent {
                    len: next - pos,
                    hole: zero,
                    zero,
                    depth: if zero { 0 } else { 1 },
                },
            );
            pos = next;
        }
        Ok(out)
    }
}

/// The order in which a boot first touched each chunk of an image version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessProfile {
    /// Chunks in the image version (a profile only fits a list of this length).
    pub chunks: usize,
    /// Chunk indices in order of first access, each at most once.
    pub order: Vec<u32>,
}

impl AccessProfile {
    /// Write the profile (text, see the module docs), atomically.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let mut text = format!("{PROFILE_MAGIC} {}\n", self.chunks);
        for i in &self.order {
            text.push_str(&i.to_string());
            text.push('\n');
        }
        let tmp = path.with_extension("tmp-profile");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    /// Read a profile written by [`AccessProfile::save`].
    ///
    /// # Errors
    /// I/O errors; [`io::ErrorKind::InvalidData`] for a bad header, an index out of range or
    /// an index listed twice.
    pub fn load(path: &Path) -> io::Result<AccessProfile> {
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let text = std::fs::read_to_string(path)?;
        let mut lines = text.lines();
        let chunks: usize = lines
            .next()
            .and_then(|l| l.strip_prefix(PROFILE_MAGIC))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| bad(format!("{}: not an access profile", path.display())))?;
        let mut seen = vec![false; chunks];
        let mut order = Vec::new();
        for (n, l) in lines.enumerate() {
            let i: u32 = l
                .trim()
                .parse()
                .map_err(|_| bad(format!("line {}: {l:?} is not a chunk index", n + 2)))?;
            match seen.get_mut(i as usize) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(bad(format!(
                        "line {}: index {i} repeated or >= {chunks}",
                        n + 2
                    )))
                }
            }
            order.push(i);
        }
        Ok(AccessProfile { chunks, order })
    }

    /// The chunks to prefetch for `list`, in profile order, then every other data chunk in
    /// list order, each with its length; zero chunks are left out. `None` if the profile was
    /// recorded on a list of another length.
    pub fn order(&self, list: &ChunkList) -> Option<Vec<(ChunkId, usize)>> {
        if self.chunks != list.chunks.len() {
            return None;
        }
        let mut seen = vec![false; list.chunks.len()];
        let mut out = Vec::new();
        let indices = self
            .order
            .iter()
            .map(|&i| i as usize)
            .chain(0..list.chunks.len());
        for i in indices {
            if i < seen.len() && !seen[i] {
                seen[i] = true;
                if let Some(id) = list.chunks[i] {
                    out.push((id, list.len_of(i)));
                }
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::chunk::ChunkSize;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An in-memory source that counts fetches.
    #[derive(Default)]
    struct MemSource {
        chunks: HashMap<ChunkId, Vec<u8>>,
        fetches: AtomicUsize,
    }

    impl ChunkSource for MemSource {
        fn fetch(&self, id: &ChunkId, _len: usize) -> Result<Vec<u8>, ChunkError> {
            self.fetches.fetch_add(1, Ordering::Relaxed);
            self.chunks
                .get(id)
                .cloned()
                .ok_or(ChunkError::NotFound(*id))
        }
    }

    /// Cut `image` into 4 KiB chunks the way the store does (zero chunks elided).
    fn split(image: &[u8]) -> (ChunkList, MemSource) {
        let cs = ChunkSize::new(4096).unwrap();
        let mut src = MemSource::default();
        let chunks = image
            .chunks(4096)
            .map(|c| {
                if c.iter().all(|&b| b == 0) {
                    None
                } else {
                    let id = ChunkId::of(c);
                    src.chunks.insert(id, c.to_vec());
                    Some(id)
                }
            })
            .collect();
        (
            ChunkList {
                chunk_size: cs,
                size: image.len() as u64,
                chunks,
            },
            src,
        )
    }

    fn image() -> Vec<u8> {
        // 5 chunks and a 1000-byte tail; chunks 1 and 3 are zeroes.
        let mut v: Vec<u8> = (0..5 * 4096 + 1000).map(|i| (i % 251) as u8 + 1).collect();
        v[4096..8192].fill(0);
        v[3 * 4096..4 * 4096].fill(0);
        v
    }

    #[test]
    fn reads_return_the_image_bytes_and_zero_chunks_are_not_fetched() {
        let img = image();
        let (list, src) = split(&img);
        let src = Arc::new(src);
        let t = ChunkTemplate::new(list, src.clone()).unwrap();
        assert_eq!(t.size(), img.len() as u64);
        let mut all = vec![0xaa; img.len()];
        t.read_at(&mut all, 0).unwrap();
        assert_eq!(all, img);
        // 4 data chunks (0, 2, 4 and the tail), fetched once each.
        assert_eq!(src.fetches.load(Ordering::Relaxed), 4);
        // Unaligned reads spanning chunk boundaries.
        for (off, len) in [
            (4000u64, 300usize),
            (4096, 4096),
            (8191, 8194),
            (20480, 1000),
        ] {
            let mut b = vec![0xaa; len];
            t.read_at(&mut b, off).unwrap();
            assert_eq!(b, img[off as usize..off as usize + len], "{off}+{len}");
        }
        let zero_reads_before = src.fetches.load(Ordering::Relaxed);
        let mut b = vec![0xaa; 4096];
        t.read_at(&mut b, 3 * 4096).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(src.fetches.load(Ordering::Relaxed), zero_reads_before);
        let mut past = vec![0; 2];
        assert!(matches!(
            t.read_at(&mut past, img.len() as u64 - 1),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.write_at(&[1], 0, WriteFlags::default()),
            Err(DiskError::ReadOnly)
        ));
        assert!(t.is_read_only());
    }

    #[test]
    fn block_status_reports_zero_chunks_as_zero_holes() {
        let img = image();
        let (list, src) = split(&img);
        let t = ChunkTemplate::new(list, Arc::new(src)).unwrap();
        let ext = t.block_status(0, img.len() as u64).unwrap();
        let kinds: Vec<(u64, bool)> = ext.iter().map(|e| (e.len, e.zero)).collect();
        assert_eq!(
            kinds,
            vec![
                (4096, false),
                (4096, true),
                (4096, false),
                (4096, true),
                (5096, false)
            ]
        );
        assert!(ext.iter().all(|e| e.hole == e.zero));
        let ext = t.block_status(5000, 100).unwrap();
        assert_eq!(ext.len(), 1);
        assert!(ext[0].zero && ext[0].len == 100);
    }

    #[test]
    fn a_missing_chunk_is_an_io_error_not_wrong_bytes() {
        let img = image();
        let (list, mut src) = split(&img);
        src.chunks.clear();
        let t = ChunkTemplate::new(list, Arc::new(src)).unwrap();
        let mut b = vec![0; 10];
        assert!(matches!(t.read_at(&mut b, 0), Err(DiskError::Io(_))));
    }

    #[test]
    fn an_inconsistent_list_is_refused() {
        let (mut list, src) = split(&image());
        list.chunks.pop();
        assert!(ChunkTemplate::new(list, Arc::new(src)).is_err());
    }

    #[test]
    fn the_access_profile_records_first_access_order_and_round_trips() {
        let img = image();
        let (list, src) = split(&img);
        let t = ChunkTemplate::new(list.clone(), Arc::new(src))
            .unwrap()
            .recording();
        let mut b = vec![0; 100];
        for off in [4 * 4096u64, 0, 4 * 4096 + 50, 4096, 2 * 4096 + 4090] {
            t.read_at(&mut b, off).unwrap();
        }
        let p = t.profile();
        assert_eq!(p.order, vec![4, 0, 1, 2, 3]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boot.profile");
        t.save_profile(&path).unwrap();
        let back = AccessProfile::load(&path).unwrap();
        assert_eq!(back, p);
        // Prefetch order: profile order, then the rest; zero chunks (1, 3) left out.
        let order = back.order(&list).unwrap();
        let want: Vec<(ChunkId, usize)> = [4, 0, 2, 5]
            .iter()
            .map(|&i| (list.chunks[i].unwrap(), list.len_of(i)))
            .collect();
        assert_eq!(order, want);
        // A profile of another image shape is refused; broken files are refused.
        let mut other = list.clone();
        other.chunks.push(None);
        assert!(back.order(&other).is_none());
        for text in [
            "nope\n",
            "remoca-access-profile v1 6\n7\n",
            "remoca-access-profile v1 6\n1\n1\n",
            "remoca-access-profile v1 6\nx\n",
        ] {
            std::fs::write(&path, text).unwrap();
            assert!(AccessProfile::load(&path).is_err(), "{text:?}");
        }
    }

    #[test]
    fn serves_as_the_template_under_a_copy_on_write_overlay() {
        use crate::overlay::Overlay;
        let img = image();
        let (list, src) = split(&img);
        let t: Arc<dyn Disk> = Arc::new(ChunkTemplate::new(list, Arc::new(src)).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.overlay");
        Overlay::create(&path, t.as_ref(), 12, "chunk template").unwrap();
        let ov = Overlay::open(&path, t.clone(), false).unwrap();
        let mut want = img.clone();
        ov.write_at(&[9; 100], 4096 + 10, WriteFlags::default())
            .unwrap();
        want[4096 + 10..4096 + 110].fill(9);
        ov.write_at(&[8; 4000], 17000, WriteFlags::default())
            .unwrap();
        want[17000..21000].fill(8);
        ov.flush().unwrap();
        let mut got = vec![0; img.len()];
        ov.read_at(&mut got, 0).unwrap();
        assert_eq!(got, want);
        // The template never changed, and reopening the overlay over it keeps the writes.
        let mut tb = vec![0; img.len()];
        t.read_at(&mut tb, 0).unwrap();
        assert_eq!(tb, img);
        drop(ov);
        let ov = Overlay::open(&path, t, true).unwrap();
        let mut got = vec![0; img.len()];
        ov.read_at(&mut got, 0).unwrap();
        assert_eq!(got, want);
        // Zero chunks the overlay never wrote still show as zeroes through it.
        let ext = ov.block_status(3 * 4096, 4096).unwrap();
        assert!(ext.iter().all(|e| e.zero));
    }
}
