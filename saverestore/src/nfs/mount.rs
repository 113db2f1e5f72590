//! Portmapper GETPORT (program 100000 v2, port 111) and MOUNT v3 MNT (program 100005).

use super::rpc::RpcConn;
use super::xdr::{XdrIn, XdrOut};
use super::NfsError;

pub const PMAP_PROG: u32 = 100_000;
pub const MOUNT_PROG: u32 = 100_005;
pub const NFS_PROG: u32 = 100_003;
const IPPROTO_TCP: u32 = 6;

/// Asks the portmapper on `host` for the TCP port of `prog` `vers`.
///
/// # Errors
/// Portmapper unreachable, or the program is not registered.
pub fn getport(host: &str, prog: u32, vers: u32) -> Result<u16, NfsError> {
    let mut c = RpcConn::connect(host, 111, PMAP_PROG, 2)?;
    let mut a = XdrOut::default();
    a.u32(prog).u32(vers).u32(IPPROTO_TCP).u32(0);
    let r = c.call(3, &a.0)?;
    let port = XdrIn::new(&r)
        .u32()
        .map_err(|_| NfsError::Protocol("short GETPORT reply".into()))?;
    if port == 0 || port > 65535 {
        return Err(NfsError::NotRegistered {
            host: host.to_string(),
            prog,
            vers,
        });
    }
    Ok(port as u16)
}

/// Mounts the longest exported prefix of `path`; returns the root file handle and the
/// path components below it.
///
/// # Errors
/// No prefix of the path is exported to us.
pub fn mount(host: &str, path: &str) -> Result<(Vec<u8>, Vec<String>), NfsError> {
    let port = getport(host, MOUNT_PROG, 3)?;
    let mut c = RpcConn::connect(host, port, MOUNT_PROG, 3)?;
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut last = 0;
    for n in (0..=parts.len()).rev() {
        let export = format!("/{}", parts[..n].join("/"));
        let mut a = XdrOut::default();
        a.string(&export);
        let r = c.call(1, &a.0)?;
        let mut x = XdrIn::new(&r);
        let short = |_| NfsError::Protocol("short MNT reply".into());
        let status = x.u32().map_err(short)?;
        if status == 0 {
            let fh = x.opaque().map_err(short)?.to_vec();
            if fh.len() > 64 {
                return Err(NfsError::Protocol(
                    "file handle longer than 64 bytes".into(),
                ));
            }
            return Ok((fh, parts[n..].iter().map(|s| s.to_string()).collect()));
        }
        last = status;
    }
    Err(NfsError::NotExported {
        host: host.to_string(),
        path: path.to_string(),
        status: last,
    })
}
