//! The NBD server in-process, driven by the crate's raw client: option handling, error codes
//! (the daemon keeps serving after each), pipelining, multi-connection flush visibility,
//! structured replies and block status.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;

use remoca_blkback::memory::MemDisk;
use remoca_blkback::nbd::client::{self, Client, ClientError};
use remoca_blkback::nbd::wire::*;
use remoca_blkback::nbd::{self, Listener};
use remoca_blkback::overlay::Overlay;
use remoca_blkback::{Disk, Exports};

const SIZE: u64 = 4 << 20;

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    exports: Exports,
}

impl Server {
    fn start(exports: Exports) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let l = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let ex = exports.clone();
        let thread = std::thread::spawn(move || {
            rt.block_on(nbd::run(Listener::Tcp(l), ex, async {
                let _ = rx.await;
            }))
            .unwrap();
        });
        Server {
            addr,
            stop: Some(tx),
            thread: Some(thread),
            exports,
        }
    }

    fn connect(&self, export: &str, structured: bool) -> Client<TcpStream> {
        Client::connect(TcpStream::connect(self.addr).unwrap(), export, structured).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
    }
}

fn standard_exports() -> Exports {
    let rw: Arc<dyn Disk> = Arc::new(MemDisk::new(SIZE));
    let ro: Arc<dyn Disk> = Arc::new(MemDisk::read_only(vec![7; SIZE as usize]));
    Exports::from_disks(vec![
        ("rw".into(), "writable".into(), rw),
        ("ro".into(), "read-only".into(), ro),
    ])
    .unwrap()
}

#[test]
fn bad_requests_get_protocol_errors_and_the_connection_keeps_serving() {
    let s = Server::start(standard_exports());
    for structured in [false, true] {
        let mut c = s.connect("rw", structured);
        assert_eq!(c.size, SIZE);
        assert_eq!(
            c.command(CMD_READ, 0, SIZE - 10, 20).unwrap(),
            EINVAL,
            "read past end"
        );
        assert_eq!(
            c.command(CMD_TRIM, 0, SIZE, 1).unwrap(),
            EINVAL,
            "trim past end"
        );
        let r = c.write(SIZE - 1, &[1, 2], false);
        assert!(
            matches!(r, Err(ClientError::Errno(ENOSPC))),
            "write past end: {r:?}"
        );
        assert_eq!(c.command(CMD_WRITE_ZEROES, 0, SIZE, 4096).unwrap(), ENOSPC);
        assert_eq!(c.command(99, 0, 0, 0).unwrap(), EINVAL, "unknown command");
        assert_eq!(
            c.command(CMD_READ, 1 << 9, 0, 512).unwrap(),
            EINVAL,
            "unknown flag"
        );
        assert_eq!(
            c.command(CMD_READ, 0, 0, MAX_PAYLOAD + 1).unwrap(),
            EINVAL,
            "too big"
        );
        assert_eq!(
            c.command(CMD_BLOCK_STATUS, 0, 0, 4096).unwrap(),
            EINVAL,
            "no context"
        );
        // Still serving after all that.
        c.write(4096, b"still alive", true).unwrap();
        assert_eq!(c.read(4096, 11).unwrap(), b"still alive");
        c.disconnect().unwrap();

        let mut ro = s.connect("ro", structured);
        assert_ne!(ro.flags & TFLAG_READ_ONLY, 0);
        let r = ro.write(0, b"x", false);
        assert!(
            matches!(r, Err(ClientError::Errno(EPERM))),
            "write to read-only: {r:?}"
        );
        assert_eq!(ro.command(CMD_TRIM, 0, 0, 4096).unwrap(), EPERM);
        assert_eq!(ro.command(CMD_WRITE_ZEROES, 0, 0, 4096).unwrap(), EPERM);
        assert_eq!(ro.read(0, 4).unwrap(), vec![7; 4]);
    }
    // Nothing ever reached the read-only disk.
    let mut buf = vec![0u8; SIZE as usize];
    s.exports
        .get("ro")
        .unwrap()
        .disk
        .read_at(&mut buf, 0)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 7));
    assert!(s.exports.get("rw").unwrap().stats.snapshot().errors >= 8);
}

#[test]
fn option_phase_refuses_what_it_must_and_continues() {
    let s = Server::start(standard_exports());
    let mut t = TcpStream::connect(s.addr).unwrap();
    client::start_handshake(&mut t).unwrap();
    let r = client::option(&mut t, 1234, b"junk").unwrap();
    assert_eq!(r.last().unwrap().0, REP_ERR_UNSUP);
    let r = client::option(&mut t, OPT_STARTTLS, &[]).unwrap();
    assert_eq!(r.last().unwrap().0, REP_ERR_UNSUP);
    // Meta contexts need structured replies first.
    let r = client::option(&mut t, OPT_LIST_META_CONTEXT, &meta(b"rw", &[])).unwrap();
    assert_eq!(r.last().unwrap().0, REP_ERR_INVALID);
    let r = client::option(&mut t, OPT_LIST, &[]).unwrap();
    let names: Vec<_> = r
        .iter()
        .filter(|x| x.0 == REP_SERVER)
        .map(|x| x.1[4..6].to_vec())
        .collect();
    assert_eq!(names, vec![b"ro".to_vec(), b"rw".to_vec()]);
    let r = client::option(&mut t, OPT_LIST, b"x").unwrap();
    assert_eq!(r.last().unwrap().0, REP_ERR_INVALID);
    let r = client::option(&mut t, OPT_INFO, &go(b"nope", &[])).unwrap();
    assert_eq!(r.last().unwrap().0, REP_ERR_UNKNOWN);
    let r = client::option(&mut t, OPT_INFO, &go(b"rw", &[INFO_BLOCK_SIZE])[..5]).unwrap();
    assert_eq!(r.last().unwrap().0, REP_ERR_INVALID);
    let r = client::option(&mut t, OPT_INFO, &go(b"rw", &[INFO_BLOCK_SIZE])).unwrap();
    let bs = r
        .iter()
        .find(|x| x.0 == REP_INFO && x.1[..2] == INFO_BLOCK_SIZE.to_be_bytes());
    let bs = &bs.expect("block size info").1;
    assert_eq!(
        u32::from_be_bytes(bs[10..14].try_into().unwrap()),
        MAX_PAYLOAD
    );
    assert_eq!(r.last().unwrap().0, REP_ACK);
    let r = client::option(&mut t, OPT_STRUCTURED_REPLY, &[]).unwrap();
    assert_eq!(r.last().unwrap().0, REP_ACK);
    let r = client::option(&mut t, OPT_LIST_META_CONTEXT, &meta(b"rw", &[b"base:"])).unwrap();
    assert_eq!(r[0].0, REP_META_CONTEXT);
    assert_eq!(&r[0].1[4..], b"base:allocation");
    let r = client::option(&mut t, OPT_ABORT, &[]).unwrap();
    assert_eq!(r.last().unwrap().0, REP_ACK);
}

fn go(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
    }
    d
}

#[test]
fn export_name_fallback_works() {
    let s = Server::start(standard_exports());
    let mut t = TcpStream::connect(s.addr).unwrap();
    client::start_handshake(&mut t).unwrap();
    use std::io::{Read, Write};
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    b.extend_from_slice(&2u32.to_be_bytes());
    b.extend_from_slice(b"ro");
    t.write_all(&b).unwrap();
    let mut r = [0u8; 10];
    t.read_exact(&mut r).unwrap(); // NO_ZEROES was negotiated: size + flags only
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE);
    assert_ne!(u16::from_be_bytes([r[8], r[9]]) & TFLAG_READ_ONLY, 0);
}

#[test]
fn pipelined_requests_all_complete_and_multi_conn_flush_is_shared() {
    let s = Server::start(standard_exports());
    let mut a = s.connect("rw", false);
    let mut cookies = Vec::new();
    for i in 0..200u64 {
        let data = vec![i as u8; 4096];
        cookies.push(a.send(CMD_WRITE, 0, i * 4096, 4096, &data).unwrap());
    }
    let mut got: Vec<u64> = (0..200)
        .map(|_| a.recv().unwrap())
        .map(|r| {
            assert_eq!(r.error, 0);
            r.cookie
        })
        .collect();
    got.sort();
    assert_eq!(got, cookies);
    // Flush on another connection, read on a third (CAN_MULTI_CONN is advertised).
    let mut b = s.connect("rw", true);
    assert_ne!(b.flags & TFLAG_CAN_MULTI_CONN, 0);
    b.flush().unwrap();
    let mut c = s.connect("rw", true);
    for i in [0u64, 77, 199] {
        assert_eq!(c.read(i * 4096, 4096).unwrap(), vec![i as u8; 4096]);
    }
}

#[test]
fn block_status_reports_overlay_allocation_and_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let base: Arc<dyn Disk> = Arc::new(MemDisk::read_only(vec![1; SIZE as usize]));
    let path = dir.path().join("o.ovl");
    Overlay::create(&path, &*base, 16, "mem").unwrap();
    let ov: Arc<dyn Disk> = Arc::new(Overlay::open(&path, base, false).unwrap());
    let s = Server::start(Exports::from_disks(vec![("vm".into(), String::new(), ov)]).unwrap());
    let mut t = TcpStream::connect(s.addr).unwrap();
    client::start_handshake(&mut t).unwrap();
    client::option(&mut t, OPT_STRUCTURED_REPLY, &[]).unwrap();
    let r = client::option(
        &mut t,
        OPT_SET_META_CONTEXT,
        &meta(b"vm", &[b"base:allocation", b"qemu:allocation-depth"]),
    )
    .unwrap();
    assert_eq!(r.iter().filter(|x| x.0 == REP_META_CONTEXT).count(), 2);
    // GO via the client helper on the same stream.
    let mut c = {
        use std::io::Write;
        let d = go(b"vm", &[]);
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&(d.len() as u32).to_be_bytes());
        b.extend_from_slice(&d);
        t.write_all(&b).unwrap();
        loop {
            let (_, kind, _) = client::read_option_reply(&mut t).unwrap();
            if kind == REP_ACK {
                break;
            }
            assert_eq!(kind, REP_INFO);
        }
        t
    };
    let mut cl = ClientShim(&mut c);
    cl.send(CMD_WRITE, 0, 65536, 65536, &[5; 65536]);
    cl.recv_simple_or_chunk();
    cl.send(CMD_WRITE_ZEROES, 0, 2 * 65536, 65536, &[]);
    cl.recv_simple_or_chunk();
    cl.send(CMD_BLOCK_STATUS, 0, 0, 4 * 65536, &[]);
    // Two chunks, one per context: base:allocation then allocation depth.
    let (flags1, p1) = cl.chunk();
    assert_eq!(flags1 & REPLY_FLAG_DONE, 0);
    let (flags2, p2) = cl.chunk();
    assert_ne!(flags2 & REPLY_FLAG_DONE, 0);
    let descs = |p: &[u8]| -> Vec<(u32, u32)> {
        p[4..]
            .chunks_exact(8)
            .map(|d| {
                (
                    u32::from_be_bytes(d[..4].try_into().unwrap()),
                    u32::from_be_bytes(d[4..].try_into().unwrap()),
                )
            })
            .collect()
    };
    assert_eq!(
        descs(&p1),
        vec![(131072, 0), (65536, STATE_HOLE | STATE_ZERO), (65536, 0)]
    );
    assert_eq!(descs(&p2), vec![(65536, 2), (131072, 1), (65536, 2)]);
}

/// Just enough framing to read raw structured chunks.
struct ClientShim<'a>(&'a mut TcpStream);

impl ClientShim<'_> {
    fn send(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, data: &[u8]) {
        use std::io::Write;
        let h = RequestHeader {
            flags,
            command: cmd,
            cookie: 1,
            offset,
            len,
        };
        self.0.write_all(&encode_request(&h)).unwrap();
        self.0.write_all(data).unwrap();
    }
    fn recv_simple_or_chunk(&mut self) {
        use std::io::Read;
        let mut m = [0u8; 4];
        self.0.read_exact(&mut m).unwrap();
        if u32::from_be_bytes(m) == SIMPLE_REPLY_MAGIC {
            let mut r = [0u8; 12];
            self.0.read_exact(&mut r).unwrap();
            assert_eq!(&r[..4], &[0; 4]);
        } else {
            let mut h = [0u8; 16];
            self.0.read_exact(&mut h).unwrap();
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut p = vec![0u8; len as usize];
            self.0.read_exact(&mut p).unwrap();
        }
    }
    fn chunk(&mut self) -> (u16, Vec<u8>) {
        use std::io::Read;
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC
        );
        let flags = u16::from_be_bytes([h[4], h[5]]);
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), CHUNK_BLOCK_STATUS);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        self.0.read_exact(&mut p).unwrap();
        (flags, p)
    }
}

#[test]
fn shutdown_ends_open_connections() {
    let s = Server::start(standard_exports());
    let mut c = s.connect("rw", false);
    c.write(0, b"before shutdown", false).unwrap();
    drop(s); // joins the server thread: returns although `c` is still connected
    assert!(c.read(0, 4).is_err());
}

#[test]
fn misaligned_requests_get_einval_when_a_block_size_is_set() {
    let d: Arc<dyn Disk> = Arc::new(MemDisk::new(SIZE));
    let exports = Exports::from_disks(vec![("aligned".into(), String::new(), d)])
        .unwrap()
        .with_min_block("aligned", 512)
        .unwrap();
    let s = Server::start(exports);
    let mut c = s.connect("aligned", true);
    assert_eq!(c.command(CMD_READ, 0, 100, 512).unwrap(), EINVAL);
    assert_eq!(c.command(CMD_READ, 0, 512, 100).unwrap(), EINVAL);
    assert_eq!(c.command(CMD_TRIM, 0, 1, 512).unwrap(), EINVAL);
    let r = c.write(7, &[1; 512], false);
    assert!(matches!(r, Err(ClientError::Errno(EINVAL))), "{r:?}");
    c.write(512, &[1; 512], false).unwrap();
    assert_eq!(c.read(512, 512).unwrap(), vec![1; 512]);
    assert!(Exports::from_disks(vec![(
        "x".into(),
        String::new(),
        Arc::new(MemDisk::new(8)) as Arc<dyn Disk>
    )])
    .unwrap()
    .with_min_block("x", 3)
    .is_err());
}

#[test]
fn fast_zero_fails_with_enotsup_only_when_zeroing_needs_a_data_write() {
    let dir = tempfile::tempdir().unwrap();
    let base: Arc<dyn Disk> = Arc::new(MemDisk::read_only(vec![1; SIZE as usize]));
    let path = dir.path().join("o.ovl");
    Overlay::create(&path, &*base, 16, "mem").unwrap();
    let ov: Arc<dyn Disk> = Arc::new(Overlay::open(&path, base, false).unwrap());
    let s = Server::start(Exports::from_disks(vec![("vm".into(), String::new(), ov)]).unwrap());
    let mut c = s.connect("vm", true);
    assert_ne!(c.flags & TFLAG_SEND_FAST_ZERO, 0);
    // Part of a template cluster: would need a copy-up, so not fast; nothing changes.
    assert_eq!(
        c.command(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 100, 4096)
            .unwrap(),
        ENOTSUP
    );
    assert_eq!(c.read(100, 4).unwrap(), vec![1; 4]);
    // Whole clusters are a map update: fast.
    assert_eq!(
        c.command(
            CMD_WRITE_ZEROES,
            CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
            65536,
            131072
        )
        .unwrap(),
        0
    );
    assert_eq!(c.read(65536, 131072).unwrap(), vec![0; 131072]);
    // Without FAST_ZERO the partial case is done by copy-up.
    assert_eq!(c.command(CMD_WRITE_ZEROES, 0, 100, 4096).unwrap(), 0);
    assert_eq!(c.read(96, 8).unwrap(), vec![1, 1, 1, 1, 0, 0, 0, 0]);
}
