//! The channel between the failover endpoint and a storage driver: frame formats, parsing
//! and encoding. No I/O here, so every parser can be fuzzed on plain bytes.
//!
//! All integers are big-endian. A connection starts with a handshake, then carries
//! requests (endpoint → driver) and replies and heartbeats (driver → endpoint).
//!
//! ```text
//! Hello      (endpoint → driver)  u32 HELLO_MAGIC | u16 VERSION | u16 flags (HELLO_*)
//!                                 | u64 generation | [32] endpoint nonce | u16 name_len
//!                                 | name[name_len ≤ MAX_NAME_LEN]
//! HelloReply (driver → endpoint)  u32 HELLO_REPLY_MAGIC | u16 VERSION | u16 flags
//!                                 | u32 status (0 = ok, else errno) | u32 pid | u64 size
//!                                 | u8 read_only | [3] zero | [32] driver nonce | [32] driver mac
//! Auth       (endpoint → driver)  u32 AUTH_MAGIC | [32] endpoint mac
//! Ready      (driver → endpoint)  u32 READY_MAGIC | u32 status (0 = accepted, else errno)
//!
//! Request    (endpoint → driver)  u32 REQUEST_MAGIC | u8 op | u8 flags | u16 zero | u64 id
//!                                 | u64 generation | u64 offset | u32 length
//!                                 | data[length] (WRITE only; length ≤ MAX_DATA)
//! Reply      (driver → endpoint)  u32 REPLY_MAGIC | u8 kind | [3] zero | u32 error | u64 id
//!                                 | u32 data_len | data[data_len ≤ MAX_DATA]
//! ```
//!
//! `kind` is [`KIND_REPLY`] (the answer to request `id`; `error` is an errno, 0 = success;
//! data is the read data, or the encoded extents of a BLOCK_STATUS), [`KIND_HEARTBEAT`]
//! (`id` is the driver's heartbeat sequence number, no data), [`KIND_REPLY_SLOT`] (read data
//! in the shared area) or [`KIND_REPLY_STORED`] (a write that needs no re-applying; only
//! when both sides set [`HELLO_STORED`]).
//!
//! **Authentication.** With a pre-shared key both sides prove they hold it: each side sends a
//! fresh random 32-byte nonce, the driver answers with
//! `mac_d = BLAKE3-keyed(key, "remoca-failover driver" | endpoint_nonce | driver_nonce | generation)`
//! and the endpoint with the same over `"remoca-failover endpoint" | driver_nonce |
//! endpoint_nonce | generation`. Each side checks the other's mac in constant time (the
//! BLAKE3 hash type compares in constant time) before anything else is exchanged. Without a
//! key the macs are all zero; a driver configured with a key refuses a hello without
//! [`HELLO_KEYED`], and an endpoint with a key refuses a driver whose reply lacks it. The
//! key is `BLAKE3-derive-key("remoca failover channel key v1", secret file bytes)`. The
//! channel is authenticated, not encrypted: across hosts, run it inside a trusted network or
//! a tunnel when the data is confidential.
//!
//! **Generation.** Each connection gets a generation from the endpoint, higher than any it
//! used before; every request carries it and a driver answers a request whose generation
//! is not its connection's with `ESTALE`. Storage that checks the generation (the fence)
//! is not built yet: see docs/failover.md.
//!
//! Limits, checked before any allocation: export names at most [`MAX_NAME_LEN`] bytes,
//! request and reply data at most [`MAX_DATA`] bytes; a READ or BLOCK_STATUS `length` also
//! at most [`MAX_DATA`].

use crate::disk::Extent;

pub const HELLO_MAGIC: u32 = 0x5246_4f48; // "RFOH"
pub const HELLO_REPLY_MAGIC: u32 = 0x5246_4f53; // "RFOS"
pub const AUTH_MAGIC: u32 = 0x5246_4f41; // "RFOA"
pub const READY_MAGIC: u32 = 0x5246_4f4b; // "RFOK"
pub const REQUEST_MAGIC: u32 = 0x5246_4f51; // "RFOQ"
pub const REPLY_MAGIC: u32 = 0x5246_4f52; // "RFOR"

/// Protocol version in the hello.
pub const VERSION: u16 = 1;
/// Hello / hello-reply flag: the sender holds a pre-shared key and its mac is real.
pub const HELLO_KEYED: u16 = 1 << 0;
/// Hello / hello-reply flag (Unix sockets only): the endpoint offers, and the driver takes,
/// a shared-memory data area ([`super::shm`]), passed after READY.
pub const HELLO_SHM: u16 = 1 << 1;
/// Hello / hello-reply flag (Unix sockets only): the endpoint takes, and the driver sends,
/// [`KIND_REPLY_STORED`] for writes that need no re-applying if the driver dies.
pub const HELLO_STORED: u16 = 1 << 2;
const HELLO_FLAGS: u16 = HELLO_KEYED | HELLO_SHM | HELLO_STORED;

fn hello_flags(keyed: bool, shm: bool, stored: bool) -> u16 {
    let bit = |on: bool, f: u16| if on { f } else { 0 };
    bit(keyed, HELLO_KEYED) | bit(shm, HELLO_SHM) | bit(stored, HELLO_STORED)
}

/// Longest export name in a hello.
pub const MAX_NAME_LEN: usize = 4096;
/// Largest data in one request or reply (the NBD server's maximum payload).
pub const MAX_DATA: u32 = 32 << 20;

pub const HELLO_FIXED_LEN: usize = 4 + 2 + 2 + 8 + 32 + 2;
pub const HELLO_REPLY_LEN: usize = 4 + 2 + 2 + 4 + 4 + 8 + 1 + 3 + 32 + 32;
pub const AUTH_LEN: usize = 4 + 32;
pub const READY_LEN: usize = 4 + 4;
pub const REQUEST_HEADER_LEN: usize = 4 + 1 + 1 + 2 + 8 + 8 + 8 + 4;
pub const REPLY_HEADER_LEN: usize = 4 + 1 + 3 + 4 + 8 + 4;
/// One encoded extent in a BLOCK_STATUS reply: u64 len | u32 flags | u32 depth.
pub const EXTENT_LEN: usize = 16;

pub const OP_READ: u8 = 1;
pub const OP_WRITE: u8 = 2;
pub const OP_FLUSH: u8 = 3;
pub const OP_DISCARD: u8 = 4;
pub const OP_WRITE_ZEROES: u8 = 5;
pub const OP_BLOCK_STATUS: u8 = 6;

/// Request flag: force unit access (WRITE, WRITE_ZEROES).
pub const FLAG_FUA: u8 = 1 << 0;
/// Request flag: WRITE_ZEROES only if fast.
pub const FLAG_FAST_ZERO: u8 = 1 << 1;
/// Request flag (READ, WRITE on a channel with a shared area): the data is in area slot
/// `slot` (the u16 after the flags), not on the socket.
pub const FLAG_SLOT: u8 = 1 << 2;
const KNOWN_FLAGS: u8 = FLAG_FUA | FLAG_FAST_ZERO | FLAG_SLOT;

pub const KIND_REPLY: u8 = 0;
pub const KIND_HEARTBEAT: u8 = 1;
/// A reply whose `data_len` bytes are in the request's area slot, not on the socket.
pub const KIND_REPLY_SLOT: u8 = 2;
/// A successful write, discard or write-zeroes whose result is already in the storage as a
/// new driver would open it ([`crate::disk::Disk::write_is_stored`]): the endpoint need not
/// keep it for re-applying. No error, no data. Only after [`HELLO_STORED`] was agreed.
pub const KIND_REPLY_STORED: u8 = 3;

const EXTENT_HOLE: u32 = 1 << 0;
const EXTENT_ZERO: u32 = 1 << 1;

/// Label of the key derivation.
pub const KEY_CONTEXT: &str = "remoca failover channel key v1";
const DRIVER_MAC_LABEL: &[u8] = b"remoca-failover driver";
const ENDPOINT_MAC_LABEL: &[u8] = b"remoca-failover endpoint";

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported protocol version {0}")]
    BadVersion(u16),
    #[error("unknown flags {0:#x}")]
    BadFlags(u32),
    #[error("unknown op {0}")]
    BadOp(u8),
    #[error("unknown reply kind {0}")]
    BadKind(u8),
    #[error("length {0} is over the limit")]
    TooLong(u64),
    #[error("frame is truncated")]
    Truncated,
    #[error("reserved bytes are not zero")]
    Reserved,
    #[error("export name is not UTF-8")]
    BadName,
    #[error("extent list is malformed")]
    BadExtents,
}

/// A pre-shared channel key.
#[derive(Clone)]
pub struct ChannelKey([u8; 32]);

impl std::fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelKey(..)")
    }
}

impl ChannelKey {
    /// Derive the key from the bytes of a secret file.
    pub fn from_secret(secret: &[u8]) -> Self {
        Self(blake3::derive_key(KEY_CONTEXT, secret))
    }

    fn mac(
        &self,
        label: &[u8],
        first: &[u8; 32],
        second: &[u8; 32],
        generation: u64,
    ) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label);
        h.update(first);
        h.update(second);
        h.update(&generation.to_be_bytes());
        h.finalize()
    }

    /// The mac the driver sends.
    pub fn driver_mac(
        &self,
        endpoint_nonce: &[u8; 32],
        driver_nonce: &[u8; 32],
        generation: u64,
    ) -> [u8; 32] {
        *self
            .mac(DRIVER_MAC_LABEL, endpoint_nonce, driver_nonce, generation)
            .as_bytes()
    }

    /// The mac the endpoint sends.
    pub fn endpoint_mac(
        &self,
        endpoint_nonce: &[u8; 32],
        driver_nonce: &[u8; 32],
        generation: u64,
    ) -> [u8; 32] {
        *self
            .mac(ENDPOINT_MAC_LABEL, driver_nonce, endpoint_nonce, generation)
            .as_bytes()
    }

    /// Check the driver's mac in constant time.
    pub fn check_driver_mac(
        &self,
        endpoint_nonce: &[u8; 32],
        driver_nonce: &[u8; 32],
        generation: u64,
        mac: &[u8; 32],
    ) -> bool {
        self.mac(DRIVER_MAC_LABEL, endpoint_nonce, driver_nonce, generation)
            == blake3::Hash::from(*mac)
    }

    /// Check the endpoint's mac in constant time.
    pub fn check_endpoint_mac(
        &self,
        endpoint_nonce: &[u8; 32],
        driver_nonce: &[u8; 32],
        generation: u64,
        mac: &[u8; 32],
    ) -> bool {
        self.mac(ENDPOINT_MAC_LABEL, driver_nonce, endpoint_nonce, generation)
            == blake3::Hash::from(*mac)
    }
}

/// A fresh random nonce (from the OS: `/dev/urandom`, mixed through BLAKE3 with the time
/// and the process id so a failing read still gives distinct nonces).
pub fn fresh_nonce() -> [u8; 32] {
    use std::io::Read;
    let mut seed = [0u8; 32];
    let from_os = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .is_ok();
    let mut h = blake3::Hasher::new();
    h.update(&seed);
    h.update(&[u8::from(from_os)]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_be_bytes());
    h.update(&std::process::id().to_be_bytes());
    *h.finalize().as_bytes()
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn arr32(b: &[u8], at: usize) -> [u8; 32] {
    b[at..at + 32].try_into().expect("32 bytes")
}

/// The endpoint's hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub keyed: bool,
    /// The endpoint offers a shared-memory data area ([`HELLO_SHM`]).
    pub shm: bool,
    /// The endpoint takes stored-write replies ([`HELLO_STORED`]).
    pub stored: bool,
    pub generation: u64,
    pub nonce: [u8; 32],
    pub export: String,
}

/// The fixed part of a hello: the header and the name length that follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloHeader {
    pub keyed: bool,
    pub shm: bool,
    pub stored: bool,
    pub generation: u64,
    pub nonce: [u8; 32],
    pub name_len: usize,
}

pub fn encode_hello(h: &Hello) -> Vec<u8> {
    let mut b = Vec::with_capacity(HELLO_FIXED_LEN + h.export.len());
    b.extend_from_slice(&HELLO_MAGIC.to_be_bytes());
    b.extend_from_slice(&VERSION.to_be_bytes());
    b.extend_from_slice(&hello_flags(h.keyed, h.shm, h.stored).to_be_bytes());
    b.extend_from_slice(&h.generation.to_be_bytes());
    b.extend_from_slice(&h.nonce);
    b.extend_from_slice(&(h.export.len() as u16).to_be_bytes());
    b.extend_from_slice(h.export.as_bytes());
    b
}

/// Parse the fixed part of a hello; the caller then reads `name_len` bytes.
///
/// # Errors
/// Bad magic, version or flags; a name over [`MAX_NAME_LEN`].
pub fn parse_hello_header(b: &[u8; HELLO_FIXED_LEN]) -> Result<HelloHeader, WireError> {
    let magic = be32(b, 0);
    if magic != HELLO_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = be16(b, 4);
    if version != VERSION {
        return Err(WireError::BadVersion(version));
    }
    let flags = be16(b, 6);
    if flags & !HELLO_FLAGS != 0 {
        return Err(WireError::BadFlags(flags.into()));
    }
    let name_len = usize::from(be16(b, 48));
    if name_len > MAX_NAME_LEN {
        return Err(WireError::TooLong(name_len as u64));
    }
    Ok(HelloHeader {
        keyed: flags & HELLO_KEYED != 0,
        shm: flags & HELLO_SHM != 0,
        stored: flags & HELLO_STORED != 0,
        generation: be64(b, 8),
        nonce: arr32(b, 16),
        name_len,
    })
}

/// Parse a whole hello (header and name).
///
/// # Errors
/// As [`parse_hello_header`]; [`WireError::Truncated`] for a short or long frame;
/// [`WireError::BadName`].
pub fn parse_hello(b: &[u8]) -> Result<Hello, WireError> {
    let fixed: &[u8; HELLO_FIXED_LEN] = b
        .get(..HELLO_FIXED_LEN)
        .ok_or(WireError::Truncated)?
        .try_into()
        .expect("fixed length");
    let h = parse_hello_header(fixed)?;
    let name = b.get(HELLO_FIXED_LEN..).ok_or(WireError::Truncated)?;
    if name.len() != h.name_len {
        return Err(WireError::Truncated);
    }
    let export = std::str::from_utf8(name).map_err(|_| WireError::BadName)?;
    Ok(Hello {
        keyed: h.keyed,
        shm: h.shm,
        stored: h.stored,
        generation: h.generation,
        nonce: h.nonce,
        export: export.to_owned(),
    })
}

/// The driver's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    pub keyed: bool,
    /// The driver takes the offered shared-memory area.
    pub shm: bool,
    /// The driver sends stored-write replies.
    pub stored: bool,
    /// 0 = the export is served; else an errno (ENOENT: no such export, EACCES: key).
    pub status: u32,
    pub pid: u32,
    pub size: u64,
    pub read_only: bool,
    pub nonce: [u8; 32],
    pub mac: [u8; 32],
}

pub fn encode_hello_reply(r: &HelloReply) -> [u8; HELLO_REPLY_LEN] {
    let mut b = [0u8; HELLO_REPLY_LEN];
    b[0..4].copy_from_slice(&HELLO_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&VERSION.to_be_bytes());
    b[6..8].copy_from_slice(&hello_flags(r.keyed, r.shm, r.stored).to_be_bytes());
    b[8..12].copy_from_slice(&r.status.to_be_bytes());
    b[12..16].copy_from_slice(&r.pid.to_be_bytes());
    b[16..24].copy_from_slice(&r.size.to_be_bytes());
    b[24] = u8::from(r.read_only);
    b[28..60].copy_from_slice(&r.nonce);
    b[60..92].copy_from_slice(&r.mac);
    b
}

/// # Errors
/// Bad magic, version, flags, reserved bytes or read-only byte.
pub fn parse_hello_reply(b: &[u8; HELLO_REPLY_LEN]) -> Result<HelloReply, WireError> {
    let magic = be32(b, 0);
    if magic != HELLO_REPLY_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = be16(b, 4);
    if version != VERSION {
        return Err(WireError::BadVersion(version));
    }
    let flags = be16(b, 6);
    if flags & !HELLO_FLAGS != 0 {
        return Err(WireError::BadFlags(flags.into()));
    }
    if b[24] > 1 || b[25..28] != [0, 0, 0] {
        return Err(WireError::Reserved);
    }
    Ok(HelloReply {
        keyed: flags & HELLO_KEYED != 0,
        shm: flags & HELLO_SHM != 0,
        stored: flags & HELLO_STORED != 0,
        status: be32(b, 8),
        pid: be32(b, 12),
        size: be64(b, 16),
        read_only: b[24] == 1,
        nonce: arr32(b, 28),
        mac: arr32(b, 60),
    })
}

pub fn encode_auth(mac: &[u8; 32]) -> [u8; AUTH_LEN] {
    let mut b = [0u8; AUTH_LEN];
    b[..4].copy_from_slice(&AUTH_MAGIC.to_be_bytes());
    b[4..].copy_from_slice(mac);
    b
}

/// # Errors
/// Bad magic.
pub fn parse_auth(b: &[u8; AUTH_LEN]) -> Result<[u8; 32], WireError> {
    let magic = be32(b, 0);
    if magic != AUTH_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    Ok(arr32(b, 4))
}

pub fn encode_ready(status: u32) -> [u8; READY_LEN] {
    let mut b = [0u8; READY_LEN];
    b[..4].copy_from_slice(&READY_MAGIC.to_be_bytes());
    b[4..].copy_from_slice(&status.to_be_bytes());
    b
}

/// # Errors
/// Bad magic.
pub fn parse_ready(b: &[u8; READY_LEN]) -> Result<u32, WireError> {
    let magic = be32(b, 0);
    if magic != READY_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    Ok(be32(b, 4))
}

/// A request header (WRITE data follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub op: u8,
    pub flags: u8,
    pub id: u64,
    pub generation: u64,
    pub offset: u64,
    pub length: u32,
    /// The area slot holding the data (with [`FLAG_SLOT`]; else 0).
    pub slot: u16,
}

impl RequestHeader {
    /// Bytes of data that follow this header on the wire.
    pub fn data_len(&self) -> usize {
        if self.op == OP_WRITE && self.flags & FLAG_SLOT == 0 {
            self.length as usize
        } else {
            0
        }
    }
}

pub fn encode_request(h: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4] = h.op;
    b[5] = h.flags;
    b[6..8].copy_from_slice(&h.slot.to_be_bytes());
    b[8..16].copy_from_slice(&h.id.to_be_bytes());
    b[16..24].copy_from_slice(&h.generation.to_be_bytes());
    b[24..32].copy_from_slice(&h.offset.to_be_bytes());
    b[32..36].copy_from_slice(&h.length.to_be_bytes());
    b
}

/// Parse a request header. Every field is checked, so a caller may allocate
/// `data_len()` bytes afterwards.
///
/// # Errors
/// Bad magic, op, flags, reserved bytes; a length over [`MAX_DATA`]; `offset + length`
/// overflowing.
pub fn parse_request(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, WireError> {
    let magic = be32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let op = b[4];
    if !(OP_READ..=OP_BLOCK_STATUS).contains(&op) {
        return Err(WireError::BadOp(op));
    }
    let flags = b[5];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(WireError::BadFlags(flags.into()));
    }
    let slot = be16(b, 6);
    if flags & FLAG_SLOT == 0 && slot != 0 {
        return Err(WireError::Reserved);
    }
    if flags & FLAG_SLOT != 0 && !matches!(op, OP_READ | OP_WRITE) {
        return Err(WireError::BadFlags(flags.into()));
    }
    let h = RequestHeader {
        op,
        flags,
        id: be64(b, 8),
        generation: be64(b, 16),
        offset: be64(b, 24),
        length: be32(b, 32),
        slot,
    };
    // DISCARD and WRITE_ZEROES carry no data, so their length is not limited by MAX_DATA;
    // everything that moves data (or allocates an answer) is.
    let limited = matches!(h.op, OP_READ | OP_WRITE | OP_BLOCK_STATUS);
    if limited && h.length > MAX_DATA {
        return Err(WireError::TooLong(h.length.into()));
    }
    if h.offset.checked_add(h.length.into()).is_none() {
        return Err(WireError::TooLong(h.offset));
    }
    Ok(h)
}

/// A reply or heartbeat header (data follows a reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    pub kind: u8,
    pub error: u32,
    pub id: u64,
    pub data_len: u32,
}

impl ReplyHeader {
    /// Bytes of data that follow this header on the socket (a slot reply's are in the area).
    pub fn socket_data_len(&self) -> usize {
        if self.kind == KIND_REPLY_SLOT {
            0
        } else {
            self.data_len as usize
        }
    }
}

pub fn encode_reply(h: &ReplyHeader) -> [u8; REPLY_HEADER_LEN] {
    let mut b = [0u8; REPLY_HEADER_LEN];
    b[0..4].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
    b[4] = h.kind;
    b[8..12].copy_from_slice(&h.error.to_be_bytes());
    b[12..20].copy_from_slice(&h.id.to_be_bytes());
    b[20..24].copy_from_slice(&h.data_len.to_be_bytes());
    b
}

/// Parse a reply header; the caller may then allocate `data_len` bytes.
///
/// # Errors
/// Bad magic or kind, reserved bytes, data over [`MAX_DATA`], a heartbeat with data or an
/// error.
pub fn parse_reply(b: &[u8; REPLY_HEADER_LEN]) -> Result<ReplyHeader, WireError> {
    let magic = be32(b, 0);
    if magic != REPLY_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let kind = b[4];
    if !matches!(
        kind,
        KIND_REPLY | KIND_HEARTBEAT | KIND_REPLY_SLOT | KIND_REPLY_STORED
    ) {
        return Err(WireError::BadKind(kind));
    }
    if b[5..8] != [0, 0, 0] {
        return Err(WireError::Reserved);
    }
    let h = ReplyHeader {
        kind,
        error: be32(b, 8),
        id: be64(b, 12),
        data_len: be32(b, 20),
    };
    if h.data_len > MAX_DATA {
        return Err(WireError::TooLong(h.data_len.into()));
    }
    if matches!(kind, KIND_HEARTBEAT | KIND_REPLY_STORED) && (h.data_len != 0 || h.error != 0) {
        return Err(WireError::Reserved);
    }
    Ok(h)
}

/// Encode extents for a BLOCK_STATUS reply.
pub fn encode_extents(extents: &[Extent]) -> Vec<u8> {
    let mut b = Vec::with_capacity(extents.len() * EXTENT_LEN);
    for e in extents {
        let mut flags = 0;
        if e.hole {
            flags |= EXTENT_HOLE;
        }
        if e.zero {
            flags |= EXTENT_ZERO;
        }
        b.extend_from_slice(&e.len.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&e.depth.to_be_bytes());
    }
    b
}

/// Decode the extents of a BLOCK_STATUS reply.
///
/// # Errors
/// [`WireError::BadExtents`] for a length that is not a multiple of [`EXTENT_LEN`], an
/// empty extent or unknown flags.
pub fn parse_extents(b: &[u8]) -> Result<Vec<Extent>, WireError> {
    if b.len() % EXTENT_LEN != 0 {
        return Err(WireError::BadExtents);
    }
    b.chunks_exact(EXTENT_LEN)
        .map(|c| {
            let len = be64(c, 0);
            let flags = be32(c, 8);
            if len == 0 || flags & !(EXTENT_HOLE | EXTENT_ZERO) != 0 {
                return Err(WireError::BadExtents);
            }
            Ok(Extent {
                len,
                hole: flags & EXTENT_HOLE != 0,
                zero: flags & EXTENT_ZERO != 0,
                depth: be32(c, 12),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req() -> RequestHeader {
        RequestHeader {
            op: OP_WRITE,
            flags: FLAG_FUA,
            id: 7,
            generation: 3,
            offset: 4096,
            length: 512,
            slot: 0,
        }
    }

    #[test]
    fn slot_requests_carry_no_socket_data_and_only_read_or_write_may_use_a_slot() {
        let h = RequestHeader {
            flags: FLAG_SLOT,
            slot: 513,
            ..req()
        };
        let b = encode_request(&h);
        assert_eq!(parse_request(&b).unwrap(), h);
        assert_eq!(h.data_len(), 0);
        let flush = RequestHeader {
            op: OP_FLUSH,
            length: 0,
            ..h
        };
        assert!(matches!(
            parse_request(&encode_request(&flush)),
            Err(WireError::BadFlags(_))
        ));
        let r = ReplyHeader {
            kind: KIND_REPLY_SLOT,
            error: 0,
            id: 1,
            data_len: 4096,
        };
        assert_eq!(parse_reply(&encode_reply(&r)).unwrap(), r);
    }

    #[test]
    fn request_round_trips_and_write_carries_data() {
        let h = req();
        let b = encode_request(&h);
        assert_eq!(parse_request(&b).unwrap(), h);
        assert_eq!(h.data_len(), 512);
        assert_eq!(RequestHeader { op: OP_READ, ..h }.data_len(), 0);
    }

    #[test]
    fn malformed_requests_are_refused() {
        let good = encode_request(&req());
        let mut b = good;
        b[0] ^= 1;
        assert!(matches!(parse_request(&b), Err(WireError::BadMagic(_))));
        for op in [0u8, 7, 255] {
            let mut b = good;
            b[4] = op;
            assert_eq!(parse_request(&b), Err(WireError::BadOp(op)));
        }
        let mut b = good;
        b[5] = 0x80;
        assert!(matches!(parse_request(&b), Err(WireError::BadFlags(_))));
        let mut b = good;
        b[7] = 1;
        assert_eq!(parse_request(&b), Err(WireError::Reserved));
        let long = RequestHeader {
            length: MAX_DATA + 1,
            ..req()
        };
        assert!(matches!(
            parse_request(&encode_request(&long)),
            Err(WireError::TooLong(_))
        ));
        let read_long = RequestHeader {
            op: OP_READ,
            ..long
        };
        assert!(parse_request(&encode_request(&read_long)).is_err());
        // A discard of more than MAX_DATA bytes moves no data and is fine.
        let discard = RequestHeader {
            op: OP_DISCARD,
            length: u32::MAX,
            ..req()
        };
        assert!(parse_request(&encode_request(&discard)).is_ok());
        let wrap = RequestHeader {
            offset: u64::MAX - 10,
            ..req()
        };
        assert!(matches!(
            parse_request(&encode_request(&wrap)),
            Err(WireError::TooLong(_))
        ));
    }

    #[test]
    fn replies_round_trip_and_malformed_ones_are_refused() {
        let h = ReplyHeader {
            kind: KIND_REPLY,
            error: 5,
            id: 99,
            data_len: 4096,
        };
        let good = encode_reply(&h);
        assert_eq!(parse_reply(&good).unwrap(), h);
        let mut b = good;
        b[3] ^= 1;
        assert!(matches!(parse_reply(&b), Err(WireError::BadMagic(_))));
        let mut b = good;
        b[4] = 4;
        assert_eq!(parse_reply(&b), Err(WireError::BadKind(4)));
        // A stored-write reply carries neither an error nor data.
        let mut b = good;
        b[4] = KIND_REPLY_STORED;
        assert_eq!(parse_reply(&b), Err(WireError::Reserved));
        let stored = ReplyHeader {
            kind: KIND_REPLY_STORED,
            error: 0,
            id: 7,
            data_len: 0,
        };
        assert_eq!(parse_reply(&encode_reply(&stored)).unwrap(), stored);
        let mut b = good;
        b[6] = 1;
        assert_eq!(parse_reply(&b), Err(WireError::Reserved));
        let big = ReplyHeader {
            data_len: MAX_DATA + 1,
            ..h
        };
        assert!(matches!(
            parse_reply(&encode_reply(&big)),
            Err(WireError::TooLong(_))
        ));
        let hb_with_data = ReplyHeader {
            kind: KIND_HEARTBEAT,
            error: 0,
            ..h
        };
        assert_eq!(
            parse_reply(&encode_reply(&hb_with_data)),
            Err(WireError::Reserved)
        );
        let hb = ReplyHeader {
            kind: KIND_HEARTBEAT,
            error: 0,
            id: 1,
            data_len: 0,
        };
        assert_eq!(parse_reply(&encode_reply(&hb)).unwrap(), hb);
    }

    #[test]
    fn hello_round_trips_and_malformed_ones_are_refused() {
        let h = Hello {
            keyed: true,
            shm: true,
            stored: true,
            generation: 42,
            nonce: [9; 32],
            export: "vm1".into(),
        };
        let good = encode_hello(&h);
        assert_eq!(parse_hello(&good).unwrap(), h);
        assert_eq!(
            parse_hello(&good[..good.len() - 1]),
            Err(WireError::Truncated)
        );
        assert_eq!(parse_hello(&good[..10]), Err(WireError::Truncated));
        let mut extra = good.clone();
        extra.push(b'x');
        assert_eq!(parse_hello(&extra), Err(WireError::Truncated));
        let mut b = good.clone();
        b[0] = 0;
        assert!(matches!(parse_hello(&b), Err(WireError::BadMagic(_))));
        let mut b = good.clone();
        b[5] = 9;
        assert_eq!(parse_hello(&b), Err(WireError::BadVersion(9)));
        let mut b = good.clone();
        b[6] = 0x80;
        assert!(matches!(parse_hello(&b), Err(WireError::BadFlags(_))));
        let mut b = good.clone();
        b[48..50].copy_from_slice(&(MAX_NAME_LEN as u16 + 1).to_be_bytes());
        assert!(matches!(parse_hello(&b), Err(WireError::TooLong(_))));
        let mut b = good.clone();
        let n = b.len();
        b[n - 1] = 0xff;
        assert_eq!(parse_hello(&b), Err(WireError::BadName));
    }

    #[test]
    fn hello_reply_auth_ready_round_trip_and_refuse_garbage() {
        let r = HelloReply {
            keyed: false,
            shm: true,
            stored: true,
            status: 0,
            pid: 1234,
            size: 1 << 30,
            read_only: true,
            nonce: [1; 32],
            mac: [2; 32],
        };
        let good = encode_hello_reply(&r);
        assert_eq!(parse_hello_reply(&good).unwrap(), r);
        let mut b = good;
        b[1] = 0;
        assert!(matches!(parse_hello_reply(&b), Err(WireError::BadMagic(_))));
        let mut b = good;
        b[5] = 2;
        assert_eq!(parse_hello_reply(&b), Err(WireError::BadVersion(2)));
        let mut b = good;
        b[7] = 8;
        assert!(matches!(parse_hello_reply(&b), Err(WireError::BadFlags(_))));
        let mut b = good;
        b[24] = 2;
        assert_eq!(parse_hello_reply(&b), Err(WireError::Reserved));
        let mut b = good;
        b[26] = 1;
        assert_eq!(parse_hello_reply(&b), Err(WireError::Reserved));

        let a = encode_auth(&[5; 32]);
        assert_eq!(parse_auth(&a).unwrap(), [5; 32]);
        let mut b = a;
        b[0] = 1;
        assert!(parse_auth(&b).is_err());
        let rd = encode_ready(13);
        assert_eq!(parse_ready(&rd).unwrap(), 13);
        let mut b = rd;
        b[2] = 0;
        assert!(parse_ready(&b).is_err());
    }

    #[test]
    fn macs_need_the_key_the_nonces_and_the_generation() {
        let k = ChannelKey::from_secret(b"secret");
        let other = ChannelKey::from_secret(b"other");
        let (en, dn) = (fresh_nonce(), fresh_nonce());
        assert_ne!(en, dn);
        let dm = k.driver_mac(&en, &dn, 4);
        assert!(k.check_driver_mac(&en, &dn, 4, &dm));
        assert!(!other.check_driver_mac(&en, &dn, 4, &dm));
        assert!(!k.check_driver_mac(&en, &dn, 5, &dm));
        assert!(!k.check_driver_mac(&dn, &en, 4, &dm));
        let em = k.endpoint_mac(&en, &dn, 4);
        assert!(k.check_endpoint_mac(&en, &dn, 4, &em));
        // A driver's mac cannot be reflected as the endpoint's.
        assert!(!k.check_endpoint_mac(&en, &dn, 4, &dm));
    }

    #[test]
    fn extents_round_trip_and_garbage_is_refused() {
        let e = vec![
            Extent {
                len: 4096,
                hole: false,
                zero: false,
                depth: 1,
            },
            Extent {
                len: 8192,
                hole: true,
                zero: true,
                depth: 0,
            },
        ];
        assert_eq!(parse_extents(&encode_extents(&e)).unwrap(), e);
        assert_eq!(parse_extents(&[0; 15]), Err(WireError::BadExtents));
        assert_eq!(parse_extents(&[0; 16]), Err(WireError::BadExtents));
        let mut b = encode_extents(&e);
        b[11] = 4;
        assert_eq!(parse_extents(&b), Err(WireError::BadExtents));
    }

    proptest! {
        #[test]
        fn parsers_never_panic_and_accepted_frames_re_encode(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_hello(&data);
            let _ = parse_extents(&data);
            if let Some(b) = data.get(..REQUEST_HEADER_LEN) {
                let b: &[u8; REQUEST_HEADER_LEN] = b.try_into().unwrap();
                if let Ok(h) = parse_request(b) {
                    prop_assert_eq!(&encode_request(&h), b);
                }
            }
            if let Some(b) = data.get(..REPLY_HEADER_LEN) {
                let b: &[u8; REPLY_HEADER_LEN] = b.try_into().unwrap();
                if let Ok(h) = parse_reply(b) {
                    prop_assert_eq!(&encode_reply(&h), b);
                }
            }
            if let Some(b) = data.get(..HELLO_REPLY_LEN) {
                let b: &[u8; HELLO_REPLY_LEN] = b.try_into().unwrap();
                if let Ok(h) = parse_hello_reply(b) {
                    prop_assert_eq!(&encode_hello_reply(&h), b);
                }
            }
        }
    }
}
