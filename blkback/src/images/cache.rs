//! The node cache: a persistent, bounded chunk cache in a local directory (the fast device).
//!
//! **Format.** One file per chunk, `DIR/chunks/XY/<64 hex digits of the id>` (`XY` = the
//! id's first byte, so no directory grows huge), holding exactly the chunk's bytes. New
//! chunks are written to `DIR/tmp/` and renamed into place, so a crash leaves either the
//! whole chunk or a stray temporary file (deleted at the next open). Nothing else is stored:
//! the index is rebuilt at open by listing the files and hashing each one; a file whose bytes
//! do not hash to its name, or whose name is not an id, is deleted. Recency at open comes from
//! the files' modification times.
//!
//! **Integrity.** Every chunk is checked against its id when inserted (a peer may lie) and
//! every time it is read back from disk (a disk may rot); a chunk that fails on read is
//! deleted and reported as missing, so the caller fetches it again.
//!
//! **Eviction.** The cache is bounded in bytes. Each chunk has a priority: the number of
//! distinct *owners* that reference it, where an owner is an image or layer this node serves
//! or a running VM whose template needs it (registered with [`NodeCache::set_references`]).
//! A chunk of a base layer shared by ten images and three running VMs has priority 13; a
//! chunk only one layer uses has 1; a chunk nothing registered references (left from an
//! image that is gone) has 0. When space is needed the cache evicts the chunk with the lowest
//! priority, and the least recently used among equal priorities. References live in memory
//! only: whoever runs the node registers them again after a restart (until then every chunk
//! has priority 0 and eviction is plain LRU).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;

use super::chunk::{ChunkError, ChunkId, ChunkSource, MAX_CHUNK_SIZE};

/// Counters of one cache since it was opened.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub inserted: AtomicU64,
    pub evicted: AtomicU64,
    /// Chunks dropped because their file no longer matched their id.
    pub corrupt_dropped: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    len: u64,
    priority: u32,
    tick: u64,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<ChunkId, Entry>,
    /// Eviction order: lowest priority first, then least recently used.
    order: BTreeSet<(u32, u64, ChunkId)>,
    used: u64,
    tick: u64,
    /// Owner → the chunks it references.
    owners: HashMap<String, HashSet<ChunkId>>,
    /// Chunk → how many owners reference it.
    refs: HashMap<ChunkId, u32>,
}

impl State {
    fn touch(&mut self, id: &ChunkId) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(id) {
            self.order.remove(&(e.priority, e.tick, *id));
            e.tick = tick;
            self.order.insert((e.priority, e.tick, *id));
        }
    }

    fn set_priority(&mut self, id: &ChunkId, priority: u32) {
        if let Some(e) = self.entries.get_mut(id) {
            self.order.remove(&(e.priority, e.tick, *id));
            e.priority = priority;
            self.order.insert((e.priority, e.tick, *id));
        }
    }

    fn remove(&mut self, id: &ChunkId) -> bool {
        match self.entries.remove(id) {
            Some(e) => {
                self.order.remove(&(e.priority, e.tick, *id));
                self.used -= e.len;
                true
            }
            None => false,
        }
    }
}

/// A persistent, bounded, verified chunk cache. See the module docs.
#[derive(Debug)]
pub struct NodeCache {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    tmp_seq: AtomicU64,
    pub stats: CacheStats,
}

fn parse_name(name: &str) -> Option<ChunkId> {
    name.parse().ok()
}

impl NodeCache {
    /// Open (or create) the cache in `dir`, bounded to `max_bytes`, rebuilding the index from
    /// the chunk files and deleting every file that fails its hash. If the files hold more
    /// than `max_bytes` (the bound was lowered), the oldest are evicted.
    ///
    /// # Errors
    /// I/O errors creating or listing the directory.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<NodeCache> {
        fs::create_dir_all(dir.join("chunks"))?;
        let tmp = dir.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        let cache = NodeCache {
            dir: dir.to_owned(),
            max_bytes,
            state: Mutex::new(State::default()),
            tmp_seq: AtomicU64::new(0),
            stats: CacheStats::default(),
        };
        let mut found: Vec<(SystemTime, ChunkId, u64)> = Vec::new();
        for sub in fs::read_dir(dir.join("chunks"))? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                fs::remove_file(sub.path())?;
                continue;
            }
            for f in fs::read_dir(sub.path())? {
                let f = f?;
                let path = f.path();
                let id = f.file_name().to_str().and_then(parse_name);
                let good = match id {
                    Some(id) if cache.path_of(&id) == path => match fs::read(&path) {
                        Ok(data) if data.len() <= MAX_CHUNK_SIZE as usize && id.matches(&data) => {
                            let mtime = f.metadata()?.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                            found.push((mtime, id, data.len() as u64));
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                };
                if !good {
                    tracing::warn!("node cache: dropping {} (fails its hash)", path.display());
                    cache.stats.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
                    let _ = fs::remove_file(&path);
                }
            }
        }
        found.sort();
        {
            let mut st = cache.state.lock();
            for (_, id, len) in found {
                st.tick += 1;
                let e = Entry {
                    len,
                    priority: 0,
                    tick: st.tick,
                };
                st.order.insert((0, e.tick, id));
                st.entries.insert(id, e);
                st.used += len;
            }
        }
        cache.evict_to(max_bytes);
        Ok(cache)
    }

    /// Where chunk `id` lives.
    pub fn path_of(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_string();
        self.dir.join("chunks").join(&hex[..2]).join(hex)
    }

    /// The byte bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bytes held now.
    pub fn used_bytes(&self) -> u64 {
        self.state.lock().used
    }

    /// Chunks held now.
    pub fn len(&self) -> usize {
        self.state.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the index lists `id` (its file may still turn out corrupt on read).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.state.lock().entries.contains_key(id)
    }

    /// The priority of `id` (how many owners reference it), if cached.
    pub fn priority_of(&self, id: &ChunkId) -> Option<u32> {
        self.state.lock().entries.get(id).map(|e| e.priority)
    }

    /// Read a cached chunk, checking it against its id. `Ok(None)` when not cached, or when
    /// its file failed the check (the file is then deleted).
    ///
    /// # Errors
    /// I/O errors other than the file being gone.
    pub fn get(&self, id: &ChunkId) -> io::Result<Option<Vec<u8>>> {
        if !self.contains(id) {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let path = self.path_of(id);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Evicted between the index check and the read, or deleted behind our back.
                self.state.lock().remove(id);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if !id.matches(&data) {
            tracing::warn!("node cache: chunk {id} failed its hash on read; dropped");
            self.stats.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
            self.state.lock().remove(id);
            let _ = fs::remove_file(&path);
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        self.state.lock().touch(id);
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(data))
    }

    /// Insert a chunk after checking it against `id`. A chunk already cached is only marked
    /// used. A chunk larger than the whole bound is not cached (`Ok(false)`).
    ///
    /// # Errors
    /// [`ChunkError::Corrupt`] if `data` does not hash to `id` (nothing is stored); I/O
    /// errors writing the file.
    pub fn insert(&self, id: &ChunkId, data: &[u8]) -> Result<bool, ChunkError> {
        if !id.matches(data) {
            return Err(ChunkError::Corrupt {
                id: *id,
                source_name: "insert into node cache".into(),
            });
        }
        let len = data.len() as u64;
        if len > self.max_bytes {
            return Ok(false);
        }
        if self.contains(id) {
            self.state.lock().touch(id);
            return Ok(true);
        }
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join("tmp").join(format!("{id}.{seq}"));
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            let path = self.path_of(id);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
        {
            let mut st = self.state.lock();
            if !st.entries.contains_key(id) {
                st.tick += 1;
                let e = Entry {
                    len,
                    priority: st.refs.get(id).copied().unwrap_or(0),
                    tick: st.tick,
                };
                st.order.insert((e.priority, e.tick, *id));
                st.entries.insert(*id, e);
                st.used += len;
            }
        }
        self.stats.inserted.fetch_add(1, Ordering::Relaxed);
        self.evict_to(self.max_bytes);
        Ok(true)
    }

    /// Evict (lowest priority, least recently used first) until at most `bound` bytes are
    /// held.
    fn evict_to(&self, bound: u64) {
        loop {
            let victim = {
                let mut st = self.state.lock();
                if st.used <= bound {
                    return;
                }
                let Some(&(_, _, id)) = st.order.iter().next() else {
                    return;
                };
                st.remove(&id);
                id
            };
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
            let _ = fs::remove_file(self.path_of(&victim));
        }
    }

    /// Declare that `owner` (an image, a layer, or a running VM: any name unique on this
    /// node) references exactly `ids`, replacing what it referenced before. An empty list
    /// drops the owner (the image was removed, the VM stopped).
    pub fn set_references(&self, owner: &str, ids: impl IntoIterator<Item = ChunkId>) {
        let new: HashSet<ChunkId> = ids.into_iter().collect();
        let mut st = self.state.lock();
        let old = st.owners.remove(owner).unwrap_or_default();
        let mut changed: Vec<ChunkId> = Vec::new();
        for id in old.difference(&new) {
            if let Some(n) = st.refs.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    st.refs.remove(id);
                }
            }
            changed.push(*id);
        }
        for id in new.difference(&old) {
            *st.refs.entry(*id).or_insert(0) += 1;
            changed.push(*id);
        }
        for id in changed {
            let p = st.refs.get(&id).copied().unwrap_or(0);
            st.set_priority(&id, p);
        }
        if !new.is_empty() {
            st.owners.insert(owner.to_string(), new);
        }
    }
}

/// The cache as a source: only what it holds, never fetching.
impl ChunkSource for NodeCache {
    fn fetch(&self, id: &ChunkId, len: usize) -> Result<Vec<u8>, ChunkError> {
        match self.get(id)? {
            Some(d) if d.len() == len => Ok(d),
            _ => Err(ChunkError::NotFound(*id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u32, len: usize) -> (ChunkId, Vec<u8>) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u32 ^ n.wrapping_mul(7919)) as u8)
            .collect();
        (ChunkId::of(&data), data)
    }

    #[test]
    fn chunks_survive_a_restart_and_corrupt_files_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (a, da) = chunk(1, 4096);
        let (b, db) = chunk(2, 4096);
        let (c, dc) = chunk(3, 100);
        {
            let cache = NodeCache::open(dir.path(), 1 << 20).unwrap();
            for (id, d) in [(&a, &da), (&b, &db), (&c, &dc)] {
                assert!(cache.insert(id, d).unwrap());
            }
            assert_eq!(cache.used_bytes(), 8292);
        }
        // Rot one file, plant a stray file and a stray temporary.
        let cache = NodeCache::open(dir.path(), 1 << 20).unwrap();
        let mut rotten = db.clone();
        rotten[10] ^= 1;
        fs::write(cache.path_of(&b), &rotten).unwrap();
        drop(cache);
        fs::create_dir_all(dir.path().join("chunks/00")).unwrap();
        fs::write(dir.path().join("chunks/00/not-an-id"), b"x").unwrap();
        fs::write(dir.path().join("tmp/half-written"), b"x").unwrap();
        let cache = NodeCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(cache.get(&a).unwrap(), Some(da));
        assert_eq!(cache.get(&c).unwrap(), Some(dc));
        assert_eq!(cache.get(&b).unwrap(), None);
        assert!(!cache.path_of(&b).exists());
        assert!(!dir.path().join("chunks/00/not-an-id").exists());
        assert!(!dir.path().join("tmp/half-written").exists());
        assert_eq!(cache.used_bytes(), 4196);
        assert_eq!(cache.stats.corrupt_dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_chunk_that_rots_after_insert_is_dropped_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NodeCache::open(dir.path(), 1 << 20).unwrap();
        let (a, da) = chunk(1, 4096);
        cache.insert(&a, &da).unwrap();
        let mut bad = da.clone();
        bad[0] ^= 0xff;
        fs::write(cache.path_of(&a), &bad).unwrap();
        assert_eq!(cache.get(&a).unwrap(), None);
        assert!(!cache.contains(&a));
        assert!(matches!(
            cache.fetch(&a, 4096),
            Err(ChunkError::NotFound(_))
        ));
    }

    #[test]
    fn bad_data_is_never_inserted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NodeCache::open(dir.path(), 1 << 20).unwrap();
        let (a, _) = chunk(1, 4096);
        let (_, other) = chunk(2, 4096);
        assert!(matches!(
            cache.insert(&a, &other),
            Err(ChunkError::Corrupt { .. })
        ));
        assert!(cache.is_empty());
        assert!(!cache.path_of(&a).exists());
    }

    #[test]
    fn the_bound_holds_and_eviction_is_lru_within_priority() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NodeCache::open(dir.path(), 4 * 4096).unwrap();
        let c: Vec<_> = (0..6).map(|n| chunk(n, 4096)).collect();
        // c0 belongs to a base layer two images share and a running VM; c1 to one image.
        cache.set_references("image:debian", [c[0].0, c[1].0]);
        cache.set_references("image:debian-web", [c[0].0]);
        cache.set_references("vm:7", [c[0].0]);
        for (id, d) in &c[..4] {
            cache.insert(id, d).unwrap();
        }
        assert_eq!(cache.priority_of(&c[0].0), Some(3));
        assert_eq!(cache.priority_of(&c[1].0), Some(1));
        assert_eq!(cache.priority_of(&c[2].0), Some(0));
        // Use c2 so c3 is the least recent priority-0 chunk.
        assert!(cache.get(&c[2].0).unwrap().is_some());
        cache.insert(&c[4].0, &c[4].1).unwrap();
        assert!(!cache.contains(&c[3].0), "LRU among priority 0 goes first");
        cache.insert(&c[5].0, &c[5].1).unwrap();
        assert!(!cache.contains(&c[2].0));
        assert!(cache.used_bytes() <= 4 * 4096);
        // Now c4 and c5 (priority 0) go before c1 and c0 however recently those were used.
        let (x, dx) = chunk(10, 4096);
        let (y, dy) = chunk(11, 4096);
        cache.insert(&x, &dx).unwrap();
        cache.insert(&y, &dy).unwrap();
        assert!(cache.contains(&c[0].0) && cache.contains(&c[1].0));
        // The image goes away: c1 drops to priority 0 and is the oldest, so it goes next.
        cache.set_references("image:debian", []);
        assert_eq!(cache.priority_of(&c[0].0), Some(2));
        assert_eq!(cache.priority_of(&c[1].0), Some(0));
        let (z, dz) = chunk(12, 4096);
        cache.insert(&z, &dz).unwrap();
        assert!(!cache.contains(&c[1].0));
        assert!(cache.contains(&c[0].0));
        assert_eq!(cache.len(), 4);
        // A chunk bigger than the whole cache is served but not kept.
        let small = NodeCache::open(&dir.path().join("small"), 100).unwrap();
        assert!(!small.insert(&x, &dx).unwrap());
        assert!(small.is_empty());
    }

    #[test]
    fn a_lowered_bound_evicts_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = NodeCache::open(dir.path(), 1 << 20).unwrap();
            for n in 0..5 {
                let (id, d) = chunk(n, 4096);
                cache.insert(&id, &d).unwrap();
            }
        }
        let cache = NodeCache::open(dir.path(), 2 * 4096).unwrap();
        assert_eq!(cache.len(), 2);
        let files: usize = fs::read_dir(dir.path().join("chunks"))
            .unwrap()
            .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum();
        assert_eq!(files, 2);
    }
}
