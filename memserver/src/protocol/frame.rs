//! The frame: a fixed 48-byte little-endian header followed by a raw payload.
//!
//! ```text
//!  offset size field
//!  ------ ---- -----------------------------------------------------------
//!   0      4   magic        b"RMSV"
//!   4      1   version      PROTOCOL_VERSION (1)
//!   5      1   opcode       see `Opcode`
//!   6      1   status       0 in requests; see `Status` in replies
//!   7      1   pool         0 = none, 1 = ephemeral, 2 = persistent
//!   8      2   flags        bit 0 = REPLY; other bits must be 0
//!  10      2   reserved     must be 0
//!  12      4   count        entries in a batch (0 for single-key ops)
//!  16      8   request id   chosen by the client, echoed in the reply
//!  24      8   namespace    one per VM
//!  32      8   key          page key (single-key ops; 0 otherwise)
//!  40      4   payload len  bytes that follow the header
//!  44      4   reserved     must be 0
//!  48      ..  payload      raw bytes (a page, a batch, or a control message)
//! ```
//!
//! Limits, checked on the header alone, before a byte of payload is buffered or allocated:
//! `payload len <= MAX_PAYLOAD`, `count <= MAX_BATCH`. The per-opcode shape (for example "GET
//! carries no payload", "GET-BATCH carries exactly `count` keys") is checked by
//! [`super::message`] once the whole frame has arrived.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"RMSV";
/// The only protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 48;
/// Largest payload one frame may carry (a full batch of sealed pages fits comfortably).
pub const MAX_PAYLOAD: u32 = 8 << 20;
/// Largest number of entries in one batch.
pub const MAX_BATCH: u32 = 1024;
/// Largest single stored value (a sealed 4 KiB page is 4 144 bytes; bigger pages up to 64 KiB).
pub const MAX_VALUE: u32 = 64 << 10;

/// Header flag: this frame is a reply.
pub const FLAG_REPLY: u16 = 1;

/// Operation carried by a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Version handshake; must be the first frame on a connection.
    Hello = 0x01,
    /// Challenge-response proof of the pre-shared key.
    Auth = 0x02,
    /// Liveness probe; no payload.
    Ping = 0x03,
    /// Store one value under (pool, namespace, key).
    Put = 0x10,
    /// Fetch one value.
    Get = 0x11,
    /// Delete one value.
    Delete = 0x12,
    /// Store `count` values in one namespace.
    PutBatch = 0x20,
    /// Fetch `count` values.
    GetBatch = 0x21,
    /// Delete `count` values.
    DeleteBatch = 0x22,
    /// Free every page of a namespace in both pools.
    DropNamespace = 0x30,
    /// Counters per pool and namespace.
    Stats = 0x31,
}

impl Opcode {
    /// Every opcode, for tests and documentation.
    pub const ALL: [Opcode; 11] = [
        Opcode::Hello,
        Opcode::Auth,
        Opcode::Ping,
        Opcode::Put,
        Opcode::Get,
        Opcode::Delete,
        Opcode::PutBatch,
        Opcode::GetBatch,
        Opcode::DeleteBatch,
        Opcode::DropNamespace,
        Opcode::Stats,
    ];

    pub fn from_u8(v: u8) -> Option<Opcode> {
        Opcode::ALL.into_iter().find(|op| *op as u8 == v)
    }
}

/// Outcome carried by a reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    /// The key is not stored (normal for the ephemeral pool).
    NotFound = 1,
    /// The persistent pool is full: place the page on another server.
    PersistentFull = 2,
    /// The ephemeral pool could not make room (everything else is persistent).
    NoSpace = 3,
    /// The request was well-framed but invalid (for example pool 0 on a PUT).
    BadRequest = 4,
    /// The connection has not completed the handshake.
    Unauthenticated = 5,
    /// The HELLO asked for a protocol version this server does not speak.
    VersionMismatch = 6,
    /// The AUTH proof was wrong.
    AuthFailed = 7,
    /// The frame could not be decoded; the server closes the connection after this reply.
    Malformed = 8,
    /// The server is shutting down.
    ShuttingDown = 9,
}

impl Status {
    pub fn from_u8(v: u8) -> Option<Status> {
        use Status::*;
        [
            Ok,
            NotFound,
            PersistentFull,
            NoSpace,
            BadRequest,
            Unauthenticated,
            VersionMismatch,
            AuthFailed,
            Malformed,
            ShuttingDown,
        ]
        .into_iter()
        .find(|s| *s as u8 == v)
    }
}

/// The two page pools, never mixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Pool {
    /// Clean pages; may be evicted at any time; a miss is normal.
    Ephemeral = 1,
    /// The only copy of a guest page; never evicted; PUT refused when full.
    Persistent = 2,
}

impl Pool {
    pub const ALL: [Pool; 2] = [Pool::Ephemeral, Pool::Persistent];

    pub fn from_u8(v: u8) -> Option<Pool> {
        match v {
            1 => Some(Pool::Ephemeral),
            2 => Some(Pool::Persistent),
            _ => None,
        }
    }

    pub fn index(self) -> usize {
        self as usize - 1
    }

    pub fn name(self) -> &'static str {
        match self {
            Pool::Ephemeral => "ephemeral",
            Pool::Persistent => "persistent",
        }
    }
}

/// Why a byte stream is not a valid frame. Any of these closes the connection.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0}")]
    BadVersion(u8),
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("unknown status {0}")]
    UnknownStatus(u8),
    #[error("unknown pool {0}")]
    UnknownPool(u8),
    #[error("reserved header bits set")]
    ReservedBits,
    #[error("payload length {0} exceeds the limit {MAX_PAYLOAD}")]
    PayloadTooLong(u32),
    #[error("batch count {0} exceeds the limit {MAX_BATCH}")]
    BatchTooLong(u32),
    #[error("value length {0} exceeds the limit {MAX_VALUE}")]
    ValueTooLong(u32),
    #[error("{op:?} frame has an invalid shape: {why}")]
    BadShape { op: Opcode, why: &'static str },
    #[error("connection closed inside a frame ({0} bytes buffered)")]
    Truncated(usize),
    #[error("control message: {0}")]
    Control(String),
}

/// The decoded fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub opcode: Opcode,
    pub status: Status,
    /// Raw pool byte: 0 for none, else a [`Pool`].
    pub pool: Option<Pool>,
    pub flags: u16,
    pub count: u32,
    pub request_id: u64,
    pub namespace: u64,
    pub key: u64,
    pub payload_len: u32,
}

impl Header {
    /// A request header with the given opcode and everything else zero.
    pub fn request(opcode: Opcode, request_id: u64) -> Header {
        Header {
            opcode,
            status: Status::Ok,
            pool: None,
            flags: 0,
            count: 0,
            request_id,
            namespace: 0,
            key: 0,
            payload_len: 0,
        }
    }

    /// The reply header for this request with a status and payload length.
    pub fn reply(&self, status: Status, payload_len: u32) -> Header {
        Header {
            status,
            flags: FLAG_REPLY,
            payload_len,
            ..*self
        }
    }

    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// Parse and limit-check a header from exactly [`HEADER_LEN`] bytes.
    ///
    /// # Errors
    /// Any field outside its range or limit.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        let mut r = &b[..];
        let mut magic = [0u8; 4];
        r.copy_to_slice(&mut magic);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = r.get_u8();
        if version != PROTOCOL_VERSION {
            return Err(FrameError::BadVersion(version));
        }
        let op = r.get_u8();
        let opcode = Opcode::from_u8(op).ok_or(FrameError::UnknownOpcode(op))?;
        let st = r.get_u8();
        let status = Status::from_u8(st).ok_or(FrameError::UnknownStatus(st))?;
        let pool_byte = r.get_u8();
        let pool = match pool_byte {
            0 => None,
            p => Some(Pool::from_u8(p).ok_or(FrameError::UnknownPool(p))?),
        };
        let flags = r.get_u16_le();
        let reserved1 = r.get_u16_le();
        let count = r.get_u32_le();
        let request_id = r.get_u64_le();
        let namespace = r.get_u64_le();
        let key = r.get_u64_le();
        let payload_len = r.get_u32_le();
        let reserved2 = r.get_u32_le();
        if flags & !FLAG_REPLY != 0 || reserved1 != 0 || reserved2 != 0 {
            return Err(FrameError::ReservedBits);
        }
        if payload_len > MAX_PAYLOAD {
            return Err(FrameError::PayloadTooLong(payload_len));
        }
        if count > MAX_BATCH {
            return Err(FrameError::BatchTooLong(count));
        }
        Ok(Header {
            opcode,
            status,
            pool,
            flags,
            count,
            request_id,
            namespace,
            key,
            payload_len,
        })
    }

    /// Append the 48 header bytes to `out`.
    pub fn write(&self, out: &mut BytesMut) {
        out.reserve(HEADER_LEN);
        out.put_slice(&MAGIC);
        out.put_u8(PROTOCOL_VERSION);
        out.put_u8(self.opcode as u8);
        out.put_u8(self.status as u8);
        out.put_u8(self.pool.map_or(0, |p| p as u8));
        out.put_u16_le(self.flags);
        out.put_u16_le(0);
        out.put_u32_le(self.count);
        out.put_u64_le(self.request_id);
        out.put_u64_le(self.namespace);
        out.put_u64_le(self.key);
        out.put_u32_le(self.payload_len);
        out.put_u32_le(0);
    }
}

/// One whole frame: header plus its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub payload: Bytes,
}

impl Frame {
    /// Append header and payload to `out` (the header's length is set from the payload).
    pub fn write(&self, out: &mut BytesMut) {
        let mut h = self.header;
        h.payload_len = self.payload.len() as u32;
        h.write(out);
        out.extend_from_slice(&self.payload);
    }
}

/// Take one whole frame off the front of `buf`, if one has fully arrived.
///
/// Returns `Ok(None)` when more bytes are needed. The header is validated (including the
/// payload limit) as soon as its 48 bytes are present, so an oversize length is rejected
/// before the caller buffers its payload. On success `buf` reserves room for the rest of a
/// partly received frame, never more than `MAX_PAYLOAD`.
///
/// # Errors
/// A [`FrameError`] when the header is invalid; the stream cannot be resynchronised.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let hdr: &[u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().expect("length checked");
    let header = Header::parse(hdr)?;
    let total = HEADER_LEN + header.payload_len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(header.payload_len as usize).freeze();
    Ok(Some(Frame { header, payload }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            opcode: Opcode::Put,
            status: Status::Ok,
            pool: Some(Pool::Persistent),
            flags: 0,
            count: 0,
            request_id: 0x1122_3344_5566_7788,
            namespace: 7,
            key: 42,
            payload_len: 3,
        }
    }

    #[test]
    fn header_round_trips_and_is_48_bytes() {
        let mut out = BytesMut::new();
        sample().write(&mut out);
        assert_eq!(out.len(), HEADER_LEN);
        assert_eq!(&out[..4], b"RMSV");
        let parsed = Header::parse(out[..].try_into().unwrap()).unwrap();
        assert_eq!(parsed, sample());
    }

    #[test]
    fn decode_waits_for_whole_frame() {
        let mut out = BytesMut::new();
        Frame {
            header: sample(),
            payload: Bytes::from_static(b"abc"),
        }
        .write(&mut out);
        let mut partial = BytesMut::from(&out[..HEADER_LEN + 1]);
        assert_eq!(decode(&mut partial).unwrap(), None);
        let mut whole = out.clone();
        let f = decode(&mut whole).unwrap().unwrap();
        assert_eq!(&f.payload[..], b"abc");
        assert!(whole.is_empty());
    }

    #[test]
    fn rejects_bad_magic_version_opcode_and_oversize() {
        let mut good = BytesMut::new();
        sample().write(&mut good);
        let too_long = (MAX_PAYLOAD + 1).to_le_bytes();
        let too_many = (MAX_BATCH + 1).to_le_bytes();
        let cases: Vec<(usize, &[u8], FrameError)> = vec![
            (0, b"XMSV", FrameError::BadMagic(*b"XMSV")),
            (4, &[9], FrameError::BadVersion(9)),
            (5, &[0xee], FrameError::UnknownOpcode(0xee)),
            (7, &[3], FrameError::UnknownPool(3)),
            (10, &[1], FrameError::ReservedBits),
            (40, &too_long, FrameError::PayloadTooLong(MAX_PAYLOAD + 1)),
            (12, &too_many, FrameError::BatchTooLong(MAX_BATCH + 1)),
        ];
        for (at, bytes, want) in cases {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            assert_eq!(decode(&mut b).unwrap_err(), want);
        }
    }

    #[test]
    fn oversize_length_is_rejected_without_reserving() {
        let mut h = BytesMut::new();
        sample().write(&mut h);
        h[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        let cap = h.capacity();
        assert!(decode(&mut h).is_err());
        assert_eq!(h.capacity(), cap);
    }
}
