use std::io::Cursor;
use std::sync::Arc;

use proptest::prelude::*;

use super::gc::GcOptions;
use super::*;
use crate::images::chunk::ChunkSize;
use crate::raw::RawFile;
use crate::Disk;

fn cs(n: u64) -> ChunkSize {
    ChunkSize::new(n).unwrap()
}

fn opts(limit: u64) -> StoreOptions {
    StoreOptions {
        write: true,
        compression: arena::Compression::default(),
        arena_limit: limit,
    }
}

/// A deterministic image: `pieces` 4 KiB pieces, piece i filled from seed (seed, i); every
/// 5th piece zero; half of each piece compressible.
fn image(seed: u64, pieces: usize, tail: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..pieces {
        let mut p = vec![0u8; 4096];
        if i % 5 != 3 {
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64 + 1);
            for b in p[..2048].iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            p[2048..].fill(i as u8);
        }
        v.extend_from_slice(&p);
    }
    v.extend(std::iter::repeat_n(7u8, tail));
    v
}

fn import(s: &mut Store, name: &str, data: &[u8], chunk: u64) -> super::ingest::AddReport {
    s.import(name, &mut Cursor::new(data), cs(chunk), "test", &mut |_| {})
        .unwrap()
}

fn export(s: &Store, spec: &str) -> Vec<u8> {
    let v = s.resolve(spec).unwrap();
    let mut out = Vec::new();
    s.export_to(&v, &mut out, &mut |_| {}).unwrap();
    out
}

#[test]
fn import_export_round_trip_with_zero_elision_and_a_short_tail() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Store::open(d.path(), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    let data = image(1, 100, 1000);
    for chunk in [4096, 16384, 65536] {
        let name = format!("img{chunk}");
        let r = import(&mut s, &name, &data, chunk);
        assert_eq!(r.size, data.len() as u64);
        assert_eq!(export(&s, &name), data);
        let list = s.chunk_list(&r.version).unwrap();
        assert!(list.is_consistent());
        if chunk == 4096 {
            // Every fifth piece is zeroes and is not stored.
            assert_eq!(list.chunks.iter().filter(|c| c.is_none()).count(), 20);
        }
    }
    let f = d.path().join("out.raw");
    s.export_file(&s.resolve("img4096").unwrap(), &f, &mut |_| {})
        .unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), data);
    assert!(s
        .export_file(&s.resolve("img4096").unwrap(), &f, &mut |_| {})
        .is_err());
}

#[test]
fn images_sharing_most_chunks_are_stored_once_and_du_shows_it() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Store::open(d.path(), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    let a = image(1, 256, 0);
    let mut b = a.clone();
    b[10 * 4096..11 * 4096].fill(0xab); // one piece differs
    let ra = import(&mut s, "a", &a, 4096);
    let rb = import(&mut s, "b", &b, 4096);
    assert!(ra.new_bytes > 0);
    assert_eq!(rb.new_chunks, 1, "only the changed piece is new");
    let u = s.usage().unwrap();
    let data_a: u64 = ra.chunks * 4096;
    assert_eq!(u.logical_bytes, data_a + rb.chunks * 4096);
    assert_eq!(u.unique_bytes, data_a + 4096);
    assert!(u.dedup_ratio() > 1.9, "{}", u.dedup_ratio());
    assert!(u.stored_bytes < u.logical_bytes / 2);
    let ia = u.images.iter().find(|i| i.name == "a").unwrap();
    assert_eq!(ia.exclusive_bytes, 4096);
}

#[test]
fn older_snapshots_export_unchanged_after_new_versions() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Store::open(d.path(), opts(64 << 10)).unwrap();
    let v1 = image(1, 64, 0);
    let v2 = image(2, 80, 100);
    let r1 = import(&mut s, "os", &v1, 8192);
    let r2 = import(&mut s, "os", &v2, 8192);
    assert_eq!((r1.version.version, r2.version.version), (1, 2));
    assert_eq!(export(&s, "os@1"), v1);
    assert_eq!(export(&s, "os@2"), v2);
    assert_eq!(export(&s, "os"), v2, "a bare name is the newest version");
    assert!(
        s.arenas().len() > 2,
        "small arena limit: several sealed arenas"
    );
    drop(s);
    let s = Store::open(d.path(), StoreOptions::default()).unwrap();
    assert_eq!(export(&s, "os@1"), v1);
    assert!(s.open_report().rescanned.is_empty());
}

#[test]
fn a_lost_or_stale_index_is_rebuilt_from_the_arenas() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Store::open(d.path(), opts(100 << 10)).unwrap();
    let data = image(3, 200, 0);
    import(&mut s, "x", &data, 4096);
    let before = s.index().clone();
    let list = s.chunk_list(&s.resolve("x").unwrap()).unwrap();
    drop(s);
    std::fs::remove_file(d.path().join("index")).unwrap();
    let s = Store::open(d.path(), opts(100 << 10)).unwrap();
    assert!(s.open_report().index_missing);
    assert_eq!(s.index(), &before);
    assert_eq!(s.chunk_list(&s.resolve("x").unwrap()).unwrap(), list);
    assert_eq!(export(&s, "x"), data);
    assert!(s.verify(&mut |_| {}).unwrap().is_clean());
    drop(s);
    // A corrupt index file is the same as none.
    std::fs::write(d.path().join("index"), b"RMCINDX1 garbage").unwrap();
    let s = Store::open(d.path(), StoreOptions::default()).unwrap();
    assert_eq!(s.index(), &before);
}

#[test]
fn a_torn_tail_after_a_crash_is_cut_and_complete_versions_survive() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Store::open(d.path(), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    let data = image(4, 50, 0);
    import(&mut s, "x", &data, 4096);
    let n = *s.arenas().keys().last().unwrap();
    drop(s);
    let p = log::arena_path(d.path(), n);
    let good = std::fs::metadata(&p).unwrap().len();
    // A record header whose payload never reached the disk, then junk.
    let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
    let h = arena::RecordHeader {
        kind: arena::KIND_CHUNK,
        codec: arena::CODEC_RAW,
        raw_len: 4096,
        stored_len: 4096,
        id: ChunkId::of(&[1u8; 4096]),
    };
    std::io::Write::write_all(&mut f, &arena::encode_record_header(&h)).unwrap();
    std::io::Write::write_all(&mut f, &[0u8; 4096]).unwrap();
    drop(f);
    let mut s = Store::open(d.path(), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    assert_eq!(s.open_report().rescanned, vec![n]);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), good, "torn tail cut");
    assert!(!s.contains(&h.id));
    assert_eq!(export(&s, "x"), data);
    let data2 = image(5, 50, 0);
    import(&mut s, "y", &data2, 4096);
    assert_eq!(export(&s, "y"), data2);
    assert!(s.verify(&mut |_| {}).unwrap().is_clean());
}

#[test]
fn verify_names_a_corrupt_chunk_and_the_versions_that_use_it() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Store::open(d.path(), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    let a = image(6, 40, 0);
    import(&mut s, "a", &a, 4096);
    import(&mut s, "b", &a, 4096);
    let victim = s.chunk_list(&s.resolve("a").unwrap()).unwrap().chunks[7].unwrap();
    let loc = s.index()[&victim];
    drop(s);
    let p = log::arena_path(d.path(), loc.arena);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[loc.offset as usize + 5] ^= 0x40;
    std::fs::write(&p, bytes).unwrap();
    let s = Store::open(d.path(), StoreOptions::default()).unwrap();
    let r = s.verify(&mut |_| {}).unwrap();
    assert!(!r.is_clean());
    assert_eq!(r.bad_chunks.len(), 1);
    assert_eq!(r.bad_chunks[0].id, victim);
    let users: Vec<String> = r.bad_chunks[0]
        .used_by
        .iter()
        .map(|v| v.to_string())
        .collect();
    assert_eq!(users, ["a@1", "b@1"]);
    assert!(matches!(s.read_chunk(&victim), Err(StoreError::Corrupt(_))));
    drop(s);
    // Without the index the arena is re-read: the rotten record is stepped over, named by
    // verify, and the records after it are still found.
    std::fs::remove_file(d.path().join("index")).unwrap();
    let mut s = Store::open(d.path(), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    let r = s.verify(&mut |_| {}).unwrap();
    assert_eq!(r.bad_chunks.len(), 1, "{r:?}");
    assert_eq!(r.bad_chunks[0].id, victim);
    assert_eq!(r.bad_chunks[0].used_by.len(), 2);
    assert!(r.missing.is_empty(), "{r:?}");
    let last = s.chunk_list(&s.resolve("a").unwrap()).unwrap().chunks[39].unwrap();
    assert!(s.contains(&last));
    // Importing the same piece again stores a good copy and heals both versions.
    let (id, new) = s.put_chunk(&a[7 * 4096..8 * 4096]).unwrap();
    assert_eq!((id, new), (victim, true));
    assert_eq!(export(&s, "b"), a);
}

#[test]
fn gc_frees_exactly_the_unreferenced_chunks() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Store::open(d.path(), opts(128 << 10)).unwrap();
    let v1 = image(7, 100, 0);
    let v2 = image(8, 100, 0);
    let mut v3 = v2.clone();
    v3[..4096].fill(9);
    import(&mut s, "os", &v1, 4096);
    import(&mut s, "os", &v2, 4096);
    import(&mut s, "os", &v3, 4096);
    let other = image(7, 30, 0); // shares its first 30 pieces with os@1
    import(&mut s, "other", &other, 4096);
    let before = s.usage().unwrap();
    // Only what os@1 alone holds is garbage once it goes.
    let l1 = s.chunk_list(&s.resolve("os@1").unwrap()).unwrap();
    let mut keep_ids = std::collections::HashSet::new();
    for spec in ["os@2", "os@3", "other@1"] {
        keep_ids.extend(
            s.chunk_list(&s.resolve(spec).unwrap())
                .unwrap()
                .chunks
                .into_iter()
                .flatten(),
        );
    }
    let only_v1: std::collections::HashSet<_> = l1
        .chunks
        .iter()
        .flatten()
        .filter(|c| !keep_ids.contains(c))
        .copied()
        .collect();
    let only_v1_bytes: u64 = only_v1.iter().map(|c| s.index()[c].stored_len as u64).sum();
    assert!(!only_v1.is_empty());

    let nothing = s.gc(GcOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(nothing.chunks_freed, 0);
    assert_eq!(nothing.stored_after, nothing.stored_before);

    let r = s
        .gc(
            GcOptions {
                keep_last: Some(2),
                dry_run: false,
            },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(
        r.versions_removed,
        vec!["os@1".parse::<VersionRef>().unwrap()]
    );
    assert_eq!(r.chunks_freed, only_v1.len() as u64);
    assert_eq!(r.stored_before - r.stored_after, only_v1_bytes);
    assert!(r.arena_bytes_after < r.arena_bytes_before);
    for id in &only_v1 {
        assert!(!s.contains(id));
    }
    for id in &keep_ids {
        assert!(s.contains(id));
    }
    assert!(s.usage().unwrap().stored_bytes < before.stored_bytes);
    assert_eq!(export(&s, "os@2"), v2);
    assert_eq!(export(&s, "os@3"), v3);
    assert_eq!(export(&s, "other"), other);
    assert!(s.resolve("os@1").is_err());
    // Numbers are not reused after a removal.
    assert_eq!(import(&mut s, "os", &v1, 4096).version.version, 4);
    drop(s);
    let s = Store::open(d.path(), StoreOptions::default()).unwrap();
    assert!(s.open_report().rescanned.is_empty());
    let v = s.verify(&mut |_| {}).unwrap();
    assert!(v.is_clean(), "{v:?}");
    assert_eq!(v.unreferenced_chunks, 0);
}

#[test]
fn an_overlay_commits_as_a_layer_holding_only_what_it_changed() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Store::open(&d.path().join("store"), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    let base = image(9, 256, 0);
    let rb = import(&mut s, "os", &base, 16384);
    // The workflow: export the version, make an overlay over it, let the VM write.
    let t = d.path().join("t.raw");
    s.export_file(&rb.version, &t, &mut |_| {}).unwrap();
    let tdisk = Arc::new(RawFile::open_read_only(&t).unwrap());
    let ov = d.path().join("vm.ovl");
    crate::overlay::Overlay::create(&ov, &*tdisk, 12, "t.raw").unwrap();
    {
        let o = crate::overlay::Overlay::open(&ov, tdisk.clone(), false).unwrap();
        o.write_at(&[0x5a; 100], 5000, Default::default()).unwrap(); // piece 0
        o.write_at(&[0x33; 4096], 20 * 16384, Default::default())
            .unwrap(); // piece 20
        o.write_zeroes(30 * 16384, 16384, Default::default())
            .unwrap(); // piece 30 zeroed
        o.flush().unwrap();
    }
    let mut expect = base.clone();
    expect[5000..5100].fill(0x5a);
    expect[20 * 16384..20 * 16384 + 4096].fill(0x33);
    expect[30 * 16384..31 * 16384].fill(0);
    let r = s
        .commit_overlay(&ov, &rb.version, "os-vm1", "commit vm.ovl", &mut |_| {})
        .unwrap();
    assert_eq!(r.chunks, 3);
    assert_eq!(r.new_chunks, 2);
    assert_eq!(r.zero_chunks, 1);
    assert_eq!(export(&s, "os-vm1"), expect);
    let m = s.manifest(&r.version).unwrap();
    assert_eq!(m.parent, Some(rb.version.clone()));
    assert!(matches!(
        s.remove(&rb.version),
        Err(StoreError::InUse { .. })
    ));
    // An overlay made over another version is refused.
    let rb2 = import(&mut s, "os", &image(10, 256, 0), 16384);
    assert!(s
        .commit_overlay(&ov, &rb2.version, "x", "", &mut |_| {})
        .is_err());
}

#[test]
fn a_writer_excludes_other_writers_and_readers() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path(), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    use rustix::fs::{flock, FlockOperation};
    let f = std::fs::File::open(d.path().join("lock")).unwrap();
    assert!(flock(&f, FlockOperation::NonBlockingLockShared).is_err());
    drop(s);
    assert!(flock(&f, FlockOperation::NonBlockingLockShared).is_ok());
}

proptest! {
    #[test]
    fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        arena::parse_any(&data);
        manifest::parse_any(&data);
        let _ = index::IndexFile::decode(&data);
    }

    #[test]
    fn manifests_round_trip(
        entries in proptest::collection::btree_map(0u64..1000, proptest::option::of(any::<[u8; 32]>()), 0..50),
        size in 1000u64 * 65536..2000 * 65536,
        parent in proptest::option::of(1u32..100),
        note in "[ -~]{0,40}",
    ) {
        let m = Manifest {
            version: 3,
            created: 1_700_000_000,
            chunk_size: ChunkSize::new(65536).unwrap(),
            size,
            new_bytes: 12345,
            parent: parent.map(|version| VersionRef { image: "base.img".into(), version }),
            note,
            entries: entries.into_iter().map(|(k, v)| (k, v.map(ChunkId))).collect(),
        };
        let b = m.encode();
        prop_assert_eq!(Manifest::decode(&b).unwrap(), m.clone());
        // Stores written before format 2 still read.
        let old = manifest::encode_v1(&m);
        prop_assert_eq!(Manifest::decode(&old).unwrap(), m.clone());
        // Format 2 is never larger: 33 bytes for a chunk next to the previous entry.
        prop_assert!(b.len() <= old.len());
        // Any single flipped byte is caught by the checksum.
        for i in (0..b.len()).step_by(7) {
            let mut c = b.clone();
            c[i] ^= 1;
            prop_assert!(Manifest::decode(&c).is_err());
        }
    }

    #[test]
    fn record_headers_round_trip(raw_len in 1u32..=65536, lz4 in any::<bool>(), id in any::<[u8; 32]>()) {
        let h = arena::RecordHeader {
            kind: arena::KIND_CHUNK,
            codec: if lz4 { arena::CODEC_LZ4 } else { arena::CODEC_RAW },
            raw_len,
            stored_len: if lz4 { raw_len / 2 + 1 } else { raw_len },
            id: ChunkId(id),
        };
        let b = arena::encode_record_header(&h);
        prop_assert_eq!(arena::decode_record_header(&b, 1 << 20).unwrap(), h);
        prop_assert!(arena::decode_record_header(&b, 56 + h.stored_len as u64 - 1).is_err());
    }
}

#[test]
fn an_arena_cut_off_while_being_created_is_reused() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Store::open(d.path(), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    let a = image(11, 20, 0);
    import(&mut s, "a", &a, 4096);
    s.seal_writer().unwrap();
    drop(s);
    let p = log::arena_path(d.path(), 2);
    std::fs::write(&p, [0u8; 7]).unwrap();
    let s = Store::open(d.path(), StoreOptions::default()).unwrap();
    assert_eq!(export(&s, "a"), a);
    drop(s);
    let mut s = Store::open(d.path(), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    let b = image(12, 20, 0);
    import(&mut s, "b", &b, 4096);
    drop(s);
    let s = Store::open(d.path(), StoreOptions::default()).unwrap();
    assert!(s.open_report().rescanned.is_empty());
    assert_eq!(export(&s, "b"), b);
    assert!(s.verify(&mut |_| {}).unwrap().is_clean());
}

#[test]
fn compression_setting_parses_and_refuses_nonsense() {
    use arena::Compression;
    assert_eq!("lz4".parse::<Compression>(), Ok(Compression::Lz4));
    assert_eq!("none".parse::<Compression>(), Ok(Compression::None));
    assert_eq!("zstd".parse::<Compression>(), Ok(Compression::Zstd(3)));
    assert_eq!("zstd:19".parse::<Compression>(), Ok(Compression::Zstd(19)));
    for bad in ["zstd:0", "zstd:20", "zstd:x", "gzip", ""] {
        assert!(bad.parse::<Compression>().is_err(), "{bad:?}");
    }
    for c in [Compression::None, Compression::Lz4, Compression::Zstd(7)] {
        assert_eq!(c.to_string().parse::<Compression>(), Ok(c));
    }
}

#[test]
fn each_codec_round_trips_and_saves_or_stores_raw() {
    use arena::Compression;
    let text: Vec<u8> = (0..4096u32)
        .map(|i| b"remoca image "[i as usize % 13])
        .collect();
    let mut x = 0x1234_5678_9abc_def0u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for how in [
        Compression::Lz4,
        Compression::Zstd(1),
        Compression::Zstd(19),
    ] {
        let (codec, p) = arena::encode_payload(&text, how);
        assert_ne!(codec, arena::CODEC_RAW, "{how}: repetitive text compresses");
        assert!(p.len() < text.len() / 8, "{how}: {} bytes", p.len());
        let h = arena::RecordHeader {
            kind: arena::KIND_CHUNK,
            codec,
            raw_len: 4096,
            stored_len: p.len() as u32,
            id: ChunkId::of(&text),
        };
        assert_eq!(arena::decode_payload(&h, &p).unwrap(), text);
        // The same payload claimed as another chunk, or as a shorter one, is refused.
        let other = arena::RecordHeader {
            id: ChunkId::of(&noise),
            ..h
        };
        assert!(arena::decode_payload(&other, &p).is_err());
        let short = arena::RecordHeader { raw_len: 4000, ..h };
        assert!(arena::decode_payload(&short, &p).is_err());
        // Noise does not compress by an eighth: stored raw.
        let (codec, p) = arena::encode_payload(&noise, how);
        assert_eq!((codec, p.as_slice()), (arena::CODEC_RAW, &noise[..]));
    }
}

#[test]
fn a_store_written_with_every_codec_reads_back_and_verifies() {
    use arena::Compression;
    let d = tempfile::tempdir().unwrap();
    let mut data = Vec::new();
    for (k, how) in [Compression::Lz4, Compression::None, Compression::Zstd(5)]
        .into_iter()
        .enumerate()
    {
        // Each writer compresses its own new chunks its own way; the older records stay
        // as they were written.
        let o = StoreOptions {
            compression: how,
            ..opts(64 << 10)
        };
        let mut s = Store::open(d.path(), o).unwrap();
        let img = image(100 + k as u64, 40, 0);
        import(&mut s, &format!("img{k}"), &img, 4096);
        data.push(img);
    }
    let s = Store::open(d.path(), StoreOptions::default()).unwrap();
    let codecs: std::collections::BTreeSet<u8> = s.index().values().map(|l| l.codec).collect();
    assert!(
        codecs.contains(&arena::CODEC_LZ4) && codecs.contains(&arena::CODEC_ZSTD),
        "{codecs:?}"
    );
    assert!(codecs.contains(&arena::CODEC_RAW), "{codecs:?}");
    for (k, img) in data.iter().enumerate() {
        assert_eq!(&export(&s, &format!("img{k}")), img);
    }
    assert!(s.verify(&mut |_| {}).unwrap().is_clean());
    drop(s);
    // And from the arenas alone.
    std::fs::remove_file(d.path().join("index")).unwrap();
    let s = Store::open(d.path(), StoreOptions::default()).unwrap();
    assert!(s.open_report().index_missing);
    for (k, img) in data.iter().enumerate() {
        assert_eq!(&export(&s, &format!("img{k}")), img);
    }
}

// A remote store over a `DirBackend`: the same code the S3 adapter runs, without a server
// (tests/image_store_s3.rs runs it against an S3-compatible server).

/// Counts the bytes the store fetches from its backend.
#[derive(Debug)]
struct Counting {
    inner: backend::DirBackend,
    fetched: std::sync::atomic::AtomicU64,
    ranged: std::sync::atomic::AtomicU64,
}

impl backend::Backend for Counting {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let b = self.inner.get(key)?;
        let n = b.as_ref().map_or(0, |b| b.len() as u64);
        self.fetched
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(b)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        self.fetched
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        self.ranged
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.get_range(key, offset, len)
    }
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.inner.put(key, bytes)
    }
    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        self.inner.put_new(key, bytes)
    }
    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.list(prefix)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn remote(root: &std::path::Path) -> Arc<Counting> {
    Arc::new(Counting {
        inner: backend::DirBackend::new(root),
        fetched: Default::default(),
        ranged: Default::default(),
    })
}

#[test]
fn a_remote_store_holds_only_sealed_arenas_manifests_and_the_index() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("bucket");
    let a = image(31, 64, 0);
    let mut b = a.clone();
    b[7 * 4096..8 * 4096].fill(0x5a);
    {
        let mut s = Store::open_remote(remote(&root), opts(DEFAULT_ARENA_LIMIT)).unwrap();
        let ra = import(&mut s, "a", &a, 4096);
        let rb = import(&mut s, "b", &b, 4096);
        assert!(ra.new_chunks > 40);
        assert_eq!(rb.new_chunks, 1, "dedup against what is already remote");
    }
    // Objects: one sealed arena per import that added chunks, two manifests, the index.
    let objs = backend::DirBackend::new(&root).list("").unwrap();
    let mut names: Vec<&str> = objs.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "arenas/00000001.arena",
            "arenas/00000002.arena",
            "images/a/1.manifest",
            "images/b/1.manifest",
            "index"
        ]
    );
    for n in [1, 2] {
        let f = File::open(root.join(format!("arenas/0000000{n}.arena"))).unwrap();
        let len = f.metadata().unwrap().len();
        assert!(log::read_footer(&f, n, len).is_some(), "arena {n} sealed");
    }
    // A reader sees both versions through ranged reads, byte-identical.
    let r = remote(&root);
    let s = Store::open_remote(r.clone(), StoreOptions::default()).unwrap();
    assert!(s.open_report().rescanned.is_empty());
    assert_eq!(export(&s, "a"), a);
    assert_eq!(export(&s, "b"), b);
    assert!(s.verify(&mut |_| {}).unwrap().is_clean());
    // Reading one chunk fetches that chunk's payload and nothing more.
    let id = ChunkId::of(&b[7 * 4096..8 * 4096]);
    let before = r.fetched.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(s.read_chunk(&id).unwrap(), &b[7 * 4096..8 * 4096]);
    let got = r.fetched.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert_eq!(got, s.index()[&id].stored_len as u64);
    drop(s);
    let mut w = Store::open_remote(remote(&root), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    // rm writes a tombstone object and removes the manifest object.
    w.remove(&"a@1".parse().unwrap()).unwrap();
    drop(w);
    assert!(root.join("images/a/1.removed").exists());
    assert!(!root.join("images/a/1.manifest").exists());
    let w = Store::open_remote(remote(&root), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    assert!(w.resolve("a").is_err());
    assert_eq!(export(&w, "b"), b);
}

#[test]
fn a_remote_store_rebuilds_a_lost_index_from_footers_and_verify_finds_a_bad_object() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("bucket");
    let a = image(41, 48, 100);
    {
        let mut s = Store::open_remote(remote(&root), opts(DEFAULT_ARENA_LIMIT)).unwrap();
        import(&mut s, "a", &a, 4096);
    }
    // An import killed after its arena was put and before its manifest: an arena whose
    // chunks no manifest names (garbage), which must not disturb anything.
    {
        let s2 = tempfile::tempdir().unwrap();
        let mut l = Store::open(s2.path(), opts(DEFAULT_ARENA_LIMIT)).unwrap();
        import(&mut l, "x", &image(42, 8, 0), 4096);
        l.seal_writer().unwrap();
        drop(l);
        let bytes = std::fs::read(log::arena_path(s2.path(), 1)).unwrap();
        // Renumber: arena 2 of the remote store.
        let mut bytes = bytes;
        bytes[12..16].copy_from_slice(&2u32.to_le_bytes());
        std::fs::write(root.join("arenas/00000002.arena"), bytes).unwrap();
    }
    std::fs::remove_file(root.join("index")).unwrap();
    let s = Store::open_remote(remote(&root), StoreOptions::default()).unwrap();
    assert!(s.open_report().index_missing);
    assert_eq!(export(&s, "a"), a);
    let v = s.verify(&mut |_| {}).unwrap();
    assert!(v.is_clean(), "{v:?}");
    assert!(
        v.unreferenced_chunks > 0,
        "the orphan arena's chunks are garbage"
    );
    drop(s);
    // Flip a byte of a chunk payload in the arena object: verify names it.
    let p = root.join("arenas/00000001.arena");
    let mut bytes = std::fs::read(&p).unwrap();
    let at = arena::ARENA_HEADER_LEN as usize + arena::RECORD_HEADER_LEN + 10;
    bytes[at] ^= 0x40;
    std::fs::write(&p, bytes).unwrap();
    let s = Store::open_remote(remote(&root), StoreOptions::default()).unwrap();
    let v = s.verify(&mut |_| {}).unwrap();
    assert_eq!(v.bad_chunks.len(), 1, "{v:?}");
    assert!(!v.is_clean());
}

#[test]
fn a_second_remote_writer_fails_instead_of_replacing_the_first_ones_objects() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("bucket");
    let a = image(51, 24, 0);
    let b = image(52, 24, 0);
    // Both open before either publishes: both pick arena 1 and version 1.
    let mut w1 = Store::open_remote(remote(&root), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    let mut w2 = Store::open_remote(remote(&root), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    import(&mut w1, "os", &a, 4096);
    let e = w2
        .import("os", &mut Cursor::new(&b), cs(4096), "t", &mut |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("another writer"), "{e}");
    drop((w1, w2));
    let s = Store::open_remote(remote(&root), StoreOptions::default()).unwrap();
    assert_eq!(s.versions("os").unwrap().len(), 1);
    assert_eq!(
        export(&s, "os@1"),
        a,
        "the first writer's version is intact"
    );
    assert!(s.verify(&mut |_| {}).unwrap().is_clean());
    // Run again, the second writer succeeds as version 2.
    let mut w2 = Store::open_remote(remote(&root), opts(DEFAULT_ARENA_LIMIT)).unwrap();
    import(&mut w2, "os", &b, 4096);
    assert_eq!(export(&w2, "os@2"), b);
}

/// A backend that fails one kind of call, as if the process died there: `put_new` of an
/// arena (`at` = "arenas"), `put` of the index, or `delete`.
#[derive(Debug)]
struct Dies {
    inner: backend::DirBackend,
    at: &'static str,
}

impl backend::Backend for Dies {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        self.inner.get_range(key, offset, len)
    }
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        if self.at == key {
            return Err(StoreError::Invalid(format!("died before putting {key}")));
        }
        self.inner.put(key, bytes)
    }
    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        if key.starts_with(self.at) {
            return Err(StoreError::Invalid(format!("died before putting {key}")));
        }
        self.inner.put_new(key, bytes)
    }
    fn delete(&self, key: &str) -> Result<(), StoreError> {
        if self.at == "delete" {
            return Err(StoreError::Invalid(format!("died before deleting {key}")));
        }
        self.inner.delete(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.list(prefix)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn remote_gc_killed_at_any_step_leaves_every_kept_version_readable() {
    for at in ["arenas", "index", "delete"] {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("bucket");
        let a = image(51, 48, 0);
        let mut b = a.clone();
        b[7 * 4096..8 * 4096].fill(0x77);
        let c = image(52, 16, 0);
        {
            let mut s = Store::open_remote(remote(&root), opts(DEFAULT_ARENA_LIMIT)).unwrap();
            import(&mut s, "a", &a, 4096);
            import(&mut s, "b", &b, 4096);
            import(&mut s, "c", &c, 4096);
            s.remove(&"a@1".parse().unwrap()).unwrap();
        }
        // Arena 1 holds a@1's chunks, all but one of them b's too: gc must rewrite it.
        let dies = Arc::new(Dies {
            inner: backend::DirBackend::new(&root),
            at,
        });
        let mut s = Store::open_remote(dies, opts(DEFAULT_ARENA_LIMIT)).unwrap();
        assert!(
            s.gc(GcOptions::default(), &mut |_| {}).is_err(),
            "gc must stop at {at}"
        );
        drop(s);
        // Whatever step it died at, the store opens and every kept version reads.
        let s = Store::open_remote(remote(&root), StoreOptions::default()).unwrap();
        assert_eq!(export(&s, "b"), b, "after dying at {at}");
        assert_eq!(export(&s, "c"), c, "after dying at {at}");
        assert!(s.resolve("a").is_err());
        assert!(
            s.verify(&mut |_| {}).unwrap().is_clean(),
            "after dying at {at}"
        );
        drop(s);
        // A gc that finishes frees everything left over.
        let mut s = Store::open_remote(remote(&root), opts(DEFAULT_ARENA_LIMIT)).unwrap();
        s.gc(GcOptions::default(), &mut |_| {}).unwrap();
        drop(s);
        let s = Store::open_remote(remote(&root), StoreOptions::default()).unwrap();
        assert_eq!(export(&s, "b"), b, "after dying at {at}");
        assert_eq!(export(&s, "c"), c, "after dying at {at}");
        let v = s.verify(&mut |_| {}).unwrap();
        assert!(v.is_clean(), "{v:?}");
        assert_eq!(v.unreferenced_chunks, 0, "after dying at {at}: {v:?}");
        assert!(
            !root.join("arenas/00000001.arena").exists(),
            "after dying at {at}"
        );
    }
}
