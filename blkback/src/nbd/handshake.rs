//! The option phase of the fixed newstyle handshake: from the greeting to `NBD_OPT_GO` (or
//! `NBD_OPT_EXPORT_NAME`), answering LIST, INFO, STRUCTURED_REPLY and the meta-context
//! options on the way. Unknown options get `NBD_REP_ERR_UNSUP` and the client may go on.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::wire::*;
use crate::export::{Export, Exports};

/// Meta context id of `base:allocation`.
pub const CTX_BASE_ALLOCATION: u32 = 1;
/// Meta context id of `qemu:allocation-depth`.
pub const CTX_ALLOCATION_DEPTH: u32 = 2;
const CONTEXTS: [(u32, &str); 2] = [
    (CTX_BASE_ALLOCATION, "base:allocation"),
    (CTX_ALLOCATION_DEPTH, "qemu:allocation-depth"),
];

/// What the option phase agreed.
#[derive(Debug, Clone)]
pub struct Session {
    pub export: Arc<Export>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Meta context ids selected with SET_META_CONTEXT (in order).
    pub contexts: Vec<u32>,
    /// Transmission flags sent to the client.
    pub flags: u16,
}

/// Why the handshake ended without a session.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection I/O")]
    Io(#[from] io::Error),
    #[error("client sent unknown flags {0:#x}")]
    ClientFlags(u32),
    #[error("bad option magic")]
    BadMagic(#[from] WireError),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("client aborted the handshake")]
    Aborted,
}

/// Transmission flags for `export`.
pub fn transmission_flags(export: &Export) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
    if export.disk.is_read_only() {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    f
}

async fn reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    w.write_all(&option_reply(opt, kind, data)).await
}

fn context_matches(query: &str, listing: bool) -> Vec<(u32, &'static str)> {
    CONTEXTS
        .iter()
        .filter(|(_, name)| {
            *name == query || (listing && query.ends_with(':') && name.starts_with(query))
        })
        .copied()
        .collect()
}

/// Run the option phase on a connection. Returns the session to serve.
///
/// # Errors
/// [`HandshakeError`]; the caller closes the connection.
pub async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &Exports,
) -> Result<Session, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(&greeting()).await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(HandshakeError::ClientFlags(client_flags));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    let mut meta: Option<(String, Vec<u32>)> = None;
    loop {
        w.flush().await?;
        let mut hb = [0u8; OPTION_HEADER_LEN];
        r.read_exact(&mut hb).await?;
        let h = parse_option_header(&hb)?;
        if h.len > MAX_OPTION_LEN {
            if h.option == OPT_EXPORT_NAME {
                return Err(HandshakeError::UnknownExport("<name too long>".into()));
            }
            tokio::io::copy(
                &mut (&mut *r).take(u64::from(h.len)),
                &mut tokio::io::sink(),
            )
            .await?;
            reply(w, h.option, REP_ERR_TOO_BIG, b"option too long").await?;
            continue;
        }
        let mut data = vec![0u8; h.len as usize];
        r.read_exact(&mut data).await?;
        match h.option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = exports.get(&name) else {
                    return Err(HandshakeError::UnknownExport(name));
                };
                let flags = transmission_flags(export);
                let mut b = export.disk.size().to_be_bytes().to_vec();
                b.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&b).await?;
                w.flush().await?;
                return Ok(Session {
                    export: export.clone(),
                    structured,
                    contexts: Vec::new(),
                    flags,
                });
            }
            OPT_ABORT => {
                reply(w, h.option, REP_ACK, &[]).await?;
                w.flush().await?;
                return Err(HandshakeError::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(w, h.option, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                for e in exports.iter() {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    reply(w, h.option, REP_SERVER, &d).await?;
                }
                reply(w, h.option, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => reply(w, h.option, REP_ERR_UNSUP, b"TLS is not supported").await?,
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        w,
                        h.option,
                        REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                    continue;
                }
                structured = true;
                reply(w, h.option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Ok(req) = parse_export_request(&data) else {
                    reply(w, h.option, REP_ERR_INVALID, b"malformed request").await?;
                    continue;
                };
                let Some(export) = exports.get(&req.name) else {
                    let msg = match exports.unavailable(&req.name) {
                        Some(why) => format!("export {:?} is unavailable: {why}", req.name),
                        None => format!("no export named {:?}", req.name),
                    };
                    reply(w, h.option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                let flags = transmission_flags(export);
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.disk.size().to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                reply(w, h.option, REP_INFO, &info).await?;
                if req.info_requests.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(export.name.as_bytes());
                    reply(w, h.option, REP_INFO, &d).await?;
                }
                if req.info_requests.contains(&INFO_DESCRIPTION) {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(export.description.as_bytes());
                    reply(w, h.option, REP_INFO, &d).await?;
                }
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [
                    export.min_block,
                    PREFERRED_BLOCK.max(export.min_block),
                    MAX_PAYLOAD,
                ] {
                    bs.extend_from_slice(&v.to_be_bytes());
                }
                reply(w, h.option, REP_INFO, &bs).await?;
                reply(w, h.option, REP_ACK, &[]).await?;
                if h.option == OPT_GO {
                    w.flush().await?;
                    let contexts = match meta.take() {
                        Some((name, ids)) if name == req.name => ids,
                        _ => Vec::new(),
                    };
                    return Ok(Session {
                        export: export.clone(),
                        structured,
                        contexts,
                        flags,
                    });
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = h.option == OPT_SET_META_CONTEXT;
                if !structured {
                    let msg = b"negotiate structured replies first";
                    reply(w, h.option, REP_ERR_INVALID, msg).await?;
                    continue;
                }
                let Ok(req) = parse_meta_request(&data) else {
                    reply(w, h.option, REP_ERR_INVALID, b"malformed request").await?;
                    continue;
                };
                if exports.get(&req.export).is_none() {
                    let msg = format!("no export named {:?}", req.export);
                    reply(w, h.option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                }
                let mut chosen: Vec<(u32, &str)> = Vec::new();
                if req.queries.is_empty() && !set {
                    chosen.extend(CONTEXTS);
                }
                for q in &req.queries {
                    for c in context_matches(q, !set) {
                        if !chosen.contains(&c) {
                            chosen.push(c);
                        }
                    }
                }
                for (id, name) in &chosen {
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    reply(w, h.option, REP_META_CONTEXT, &d).await?;
                }
                if set {
                    meta = Some((req.export, chosen.iter().map(|c| c.0).collect()));
                }
                reply(w, h.option, REP_ACK, &[]).await?;
            }
            other => {
                let msg = format!("option {other} is not supported");
                reply(w, h.option, REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_matching() {
        assert_eq!(
            context_matches("base:allocation", false),
            vec![(1, "base:allocation")]
        );
        assert_eq!(context_matches("base:", true), vec![(1, "base:allocation")]);
        assert!(context_matches("base:", false).is_empty());
        assert!(context_matches("other:thing", true).is_empty());
    }
}
