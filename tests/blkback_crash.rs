//! Crash consistency of the overlay: `kill -9` of `remoca blkback` at random moments during
//! a write load with flushes, 20 times. After each restart the overlay must open cleanly and
//! every write (and write-zeroes) acknowledged before the last completed flush must read
//! back intact. Writes go to distinct 4 KiB slots (often unaligned within the slot, so the
//! copy-on-write path runs), so a later unflushed write never legitimately overwrites a
//! flushed one.

mod blkback_harness;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blkback_harness::*;
use remoca_blkback::nbd::client::Client;
use remoca_blkback::nbd::wire::CMD_WRITE_ZEROES;

const SIZE: usize = 32 << 20;
const SLOT: u64 = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn connect(srv: &Server) -> Client<TcpStream> {
    let s = TcpStream::connect(&srv.addr).unwrap();
    Client::connect(s, "vm", false).unwrap()
}

fn verify(srv: &Server, durable: &BTreeMap<u64, Vec<u8>>, round: usize) {
    let mut c = connect(srv);
    for (off, want) in durable {
        let got = c.read(*off, want.len() as u32).unwrap();
        assert!(
            &got == want,
            "round {round}: flushed data at offset {off} was lost or corrupted"
        );
    }
}

#[test]
fn kill_9_during_writes_never_loses_flushed_data() {
    crash_rounds(None);
}

/// The same with 4 KiB clusters (the library's default cluster size), where most writes
/// copy up a whole cluster of their own and full 4 KiB writes allocate without copy-up.
#[test]
fn kill_9_during_writes_never_loses_flushed_data_4k_clusters() {
    crash_rounds(Some("4K"));
}

fn crash_rounds(cluster_size: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let (t, o) = template_and_overlay(dir.path(), SIZE);
    if let Some(cs) = cluster_size {
        std::fs::remove_file(&o).unwrap();
        run_ok(
            remoca()
                .args(["image", "create", "--cluster-size", cs, "--template"])
                .arg(&t)
                .arg("--overlay")
                .arg(&o),
        );
    }
    let before = sha(&t);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    // Distinct slots in random order.
    let mut slots: Vec<u64> = (0..SIZE as u64 / SLOT).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut durable: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut total_acked = 0;
    for round in 0..20 {
        let srv = Server::tcp(&[spec("vm", &t, Some(&o))]);
        verify(&srv, &durable, round);
        let pid = srv.child.id();
        let delay = Duration::from_millis(20 + rng.below(250));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        });
        let mut c = connect(&srv);
        let mut pending = Vec::new();
        for k in 0..300 {
            let Some(slot) = slots.pop() else { break };
            let base = slot * SLOT;
            // One in four writes covers its whole slot (a full 4 KiB cluster).
            let (start, len) = if k % 4 == 1 {
                (0, SLOT)
            } else {
                let start = rng.below(SLOT / 2);
                (start, 1 + rng.below(SLOT - start))
            };
            let ok = if k % 8 == 7 {
                let r = c.command(CMD_WRITE_ZEROES, 0, base + start, len as u32);
                pending.push((base + start, vec![0u8; len as usize]));
                matches!(r, Ok(0))
            } else {
                let data: Vec<u8> = (0..len)
                    .map(|i| (i as u8) ^ (round as u8) ^ (k as u8) | 0x80)
                    .collect();
                let r = c.write(base + start, &data, false);
                pending.push((base + start, data));
                r.is_ok()
            };
            if !ok {
                pending.pop();
                break;
            }
            total_acked += 1;
            if k % 10 == 9 {
                if c.flush().is_err() {
                    break;
                }
                durable.extend(pending.drain(..));
            }
        }
        killer.join().unwrap();
        srv.crash();
    }
    let srv = Server::tcp(&[spec("vm", &t, Some(&o))]);
    verify(&srv, &durable, 20);
    srv.stop();
    assert!(
        durable.len() > 20,
        "too few flushed writes to mean anything ({})",
        durable.len()
    );
    eprintln!(
        "{total_acked} acknowledged requests, {} of them flushed before a crash",
        durable.len()
    );
    assert_eq!(sha(&t), before, "the template changed");
    let info = run_ok(remoca().args(["image", "inspect"]).arg(&o));
    assert!(info.contains("template check: matches"), "{info}");
}
