//! A xenstore client speaking the wire protocol ([`crate::xenstore::wire`]) to xenstored's
//! unix socket or the kernel's `/dev/xen/xenbus`.
//!
//! One reader thread routes replies to their callers by request id and watch events to
//! their [`Watch`]es, so many threads can use one connection and watches never block
//! requests. (The `xenstore-rs` crate was evaluated: its wire module is crate-private and its
//! synchronous client has no transactions, mkdir, permissions or watches.)

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Sender};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::xenstore::wire::{self, Header, MsgType, HEADER_LEN};
use crate::xenstore::{validate_path, Perm, Tx, Watch, WatchEvent, XenStore};

/// Where xenstored listens, newest location first.
const SOCKETS: &[&str] = &["/run/xenstored/socket", "/var/run/xenstored/socket"];
const XENBUS: &str = "/dev/xen/xenbus";
/// A request unanswered this long fails with `ETIMEDOUT` instead of hanging a service.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

enum Conn {
    Socket(UnixStream),
    Device(File),
}

impl Conn {
    fn open() -> Result<(Conn, Conn, String)> {
        for s in SOCKETS {
            if let Ok(stream) = UnixStream::connect(s) {
                let reader = stream.try_clone().map_err(|e| Error::Call {
                    op: format!("cloning {s}"),
                    source: e,
                })?;
                return Ok((Conn::Socket(stream), Conn::Socket(reader), (*s).to_string()));
            }
        }
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(XENBUS)
            .map_err(|e| Error::Call {
                op: format!("opening {XENBUS} (is xenstored running?)"),
                source: e,
            })?;
        let reader = dev.try_clone().map_err(|e| Error::Call {
            op: format!("cloning {XENBUS}"),
            source: e,
        })?;
        Ok((Conn::Device(dev), Conn::Device(reader), XENBUS.to_string()))
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Socket(s) => s.write_all(buf),
            Conn::Device(f) => f.write_all(buf),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            Conn::Socket(s) => s.read_exact(buf),
            Conn::Device(f) => f.read_exact(buf),
        }
    }
}

type Reply = std::result::Result<(MsgType, Vec<u8>), i32>;

struct WatchSlot {
    user_token: String,
    tx: Sender<WatchEvent>,
}

struct Shared {
    writer: Mutex<Conn>,
    /// On `/dev/xen/xenbus`: held from sending a request to its reply, so at most one is in
    /// flight, as libxenstore does there. In a driver domain (docs/failover.md, "Tier 2"),
    /// with requests from several threads in flight at once through the device, one went
    /// unanswered (ETIMEDOUT after 30 s, the disk never connecting) in 2 of 3 Xen-under-QEMU
    /// runs; one at a time, it connected in every run since (3 of 3). dom0 uses the socket.
    one_at_a_time: Option<Mutex<()>>,
    waiting: Mutex<HashMap<u32, Sender<Reply>>>,
    watches: Mutex<HashMap<String, WatchSlot>>,
    next_req: AtomicU32,
    next_watch: AtomicU64,
}

/// A connection to the real xenstore.
pub struct RealXenStore {
    shared: Arc<Shared>,
    endpoint: String,
}

impl std::fmt::Debug for RealXenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealXenStore")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl RealXenStore {
    /// Connect to xenstored.
    ///
    /// # Errors
    /// The errno of the open (`ENOENT` no xenstore here, `EACCES` not root).
    pub fn open() -> Result<Self> {
        Self::start(Conn::open()?)
    }

    /// Connect to a xenstore socket at a given path (the simulated host's, in `remoca up`).
    ///
    /// # Errors
    /// The errno of the connect (`ENOENT`, `ECONNREFUSED` when nothing serves there).
    pub fn connect(path: &std::path::Path) -> Result<Self> {
        let stream = UnixStream::connect(path).map_err(|e| Error::Call {
            op: format!("connecting to xenstore at {}", path.display()),
            source: e,
        })?;
        let reader = stream.try_clone().map_err(|e| Error::Call {
            op: format!("cloning {}", path.display()),
            source: e,
        })?;
        Self::start((
            Conn::Socket(stream),
            Conn::Socket(reader),
            path.display().to_string(),
        ))
    }

    fn start((writer, reader, endpoint): (Conn, Conn, String)) -> Result<Self> {
        let device = matches!(writer, Conn::Device(_));
        let shared = Arc::new(Shared {
            one_at_a_time: device.then(|| Mutex::new(())),
            writer: Mutex::new(writer),
            waiting: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
            next_req: AtomicU32::new(1),
            next_watch: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("xenstore-reader".into())
            .spawn(move || reader_loop(reader, weak))
            .map_err(|e| Error::Call {
                op: "spawning the xenstore reader".into(),
                source: e,
            })?;
        Ok(RealXenStore { shared, endpoint })
    }

    /// The socket or device in use.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn request(
        &self,
        ty: MsgType,
        tx: Tx,
        payload: Vec<u8>,
        what: impl FnOnce() -> String,
    ) -> Result<Vec<u8>> {
        let _one = self.shared.one_at_a_time.as_ref().map(|m| m.lock());
        let req_id = self.shared.next_req.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = bounded(1);
        self.shared.waiting.lock().insert(req_id, reply_tx);
        let header = Header {
            msg_type: ty,
            req_id,
            tx_id: tx.0,
            len: payload.len() as u32,
        };
        let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
        frame.extend_from_slice(&header.encode());
        frame.extend_from_slice(&payload);
        if let Err(e) = self.shared.writer.lock().write_all(&frame) {
            self.shared.waiting.lock().remove(&req_id);
            return Err(Error::Call {
                op: what(),
                source: e,
            });
        }
        match reply_rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(Ok((_, body))) => Ok(body),
            Ok(Err(errno)) => Err(Error::os(what(), errno)),
            Err(_) => {
                self.shared.waiting.lock().remove(&req_id);
                Err(Error::os(what(), libc::ETIMEDOUT))
            }
        }
    }

    fn path_request(
        &self,
        ty: MsgType,
        tx: Tx,
        path: &str,
        tail: Option<&[u8]>,
        verb: &str,
    ) -> Result<Vec<u8>> {
        validate_path(path)?;
        let payload = wire::payload(&[path.as_bytes()], tail)?;
        self.request(ty, tx, payload, || format!("xenstore {verb} {path}"))
    }
}

fn reader_loop(mut conn: Conn, shared: std::sync::Weak<Shared>) {
    loop {
        let mut head = [0u8; HEADER_LEN];
        if conn.read_exact(&mut head).is_err() {
            break;
        }
        let header = match Header::decode(&head) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "malformed xenstore reply; closing the connection");
                break;
            }
        };
        let mut body = vec![0u8; header.len as usize];
        if conn.read_exact(&mut body).is_err() {
            break;
        }
        let Some(shared) = shared.upgrade() else {
            break;
        };
        if header.msg_type == MsgType::WatchEvent {
            let parts = wire::split_strings(&body);
            if let [path, token, ..] = parts.as_slice() {
                if let Some(slot) = shared.watches.lock().get(token) {
                    let _ = slot.tx.send(WatchEvent {
                        path: path.clone(),
                        token: slot.user_token.clone(),
                    });
                }
            }
            continue;
        }
        let reply = if header.msg_type == MsgType::Error {
            Err(wire::errno_from_name(&body))
        } else {
            Ok((header.msg_type, body))
        };
        let waiter = shared.waiting.lock().remove(&header.req_id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(reply);
        }
    }
    // Connection gone: fail everyone still waiting, end every watch.
    if let Some(shared) = shared.upgrade() {
        for (_, w) in shared.waiting.lock().drain() {
            let _ = w.send(Err(libc::EPIPE));
        }
        shared.watches.lock().clear();
    }
}

impl XenStore for RealXenStore {
    fn read(&self, tx: Tx, path: &str) -> Result<Vec<u8>> {
        self.path_request(MsgType::Read, tx, path, None, "read")
    }

    fn write(&self, tx: Tx, path: &str, value: &[u8]) -> Result<()> {
        self.path_request(MsgType::Write, tx, path, Some(value), "write")
            .map(drop)
    }

    fn mkdir(&self, tx: Tx, path: &str) -> Result<()> {
        self.path_request(MsgType::Mkdir, tx, path, None, "mkdir")
            .map(drop)
    }

    fn rm(&self, tx: Tx, path: &str) -> Result<()> {
        self.path_request(MsgType::Rm, tx, path, None, "rm")
            .map(drop)
    }

    fn directory(&self, tx: Tx, path: &str) -> Result<Vec<String>> {
        let body = self.path_request(MsgType::Directory, tx, path, None, "directory")?;
        Ok(wire::split_strings(&body))
    }

    fn get_perms(&self, tx: Tx, path: &str) -> Result<Vec<Perm>> {
        let body = self.path_request(MsgType::GetPerms, tx, path, None, "get-perms")?;
        wire::split_strings(&body)
            .iter()
            .map(|s| s.parse())
            .collect()
    }

    fn set_perms(&self, tx: Tx, path: &str, perms: &[Perm]) -> Result<()> {
        validate_path(path)?;
        let strs: Vec<String> = perms.iter().map(Perm::to_string).collect();
        let mut parts: Vec<&[u8]> = vec![path.as_bytes()];
        parts.extend(strs.iter().map(|s| s.as_bytes()));
        let payload = wire::payload(&parts, None)?;
        self.request(MsgType::SetPerms, tx, payload, || {
            format!("xenstore set-perms {path}")
        })
        .map(drop)
    }

    fn transaction_start(&self) -> Result<Tx> {
        let body = self.request(MsgType::TransactionStart, Tx::NONE, vec![0], || {
            "xenstore transaction start".into()
        })?;
        let id = wire::split_strings(&body)
            .first()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::os("xenstore transaction start: bad reply", libc::EIO))?;
        Ok(Tx(id))
    }

    fn transaction_end(&self, tx: Tx, commit: bool) -> Result<()> {
        let flag: &[u8] = if commit { b"T" } else { b"F" };
        let payload = wire::payload(&[flag], None)?;
        self.request(MsgType::TransactionEnd, tx, payload, || {
            format!("xenstore transaction {} end", tx.0)
        })
        .map(drop)
    }

    fn watch(&self, path: &str, token: &str) -> Result<Watch> {
        validate_path(path)?;
        let internal = format!(
            "remoca-{}",
            self.shared.next_watch.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = crossbeam_channel::unbounded();
        self.shared.watches.lock().insert(
            internal.clone(),
            WatchSlot {
                user_token: token.to_string(),
                tx,
            },
        );
        let payload = wire::payload(&[path.as_bytes(), internal.as_bytes()], None)?;
        if let Err(e) = self.request(MsgType::Watch, Tx::NONE, payload, || {
            format!("xenstore watch {path}")
        }) {
            self.shared.watches.lock().remove(&internal);
            return Err(e);
        }
        let shared = Arc::downgrade(&self.shared);
        let path = path.to_string();
        Ok(Watch::new(
            rx,
            Box::new(move || {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                shared.watches.lock().remove(&internal);
                let store = RealXenStore {
                    shared,
                    endpoint: String::new(),
                };
                if let Ok(payload) = wire::payload(&[path.as_bytes(), internal.as_bytes()], None) {
                    let _ = store.request(MsgType::Unwatch, Tx::NONE, payload, || {
                        "xenstore unwatch".into()
                    });
                }
            }),
        ))
    }

    fn domain_path(&self, dom: crate::types::DomId) -> Result<String> {
        let payload = wire::payload(&[dom.to_string().as_bytes()], None)?;
        let body = self.request(MsgType::GetDomainPath, Tx::NONE, payload, || {
            format!("xenstore get-domain-path {dom}")
        })?;
        Ok(wire::split_strings(&body)
            .into_iter()
            .next()
            .unwrap_or_default())
    }
}
