//! The client against real servers: encryption, integrity, authentication, placement,
//! replication, failover and re-replication, pipelining, the blocking wrapper.

mod support;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use remoca_memserver::client::{
    BlockingClient, Client, ClientConfig, ClientError, Connection, PageSecret, SealError,
};
use remoca_memserver::protocol::auth::AuthKey;
use remoca_memserver::protocol::control::{self, HelloReply};
use remoca_memserver::protocol::frame::Header;
use remoca_memserver::protocol::message::ReplyWriter;
use remoca_memserver::protocol::{decode, Pool, ReplyBody, Request};
use support::{key, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn page(ns: u64, k: u64) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    for (i, b) in p.iter_mut().enumerate() {
        *b = (ns as usize * 31 + k as usize * 7 + i) as u8;
    }
    p
}

fn config(servers: &[&TestServer], replicas: usize) -> ClientConfig {
    let mut c = ClientConfig::new(
        servers.iter().map(|s| s.addr).collect(),
        Some(key()),
        PageSecret::new([42; 32]),
    );
    c.replicas = replicas;
    c.request_timeout = Duration::from_secs(5);
    c.auto_repair = false;
    c
}

#[tokio::test]
async fn round_trip_and_servers_hold_only_ciphertext() {
    let a = TestServer::start(64 << 20, Some(key()));
    let b = TestServer::start(64 << 20, Some(key()));
    let c = Client::connect(config(&[&a, &b], 2)).await.unwrap();
    for pool in Pool::ALL {
        c.put(pool, 1, 7, &page(1, 7)).await.unwrap();
        assert_eq!(c.get(pool, 1, 7).await.unwrap(), Some(page(1, 7)));
        c.delete(pool, 1, 7).await.unwrap();
        assert_eq!(c.get(pool, 1, 7).await.unwrap(), None);
    }
    let pages: Vec<(u64, Vec<u8>)> = (0..300).map(|k| (k, page(3, k))).collect();
    let refs: Vec<(u64, &[u8])> = pages.iter().map(|(k, p)| (*k, &p[..])).collect();
    c.put_batch(Pool::Persistent, 3, &refs).await.unwrap();
    let keys: Vec<u64> = (0..300).chain([1000]).collect();
    let got = c.get_batch(Pool::Persistent, 3, &keys).await.unwrap();
    for (k, g) in keys.iter().zip(&got) {
        assert_eq!(g.as_deref(), (*k < 300).then(|| page(3, *k)).as_deref());
    }
    // Two replicas of each: both servers hold 300 pages, none of them readable.
    for s in [&a, &b] {
        let st = s.store.stats();
        assert_eq!(st.pools[1].pages, 300);
        for k in 0..300 {
            let v = s.store.get(Pool::Persistent, 3, k).unwrap();
            let plain = page(3, k);
            assert!(!v.windows(32).any(|w| w == &plain[100..132]));
        }
    }
    c.delete_batch(Pool::Persistent, 3, &[0, 1, 2])
        .await
        .unwrap();
    assert_eq!(a.store.stats().pools[1].pages, 297);
    assert_eq!(c.drop_namespace(3).await.unwrap(), 2 * 297);
    assert_eq!(a.store.used() + b.store.used(), 0);
    let stats = c.stats().await;
    assert_eq!(stats.len(), 2);
    assert!(stats.iter().all(|(_, s)| s.as_ref().unwrap().used == 0));
}

#[tokio::test]
async fn tampered_swapped_and_replayed_pages_are_errors() {
    let a = TestServer::start(64 << 20, Some(key()));
    let c = Client::connect(config(&[&a], 1)).await.unwrap();
    let p = Pool::Persistent;
    c.put(p, 1, 1, &page(1, 1)).await.unwrap();
    c.put(p, 1, 2, &page(1, 2)).await.unwrap();
    let old_1 = a.store.get(p, 1, 1).unwrap();
    // Tampered: one bit flipped by the server.
    let mut t = old_1.to_vec();
    t[100] ^= 1;
    a.store.put(p, 1, 1, Bytes::from(t)).unwrap();
    let e = c.get(p, 1, 1).await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Integrity {
                source: SealError::Tampered,
                ..
            }
        ),
        "{e}"
    );
    // Swapped: key 2's page served for key 1.
    a.store.put(p, 1, 1, a.store.get(p, 1, 2).unwrap()).unwrap();
    let e = c.get(p, 1, 1).await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Integrity {
                source: SealError::Tampered,
                ..
            }
        ),
        "{e}"
    );
    // Replayed: the genuine old version after the client wrote a new one.
    c.put(p, 1, 1, &page(9, 9)).await.unwrap();
    assert_eq!(c.get(p, 1, 1).await.unwrap(), Some(page(9, 9)));
    a.store.put(p, 1, 1, old_1).unwrap();
    let e = c.get(p, 1, 1).await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Integrity {
                source: SealError::Stale { .. },
                ..
            }
        ),
        "{e}"
    );
    // Batched reads detect it too.
    assert!(c.get_batch(p, 1, &[2, 1]).await.is_err());
    assert_eq!(c.get(p, 1, 2).await.unwrap(), Some(page(1, 2)));
}

#[tokio::test]
async fn client_without_the_key_is_refused() {
    let a = TestServer::start(1 << 20, Some(key()));
    let mut cfg = config(&[&a], 1);
    cfg.auth_key = None;
    let e = Client::connect(cfg).await.unwrap_err();
    assert!(matches!(e, ClientError::AuthRefused { .. }), "{e}");
    let mut cfg = config(&[&a], 1);
    cfg.auth_key = Some(AuthKey::from_secret(b"some other key, same length!!").unwrap());
    let e = Client::connect(cfg).await.unwrap_err();
    assert!(matches!(e, ClientError::AuthRefused { .. }), "{e}");
    // A server without the key cannot fool a client that has one: it would have to prove it.
    assert_eq!(
        a.store.stats().pools[0].puts + a.store.stats().pools[1].puts,
        0
    );
}

/// A fake server that answers the handshake, then holds `n` requests and answers them in
/// reverse order: the client must hand each caller its own reply.
#[tokio::test]
async fn out_of_order_replies_reach_the_right_caller() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    const N: usize = 16;
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        while frames.len() < N {
            while let Some(f) = decode(&mut buf).unwrap() {
                if frames.is_empty() {
                    // The HELLO: answer at once.
                    let mut out = BytesMut::new();
                    let hello = HelloReply {
                        version: 1,
                        min_version: 1,
                        auth_required: false,
                        server_nonce: [0; 32],
                    };
                    ReplyWriter { out: &mut out }.payload(&f.header, &control::encode(&hello));
                    s.write_all(&out).await.unwrap();
                }
                frames.push(f);
            }
            if frames.len() < N && s.read_buf(&mut buf).await.unwrap() == 0 {
                return;
            }
        }
        // All N-1 GETs are in: answer them newest first.
        let mut out = BytesMut::new();
        for f in frames[1..].iter().rev() {
            let h: Header = f.header;
            ReplyWriter { out: &mut out }.payload(&h, &h.key.to_le_bytes());
        }
        s.write_all(&out).await.unwrap();
        let _ = s.read(&mut [0u8; 1]).await;
    });
    let conn = Connection::connect(addr, None, Duration::from_secs(5))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for k in 0..(N - 1) as u64 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let r = conn
                .call(
                    &Request::Get {
                        pool: Pool::Ephemeral,
                        namespace: 0,
                        key: k,
                    },
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
            (k, r)
        }));
    }
    for t in tasks {
        let (k, r) = t.await.unwrap();
        assert_eq!(
            r.body,
            ReplyBody::Value(Bytes::copy_from_slice(&k.to_le_bytes()))
        );
    }
}

#[tokio::test]
async fn crashed_server_loses_no_persistent_page_and_is_re_replicated() {
    let mut servers: Vec<TestServer> = (0..3)
        .map(|_| TestServer::start(256 << 20, Some(key())))
        .collect();
    let refs: Vec<&TestServer> = servers.iter().collect();
    let c = Client::connect(config(&refs, 2)).await.unwrap();
    // A replicated workload; a server crashes in the middle of it.
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let c = c.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for k in 0..600u64 {
                if k % 2 == 0 {
                    if c.put(Pool::Persistent, 5, k, &page(5, k)).await.is_ok() {
                        acked.push(k);
                    }
                } else {
                    let batch: Vec<(u64, Vec<u8>)> = (0..8)
                        .map(|i| (k * 100 + i, page(5, k * 100 + i)))
                        .collect();
                    let r: Vec<(u64, &[u8])> = batch.iter().map(|(k, p)| (*k, &p[..])).collect();
                    if c.put_batch(Pool::Persistent, 5, &r).await.is_ok() {
                        acked.extend(batch.iter().map(|(k, _)| *k));
                    }
                }
                progress.store(acked.len(), std::sync::atomic::Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
            acked
        })
    };
    // Crash a server once the workload is well under way.
    while progress.load(std::sync::atomic::Ordering::Relaxed) < 100 && !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let victim = servers[0].addr;
    servers[0].crash();
    let acked = writer.await.unwrap();
    assert!(
        acked.len() > 2000,
        "workload kept going: {} acked",
        acked.len()
    );
    // Every acknowledged page is readable (from the replica where needed).
    for chunk in acked.chunks(500) {
        let got = c.get_batch(Pool::Persistent, 5, chunk).await.unwrap();
        for (k, g) in chunk.iter().zip(got) {
            assert_eq!(g, Some(page(5, *k)), "page {k}");
        }
    }
    assert!(!c.health().iter().find(|h| h.addr == victim).unwrap().up);
    // Re-replicate, then lose a second original server: still nothing lost.
    let report = c.repair().await;
    assert!(report.affected > 0);
    assert_eq!(report.lost, 0);
    assert_eq!(report.repaired, report.affected);
    for k in &acked {
        let r = c.replicas_of(Pool::Persistent, 5, *k);
        assert_eq!(r.len(), 2);
        assert!(!r.contains(&victim));
    }
    servers[1].crash();
    for chunk in acked.chunks(500) {
        let got = c.get_batch(Pool::Persistent, 5, chunk).await.unwrap();
        for (k, g) in chunk.iter().zip(got) {
            assert_eq!(g, Some(page(5, *k)), "page {k} after second loss");
        }
    }
}

#[tokio::test]
async fn full_persistent_server_sends_pages_elsewhere() {
    let small = TestServer::start(40 * 4300, Some(key()));
    let big = TestServer::start(64 << 20, Some(key()));
    let c = Client::connect(config(&[&small, &big], 1)).await.unwrap();
    for k in 0..400 {
        c.put(Pool::Persistent, 1, k, &page(1, k)).await.unwrap();
    }
    for k in 0..400 {
        assert_eq!(
            c.get(Pool::Persistent, 1, k).await.unwrap(),
            Some(page(1, k))
        );
    }
    let s = small.store.stats();
    assert!(s.pools[1].refused > 0, "the small server refused some");
    assert!(s.used <= s.capacity);
    assert_eq!(s.pools[1].pages + big.store.stats().pools[1].pages, 400);
}

#[tokio::test]
async fn twice_oversubscribed_through_the_client() {
    let cap = 2 << 20;
    let a = TestServer::start(cap, Some(key()));
    let c = Client::connect(config(&[&a], 1)).await.unwrap();
    let n = 2 * cap / 4096;
    let (mut ok, mut refused) = (0, 0);
    for k in 0..n {
        // An ephemeral PUT may be refused once persistent pages fill the server.
        match c.put(Pool::Ephemeral, 1, k, &page(1, k)).await {
            Ok(()) | Err(ClientError::NotEnoughReplicas { .. }) => {}
            Err(e) => panic!("{e}"),
        }
        match c.put(Pool::Persistent, 2, k, &page(2, k)).await {
            Ok(()) => ok += 1,
            Err(ClientError::NotEnoughReplicas { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(ok > 0 && refused > 0);
    assert!(a.store.peak() <= cap, "peak {} > {cap}", a.store.peak());
    // Ephemeral reads: right data or a miss, never wrong data.
    let mut hits = 0;
    for k in 0..n {
        if let Some(p) = c.get(Pool::Ephemeral, 1, k).await.unwrap() {
            assert_eq!(p, page(1, k));
            hits += 1;
        }
    }
    assert!(hits < n, "some ephemeral pages were evicted");
    assert!(a.store.stats().pools[0].evictions > 0);
}

#[test]
fn blocking_client_from_plain_threads() {
    let a = TestServer::start(64 << 20, Some(key()));
    let b = TestServer::start(64 << 20, Some(key()));
    let c = std::sync::Arc::new(BlockingClient::connect(config(&[&a, &b], 2), 2).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for k in 0..100 {
                    c.put(Pool::Persistent, t, k, &page(t, k)).unwrap();
                }
                for k in 0..100 {
                    assert_eq!(c.get(Pool::Persistent, t, k).unwrap(), Some(page(t, k)));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(a.store.stats().pools[1].pages, 400);
    assert!(c.health().iter().all(|h| h.up));
}

/// Single-page reads from plain threads take the blocking fast path (the thread talks to the
/// server itself); it must keep the client's guarantees: verified pages, integrity errors,
/// failover to the replica when a server dies under it, and the dead server marked down.
#[test]
fn blocking_reads_verify_and_fail_over() {
    let mut a = TestServer::start(64 << 20, Some(key()));
    let b = TestServer::start(64 << 20, Some(key()));
    let c = std::sync::Arc::new(BlockingClient::connect(config(&[&a, &b], 2), 2).unwrap());
    let p = Pool::Persistent;
    for k in 0..200 {
        c.put(p, 3, k, &page(3, k)).unwrap();
    }
    // Several threads at once, each needing a connection of its own.
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for k in (t..200).step_by(3) {
                    assert_eq!(c.get(p, 3, k).unwrap(), Some(page(3, k)), "page {k}");
                    assert_eq!(
                        c.get_batch(p, 3, &[k]).unwrap(),
                        vec![Some(page(3, k))],
                        "page {k} (batch of one)"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(c.get(p, 3, 999).unwrap(), None, "never stored");
    // A tampered copy on both replicas is an error, never wrong data.
    c.put(p, 4, 1, &page(4, 1)).unwrap();
    for s in [&a, &b] {
        let mut t = s.store.get(p, 4, 1).unwrap().to_vec();
        t[200] ^= 1;
        s.store.put(p, 4, 1, Bytes::from(t)).unwrap();
    }
    let e = c.get(p, 4, 1).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Integrity {
                source: SealError::Tampered,
                ..
            }
        ),
        "{e}"
    );
    // A server dies with the blocking connections open: every page still reads, from b.
    let victim = a.addr;
    a.crash();
    for k in 0..200 {
        assert_eq!(
            c.get(p, 3, k).unwrap(),
            Some(page(3, k)),
            "page {k} after crash"
        );
    }
    let h = c.health();
    assert!(!h.iter().find(|h| h.addr == victim).unwrap().up);
    assert!(h.iter().find(|h| h.addr == b.addr).unwrap().up);
}
