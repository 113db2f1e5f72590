//! The remote read cache against real memory servers on loopback (in-process): admission on
//! the second touch, hits served from the ephemeral pool, invalidation by writes, a lost
//! server costing only misses, and random reads / writes / discards / write-zeroes / flushes
//! through the cache over an in-memory disk always reading what a model says.

mod remote_support;

use std::sync::Arc;

use proptest::prelude::*;
use remoca_blkback::memory::MemDisk;
use remoca_blkback::remote::{CacheConfig, RemoteCache};
use remoca_blkback::{Disk, WriteFlags, ZeroFlags};
use remote_support::*;

fn read(d: &dyn Disk, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read_at(&mut b, off).unwrap();
    b
}

fn filled(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

#[test]
fn second_touch_admits_then_hits_and_a_write_invalidates() {
    let (servers, client) = servers_and_client(1);
    let lower = Arc::new(MemDisk::new(1 << 20));
    lower
        .write_at(&filled(1 << 20, 5), 0, WriteFlags::default())
        .unwrap();
    let c = RemoteCache::new(lower.clone(), client, CacheConfig::new(9));
    let want = lower.contents()[8192..16384].to_vec();
    assert_eq!(read(&c, 8192, 8192), want);
    let s = c.stats();
    assert_eq!((s.misses, s.first_touch, s.admitted, s.hits), (2, 2, 0, 0));
    assert_eq!(servers[0].pages().0, 0, "first touch is not cached");
    assert_eq!(read(&c, 8192, 8192), want);
    let s = c.stats();
    assert_eq!((s.misses, s.admitted, s.hits), (4, 2, 0));
    assert_eq!(servers[0].pages().0, 2);
    // Third read: served from remote memory. Prove it by changing the lower disk behind
    // the cache's back (never done in real use) and seeing the cached bytes.
    lower
        .write_at(&[0xEE; 4096], 8192, WriteFlags::default())
        .unwrap();
    assert_eq!(read(&c, 8192, 8192), want);
    assert_eq!(c.stats().hits, 2);
    // A write through the cache invalidates: the next read sees the new data.
    c.write_at(&[0xAB; 100], 8192 + 50, WriteFlags::default())
        .unwrap();
    assert_eq!(servers[0].pages().0, 1);
    assert_eq!(c.stats().invalidated, 1);
    let got = read(&c, 8192, 4096);
    assert_eq!(got, lower.contents()[8192..12288].to_vec());
    assert_eq!(&got[50..150], &[0xAB; 100][..]);
    // Partial reads of a cached block are served from it too.
    let hits = c.stats().hits;
    assert_eq!(
        read(&c, 12288 + 10, 20),
        want[4096 + 10..4096 + 30].to_vec()
    );
    assert_eq!(c.stats().hits, hits + 1);
}

#[test]
fn a_lost_server_costs_only_misses() {
    let (mut servers, client) = servers_and_client(1);
    let lower = Arc::new(MemDisk::new(64 << 10));
    lower
        .write_at(&filled(64 << 10, 1), 0, WriteFlags::default())
        .unwrap();
    let c = RemoteCache::new(lower.clone(), client, CacheConfig::new(3));
    for _ in 0..3 {
        assert_eq!(read(&c, 0, 64 << 10), lower.contents());
    }
    assert_eq!(c.stats().hits, 16);
    servers[0].crash();
    for _ in 0..2 {
        assert_eq!(read(&c, 0, 64 << 10), lower.contents());
    }
    c.write_at(&[1; 4096], 0, WriteFlags::default()).unwrap();
    assert_eq!(read(&c, 0, 4096), vec![1; 4096]);
    assert!(c.stats().remote_errors > 0 || c.stats().misses > 16);
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Discard { off: u64, len: u64 },
    Zero { off: u64, len: u64 },
    Read { off: u64, len: u64 },
    Flush,
}

/// Not a multiple of 4096: the partial last block is never cached.
const SIZE: u64 = 16 * 4096 + 1000;

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        // Block-aligned, as guests mostly do.
        (0..17u64, 1..4u64).prop_map(|(b, n)| (b * 4096, n * 4096)),
        (0..SIZE, 1..10_000u64),
    ]
    .prop_map(|(off, len)| {
        let off = off.min(SIZE - 1);
        (off, len.min(SIZE - off))
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (range(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => range().prop_map(|(off, len)| Op::Zero { off, len }),
        8 => range().prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_through_the_cache_read_what_the_model_says(
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let (servers, client) = servers_and_client(1);
        let lower = Arc::new(MemDisk::new(SIZE));
        lower.write_at(&filled(SIZE as usize, 7), 0, WriteFlags::default()).unwrap();
        let model = MemDisk::new(SIZE);
        model.write_at(&filled(SIZE as usize, 7), 0, WriteFlags::default()).unwrap();
        let c = RemoteCache::new(lower, client, CacheConfig::new(11));
        for o in &ops {
            match o {
                Op::Write { off, len, seed } => {
                    let data = filled(*len as usize, *seed);
                    c.write_at(&data, *off, WriteFlags::default()).unwrap();
                    model.write_at(&data, *off, WriteFlags::default()).unwrap();
                }
                Op::Discard { off, len } => {
                    c.discard(*off, *len).unwrap();
                    model.discard(*off, *len).unwrap();
                }
                Op::Zero { off, len } => {
                    c.write_zeroes(*off, *len, ZeroFlags::default()).unwrap();
                    model.write_zeroes(*off, *len, ZeroFlags::default()).unwrap();
                }
                Op::Read { off, len } => {
                    let want = model.contents()[*off as usize..(*off + *len) as usize].to_vec();
                    prop_assert_eq!(read(&c, *off, *len as usize), want);
                }
                Op::Flush => c.flush().unwrap(),
            }
        }
        // Everything, twice (the second pass is mostly hits).
        prop_assert_eq!(read(&c, 0, SIZE as usize), model.contents());
        prop_assert_eq!(read(&c, 0, SIZE as usize), model.contents());
        let s = c.stats();
        prop_assert_eq!(s.hits + s.misses > 0, true);
        prop_assert!(servers[0].pages().0 <= 16, "only whole blocks are cached");
    }
}
