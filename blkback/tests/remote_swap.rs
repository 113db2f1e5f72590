//! The remote swap device against real memory servers on loopback (in-process): blocks on
//! two replicas, zero blocks stored nowhere, read-modify-write of misaligned requests,
//! discard freeing remote pages, a lost server survived through the replica and the spill
//! file, a full spill file refused with ENOSPC, and random operations (with a server lost
//! at a random moment) always reading what a model says.

mod remote_support;

use std::sync::Arc;

use proptest::prelude::*;
use remoca_blkback::memory::MemDisk;
use remoca_blkback::remote::{RemoteClient, SwapConfig, SwapDisk};
use remoca_blkback::{Disk, WriteFlags, ZeroFlags};
use remoca_memserver::protocol::Pool;
use remote_support::*;

const NS: u64 = 77;

fn swap(client: &Arc<RemoteClient>, dir: &tempfile::TempDir, size: u64, spill: u64) -> SwapDisk {
    SwapDisk::open(
        client.clone(),
        SwapConfig {
            size,
            namespace: NS,
            spill_path: dir.path().join("swap.spill"),
            spill_max: spill,
        },
    )
    .unwrap()
}

fn block(seed: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| ((i * 7) ^ seed.wrapping_mul(0x9e37_79b9)) as u8 | 1)
        .collect()
}

fn read(d: &dyn Disk, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read_at(&mut b, off).unwrap();
    b
}

#[test]
fn blocks_live_on_two_replicas_and_zero_blocks_nowhere() {
    let (servers, client) = servers_and_client(2);
    let dir = tempfile::tempdir().unwrap();
    let d = swap(&client, &dir, 1 << 20, 1 << 20);
    let mut data = Vec::new();
    for b in 0..8u64 {
        data.extend_from_slice(&block(b));
    }
    data[4096 * 3..4096 * 4].fill(0); // one all-zero block
    d.write_at(&data, 8192, WriteFlags::default()).unwrap();
    assert_eq!(read(&d, 8192, data.len()), data);
    assert_eq!(read(&d, 0, 8192), vec![0u8; 8192]);
    for s in &servers {
        assert_eq!(s.pages().1, 7, "each server holds every non-zero block");
    }
    assert_eq!(
        client.client().replicas_of(Pool::Persistent, NS, 2).len(),
        2
    );
    let st = d.stats();
    assert_eq!(
        (st.remote_writes, st.zero_writes, st.spill_writes),
        (7, 1, 0)
    );
    assert_eq!((st.remote_blocks, st.spilled_blocks), (7, 0));
    // block status: the zero block and the untouched ones are holes.
    let ext = d.block_status(0, 1 << 20).unwrap();
    assert_eq!(ext[0].len, 8192);
    assert!(ext[0].hole && ext[0].zero);
    assert!(!ext[1].hole);
    assert_eq!(ext[1].len, 3 * 4096);
    assert!(ext[2].hole);
    assert_eq!(ext[2].len, 4096);
}

#[test]
fn compressible_blocks_take_less_server_memory() {
    let (servers, client) = servers_and_client(2);
    let dir = tempfile::tempdir().unwrap();
    let d = swap(&client, &dir, 1 << 20, 1 << 20);
    // Sparse pages, as swapped-out heap often is.
    let sparse: Vec<u8> = (0..4096u32)
        .map(|i| if i % 256 == 0 { i as u8 | 1 } else { 0 })
        .collect();
    for b in 0..32u64 {
        d.write_at(&sparse, b * 4096, WriteFlags::default())
            .unwrap();
    }
    d.write_at(&block(1), 32 * 4096, WriteFlags::default())
        .unwrap();
    for b in 0..32u64 {
        assert_eq!(read(&d, b * 4096, 4096), sparse);
    }
    assert_eq!(read(&d, 32 * 4096, 4096), block(1));
    let st = d.stats();
    assert_eq!(st.remote_writes, 33);
    assert!(st.remote_bytes < 4 * 4096, "{st:?}");
    for s in &servers {
        let bytes = s.store.stats().pools[1].bytes;
        assert!(bytes < 8 * 4096, "server holds {bytes} bytes for 33 blocks");
    }
}

#[test]
fn misaligned_requests_are_read_modify_written() {
    let (_servers, client) = servers_and_client(2);
    let dir = tempfile::tempdir().unwrap();
    let d = swap(&client, &dir, 64 << 10, 64 << 10);
    let model = MemDisk::new(64 << 10);
    let big = block(3).repeat(3);
    for (off, len) in [(0u64, 8192usize), (4000, 200), (5000, 9000), (12287, 2)] {
        let buf = &big[..len];
        d.write_at(buf, off, WriteFlags::default()).unwrap();
        model.write_at(buf, off, WriteFlags::default()).unwrap();
    }
    d.discard(100, 5000).unwrap();
    model.discard(100, 5000).unwrap();
    d.write_zeroes(9000, 100, ZeroFlags::default()).unwrap();
    model.write_zeroes(9000, 100, ZeroFlags::default()).unwrap();
    // A fast-only zero of a partial block would need a data write: refused, nothing changed.
    let fast = ZeroFlags {
        fua: false,
        fast_only: true,
    };
    assert!(d.write_zeroes(10, 10, fast).is_err());
    assert_eq!(read(&d, 0, 64 << 10), model.contents());
    assert_eq!(read(&d, 4001, 7), model.contents()[4001..4008].to_vec());
}

#[test]
fn discard_frees_remote_pages() {
    let (servers, client) = servers_and_client(2);
    let dir = tempfile::tempdir().unwrap();
    let d = swap(&client, &dir, 1 << 20, 1 << 20);
    for b in 0..16u64 {
        d.write_at(&block(b), b * 4096, WriteFlags::default())
            .unwrap();
    }
    assert_eq!(servers[0].pages().1, 16);
    d.discard(0, 16 * 4096).unwrap();
    for s in &servers {
        assert_eq!(s.pages().1, 0);
    }
    assert_eq!(read(&d, 0, 16 * 4096), vec![0u8; 16 * 4096]);
    assert_eq!(d.stats().freed, 16);
}

#[test]
fn a_lost_server_is_survived_by_the_replica_and_the_spill_file() {
    let (mut servers, client) = servers_and_client(2);
    let dir = tempfile::tempdir().unwrap();
    let d = swap(&client, &dir, 4 << 20, 4 << 20);
    for b in 0..64u64 {
        d.write_at(&block(b), b * 4096, WriteFlags::default())
            .unwrap();
    }
    servers[0].crash();
    // Old blocks come from the surviving replica.
    for b in 0..64u64 {
        assert_eq!(read(&d, b * 4096, 4096), block(b), "block {b}");
    }
    // New writes cannot get two replicas: they are acknowledged from the spill file.
    for b in 64..128u64 {
        d.write_at(&block(b), b * 4096, WriteFlags::default())
            .unwrap();
    }
    // Rewriting a remote block moves it to the spill file.
    d.write_at(&block(1000), 0, WriteFlags::default()).unwrap();
    let st = d.stats();
    assert_eq!(st.spilled_blocks, 65);
    assert_eq!(st.remote_blocks, 63);
    assert!(st.fallbacks > 0);
    for b in 64..128u64 {
        assert_eq!(read(&d, b * 4096, 4096), block(b), "block {b}");
    }
    assert_eq!(read(&d, 0, 4096), block(1000));
    // The second server dies too: spilled blocks still read, the rest is an error, never
    // zeroes or wrong data.
    servers[1].crash();
    assert_eq!(read(&d, 100 * 4096, 4096), block(100));
    let mut buf = vec![0u8; 4096];
    let e = d.read_at(&mut buf, 5 * 4096).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    d.write_at(&block(9), 9 * 4096, WriteFlags::default())
        .unwrap();
    assert_eq!(read(&d, 9 * 4096, 4096), block(9));
}

#[test]
fn a_full_spill_file_is_enospc() {
    let (mut servers, client) = servers_and_client(2);
    let dir = tempfile::tempdir().unwrap();
    let d = swap(&client, &dir, 1 << 20, 2 * 4096);
    servers[0].crash();
    d.write_at(&block(1).repeat(2), 0, WriteFlags::default())
        .unwrap();
    let e = d
        .write_at(&block(2), 2 * 4096, WriteFlags::default())
        .unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC);
    // Freeing a slot makes room again.
    d.discard(0, 4096).unwrap();
    d.write_at(&block(2), 2 * 4096, WriteFlags::default())
        .unwrap();
    assert_eq!(read(&d, 4096, 8192), [block(1), block(2)].concat());
    assert!(
        SwapDisk::open(
            client.clone(),
            SwapConfig {
                size: 1000,
                namespace: 1,
                spill_path: dir.path().join("x"),
                spill_max: 4096
            }
        )
        .is_err(),
        "a size that is not a multiple of 4096 is refused"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Write { block: u64, n: u64, seed: u64 },
    WriteBytes { off: u64, len: u64, seed: u64 },
    Discard { off: u64, len: u64 },
    Read { off: u64, len: u64 },
    Flush,
}

const SIZE: u64 = 32 * 4096;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..32u64, 1..4u64, any::<u64>()).prop_map(|(block, n, seed)| Op::Write { block: block.min(32 - n), n, seed }),
        1 => (0..SIZE - 1, 1..6000u64, any::<u64>()).prop_map(|(off, len, seed)| Op::WriteBytes { off, len: len.min(SIZE - off), seed }),
        2 => (0..SIZE - 1, 1..20000u64).prop_map(|(off, len)| Op::Discard { off, len: len.min(SIZE - off) }),
        4 => (0..SIZE - 1, 1..20000u64).prop_map(|(off, len)| Op::Read { off, len: len.min(SIZE - off) }),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_read_what_the_model_says(
        ops in proptest::collection::vec(op(), 1..40),
        crash_at in 0..40usize,
    ) {
        let (mut servers, client) = servers_and_client(2);
        let dir = tempfile::tempdir().unwrap();
        let d = swap(&client, &dir, SIZE, SIZE);
        let model = MemDisk::new(SIZE);
        for (i, o) in ops.iter().enumerate() {
            if i == crash_at {
                servers[0].crash();
            }
            match o {
                Op::Write { block: b, n, seed } => {
                    let data: Vec<u8> = (0..*n).flat_map(|k| block(seed ^ k)).collect();
                    d.write_at(&data, b * 4096, WriteFlags::default()).unwrap();
                    model.write_at(&data, b * 4096, WriteFlags::default()).unwrap();
                }
                Op::WriteBytes { off, len, seed } => {
                    let data: Vec<u8> = block(*seed).into_iter().cycle().take(*len as usize).collect();
                    d.write_at(&data, *off, WriteFlags::default()).unwrap();
                    model.write_at(&data, *off, WriteFlags::default()).unwrap();
                }
                Op::Discard { off, len } => {
                    d.discard(*off, *len).unwrap();
                    model.discard(*off, *len).unwrap();
                }
                Op::Read { off, len } => {
                    let want = model.contents()[*off as usize..(*off + *len) as usize].to_vec();
                    prop_assert_eq!(read(&d, *off, *len as usize), want);
                }
                Op::Flush => d.flush().unwrap(),
            }
        }
        prop_assert_eq!(read(&d, 0, SIZE as usize), model.contents());
    }
}
