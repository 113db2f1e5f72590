//! NBD wire format: constants, frame parsing and encoding. No I/O here, so the parsers can be
//! fuzzed and unit-tested on byte slices. All integers are big-endian.
//!
//! ```text
//! handshake (server → client)
//!   "NBDMAGIC" | "IHAVEOPT" | u16 handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
//! client flags (client → server)
//!   u32 flags (C_FIXED_NEWSTYLE | C_NO_ZEROES; any other bit: drop the connection)
//! option (client → server)            16-byte header + data
//!   u64 "IHAVEOPT" | u32 option | u32 length | data[length ≤ MAX_OPTION_LEN]
//! option reply (server → client)      20-byte header + data
//!   u64 0x3e889045565a9 | u32 option | u32 reply type | u32 length | data
//! request (client → server)           28-byte header (+ data for WRITE)
//!   u32 0x25609513 | u16 flags | u16 type | u64 cookie | u64 offset | u32 length
//! simple reply                        16-byte header (+ data for READ)
//!   u32 0x67446698 | u32 error | u64 cookie
//! structured reply chunk              20-byte header + payload
//!   u32 0x668e33ef | u16 flags | u16 type | u64 cookie | u32 length
//! ```
//!
//! Limits, checked before any allocation: option data at most [`MAX_OPTION_LEN`], export
//! names and meta-context query strings at most 4096 bytes, READ/WRITE payloads at most
//! [`MAX_PAYLOAD`] (advertised as the maximum block size).

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAGS_KNOWN: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = (1 << 15) + 1;

pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest option payload read into memory; longer options are skipped and refused.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest export name or meta-context string.
pub const MAX_STRING_LEN: u32 = 4096;
/// Largest READ or WRITE payload (advertised maximum block size): 32 MiB.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Advertised preferred block size.
pub const PREFERRED_BLOCK: u32 = 4096;

pub const REQUEST_HEADER_LEN: usize = 28;
pub const OPTION_HEADER_LEN: usize = 16;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;

/// A malformed frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("option payload is malformed")]
    Malformed,
    #[error("string longer than {MAX_STRING_LEN} bytes")]
    TooLong,
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// The server's opening 18 bytes.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option header: which option and how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parse an option header.
///
/// # Errors
/// [`WireError::BadMagic`] when it does not start with `IHAVEOPT`.
pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, WireError> {
    let magic = be64(b, 0);
    if magic != IHAVEOPT {
        return Err(WireError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: be32(b, 8),
        len: be32(b, 12),
    })
}

/// Encode an option reply.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A cursor over option data that never reads past the end.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Malformed);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(be16(self.take(2)?, 0))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(be32(self.take(4)?, 0))
    }
    fn string(&mut self) -> Result<String, WireError> {
        let n = self.u32()?;
        if n > MAX_STRING_LEN {
            return Err(WireError::TooLong);
        }
        let s = self.take(n as usize)?;
        String::from_utf8(s.to_vec()).map_err(|_| WireError::Malformed)
    }
    fn finish(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed)
        }
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub name: String,
    pub info_requests: Vec<u16>,
}

/// Parse `NBD_OPT_INFO` / `NBD_OPT_GO` data: u32 name length, name, u16 n, n × u16.
///
/// # Errors
/// [`WireError`] when lengths disagree with the data.
pub fn parse_export_request(data: &[u8]) -> Result<ExportRequest, WireError> {
    let mut c = Cursor { b: data };
    let name = c.string()?;
    let n = c.u16()?;
    let raw = c.take(usize::from(n) * 2)?;
    c.finish()?;
    let info_requests = raw.chunks_exact(2).map(|p| be16(p, 0)).collect();
    Ok(ExportRequest {
        name,
        info_requests,
    })
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// Parse meta-context option data: u32 name length, name, u32 n, n × (u32 length, string).
///
/// # Errors
/// [`WireError`] when lengths disagree with the data.
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, WireError> {
    let mut c = Cursor { b: data };
    let export = c.string()?;
    let n = c.u32()?;
    // Each query takes at least 4 bytes: bound the count by the data before allocating.
    if u64::from(n) * 4 > c.b.len() as u64 {
        return Err(WireError::Malformed);
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(c.string()?);
    }
    c.finish()?;
    Ok(MetaRequest { export, queries })
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Parse a request header.
///
/// # Errors
/// [`WireError::BadMagic`]; the stream cannot be resynchronised after that.
pub fn parse_request(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, WireError> {
    let magic = be32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(WireError::BadMagic(u64::from(magic)));
    }
    Ok(RequestHeader {
        flags: be16(b, 4),
        command: be16(b, 6),
        cookie: be64(b, 8),
        offset: be64(b, 16),
        len: be32(b, 24),
    })
}

/// Encode a request header (used by tests and the fuzz target's round trip).
pub fn encode_request(h: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.command.to_be_bytes());
    b[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.len.to_be_bytes());
    b
}

/// Write a simple reply header into `out[..16]`.
pub fn put_simple_reply(out: &mut [u8], error: u32, cookie: u64) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Write a structured chunk header into `out[..20]`.
pub fn put_chunk_header(out: &mut [u8], flags: u16, kind: u16, cookie: u64, len: u32) {
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
}

/// A complete structured chunk with `payload`.
pub fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; CHUNK_HEADER_LEN + payload.len()];
    put_chunk_header(&mut b, flags, kind, cookie, payload.len() as u32);
    b[CHUNK_HEADER_LEN..].copy_from_slice(payload);
    b
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk: u32 error, u16 message length, message.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut p = Vec::with_capacity(6 + msg.len());
    p.extend_from_slice(&error.to_be_bytes());
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg);
    chunk(REPLY_FLAG_DONE, CHUNK_ERROR, cookie, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export_req(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn export_request_roundtrip_and_bad_lengths() {
        let d = export_req(b"vm1", &[INFO_BLOCK_SIZE, INFO_NAME]);
        let r = parse_export_request(&d).unwrap();
        assert_eq!(r.name, "vm1");
        assert_eq!(r.info_requests, vec![3, 1]);
        assert_eq!(
            parse_export_request(&d[..d.len() - 1]),
            Err(WireError::Malformed)
        );
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_export_request(&long), Err(WireError::Malformed));
        let mut huge = d;
        huge[0..4].copy_from_slice(&5000u32.to_be_bytes());
        assert_eq!(parse_export_request(&huge), Err(WireError::TooLong));
    }

    #[test]
    fn meta_request_bounds_query_count() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&d), Err(WireError::Malformed));
        let mut d = 2u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vm");
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        let r = parse_meta_request(&d).unwrap();
        assert_eq!(r.queries, vec!["base:allocation".to_string()]);
    }

    #[test]
    fn request_header_roundtrip_and_magic() {
        let h = RequestHeader {
            flags: 1,
            command: CMD_WRITE,
            cookie: 9,
            offset: 4096,
            len: 512,
        };
        let b = encode_request(&h);
        assert_eq!(parse_request(&b), Ok(h));
        let mut bad = b;
        bad[0] = 0;
        assert!(matches!(parse_request(&bad), Err(WireError::BadMagic(_))));
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_export_request(&data);
            let _ = parse_meta_request(&data);
            if data.len() >= REQUEST_HEADER_LEN {
                let _ = parse_request(data[..REQUEST_HEADER_LEN].try_into().unwrap());
            }
        }
    }
}
