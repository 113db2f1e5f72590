//! NFSv3 procedures (RFC 1813) used by the image reader and writer: LOOKUP, GETATTR, FSINFO,
//! CREATE, WRITE, COMMIT, READ, RENAME, REMOVE.

use super::rpc::RpcConn;
use super::xdr::{XdrIn, XdrOut};
use super::NfsError;

pub const GETATTR: u32 = 1;
pub const LOOKUP: u32 = 3;
pub const READ: u32 = 6;
pub const WRITE: u32 = 7;
pub const CREATE: u32 = 8;
pub const REMOVE: u32 = 12;
pub const RENAME: u32 = 14;
pub const FSINFO: u32 = 19;
pub const COMMIT: u32 = 21;

/// NFS3ERR_NOSPC and NFS3ERR_DQUOT.
const NOSPC: u32 = 28;
const DQUOT: u32 = 69;
const NOENT: u32 = 2;

const FATTR3_LEN: usize = 84;

fn short(_: super::xdr::Short) -> NfsError {
    NfsError::Protocol("short NFS reply".into())
}

/// Reads the status word; maps NFS errors to [`NfsError::Status`].
///
/// # Errors
/// A non-zero status.
pub fn status(x: &mut XdrIn<'_>, what: &str) -> Result<(), NfsError> {
    match x.u32().map_err(short)? {
        0 => Ok(()),
        NOSPC | DQUOT => Err(NfsError::Full),
        s => Err(NfsError::Status {
            what: what.to_string(),
            status: s,
            noent: s == NOENT,
        }),
    }
}

fn skip_post_op_attr(x: &mut XdrIn<'_>) -> Result<Option<u64>, NfsError> {
    if x.bool().map_err(short)? {
        x.skip(20).map_err(short)?;
        let size = x.u64().map_err(short)?;
        x.skip(FATTR3_LEN - 28).map_err(short)?;
        return Ok(Some(size));
    }
    Ok(None)
}

fn skip_wcc(x: &mut XdrIn<'_>) -> Result<(), NfsError> {
    if x.bool().map_err(short)? {
        x.skip(24).map_err(short)?;
    }
    skip_post_op_attr(x).map(|_| ())
}

pub fn diropargs(fh: &[u8], name: &str) -> XdrOut {
    let mut a = XdrOut::default();
    a.opaque(fh).string(name);
    a
}

/// LOOKUP `name` in directory `dir`.
///
/// # Errors
/// Not found or another NFS error.
pub fn lookup(c: &mut RpcConn, dir: &[u8], name: &str) -> Result<Vec<u8>, NfsError> {
    let r = c.call(LOOKUP, &diropargs(dir, name).0)?;
    let mut x = XdrIn::new(&r);
    status(&mut x, &format!("LOOKUP {name}"))?;
    Ok(x.opaque().map_err(short)?.to_vec())
}

/// File size from GETATTR.
///
/// # Errors
/// An NFS error.
pub fn size(c: &mut RpcConn, fh: &[u8]) -> Result<u64, NfsError> {
    let mut a = XdrOut::default();
    a.opaque(fh);
    let r = c.call(GETATTR, &a.0)?;
    let mut x = XdrIn::new(&r);
    status(&mut x, "GETATTR")?;
    x.skip(20).map_err(short)?;
    x.u64().map_err(short)
}

/// Preferred (read, write) transfer sizes from FSINFO.
///
/// # Errors
/// An NFS error.
pub fn fsinfo(c: &mut RpcConn, fh: &[u8]) -> Result<(u32, u32), NfsError> {
    let mut a = XdrOut::default();
    a.opaque(fh);
    let r = c.call(FSINFO, &a.0)?;
    let mut x = XdrIn::new(&r);
    status(&mut x, "FSINFO")?;
    skip_post_op_attr(&mut x)?;
    let _rtmax = x.u32().map_err(short)?;
    let rtpref = x.u32().map_err(short)?;
    let _rtmult = x.u32().map_err(short)?;
    let _wtmax = x.u32().map_err(short)?;
    let wtpref = x.u32().map_err(short)?;
    Ok((rtpref, wtpref))
}

/// CREATE (UNCHECKED, mode 0644) `name` in `dir`, truncating an existing file.
///
/// # Errors
/// An NFS error, or a reply without a file handle.
pub fn create(c: &mut RpcConn, dir: &[u8], name: &str) -> Result<Vec<u8>, NfsError> {
    let mut a = diropargs(dir, name);
    // createhow3 UNCHECKED, sattr3: mode 0644, uid/gid unset, size 0, times unchanged.
    a.u32(0)
        .u32(1)
        .u32(0o644)
        .u32(0)
        .u32(0)
        .u32(1)
        .u64(0)
        .u32(0)
        .u32(0);
    let r = c.call(CREATE, &a.0)?;
    let mut x = XdrIn::new(&r);
    status(&mut x, &format!("CREATE {name}"))?;
    if !x.bool().map_err(short)? {
        return lookup(c, dir, name);
    }
    Ok(x.opaque().map_err(short)?.to_vec())
}

/// Arguments of an UNSTABLE WRITE.
pub fn write_args(fh: &[u8], offset: u64, data: &[u8]) -> XdrOut {
    let mut a = XdrOut::default();
    a.opaque(fh)
        .u64(offset)
        .u32(data.len() as u32)
        .u32(0)
        .opaque(data);
    a
}

/// Checks a WRITE reply; returns the count written.
///
/// # Errors
/// An NFS error (a full server gives [`NfsError::Full`]).
pub fn write_reply(r: &[u8]) -> Result<u32, NfsError> {
    let mut x = XdrIn::new(r);
    status(&mut x, "WRITE")?;
    skip_wcc(&mut x)?;
    x.u32().map_err(short)
}

/// COMMIT everything written so far.
///
/// # Errors
/// An NFS error.
pub fn commit(c: &mut RpcConn, fh: &[u8]) -> Result<(), NfsError> {
    let mut a = XdrOut::default();
    a.opaque(fh).u64(0).u32(0);
    let r = c.call(COMMIT, &a.0)?;
    status(&mut XdrIn::new(&r), "COMMIT")
}

/// Arguments of a READ.
pub fn read_args(fh: &[u8], offset: u64, count: u32) -> XdrOut {
    let mut a = XdrOut::default();
    a.opaque(fh).u64(offset).u32(count);
    a
}

/// Copies the data of a READ reply into `out`; returns the count.
///
/// # Errors
/// An NFS error or more data than asked for.
pub fn read_reply(r: &[u8], out: &mut [u8]) -> Result<usize, NfsError> {
    let mut x = XdrIn::new(r);
    status(&mut x, "READ")?;
    skip_post_op_attr(&mut x)?;
    let _count = x.u32().map_err(short)?;
    let _eof = x.bool().map_err(short)?;
    let data = x.opaque().map_err(short)?;
    if data.len() > out.len() {
        return Err(NfsError::Protocol("READ returned more than asked".into()));
    }
    out[..data.len()].copy_from_slice(data);
    Ok(data.len())
}

/// RENAME `from` to `to` in the same directory (replaces `to`).
///
/// # Errors
/// An NFS error.
pub fn rename(c: &mut RpcConn, dir: &[u8], from: &str, to: &str) -> Result<(), NfsError> {
    let mut a = diropargs(dir, from);
    a.opaque(dir).string(to);
    let r = c.call(RENAME, &a.0)?;
    status(&mut XdrIn::new(&r), &format!("RENAME {from} to {to}"))
}

/// REMOVE `name` from `dir`.
///
/// # Errors
/// An NFS error.
pub fn remove(c: &mut RpcConn, dir: &[u8], name: &str) -> Result<(), NfsError> {
    let r = c.call(REMOVE, &diropargs(dir, name).0)?;
    status(&mut XdrIn::new(&r), &format!("REMOVE {name}"))
}
