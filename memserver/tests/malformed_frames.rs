//! Malformed frames close only the offending connection, with a logged reason; the daemon keeps
//! serving everyone else.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use remoca_memserver::protocol::frame::{Header, Opcode, HEADER_LEN, MAX_PAYLOAD};
use remoca_memserver::protocol::{Pool, ReplyBody, Request, Status};
use support::{Raw, TestServer};
use tokio::io::AsyncWriteExt;

#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static LogBuf {
    static LOGS: OnceLock<LogBuf> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = LogBuf::default();
        let w = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter("remoca_memserver=warn")
            .with_writer(move || w.clone())
            .with_ansi(false)
            .init();
        buf
    })
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned()
}

fn valid_put() -> BytesMut {
    let mut b = BytesMut::new();
    Request::Put {
        pool: Pool::Ephemeral,
        namespace: 1,
        key: 1,
        value: Bytes::from_static(b"abc"),
    }
    .encode(42, &mut b);
    b
}

async fn still_serving(srv: &TestServer, bystander: &mut Raw) {
    // The connection opened before the bad one still works...
    assert_eq!(bystander.call(900, &Request::Ping).await.status, Status::Ok);
    // ...and so does a new one.
    let mut fresh = Raw::ready(srv.addr, None).await;
    assert_eq!(fresh.call(901, &Request::Ping).await.status, Status::Ok);
}

#[tokio::test]
async fn malformed_frames_close_that_connection_only() {
    logs();
    let srv = TestServer::start(16 << 20, None);
    let mut bystander = Raw::ready(srv.addr, None).await;

    let mut bad_magic = valid_put();
    bad_magic[0..4].copy_from_slice(b"HTTP");
    let mut oversize = valid_put();
    oversize[40..44].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    let mut unknown_op = valid_put();
    unknown_op[5] = 0x7f;
    let mut bad_shape = BytesMut::new();
    let mut h = Header::request(Opcode::GetBatch, 5);
    h.pool = Some(Pool::Ephemeral);
    h.count = 4;
    h.payload_len = 8; // four keys promised, one sent
    h.write(&mut bad_shape);
    bad_shape.extend_from_slice(&[0; 8]);

    let cases: [(&str, BytesMut, &str); 4] = [
        ("bad magic", bad_magic, "bad magic"),
        ("oversize length", oversize, "exceeds the limit"),
        ("unknown opcode", unknown_op, "unknown opcode"),
        ("bad batch shape", bad_shape, "invalid shape"),
    ];
    for (what, bytes, reason) in cases {
        let mut c = Raw::ready(srv.addr, None).await;
        c.send_bytes(&bytes).await;
        let r = c.recv().await.unwrap_or_else(|| panic!("{what}: no reply"));
        assert_eq!(r.status, Status::Malformed, "{what}");
        assert!(
            matches!(&r.body, ReplyBody::Error(s) if s.contains(reason)),
            "{what}: {r:?}"
        );
        assert!(c.recv().await.is_none(), "{what}: connection must close");
        still_serving(&srv, &mut bystander).await;
        assert!(log_text().contains(reason), "{what}: reason not logged");
    }

    // Truncated header: 20 bytes and the client hangs up.
    let mut c = Raw::ready(srv.addr, None).await;
    c.send_bytes(&valid_put()[..20]).await;
    c.s.shutdown().await.unwrap();
    assert!(c.recv().await.is_none());
    still_serving(&srv, &mut bystander).await;
    // The server logs the truncation once it has seen the EOF.
    for _ in 0..100 {
        if log_text().contains("connection closed inside a frame (20 bytes") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let text = log_text();
    assert!(
        text.contains("connection closed inside a frame (20 bytes"),
        "{text}"
    );
    assert!(text.contains("closing connection: malformed frame"));
    assert_eq!(HEADER_LEN, 48);
    // None of the bad frames stored anything.
    assert_eq!(srv.store.used(), 0);
}
