//! Overlay tests: a property test against the in-memory model, persistence across reopen,
//! and the refusal cases.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::memory::MemDisk;
use crate::raw::RawFile;

const SIZE: u64 = 256 * 1024 + 1000; // not a multiple of the cluster size on purpose

fn template_bytes(size: u64) -> Vec<u8> {
    (0..size).map(|i| (i * 7 % 251) as u8 + 1).collect()
}

fn new_overlay(dir: &tempfile::TempDir, bits: u32) -> (Arc<dyn Disk>, Overlay) {
    let base: Arc<dyn Disk> = Arc::new(MemDisk::read_only(template_bytes(SIZE)));
    let path = dir.path().join("vm.ovl");
    Overlay::create(&path, &*base, bits, "mem").unwrap();
    let ov = Overlay::open(&path, base.clone(), false).unwrap();
    (base, ov)
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Discard(u64, u64),
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let off = 0..SIZE;
    prop_oneof![
        4 => (off.clone(), 1usize..20000, any::<u8>()).prop_map(|(o, n, v)| {
            let n = n.min((SIZE - o) as usize);
            Op::Write(o, (0..n).map(|i| v.wrapping_add(i as u8)).collect())
        }),
        2 => (off.clone(), 1u64..70000).prop_map(|(o, n)| Op::Zero(o, n.min(SIZE - o))),
        1 => (off, 1u64..70000).prop_map(|(o, n)| Op::Discard(o, n.min(SIZE - o))),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn overlay_behaves_like_a_plain_disk(ops in proptest::collection::vec(op(), 1..40), bits in 12u32..15) {
        let dir = tempfile::tempdir().unwrap();
        let (base, mut ov) = new_overlay(&dir, bits);
        let model = MemDisk::new(SIZE);
        model.write_at(&template_bytes(SIZE), 0, WriteFlags::default()).unwrap();
        for op in ops {
            match op {
                Op::Write(o, d) => {
                    ov.write_at(&d, o, WriteFlags::default()).unwrap();
                    // Applying a write twice gives the same result.
                    ov.write_at(&d, o, WriteFlags::default()).unwrap();
                    model.write_at(&d, o, WriteFlags::default()).unwrap();
                }
                Op::Zero(o, n) => {
                    ov.write_zeroes(o, n, ZeroFlags::default()).unwrap();
                    model.write_zeroes(o, n, ZeroFlags::default()).unwrap();
                }
                Op::Discard(o, n) => {
                    ov.discard(o, n).unwrap();
                    model.discard(o, n).unwrap();
                }
                Op::Flush => ov.flush().unwrap(),
                Op::Reopen => {
                    ov.flush().unwrap();
                    drop(ov);
                    ov = Overlay::open(&dir.path().join("vm.ovl"), base.clone(), false).unwrap();
                }
            }
        }
        let mut got = vec![0u8; SIZE as usize];
        ov.read_at(&mut got, 0).unwrap();
        prop_assert!(got == model.contents(), "overlay content differs from the model");
        let ext = ov.block_status(0, SIZE).unwrap();
        prop_assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), SIZE);
        // Every extent reported as zero really reads as zeroes.
        let mut at = 0u64;
        for e in ext {
            if e.zero {
                prop_assert!(got[at as usize..(at + e.len) as usize].iter().all(|&b| b == 0));
            }
            at += e.len;
        }
        // The template was never written.
        let mut t = vec![0u8; SIZE as usize];
        base.read_at(&mut t, 0).unwrap();
        prop_assert!(t == template_bytes(SIZE));
    }
}

#[test]
fn discarded_clusters_read_zero_not_template() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, ov) = new_overlay(&dir, 12);
    ov.discard(8192, 8192).unwrap();
    let mut b = vec![1u8; 8192];
    ov.read_at(&mut b, 8192).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    let ext = ov.block_status(0, 3 * 4096 + 4096).unwrap();
    assert_eq!(
        ext[0],
        Extent {
            len: 8192,
            hole: false,
            zero: false,
            depth: 2
        }
    );
    assert_eq!(
        ext[1],
        Extent {
            len: 8192,
            hole: true,
            zero: true,
            depth: 1
        }
    );
}

#[test]
fn concurrent_partial_writes_to_one_cluster_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, ov) = new_overlay(&dir, 16);
    let ov = Arc::new(ov);
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let ov = ov.clone();
            std::thread::spawn(move || {
                ov.write_at(&[t + 100; 512], u64::from(t) * 1024, WriteFlags::default())
                    .unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut b = vec![0u8; 8 * 1024];
    ov.read_at(&mut b, 0).unwrap();
    let tmpl = template_bytes(SIZE);
    for t in 0..8usize {
        assert!(b[t * 1024..t * 1024 + 512]
            .iter()
            .all(|&x| x == t as u8 + 100));
        assert_eq!(
            &b[t * 1024 + 512..t * 1024 + 1024],
            &tmpl[t * 1024 + 512..t * 1024 + 1024]
        );
    }
}

#[test]
fn refuses_wrong_template_and_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, ov) = new_overlay(&dir, 16);
    drop(ov);
    let path = dir.path().join("vm.ovl");
    let other: Arc<dyn Disk> = Arc::new(MemDisk::read_only(vec![9; SIZE as usize]));
    let e = Overlay::open(&path, other, false).unwrap_err();
    assert!(matches!(e, OverlayError::TemplateMismatch { .. }), "{e}");
    let smaller: Arc<dyn Disk> = Arc::new(MemDisk::read_only(vec![9; 4096]));
    let e = Overlay::open(&path, smaller, false).unwrap_err();
    assert!(matches!(e, OverlayError::TemplateSize { .. }), "{e}");
    let base: Arc<dyn Disk> = Arc::new(MemDisk::read_only(template_bytes(SIZE)));
    let e = Overlay::create(&path, &*base, 16, "x").unwrap_err();
    assert!(matches!(e, OverlayError::Exists(_)), "{e}");
    // A raw file is not an overlay.
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 8192]).unwrap();
    let e = Overlay::open(&raw, base.clone(), false).unwrap_err();
    assert!(
        e.source()
            .map(|s| s.to_string())
            .unwrap_or_default()
            .contains("magic"),
        "{e}"
    );
    let e = Overlay::open(&dir.path().join("missing"), base, false).unwrap_err();
    assert!(matches!(e, OverlayError::Open { .. }));
}

#[test]
fn read_only_overlay_refuses_writes_and_inspect_counts() {
    let dir = tempfile::tempdir().unwrap();
    let tpath = dir.path().join("t.raw");
    std::fs::write(&tpath, template_bytes(SIZE)).unwrap();
    let base: Arc<dyn Disk> = Arc::new(RawFile::open_read_only(&tpath).unwrap());
    let path = dir.path().join("vm.ovl");
    Overlay::create(&path, &*base, 12, tpath.to_str().unwrap()).unwrap();
    let ov = Overlay::open(&path, base.clone(), false).unwrap();
    ov.write_at(&[1; 4096], 0, WriteFlags { fua: true })
        .unwrap();
    ov.write_zeroes(
        4096,
        8192,
        ZeroFlags {
            fua: true,
            fast_only: true,
        },
    )
    .unwrap();
    drop(ov);
    let i = inspect(&path).unwrap();
    assert_eq!((i.data_clusters, i.zero_clusters), (1, 2));
    let ro = Overlay::open(&path, base, true).unwrap();
    assert!(matches!(
        ro.write_at(&[1], 0, WriteFlags::default()),
        Err(DiskError::ReadOnly)
    ));
    let mut b = [0u8; 4];
    ro.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [1; 4]);
}

use std::error::Error as _;

/// What a new driver process would see: the overlay opened afresh from its file, with
/// nothing of `ov`'s memory.
fn reopened(dir: &tempfile::TempDir, base: &Arc<dyn Disk>) -> Overlay {
    Overlay::open(&dir.path().join("vm.ovl"), base.clone(), true).unwrap()
}

#[test]
fn a_write_is_stored_once_its_clusters_are_mapped_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ov) = new_overlay(&dir, 12);
    let a = vec![0xa1u8; 8192];
    // Allocating: the map entry exists only in memory until a flush.
    ov.write_at(&a, 4096, WriteFlags::default()).unwrap();
    assert!(!ov.write_is_stored(4096, 8192));
    let mut got = vec![0u8; 8192];
    reopened(&dir, &base).read_at(&mut got, 4096).unwrap();
    assert_ne!(got, a, "a fresh open does not see an unflushed allocation");

    ov.flush().unwrap();
    assert!(ov.write_is_stored(4096, 8192));
    assert!(ov.write_is_stored(4096 + 100, 10));
    // Overwriting mapped clusters: stored as soon as it returns, no flush.
    let b = vec![0xb2u8; 8192];
    ov.write_at(&b, 4096, WriteFlags::default()).unwrap();
    assert!(ov.write_is_stored(4096, 8192));
    reopened(&dir, &base).read_at(&mut got, 4096).unwrap();
    assert_eq!(got, b);

    // A range that reaches an unmapped cluster, a discarded cluster, a change on the same
    // map page: not stored until the next flush.
    assert!(!ov.write_is_stored(4096, 3 * 4096));
    ov.discard(8192, 4096).unwrap();
    assert!(!ov.write_is_stored(4096, 4096), "same map page changed");
    assert!(!ov.write_is_stored(8192, 4096));
    ov.flush().unwrap();
    assert!(ov.write_is_stored(4096, 4096));
    assert!(
        !ov.write_is_stored(8192, 4096),
        "a zero cluster is not data"
    );

    assert!(ov.write_is_stored(0, 0));
    assert!(!ov.write_is_stored(SIZE, 1), "out of range");
    assert!(
        !reopened(&dir, &base).write_is_stored(4096, 4096),
        "read-only"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Whenever the overlay says a write is stored, a fresh open of the file (a new driver
    /// after this one died without flushing) reads that write back.
    #[test]
    fn a_stored_write_reads_back_from_a_fresh_open(ops in proptest::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let (base, ov) = new_overlay(&dir, 12);
        for op in ops {
            match op {
                Op::Write(o, d) => {
                    ov.write_at(&d, o, WriteFlags::default()).unwrap();
                    if ov.write_is_stored(o, d.len() as u64) {
                        let mut got = vec![0u8; d.len()];
                        reopened(&dir, &base).read_at(&mut got, o).unwrap();
                        prop_assert_eq!(got, d);
                    }
                }
                Op::Zero(o, n) => ov.write_zeroes(o, n, ZeroFlags::default()).unwrap(),
                Op::Discard(o, n) => ov.discard(o, n).unwrap(),
                Op::Flush | Op::Reopen => ov.flush().unwrap(),
            }
        }
    }
}
