//! The daemon over real loopback sockets: every opcode, pipelining, authentication, graceful
//! shutdown.

mod support;

use std::collections::HashSet;

use bytes::Bytes;
use remoca_memserver::protocol::control::{Hello, NONCE_LEN};
use remoca_memserver::protocol::{Opcode, Pool, ReplyBody, Request, Status};
use support::{key, Raw, TestServer};

fn page(b: u8) -> Bytes {
    Bytes::from(vec![b; 4096])
}

#[tokio::test]
async fn every_opcode_does_what_it_says() {
    let srv = TestServer::start(64 << 20, Some(key()));
    let mut c = Raw::ready(srv.addr, Some(&key())).await;
    let (e, p) = (Pool::Ephemeral, Pool::Persistent);

    assert_eq!(c.call(3, &Request::Ping).await.status, Status::Ok);
    // Single-key ops.
    let put = Request::Put {
        pool: p,
        namespace: 1,
        key: 5,
        value: page(5),
    };
    assert_eq!(c.call(4, &put).await.status, Status::Ok);
    let r = c
        .call(
            5,
            &Request::Get {
                pool: p,
                namespace: 1,
                key: 5,
            },
        )
        .await;
    assert_eq!(r.body, ReplyBody::Value(page(5)));
    let r = c
        .call(
            6,
            &Request::Get {
                pool: e,
                namespace: 1,
                key: 5,
            },
        )
        .await;
    assert_eq!(r.status, Status::NotFound, "pools are separate");
    let r = c
        .call(
            7,
            &Request::Delete {
                pool: p,
                namespace: 1,
                key: 5,
            },
        )
        .await;
    assert_eq!(r.status, Status::Ok);
    let r = c
        .call(
            8,
            &Request::Delete {
                pool: p,
                namespace: 1,
                key: 5,
            },
        )
        .await;
    assert_eq!(r.status, Status::NotFound);
    // Batches.
    let entries: Vec<(u64, Bytes)> = (0..10).map(|k| (k, page(k as u8))).collect();
    let r = c
        .call(
            9,
            &Request::PutBatch {
                pool: e,
                namespace: 2,
                entries,
            },
        )
        .await;
    assert_eq!(r.body, ReplyBody::Statuses(vec![Status::Ok; 10]));
    let r = c
        .call(
            10,
            &Request::GetBatch {
                pool: e,
                namespace: 2,
                keys: vec![0, 99, 9],
            },
        )
        .await;
    assert_eq!(
        r.body,
        ReplyBody::Values(vec![Some(page(0)), None, Some(page(9))])
    );
    let r = c
        .call(
            11,
            &Request::DeleteBatch {
                pool: e,
                namespace: 2,
                keys: vec![0, 99],
            },
        )
        .await;
    assert_eq!(
        r.body,
        ReplyBody::Statuses(vec![Status::Ok, Status::NotFound])
    );
    // Stats see namespace 2 with 9 ephemeral pages.
    let r = c.call(12, &Request::Stats).await;
    let ReplyBody::Stats(st) = r.body else {
        panic!("{r:?}")
    };
    let ns2 = st.namespaces.iter().find(|n| n.namespace == 2).unwrap();
    assert_eq!(ns2.pools[0].pages, 9);
    assert_eq!(st.pools[0].hits, 2);
    assert_eq!(st.connections, 1);
    // Drop-namespace frees them all.
    let r = c.call(13, &Request::DropNamespace { namespace: 2 }).await;
    assert!(
        matches!(r.body, ReplyBody::Dropped { pages: 9, .. }),
        "{r:?}"
    );
    assert_eq!(srv.store.used(), 0);
    // Handshake opcodes after the handshake are refused but the connection stays.
    let hello = Request::Hello(Hello {
        min_version: 1,
        max_version: 1,
        client_nonce: [0; NONCE_LEN],
        client_name: String::new(),
    });
    assert_eq!(c.call(14, &hello).await.status, Status::BadRequest);
    assert_eq!(
        c.call(15, &Request::Auth { proof: [0; 32] }).await.status,
        Status::BadRequest
    );
    assert_eq!(c.call(16, &Request::Ping).await.status, Status::Ok);
    // Every opcode was exercised above.
    assert_eq!(Opcode::ALL.len(), 11);
}

#[tokio::test]
async fn pipelined_requests_all_answered_by_id() {
    let srv = TestServer::start(64 << 20, None);
    let mut c = Raw::ready(srv.addr, None).await;
    for k in 0..50u64 {
        c.send(
            100 + k,
            &Request::Put {
                pool: Pool::Ephemeral,
                namespace: 1,
                key: k,
                value: page(k as u8),
            },
        )
        .await;
    }
    // Slow requests (run off the connection task) mixed with fast ones: replies may overtake.
    c.send(1, &Request::Stats).await;
    c.send(2, &Request::DropNamespace { namespace: 77 }).await;
    for k in 0..50u64 {
        c.send(
            200 + k,
            &Request::Get {
                pool: Pool::Ephemeral,
                namespace: 1,
                key: k,
            },
        )
        .await;
    }
    let mut seen = HashSet::new();
    for _ in 0..102 {
        let r = c.recv().await.unwrap();
        assert!(
            seen.insert(r.request_id),
            "duplicate reply {}",
            r.request_id
        );
        match r.request_id {
            1 => assert!(matches!(r.body, ReplyBody::Stats(_))),
            2 => assert!(matches!(r.body, ReplyBody::Dropped { pages: 0, .. })),
            100..=149 => assert_eq!(r.status, Status::Ok),
            id @ 200..=249 => assert_eq!(r.body, ReplyBody::Value(page((id - 200) as u8))),
            id => panic!("unexpected id {id}"),
        }
    }
    assert_eq!(seen.len(), 102);
}

#[tokio::test]
async fn without_the_key_nothing_but_the_handshake() {
    let srv = TestServer::start(64 << 20, Some(key()));
    // A request before HELLO: refused and closed.
    let mut c = Raw::connect(srv.addr).await;
    let r = c
        .call(
            1,
            &Request::Get {
                pool: Pool::Persistent,
                namespace: 1,
                key: 1,
            },
        )
        .await;
    assert_eq!(r.status, Status::Unauthenticated);
    assert!(c.recv().await.is_none(), "connection closed");
    // HELLO done but AUTH skipped: still refused.
    let mut c = Raw::ready(srv.addr, None).await;
    let r = c.call(3, &Request::Stats).await;
    assert_eq!(r.status, Status::Unauthenticated);
    assert!(c.recv().await.is_none());
    // A wrong proof.
    let wrong = remoca_memserver::protocol::auth::AuthKey::from_secret(b"not the right key at all")
        .unwrap();
    let mut c = Raw::connect(srv.addr).await;
    let r = c
        .call(
            1,
            &Request::Hello(Hello {
                min_version: 1,
                max_version: 1,
                client_nonce: [1; 32],
                client_name: "x".into(),
            }),
        )
        .await;
    let ReplyBody::Hello(h) = r.body else {
        panic!()
    };
    assert!(h.auth_required);
    let proof = wrong.client_proof(&h.server_nonce, &[1; 32]);
    assert_eq!(
        c.call(2, &Request::Auth { proof }).await.status,
        Status::AuthFailed
    );
    assert!(c.recv().await.is_none());
    // Nothing was stored by any of them.
    assert_eq!(srv.store.stats().pools[1].puts, 0);
}

#[tokio::test]
async fn version_mismatch_is_refused_with_a_reason() {
    let srv = TestServer::start(1 << 20, None);
    let mut c = Raw::connect(srv.addr).await;
    let r = c
        .call(
            1,
            &Request::Hello(Hello {
                min_version: 2,
                max_version: 3,
                client_nonce: [0; 32],
                client_name: "future".into(),
            }),
        )
        .await;
    assert_eq!(r.status, Status::VersionMismatch);
    assert!(matches!(r.body, ReplyBody::Error(ref s) if s.contains("version 1")));
    assert!(c.recv().await.is_none());
}

#[tokio::test]
async fn graceful_shutdown_answers_what_was_sent() {
    let mut srv = TestServer::start(64 << 20, None);
    let mut c = Raw::ready(srv.addr, None).await;
    for k in 0..200u64 {
        c.send(
            k + 10,
            &Request::Put {
                pool: Pool::Persistent,
                namespace: 1,
                key: k,
                value: page(1),
            },
        )
        .await;
    }
    // Wait for the first reply so the server has the requests, then stop it.
    let first = c.recv().await.unwrap();
    assert_eq!(first.status, Status::Ok);
    let stopping = tokio::spawn(async move {
        srv.stop().await.unwrap();
        srv
    });
    let mut answered = 1;
    while let Some(r) = c.recv().await {
        assert_eq!(r.status, Status::Ok);
        answered += 1;
    }
    let srv = stopping.await.unwrap();
    // Every PUT the server executed was answered, and nothing was executed unanswered.
    assert_eq!(answered, srv.store.stats().pools[1].puts);
    assert!(answered > 0);
}

#[tokio::test]
async fn connection_cap_holds_extra_clients_until_a_slot_frees() {
    let srv = TestServer::start_with(1 << 20, None, 2);
    let mut a = Raw::ready(srv.addr, None).await;
    let _b = Raw::ready(srv.addr, None).await;
    // The third client connects (kernel backlog) but is not served while two are open.
    let mut c = Raw::connect(srv.addr).await;
    c.send(
        1,
        &Request::Hello(Hello {
            min_version: 1,
            max_version: 1,
            client_nonce: [0; 32],
            client_name: "third".into(),
        }),
    )
    .await;
    let waited = tokio::time::timeout(std::time::Duration::from_millis(300), c.recv()).await;
    assert!(waited.is_err(), "served beyond the connection cap");
    assert_eq!(srv.store.stats().connections, 2);
    // One leaves: the third is served.
    assert_eq!(a.call(5, &Request::Ping).await.status, Status::Ok);
    drop(a);
    let r = c.recv().await.unwrap();
    assert_eq!(r.status, Status::Ok);
    assert!(matches!(r.body, ReplyBody::Hello(_)));
}
