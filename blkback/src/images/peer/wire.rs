//! The peer protocol's frames: parsing and encoding, no I/O, so every parser can be fuzzed on
//! plain bytes (`blkback/fuzz/fuzz_targets/peer_wire.rs`).
//!
//! Every frame is a 12-byte header and a body. All integers are big-endian.
//!
//! ```text
//! header   u16 MAGIC ("RC") | u8 kind | u8 flags | u16 count | u16 zero | u32 body_len
//!
//! GET        (client → server) flags: FLAG_PULL | count 1..=MAX_BATCH
//!                              body: count × ([32] chunk id | u32 length ≤ MAX_CHUNK_SIZE)
//! HAVE_QUERY (client → server) flags 0 | count 1..=MAX_BATCH | body: count × [32] chunk id
//! CHUNK      (server → client) flags 0 | count 0 | body: [32] chunk id | data (≤ MAX_CHUNK_SIZE)
//! MISSING    (server → client) flags 0 | count 0 | body: [32] chunk id
//! HAVE       (server → client) flags 0 | count 1..=MAX_BATCH | body: ceil(count/8) bitmap,
//!                              bit i (LSB first in byte i/8) set = the server holds id i
//! ERROR      (server → client) flags 0 | count 0 | body: UTF-8 message ≤ MAX_ERROR_LEN
//! WAIT       (server → client) flags 0 | count 0 | empty body
//! ```
//!
//! A GET is answered by one CHUNK or MISSING frame per asked id, in the order asked; a
//! HAVE_QUERY by one HAVE frame; while the server is still working on the next answer of a
//! GET (pulling from the origin), it sends a WAIT frame every [`WAIT_EVERY`], so a client
//! can tell a peer that waits for the origin from a hung one (which sends nothing); a request the server cannot parse by one ERROR frame, after
//! which the server closes the connection. `FLAG_PULL` asks the server to fetch a chunk it
//! does not hold from the origin (never from another peer) and serve it: the server is the
//! chunk's home node (see `fetch`). A client never trusts a CHUNK's bytes: it checks them
//! against the id it asked for.
//!
//! Limits, all checked on the header before any body is allocated: `body_len` must be exactly
//! what `kind` and `count` imply (or at most the maximum for CHUNK and ERROR), so a body is
//! never larger than [`MAX_BODY`].

use crate::images::chunk::{ChunkId, MAX_CHUNK_SIZE};

/// First two bytes of every frame: "RC" (remoca chunk).
pub const MAGIC: u16 = 0x5243;
/// Header length in bytes.
pub const HEADER_LEN: usize = 12;
/// Most ids in one GET or HAVE_QUERY.
pub const MAX_BATCH: usize = 64;
/// Longest ERROR message.
pub const MAX_ERROR_LEN: usize = 256;
/// Largest body any frame may have (a CHUNK of the largest chunk size).
pub const MAX_BODY: usize = 32 + MAX_CHUNK_SIZE as usize;

pub const KIND_GET: u8 = 1;
pub const KIND_HAVE_QUERY: u8 = 2;
pub const KIND_CHUNK: u8 = 3;
pub const KIND_MISSING: u8 = 4;
pub const KIND_HAVE: u8 = 5;
pub const KIND_ERROR: u8 = 6;
pub const KIND_WAIT: u8 = 7;

/// How often a server busy with a GET's next answer sends WAIT. Client read timeouts must be
/// longer.
pub const WAIT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// GET flag: fetch what you lack from the origin and serve it.
pub const FLAG_PULL: u8 = 1;

/// One frame, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Get {
        pull: bool,
        /// Wanted chunks and their expected lengths.
        wants: Vec<(ChunkId, u32)>,
    },
    HaveQuery(Vec<ChunkId>),
    Chunk {
        id: ChunkId,
        data: Vec<u8>,
    },
    Missing(ChunkId),
    /// One flag per queried id.
    Have(Vec<bool>),
    Error(String),
    /// The next answer is still being fetched.
    Wait,
}

/// A frame header that passed every check: the body it announces is safe to allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub flags: u8,
    pub count: u16,
    pub body_len: u32,
}

/// Why bytes are not a valid frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad magic {0:#06x}")]
    Magic(u16),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("flags {flags:#04x} not allowed on frame kind {kind}")]
    Flags { kind: u8, flags: u8 },
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("count {count} not allowed on frame kind {kind}")]
    Count { kind: u8, count: u16 },
    #[error("body length {len} not allowed on frame kind {kind} with count {count}")]
    BodyLen { kind: u8, count: u16, len: u32 },
    #[error("chunk length {0} is zero or above the largest chunk size")]
    ChunkLen(u32),
    #[error("error message is not UTF-8")]
    Utf8,
    #[error("HAVE bitmap has bits set past its count")]
    Bitmap,
}

fn batch_ok(count: u16) -> bool {
    (1..=MAX_BATCH).contains(&(count as usize))
}

/// Check a header. On success the body length is bounded by [`MAX_BODY`] and consistent with
/// the kind and count, so the caller may allocate it.
///
/// # Errors
/// [`WireError`] naming the first check that failed.
pub fn parse_header(b: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    let magic = u16::from_be_bytes([b[0], b[1]]);
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    let (kind, flags) = (b[2], b[3]);
    let count = u16::from_be_bytes([b[4], b[5]]);
    if b[6] != 0 || b[7] != 0 {
        return Err(WireError::Reserved);
    }
    let body_len = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
    let allowed_flags = if kind == KIND_GET { FLAG_PULL } else { 0 };
    if !(KIND_GET..=KIND_WAIT).contains(&kind) {
        return Err(WireError::Kind(kind));
    }
    if flags & !allowed_flags != 0 {
        return Err(WireError::Flags { kind, flags });
    }
    let batched = matches!(kind, KIND_GET | KIND_HAVE_QUERY | KIND_HAVE);
    if batched && !batch_ok(count) || !batched && count != 0 {
        return Err(WireError::Count { kind, count });
    }
    let n = count as u64;
    let len = body_len as u64;
    let ok = match kind {
        KIND_GET => len == n * 36,
        KIND_HAVE_QUERY => len == n * 32,
        KIND_CHUNK => (33..=MAX_BODY as u64).contains(&len),
        KIND_MISSING => len == 32,
        KIND_HAVE => len == n.div_ceil(8),
        KIND_WAIT => len == 0,
        _ => len <= MAX_ERROR_LEN as u64,
    };
    if !ok {
        return Err(WireError::BodyLen {
            kind,
            count,
            len: body_len,
        });
    }
    Ok(Header {
        kind,
        flags,
        count,
        body_len,
    })
}

fn id_at(b: &[u8], at: usize) -> ChunkId {
    let mut id = [0u8; 32];
    id.copy_from_slice(&b[at..at + 32]);
    ChunkId(id)
}

/// Parse a body announced by `h` (from [`parse_header`]).
///
/// # Errors
/// [`WireError::BodyLen`] if `body` is not `h.body_len` long; the per-kind checks.
pub fn parse_body(h: &Header, body: &[u8]) -> Result<Frame, WireError> {
    if body.len() != h.body_len as usize {
        return Err(WireError::BodyLen {
            kind: h.kind,
            count: h.count,
            len: body.len() as u32,
        });
    }
    let n = h.count as usize;
    Ok(match h.kind {
        KIND_GET => {
            let mut wants = Vec::with_capacity(n);
            for i in 0..n {
                let at = i * 36;
                let len = u32::from_be_bytes(body[at + 32..at + 36].try_into().unwrap_or([0; 4]));
                if len == 0 || len > MAX_CHUNK_SIZE {
                    return Err(WireError::ChunkLen(len));
                }
                wants.push((id_at(body, at), len));
            }
            Frame::Get {
                pull: h.flags & FLAG_PULL != 0,
                wants,
            }
        }
        KIND_HAVE_QUERY => Frame::HaveQuery((0..n).map(|i| id_at(body, i * 32)).collect()),
        KIND_CHUNK => Frame::Chunk {
            id: id_at(body, 0),
            data: body[32..].to_vec(),
        },
        KIND_MISSING => Frame::Missing(id_at(body, 0)),
        KIND_HAVE => {
            let bits: Vec<bool> = (0..n).map(|i| body[i / 8] & (1 << (i % 8)) != 0).collect();
            // Bits past `count` in the last byte must be clear, so a frame has one encoding.
            if n % 8 != 0 && body[n / 8] >> (n % 8) != 0 {
                return Err(WireError::Bitmap);
            }
            Frame::Have(bits)
        }
        KIND_WAIT => Frame::Wait,
        _ => Frame::Error(
            std::str::from_utf8(body)
                .map_err(|_| WireError::Utf8)?
                .to_string(),
        ),
    })
}

/// Parse one whole frame from exactly `b` (header and body).
///
/// # Errors
/// As [`parse_header`] and [`parse_body`]; a slice shorter than a header is a body-length
/// error of kind 0.
pub fn parse_frame(b: &[u8]) -> Result<Frame, WireError> {
    let head: &[u8; HEADER_LEN] =
        b.get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(WireError::BodyLen {
                kind: 0,
                count: 0,
                len: b.len() as u32,
            })?;
    let h = parse_header(head)?;
    parse_body(&h, &b[HEADER_LEN..])
}

fn header(kind: u8, flags: u8, count: usize, body_len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + body_len);
    v.extend_from_slice(&MAGIC.to_be_bytes());
    v.push(kind);
    v.push(flags);
    v.extend_from_slice(&(count as u16).to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&(body_len as u32).to_be_bytes());
    v
}

/// Encode a frame. The caller keeps the limits (batches of at most [`MAX_BATCH`], chunks of
/// at most the largest chunk size, messages of at most [`MAX_ERROR_LEN`] bytes — longer
/// messages are cut at a character boundary).
pub fn encode(f: &Frame) -> Vec<u8> {
    match f {
        Frame::Get { pull, wants } => {
            let mut v = header(
                KIND_GET,
                if *pull { FLAG_PULL } else { 0 },
                wants.len(),
                wants.len() * 36,
            );
            for (id, len) in wants {
                v.extend_from_slice(id.as_bytes());
                v.extend_from_slice(&len.to_be_bytes());
            }
            v
        }
        Frame::HaveQuery(ids) => {
            let mut v = header(KIND_HAVE_QUERY, 0, ids.len(), ids.len() * 32);
            for id in ids {
                v.extend_from_slice(id.as_bytes());
            }
            v
        }
        Frame::Chunk { id, data } => {
            let mut v = header(KIND_CHUNK, 0, 0, 32 + data.len());
            v.extend_from_slice(id.as_bytes());
            v.extend_from_slice(data);
            v
        }
        Frame::Missing(id) => {
            let mut v = header(KIND_MISSING, 0, 0, 32);
            v.extend_from_slice(id.as_bytes());
            v
        }
        Frame::Have(bits) => {
            let mut map = vec![0u8; bits.len().div_ceil(8)];
            for (i, b) in bits.iter().enumerate() {
                if *b {
                    map[i / 8] |= 1 << (i % 8);
                }
            }
            let mut v = header(KIND_HAVE, 0, bits.len(), map.len());
            v.extend_from_slice(&map);
            v
        }
        Frame::Error(msg) => {
            let mut end = msg.len().min(MAX_ERROR_LEN);
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            let mut v = header(KIND_ERROR, 0, 0, end);
            v.extend_from_slice(&msg.as_bytes()[..end]);
            v
        }
        Frame::Wait => header(KIND_WAIT, 0, 0, 0),
    }
}

/// Read one frame from a blocking stream: header, checks, then the body.
///
/// # Errors
/// I/O errors; a malformed frame as [`std::io::ErrorKind::InvalidData`].
pub fn read_frame(r: &mut impl std::io::Read) -> std::io::Result<Frame> {
    let mut head = [0u8; HEADER_LEN];
    r.read_exact(&mut head)?;
    let h = parse_header(&head).map_err(invalid)?;
    let mut body = vec![0u8; h.body_len as usize];
    r.read_exact(&mut body)?;
    parse_body(&h, &body).map_err(invalid)
}

/// As [`read_frame`] on an async stream. `Ok(None)` on a clean end of stream before a header.
///
/// # Errors
/// As [`read_frame`].
pub async fn read_frame_async(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<Option<Frame>> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; HEADER_LEN];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let h = parse_header(&head).map_err(invalid)?;
    let mut body = vec![0u8; h.body_len as usize];
    r.read_exact(&mut body).await?;
    parse_body(&h, &body).map(Some).map_err(invalid)
}

fn invalid(e: WireError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Get {
                pull: true,
                wants: vec![(id(1), 4096), (id(2), MAX_CHUNK_SIZE)],
            },
            Frame::Get {
                pull: false,
                wants: vec![(id(3), 1)],
            },
            Frame::HaveQuery(vec![id(1), id(2), id(3)]),
            Frame::Chunk {
                id: id(4),
                data: vec![7; 100],
            },
            Frame::Chunk {
                id: id(4),
                data: vec![1; MAX_CHUNK_SIZE as usize],
            },
            Frame::Missing(id(5)),
            Frame::Have(vec![
                true, false, true, true, false, false, false, false, true,
            ]),
            Frame::Have(vec![false; 8]),
            Frame::Error("no".into()),
            Frame::Error(String::new()),
            Frame::Wait,
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in frames() {
            let b = encode(&f);
            assert_eq!(parse_frame(&b), Ok(f.clone()), "{f:?}");
            assert_eq!(read_frame(&mut &b[..]).unwrap(), f);
        }
    }

    fn raw(kind: u8, flags: u8, count: u16, body_len: u32) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..2].copy_from_slice(&MAGIC.to_be_bytes());
        b[2] = kind;
        b[3] = flags;
        b[4..6].copy_from_slice(&count.to_be_bytes());
        b[8..].copy_from_slice(&body_len.to_be_bytes());
        b
    }

    #[test]
    fn malformed_headers_are_refused_before_allocation() {
        let mut bad_magic = raw(KIND_MISSING, 0, 0, 32);
        bad_magic[0] = b'X';
        assert!(matches!(parse_header(&bad_magic), Err(WireError::Magic(_))));
        let mut reserved = raw(KIND_MISSING, 0, 0, 32);
        reserved[7] = 1;
        assert_eq!(parse_header(&reserved), Err(WireError::Reserved));
        for kind in [0, 8, 255] {
            assert_eq!(
                parse_header(&raw(kind, 0, 0, 0)),
                Err(WireError::Kind(kind))
            );
        }
        // Flags only on GET, and only the pull flag.
        assert!(matches!(
            parse_header(&raw(KIND_GET, 2, 1, 36)),
            Err(WireError::Flags { .. })
        ));
        assert!(matches!(
            parse_header(&raw(KIND_CHUNK, FLAG_PULL, 0, 100)),
            Err(WireError::Flags { .. })
        ));
        // Batches of 1..=MAX_BATCH; no count on single frames.
        for kind in [KIND_GET, KIND_HAVE_QUERY, KIND_HAVE] {
            for count in [0u16, MAX_BATCH as u16 + 1, u16::MAX] {
                assert!(
                    matches!(
                        parse_header(&raw(kind, 0, count, 0)),
                        Err(WireError::Count { .. })
                    ),
                    "{kind} {count}"
                );
            }
        }
        for kind in [KIND_CHUNK, KIND_MISSING, KIND_ERROR, KIND_WAIT] {
            assert!(matches!(
                parse_header(&raw(kind, 0, 1, 32)),
                Err(WireError::Count { .. })
            ));
        }
        // Body lengths that do not fit the kind and count, including huge ones.
        for (kind, count, len) in [
            (KIND_GET, 2, 71),
            (KIND_GET, 1, u32::MAX),
            (KIND_HAVE_QUERY, 1, 36),
            (KIND_CHUNK, 0, 32),
            (KIND_CHUNK, 0, MAX_BODY as u32 + 1),
            (KIND_CHUNK, 0, u32::MAX),
            (KIND_MISSING, 0, 31),
            (KIND_HAVE, 9, 1),
            (KIND_HAVE, 8, 2),
            (KIND_ERROR, 0, MAX_ERROR_LEN as u32 + 1),
            (KIND_WAIT, 0, 1),
        ] {
            assert!(
                matches!(
                    parse_header(&raw(kind, 0, count, len)),
                    Err(WireError::BodyLen { .. })
                ),
                "{kind} {count} {len}"
            );
        }
    }

    #[test]
    fn malformed_bodies_are_refused() {
        // A GET asking for a zero-length or oversized chunk.
        for len in [0u32, MAX_CHUNK_SIZE + 1, u32::MAX] {
            let mut b = raw(KIND_GET, 0, 1, 36).to_vec();
            b.extend_from_slice(id(1).as_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            assert_eq!(parse_frame(&b), Err(WireError::ChunkLen(len)));
        }
        // HAVE with a bit set past its count.
        let mut b = raw(KIND_HAVE, 0, 3, 1).to_vec();
        b.push(0b1000);
        assert_eq!(parse_frame(&b), Err(WireError::Bitmap));
        // ERROR that is not UTF-8.
        let mut b = raw(KIND_ERROR, 0, 0, 2).to_vec();
        b.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(parse_frame(&b), Err(WireError::Utf8));
        // A body shorter or longer than announced.
        let mut b = encode(&Frame::Missing(id(1)));
        b.push(0);
        assert!(matches!(parse_frame(&b), Err(WireError::BodyLen { .. })));
        b.truncate(b.len() - 2);
        assert!(matches!(parse_frame(&b), Err(WireError::BodyLen { .. })));
        assert!(matches!(
            parse_frame(&[0x52]),
            Err(WireError::BodyLen { .. })
        ));
        // A stream that ends inside the body is an I/O error, not a panic.
        let b = encode(&Frame::Chunk {
            id: id(1),
            data: vec![0; 10],
        });
        assert!(read_frame(&mut &b[..b.len() - 1]).is_err());
    }

    #[test]
    fn long_error_messages_are_cut_at_a_character_boundary() {
        let msg = "é".repeat(MAX_ERROR_LEN);
        match parse_frame(&encode(&Frame::Error(msg))).unwrap() {
            Frame::Error(m) => assert!(m.len() <= MAX_ERROR_LEN && m.chars().all(|c| c == 'é')),
            f => panic!("{f:?}"),
        }
    }

    proptest! {
        #[test]
        fn parsers_never_panic_and_accepted_frames_re_encode(
            b in proptest::collection::vec(any::<u8>(), 0..200),
            kind in 1u8..=6,
        ) {
            if let Ok(f) = parse_frame(&b) {
                prop_assert_eq!(encode(&f), b.clone());
            }
            // Same bytes behind a valid-looking header of each kind.
            let mut framed = raw(kind, 0, if kind == KIND_GET || kind == KIND_HAVE_QUERY || kind == KIND_HAVE { 1 } else { 0 }, b.len() as u32).to_vec();
            framed.extend_from_slice(&b);
            if let Ok(f) = parse_frame(&framed) {
                prop_assert_eq!(encode(&f), framed);
            }
        }
    }
}
