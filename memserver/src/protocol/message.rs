//! Requests and replies: what each opcode's payload looks like.
//!
//! ```text
//!  opcode          request payload                    reply payload (status Ok)
//!  --------------  ---------------------------------  ------------------------------------
//!  HELLO           bincode Hello                      bincode HelloReply
//!  AUTH            32-byte proof                      32-byte server proof
//!  PING            -                                  -
//!  PUT             the value (<= MAX_VALUE)           -
//!  GET             -                                  the value  (NotFound: -)
//!  DELETE          -                                  -          (NotFound: -)
//!  PUT-BATCH       count x { key u64, len u32, value } count x status u8
//!  GET-BATCH       count x key u64                    count x { status u8, len u32, value }
//!  DELETE-BATCH    count x key u64                    count x status u8
//!  DROP-NAMESPACE  -                                  pages u64, bytes u64
//!  STATS           -                                  bincode StatsSnapshot
//! ```
//!
//! PUT, GET, DELETE and the batches name a pool (header byte 7) and a namespace; the single-key
//! ops name the key in the header. A reply echoes the request's opcode, pool, namespace, key,
//! count and request id. A reply whose status is not Ok carries an optional UTF-8 reason
//! (at most 256 bytes) instead of the payload above, except that a single PUT/GET/DELETE
//! reply never has a payload unless it is a GET hit.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::control::{self, Hello, HelloReply, StatsSnapshot};
use super::frame::{
    Frame, FrameError, Header, Opcode, Pool, Status, FLAG_REPLY, MAX_BATCH, MAX_VALUE,
};

/// Length of an AUTH proof.
pub const PROOF_LEN: usize = 32;
/// Longest reason text in an error reply.
pub const MAX_REASON: usize = 256;

const PUT_ENTRY_HEADER: usize = 12;
const GET_ENTRY_HEADER: usize = 5;

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello(Hello),
    Auth {
        proof: [u8; PROOF_LEN],
    },
    Ping,
    Put {
        pool: Pool,
        namespace: u64,
        key: u64,
        value: Bytes,
    },
    Get {
        pool: Pool,
        namespace: u64,
        key: u64,
    },
    Delete {
        pool: Pool,
        namespace: u64,
        key: u64,
    },
    PutBatch {
        pool: Pool,
        namespace: u64,
        entries: Vec<(u64, Bytes)>,
    },
    GetBatch {
        pool: Pool,
        namespace: u64,
        keys: Vec<u64>,
    },
    DeleteBatch {
        pool: Pool,
        namespace: u64,
        keys: Vec<u64>,
    },
    DropNamespace {
        namespace: u64,
    },
    Stats,
}

fn shape(op: Opcode, why: &'static str) -> FrameError {
    FrameError::BadShape { op, why }
}

fn need_pool(h: &Header) -> Result<Pool, FrameError> {
    h.pool.ok_or(shape(h.opcode, "a pool is required"))
}

fn read_keys(h: &Header, mut p: Bytes) -> Result<Vec<u64>, FrameError> {
    if h.count == 0 || p.len() != h.count as usize * 8 {
        return Err(shape(
            h.opcode,
            "payload must be count (>=1) keys of 8 bytes",
        ));
    }
    let mut keys = Vec::with_capacity(h.count as usize);
    for _ in 0..h.count {
        keys.push(p.get_u64_le());
    }
    Ok(keys)
}

impl Request {
    /// Interpret a whole frame as a request.
    ///
    /// # Errors
    /// A [`FrameError`] if the frame is a reply or its payload does not fit the opcode's
    /// shape; nothing is allocated beyond the (already limited) count.
    pub fn from_frame(f: Frame) -> Result<(u64, Request), FrameError> {
        let h = f.header;
        let mut p = f.payload;
        let op = h.opcode;
        if h.is_reply() {
            return Err(shape(op, "a reply where a request was expected"));
        }
        let single = |p: &Bytes| -> Result<(), FrameError> {
            if h.count != 0 || !p.is_empty() {
                return Err(shape(op, "no count and no payload expected"));
            }
            Ok(())
        };
        let req = match op {
            Opcode::Hello => Request::Hello(control::decode(&p)?),
            Opcode::Auth => {
                let proof: [u8; PROOF_LEN] = p[..]
                    .try_into()
                    .map_err(|_| shape(op, "proof must be 32 bytes"))?;
                Request::Auth { proof }
            }
            Opcode::Ping => {
                single(&p)?;
                Request::Ping
            }
            Opcode::Put => {
                if h.count != 0 {
                    return Err(shape(op, "count must be 0"));
                }
                if p.len() > MAX_VALUE as usize {
                    return Err(FrameError::ValueTooLong(p.len() as u32));
                }
                Request::Put {
                    pool: need_pool(&h)?,
                    namespace: h.namespace,
                    key: h.key,
                    value: p,
                }
            }
            Opcode::Get => {
                single(&p)?;
                Request::Get {
                    pool: need_pool(&h)?,
                    namespace: h.namespace,
                    key: h.key,
                }
            }
            Opcode::Delete => {
                single(&p)?;
                Request::Delete {
                    pool: need_pool(&h)?,
                    namespace: h.namespace,
                    key: h.key,
                }
            }
            Opcode::PutBatch => {
                let pool = need_pool(&h)?;
                if h.count == 0 {
                    return Err(shape(op, "count must be at least 1"));
                }
                let mut entries = Vec::with_capacity(h.count as usize);
                for _ in 0..h.count {
                    if p.len() < PUT_ENTRY_HEADER {
                        return Err(shape(op, "entry header truncated"));
                    }
                    let key = p.get_u64_le();
                    let len = p.get_u32_le();
                    if len > MAX_VALUE {
                        return Err(FrameError::ValueTooLong(len));
                    }
                    if p.len() < len as usize {
                        return Err(shape(op, "entry value truncated"));
                    }
                    entries.push((key, p.split_to(len as usize)));
                }
                if !p.is_empty() {
                    return Err(shape(op, "bytes after the last entry"));
                }
                Request::PutBatch {
                    pool,
                    namespace: h.namespace,
                    entries,
                }
            }
            Opcode::GetBatch => Request::GetBatch {
                pool: need_pool(&h)?,
                namespace: h.namespace,
                keys: read_keys(&h, p)?,
            },
            Opcode::DeleteBatch => Request::DeleteBatch {
                pool: need_pool(&h)?,
                namespace: h.namespace,
                keys: read_keys(&h, p)?,
            },
            Opcode::DropNamespace => {
                single(&p)?;
                Request::DropNamespace {
                    namespace: h.namespace,
                }
            }
            Opcode::Stats => {
                single(&p)?;
                Request::Stats
            }
        };
        Ok((h.request_id, req))
    }

    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello(_) => Opcode::Hello,
            Request::Auth { .. } => Opcode::Auth,
            Request::Ping => Opcode::Ping,
            Request::Put { .. } => Opcode::Put,
            Request::Get { .. } => Opcode::Get,
            Request::Delete { .. } => Opcode::Delete,
            Request::PutBatch { .. } => Opcode::PutBatch,
            Request::GetBatch { .. } => Opcode::GetBatch,
            Request::DeleteBatch { .. } => Opcode::DeleteBatch,
            Request::DropNamespace { .. } => Opcode::DropNamespace,
            Request::Stats => Opcode::Stats,
        }
    }

    /// Append this request as one frame to `out`.
    pub fn encode(&self, request_id: u64, out: &mut BytesMut) {
        let mut h = Header::request(self.opcode(), request_id);
        match self {
            Request::Hello(hello) => {
                let b = control::encode(hello);
                h.payload_len = b.len() as u32;
                h.write(out);
                out.extend_from_slice(&b);
            }
            Request::Auth { proof } => {
                h.payload_len = PROOF_LEN as u32;
                h.write(out);
                out.extend_from_slice(proof);
            }
            Request::Ping | Request::Stats => h.write(out),
            Request::Put {
                pool,
                namespace,
                key,
                value,
            } => {
                h.pool = Some(*pool);
                h.namespace = *namespace;
                h.key = *key;
                h.payload_len = value.len() as u32;
                h.write(out);
                out.extend_from_slice(value);
            }
            Request::Get {
                pool,
                namespace,
                key,
            }
            | Request::Delete {
                pool,
                namespace,
                key,
            } => {
                h.pool = Some(*pool);
                h.namespace = *namespace;
                h.key = *key;
                h.write(out);
            }
            Request::PutBatch {
                pool,
                namespace,
                entries,
            } => {
                h.pool = Some(*pool);
                h.namespace = *namespace;
                h.count = entries.len() as u32;
                h.payload_len = entries
                    .iter()
                    .map(|(_, v)| PUT_ENTRY_HEADER + v.len())
                    .sum::<usize>() as u32;
                h.write(out);
                for (k, v) in entries {
                    out.put_u64_le(*k);
                    out.put_u32_le(v.len() as u32);
                    out.extend_from_slice(v);
                }
            }
            Request::GetBatch {
                pool,
                namespace,
                keys,
            }
            | Request::DeleteBatch {
                pool,
                namespace,
                keys,
            } => {
                h.pool = Some(*pool);
                h.namespace = *namespace;
                h.count = keys.len() as u32;
                h.payload_len = (keys.len() * 8) as u32;
                h.write(out);
                for k in keys {
                    out.put_u64_le(*k);
                }
            }
            Request::DropNamespace { namespace } => {
                h.namespace = *namespace;
                h.write(out);
            }
        }
    }
}

/// The body of a decoded reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    Hello(HelloReply),
    Auth {
        server_proof: [u8; PROOF_LEN],
    },
    /// PING, PUT, DELETE, and GET misses: the status says it all.
    Done,
    /// A GET hit.
    Value(Bytes),
    /// PUT-BATCH and DELETE-BATCH, one status per entry in request order.
    Statuses(Vec<Status>),
    /// GET-BATCH, one entry per key in request order (`None` = not found).
    Values(Vec<Option<Bytes>>),
    Dropped {
        pages: u64,
        bytes: u64,
    },
    Stats(Box<StatsSnapshot>),
    /// A non-Ok status with its reason.
    Error(String),
}

/// A decoded reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub request_id: u64,
    pub opcode: Opcode,
    pub status: Status,
    pub body: ReplyBody,
}

impl Reply {
    /// Interpret a whole frame as a reply.
    ///
    /// # Errors
    /// A [`FrameError`] if the frame is a request or its payload has the wrong shape.
    pub fn from_frame(f: Frame) -> Result<Reply, FrameError> {
        let h = f.header;
        let mut p = f.payload;
        let op = h.opcode;
        if !h.is_reply() {
            return Err(shape(op, "a request where a reply was expected"));
        }
        let single_op = matches!(
            op,
            Opcode::Put | Opcode::Get | Opcode::Delete | Opcode::Ping
        );
        let body = if h.status != Status::Ok && !(single_op && p.is_empty()) {
            if p.len() > MAX_REASON {
                return Err(shape(op, "error reason too long"));
            }
            ReplyBody::Error(String::from_utf8_lossy(&p).into_owned())
        } else if h.status != Status::Ok {
            ReplyBody::Done
        } else {
            match op {
                Opcode::Hello => ReplyBody::Hello(control::decode(&p)?),
                Opcode::Auth => ReplyBody::Auth {
                    server_proof: p[..]
                        .try_into()
                        .map_err(|_| shape(op, "proof must be 32 bytes"))?,
                },
                Opcode::Get => {
                    if p.len() > MAX_VALUE as usize {
                        return Err(FrameError::ValueTooLong(p.len() as u32));
                    }
                    ReplyBody::Value(p)
                }
                Opcode::Ping | Opcode::Put | Opcode::Delete => {
                    if !p.is_empty() {
                        return Err(shape(op, "unexpected payload"));
                    }
                    ReplyBody::Done
                }
                Opcode::PutBatch | Opcode::DeleteBatch => {
                    if p.len() != h.count as usize {
                        return Err(shape(op, "payload must be count status bytes"));
                    }
                    let mut v = Vec::with_capacity(p.len());
                    for b in p.iter() {
                        v.push(Status::from_u8(*b).ok_or(FrameError::UnknownStatus(*b))?);
                    }
                    ReplyBody::Statuses(v)
                }
                Opcode::GetBatch => {
                    let mut v = Vec::with_capacity(h.count.min(MAX_BATCH) as usize);
                    for _ in 0..h.count {
                        if p.len() < GET_ENTRY_HEADER {
                            return Err(shape(op, "entry header truncated"));
                        }
                        let st = p.get_u8();
                        let len = p.get_u32_le();
                        if len > MAX_VALUE {
                            return Err(FrameError::ValueTooLong(len));
                        }
                        if p.len() < len as usize {
                            return Err(shape(op, "entry value truncated"));
                        }
                        let val = p.split_to(len as usize);
                        match Status::from_u8(st) {
                            Some(Status::Ok) => v.push(Some(val)),
                            Some(Status::NotFound) if len == 0 => v.push(None),
                            _ => return Err(shape(op, "entry status must be Ok or NotFound")),
                        }
                    }
                    if !p.is_empty() {
                        return Err(shape(op, "bytes after the last entry"));
                    }
                    ReplyBody::Values(v)
                }
                Opcode::DropNamespace => {
                    if p.len() != 16 {
                        return Err(shape(op, "payload must be 16 bytes"));
                    }
                    ReplyBody::Dropped {
                        pages: p.get_u64_le(),
                        bytes: p.get_u64_le(),
                    }
                }
                Opcode::Stats => ReplyBody::Stats(Box::new(control::decode(&p)?)),
            }
        };
        Ok(Reply {
            request_id: h.request_id,
            opcode: op,
            status: h.status,
            body,
        })
    }
}

/// Writes replies straight into an output buffer (the server's hot path: no intermediate
/// `Reply` value, values copied once from the store into the socket buffer).
#[derive(Debug)]
pub struct ReplyWriter<'a> {
    pub out: &'a mut BytesMut,
}

impl ReplyWriter<'_> {
    fn head(&mut self, req: &Header, status: Status, len: usize) {
        let mut h = *req;
        h.flags = FLAG_REPLY;
        h.status = status;
        h.payload_len = len as u32;
        h.write(self.out);
    }

    /// A reply with no payload.
    pub fn status(&mut self, req: &Header, status: Status) {
        self.head(req, status, 0);
    }

    /// A non-Ok reply with a reason (truncated to `MAX_REASON` bytes).
    pub fn error(&mut self, req: &Header, status: Status, reason: &str) {
        let mut end = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.head(req, status, end);
        self.out.extend_from_slice(&reason.as_bytes()[..end]);
    }

    /// An Ok reply with an opaque payload.
    pub fn payload(&mut self, req: &Header, payload: &[u8]) {
        self.head(req, Status::Ok, payload.len());
        self.out.extend_from_slice(payload);
    }

    /// A PUT-BATCH / DELETE-BATCH reply.
    pub fn statuses(&mut self, req: &Header, statuses: &[Status]) {
        self.head(req, Status::Ok, statuses.len());
        for s in statuses {
            self.out.put_u8(*s as u8);
        }
    }

    /// A GET-BATCH reply.
    pub fn values(&mut self, req: &Header, values: &[Option<Bytes>]) {
        let len: usize = values
            .iter()
            .map(|v| GET_ENTRY_HEADER + v.as_ref().map_or(0, |b| b.len()))
            .sum();
        self.head(req, Status::Ok, len);
        for v in values {
            match v {
                Some(b) => {
                    self.out.put_u8(Status::Ok as u8);
                    self.out.put_u32_le(b.len() as u32);
                    self.out.extend_from_slice(b);
                }
                None => {
                    self.out.put_u8(Status::NotFound as u8);
                    self.out.put_u32_le(0);
                }
            }
        }
    }

    /// A DROP-NAMESPACE reply.
    pub fn dropped(&mut self, req: &Header, pages: u64, bytes: u64) {
        self.head(req, Status::Ok, 16);
        self.out.put_u64_le(pages);
        self.out.put_u64_le(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::decode;
    use super::*;
    use proptest::prelude::*;

    fn round_trip(req: &Request) -> Request {
        let mut b = BytesMut::new();
        req.encode(99, &mut b);
        let f = decode(&mut b).unwrap().unwrap();
        assert!(b.is_empty());
        let (id, r) = Request::from_frame(f).unwrap();
        assert_eq!(id, 99);
        r
    }

    fn arb_pool() -> impl Strategy<Value = Pool> {
        prop_oneof![Just(Pool::Ephemeral), Just(Pool::Persistent)]
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        let val = proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
        let keys = proptest::collection::vec(any::<u64>(), 1..20);
        prop_oneof![
            Just(Request::Ping),
            Just(Request::Stats),
            any::<[u8; 32]>().prop_map(|proof| Request::Auth { proof }),
            (any::<[u8; 32]>(), ".{0,10}").prop_map(|(n, s)| Request::Hello(Hello {
                min_version: 1,
                max_version: 1,
                client_nonce: n,
                client_name: s
            })),
            (arb_pool(), any::<u64>(), any::<u64>(), val.clone()).prop_map(
                |(pool, namespace, key, value)| Request::Put {
                    pool,
                    namespace,
                    key,
                    value
                }
            ),
            (arb_pool(), any::<u64>(), any::<u64>()).prop_map(|(pool, namespace, key)| {
                Request::Get {
                    pool,
                    namespace,
                    key,
                }
            }),
            (arb_pool(), any::<u64>(), any::<u64>()).prop_map(|(pool, namespace, key)| {
                Request::Delete {
                    pool,
                    namespace,
                    key,
                }
            }),
            (
                arb_pool(),
                any::<u64>(),
                proptest::collection::vec((any::<u64>(), val), 1..10)
            )
                .prop_map(|(pool, namespace, entries)| Request::PutBatch {
                    pool,
                    namespace,
                    entries
                }),
            (arb_pool(), any::<u64>(), keys.clone()).prop_map(|(pool, namespace, keys)| {
                Request::GetBatch {
                    pool,
                    namespace,
                    keys,
                }
            }),
            (arb_pool(), any::<u64>(), keys).prop_map(|(pool, namespace, keys)| {
                Request::DeleteBatch {
                    pool,
                    namespace,
                    keys,
                }
            }),
            any::<u64>().prop_map(|namespace| Request::DropNamespace { namespace }),
        ]
    }

    proptest! {
        #[test]
        fn every_request_round_trips(req in arb_request()) {
            prop_assert_eq!(round_trip(&req), req);
        }

        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut b = BytesMut::from(&bytes[..]);
            while let Ok(Some(f)) = decode(&mut b) {
                let _ = Request::from_frame(f.clone());
                let _ = Reply::from_frame(f);
            }
        }

        #[test]
        fn get_batch_reply_round_trips(vals in proptest::collection::vec(
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..100)), 1..20)) {
            let vals: Vec<Option<Bytes>> = vals.into_iter().map(|v| v.map(Bytes::from)).collect();
            let mut req = Header::request(Opcode::GetBatch, 5);
            req.count = vals.len() as u32;
            let mut out = BytesMut::new();
            ReplyWriter { out: &mut out }.values(&req, &vals);
            let r = Reply::from_frame(decode(&mut out).unwrap().unwrap()).unwrap();
            prop_assert_eq!(r.body, ReplyBody::Values(vals));
        }
    }

    #[test]
    fn shapes_are_enforced() {
        // GET with a payload.
        let mut h = Header::request(Opcode::Get, 1);
        h.pool = Some(Pool::Ephemeral);
        let f = Frame {
            header: h,
            payload: Bytes::from_static(b"x"),
        };
        assert!(Request::from_frame(f).is_err());
        // PUT without a pool.
        let f = Frame {
            header: Header::request(Opcode::Put, 1),
            payload: Bytes::new(),
        };
        assert!(Request::from_frame(f).is_err());
        // GET-BATCH whose count disagrees with the payload.
        let mut h = Header::request(Opcode::GetBatch, 1);
        h.pool = Some(Pool::Ephemeral);
        h.count = 3;
        let f = Frame {
            header: h,
            payload: Bytes::from(vec![0u8; 16]),
        };
        assert!(Request::from_frame(f).is_err());
        // PUT-BATCH entry claiming more bytes than present.
        let mut h = Header::request(Opcode::PutBatch, 1);
        h.pool = Some(Pool::Ephemeral);
        h.count = 1;
        let mut p = BytesMut::new();
        p.put_u64_le(1);
        p.put_u32_le(100);
        p.put_slice(&[0; 10]);
        let f = Frame {
            header: h,
            payload: p.freeze(),
        };
        assert!(Request::from_frame(f).is_err());
    }

    #[test]
    fn error_reply_carries_reason() {
        let h = Header::request(Opcode::Stats, 3);
        let mut out = BytesMut::new();
        ReplyWriter { out: &mut out }.error(&h, Status::Unauthenticated, "handshake first");
        let r = Reply::from_frame(decode(&mut out).unwrap().unwrap()).unwrap();
        assert_eq!(r.status, Status::Unauthenticated);
        assert_eq!(r.body, ReplyBody::Error("handshake first".into()));
    }
}
