//! The simulated xenstore served over xenstored's own wire protocol on a unix socket.
//!
//! `remoca up` on the simulated host runs one; `remoca xen store ...` in another process
//! then reaches the same tree through the ordinary wire client
//! ([`crate::real::RealXenStore::connect`]), exactly as it reaches xenstored on a Xen host.
//! Every connection acts as dom0.
//!
//! One thread accepts; each connection gets one thread that answers requests in order and
//! one per registered watch that forwards its events. Frames are checked by
//! [`wire::Header::decode`] (type and length) before the payload is read.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::SimXenstore;
use crate::error::{Error, Result};
use crate::xenstore::wire::{self, Header, MsgType, HEADER_LEN};
use crate::xenstore::{Perm, Tx, Watch, XenStore};

/// A running server; dropping it stops accepting and removes the socket.
#[derive(Debug)]
pub struct StoreServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl StoreServer {
    /// Listen on `path` (a stale socket file left by a dead server is replaced).
    ///
    /// # Errors
    /// `EADDRINUSE` when a live server already answers there; bind errors.
    pub fn start(store: SimXenstore, path: &Path) -> Result<StoreServer> {
        let io = |op: String| move |e: std::io::Error| Error::Call { op, source: e };
        if UnixStream::connect(path).is_ok() {
            return Err(Error::os(
                format!(
                    "{}: another simulated xenstore is serving here",
                    path.display()
                ),
                libc::EADDRINUSE,
            ));
        }
        let _ = std::fs::remove_file(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let listener =
            UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))?;
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("sim-xenstored".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let Ok(conn) = conn else { continue };
                        let store = store.clone();
                        let _ = std::thread::Builder::new()
                            .name("sim-xenstored-conn".into())
                            .spawn(move || serve_connection(store, conn));
                    }
                })
                .map_err(io("spawning the xenstore acceptor".into()))?
        };
        Ok(StoreServer {
            path: path.to_path_buf(),
            stop,
            acceptor: Some(acceptor),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the acceptor so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where replies and watch events of one connection go.
type Writer = Arc<Mutex<dyn Write + Send>>;

fn serve_connection(store: SimXenstore, conn: UnixStream) {
    let Ok(writer) = conn.try_clone() else { return };
    serve_stream(&store, conn, Arc::new(Mutex::new(writer)));
}

/// Answer the requests read from `input` as one dom0 connection would, until the input ends
/// or a frame is malformed, and return every reply and watch event written. The daemon's
/// per-connection loop; public so the fuzz target drives the same code.
pub fn serve_bytes(store: &SimXenstore, input: &[u8]) -> Vec<u8> {
    let output = Arc::new(Mutex::new(Vec::new()));
    serve_stream(store, input, output.clone());
    let out = output.lock().clone();
    out
}

fn serve_stream(store: &SimXenstore, mut reader: impl Read, writer: Writer) {
    let xs = store.connect(0);
    // Watches registered on this connection, by (path, token); dropping one unregisters it.
    let mut watches: HashMap<(String, String), Watch> = HashMap::new();
    loop {
        let mut head = [0u8; HEADER_LEN];
        if reader.read_exact(&mut head).is_err() {
            break;
        }
        let Ok(header) = Header::decode(&head) else {
            break;
        };
        let mut body = vec![0u8; header.len as usize];
        if reader.read_exact(&mut body).is_err() {
            break;
        }
        let reply = answer(&xs, &header, &body, &mut watches, &writer);
        let (ty, payload) = match reply {
            Ok(p) => (header.msg_type, p),
            Err(e) => (
                MsgType::Error,
                nul(wire::errno_name(e.errno().unwrap_or(libc::EIO))),
            ),
        };
        if send(&writer, ty, header.req_id, header.tx_id, &payload).is_err() {
            break;
        }
    }
}

fn nul(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn send(
    writer: &Mutex<dyn Write + Send>,
    ty: MsgType,
    req_id: u32,
    tx_id: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    let header = Header {
        msg_type: ty,
        req_id,
        tx_id,
        len: payload.len() as u32,
    };
    let mut frame = header.encode().to_vec();
    frame.extend_from_slice(payload);
    writer.lock().write_all(&frame)
}

fn answer(
    xs: &super::SimStoreConn,
    h: &Header,
    body: &[u8],
    watches: &mut HashMap<(String, String), Watch>,
    writer: &Writer,
) -> Result<Vec<u8>> {
    let tx = Tx(h.tx_id);
    // The first string (the path, usually) and what follows its NUL.
    let (first, rest) = match body.iter().position(|b| *b == 0) {
        Some(i) => (
            String::from_utf8_lossy(&body[..i]).into_owned(),
            &body[i + 1..],
        ),
        None => (String::from_utf8_lossy(body).into_owned(), &[][..]),
    };
    let ok = || Ok(nul("OK"));
    match h.msg_type {
        MsgType::Read => xs.read(tx, &first),
        MsgType::Write => xs.write(tx, &first, rest).and_then(|()| ok()),
        MsgType::Mkdir => xs.mkdir(tx, &first).and_then(|()| ok()),
        MsgType::Rm => xs.rm(tx, &first).and_then(|()| ok()),
        MsgType::Directory => {
            let names = xs.directory(tx, &first)?;
            Ok(names.iter().flat_map(|n| nul(n)).collect())
        }
        MsgType::GetPerms => {
            let perms = xs.get_perms(tx, &first)?;
            Ok(perms.iter().flat_map(|p| nul(&p.to_string())).collect())
        }
        MsgType::SetPerms => {
            let perms = wire::split_strings(rest)
                .iter()
                .map(|s| s.parse::<Perm>())
                .collect::<Result<Vec<_>>>()?;
            xs.set_perms(tx, &first, &perms).and_then(|()| ok())
        }
        MsgType::TransactionStart => Ok(nul(&xs.transaction_start()?.0.to_string())),
        MsgType::TransactionEnd => xs.transaction_end(tx, first == "T").and_then(|()| ok()),
        MsgType::GetDomainPath => {
            let dom = first
                .parse()
                .map_err(|_| Error::os(format!("get-domain-path {first:?}"), libc::EINVAL))?;
            Ok(nul(&xs.domain_path(dom)?))
        }
        MsgType::Watch => {
            let token = wire::split_strings(rest)
                .into_iter()
                .next()
                .unwrap_or_default();
            let watch = xs.watch(&first, &token)?;
            let events = watch.receiver().clone();
            let writer = writer.clone();
            std::thread::Builder::new()
                .name("sim-xenstored-watch".into())
                .spawn(move || {
                    for ev in events.iter() {
                        let payload: Vec<u8> =
                            nul(&ev.path).into_iter().chain(nul(&ev.token)).collect();
                        if send(&writer, MsgType::WatchEvent, 0, 0, &payload).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| Error::Call {
                    op: "spawning a watch forwarder".into(),
                    source: e,
                })?;
            watches.insert((first, token), watch);
            ok()
        }
        MsgType::Unwatch => {
            let token = wire::split_strings(rest)
                .into_iter()
                .next()
                .unwrap_or_default();
            watches
                .remove(&(first.clone(), token))
                .map(drop)
                .ok_or_else(|| Error::os(format!("unwatch {first}"), libc::ENOENT))?;
            ok()
        }
        other => Err(Error::os(format!("xenstore {other:?}"), libc::ENOSYS)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract;
    use crate::real::RealXenStore;
    use std::time::Duration;

    #[test]
    fn a_wire_client_sees_the_simulated_tree_and_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("xs.sock");
        let store = SimXenstore::new();
        let server = StoreServer::start(store.clone(), &sock).unwrap();
        store
            .connect(0)
            .write(Tx::NONE, "/local/domain/0/name", b"Domain-0")
            .unwrap();

        let client = RealXenStore::connect(&sock).unwrap();
        assert_eq!(
            client.read(Tx::NONE, "/local/domain/0/name").unwrap(),
            b"Domain-0"
        );
        assert!(client
            .read(Tx::NONE, "/nope")
            .unwrap_err()
            .is_errno(libc::ENOENT));
        let w = client.watch("/tool", "t").unwrap();
        assert!(
            w.next_timeout(Duration::from_secs(5)).is_some(),
            "initial firing"
        );
        client.write(Tx::NONE, "/tool/x", b"1").unwrap();
        let mut seen = Vec::new();
        while let Some(ev) = w.next_timeout(Duration::from_secs(5)) {
            assert_eq!(ev.token, "t");
            let done = ev.path == "/tool/x";
            seen.push(ev.path);
            if done {
                break;
            }
        }
        assert_eq!(
            seen.last().map(String::as_str),
            Some("/tool/x"),
            "events: {seen:?}"
        );
        drop(w);

        // A second server on a live socket is refused; the first keeps serving.
        assert!(StoreServer::start(store, &sock)
            .unwrap_err()
            .is_errno(libc::EADDRINUSE));
        assert_eq!(client.read(Tx::NONE, "/tool/x").unwrap(), b"1");
        drop(server);
        assert!(!sock.exists());
    }

    #[test]
    fn byte_streams_get_replies_until_a_malformed_frame() {
        let store = SimXenstore::new();
        let frame = |ty: MsgType, req_id: u32, payload: &[u8]| {
            let mut f = Header {
                msg_type: ty,
                req_id,
                tx_id: 0,
                len: payload.len() as u32,
            }
            .encode()
            .to_vec();
            f.extend_from_slice(payload);
            f
        };
        let mut input = frame(MsgType::Write, 1, b"/a\0hello");
        input.extend(frame(MsgType::Read, 2, b"/a\0"));
        input.extend(frame(MsgType::Read, 3, b"/missing\0"));
        // An oversize length ends the connection; the read after it is never answered.
        let mut bad = frame(MsgType::Read, 4, b"");
        bad[12..16].copy_from_slice(&(wire::PAYLOAD_MAX as u32 + 1).to_le_bytes());
        input.extend(bad);
        input.extend(frame(MsgType::Read, 5, b"/a\0"));
        let out = serve_bytes(&store, &input);
        let mut replies = Vec::new();
        let mut rest = &out[..];
        while rest.len() >= HEADER_LEN {
            let h = Header::decode(rest[..HEADER_LEN].try_into().unwrap()).unwrap();
            let end = HEADER_LEN + h.len as usize;
            replies.push((h.req_id, h.msg_type, rest[HEADER_LEN..end].to_vec()));
            rest = &rest[end..];
        }
        assert_eq!(
            replies,
            vec![
                (1, MsgType::Write, b"OK\0".to_vec()),
                (2, MsgType::Read, b"hello".to_vec()),
                (3, MsgType::Error, b"ENOENT\0".to_vec()),
            ]
        );
    }

    #[test]
    fn contract_checks_pass_over_the_wire() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("xs.sock");
        let sim = super::super::SimHost::new();
        let _server = StoreServer::start(sim.xenstore().clone(), &sock).unwrap();
        let mut host = crate::Host::from_sim(sim);
        host.store = Arc::new(RealXenStore::connect(&sock).unwrap());
        for o in contract::run_all(&host, "/local/domain/0/remoca-selftest") {
            assert!(o.result.is_ok(), "{}: {:?}", o.name, o.result);
        }
    }
}
