//! The xenstore wire protocol (`xen/include/public/io/xs_wire.h`), as spoken on
//! `/dev/xen/xenbus` and on xenstored's unix socket.
//!
//! ```text
//!  0        4        8        12       16
//!  +--------+--------+--------+--------+---------------------------+
//!  |  type  | req_id | tx_id  |  len   | payload: len bytes        |
//!  +--------+--------+--------+--------+---------------------------+
//!  all u32, host byte order (little-endian on x86); len <= 4096
//! ```
//!
//! Payloads are NUL-separated strings: `READ path\0` → value; `WRITE path\0value`;
//! `DIRECTORY path\0` → `name\0name\0`; `SET_PERMS path\0perm\0perm\0`;
//! `WATCH path\0token\0`; `TRANSACTION_START \0` → `id\0`; `TRANSACTION_END T\0|F\0`.
//! Failures come back as type `ERROR` with an errno name (`ENOENT\0`). Watch events arrive
//! unsolicited as `WATCH_EVENT path\0token\0` with req_id 0.
//!
//! [`Header::decode`] checks the length limit before anything is allocated for a payload.

use crate::error::{Error, Result};

/// Size of the fixed header.
pub const HEADER_LEN: usize = 16;
/// `XENSTORE_PAYLOAD_MAX`: no message carries more.
pub const PAYLOAD_MAX: usize = 4096;
/// `XENSTORE_ABS_PATH_MAX`.
pub const MAX_PATH: usize = 3072;

/// Message types used here (`enum xsd_sockmsg_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MsgType {
    Control = 0,
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Introduce = 8,
    Release = 9,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
    IsDomainIntroduced = 17,
    Resume = 18,
    SetTarget = 19,
    ResetWatches = 21,
    DirectoryPart = 22,
}

impl MsgType {
    pub fn from_u32(v: u32) -> Option<Self> {
        use MsgType::*;
        Some(match v {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            21 => ResetWatches,
            22 => DirectoryPart,
            _ => return None,
        })
    }
}

/// The fixed message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub msg_type: MsgType,
    pub req_id: u32,
    pub tx_id: u32,
    pub len: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&(self.msg_type as u32).to_le_bytes());
        out[4..8].copy_from_slice(&self.req_id.to_le_bytes());
        out[8..12].copy_from_slice(&self.tx_id.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Decode and validate a header.
    ///
    /// # Errors
    /// `EINVAL` for an unknown type, `E2BIG` for a payload over [`PAYLOAD_MAX`].
    pub fn decode(buf: &[u8; HEADER_LEN]) -> Result<Self> {
        let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let raw_type = word(0);
        let msg_type = MsgType::from_u32(raw_type)
            .ok_or_else(|| Error::os(format!("xenstore message type {raw_type}"), libc::EINVAL))?;
        let len = word(12);
        if len as usize > PAYLOAD_MAX {
            return Err(Error::os(
                format!("xenstore payload of {len} bytes"),
                libc::E2BIG,
            ));
        }
        Ok(Header {
            msg_type,
            req_id: word(4),
            tx_id: word(8),
            len,
        })
    }
}

/// Build a request payload from NUL-terminated strings and an optional raw tail.
///
/// # Errors
/// `E2BIG` if the payload would exceed [`PAYLOAD_MAX`].
pub fn payload(parts: &[&[u8]], tail: Option<&[u8]>) -> Result<Vec<u8>> {
    let len: usize = parts.iter().map(|p| p.len() + 1).sum::<usize>() + tail.map_or(0, <[u8]>::len);
    if len > PAYLOAD_MAX {
        return Err(Error::os(
            format!("xenstore request of {len} bytes"),
            libc::E2BIG,
        ));
    }
    let mut out = Vec::with_capacity(len);
    for p in parts {
        out.extend_from_slice(p);
        out.push(0);
    }
    if let Some(t) = tail {
        out.extend_from_slice(t);
    }
    Ok(out)
}

/// Split a reply of NUL-terminated strings (a trailing NUL is optional).
pub fn split_strings(payload: &[u8]) -> Vec<String> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if body.is_empty() {
        return Vec::new();
    }
    body.split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The name an `ERROR` reply carries for `errno` (xenstored's `xsd_errors` table).
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EINVAL => "EINVAL",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EISDIR => "EISDIR",
        libc::ENOENT => "ENOENT",
        libc::ENOMEM => "ENOMEM",
        libc::ENOSPC => "ENOSPC",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENOSYS => "ENOSYS",
        libc::EROFS => "EROFS",
        libc::EBUSY => "EBUSY",
        libc::EAGAIN => "EAGAIN",
        libc::EISCONN => "EISCONN",
        libc::E2BIG => "E2BIG",
        libc::EPERM => "EPERM",
        _ => "EIO",
    }
}

/// The errno named by an `ERROR` reply; unknown names map to `EIO`.
pub fn errno_from_name(payload: &[u8]) -> i32 {
    let name = payload.strip_suffix(&[0]).unwrap_or(payload);
    match name {
        b"EINVAL" => libc::EINVAL,
        b"EACCES" => libc::EACCES,
        b"EEXIST" => libc::EEXIST,
        b"EISDIR" => libc::EISDIR,
        b"ENOENT" => libc::ENOENT,
        b"ENOMEM" => libc::ENOMEM,
        b"ENOSPC" => libc::ENOSPC,
        b"ENOTEMPTY" => libc::ENOTEMPTY,
        b"ENOSYS" => libc::ENOSYS,
        b"EROFS" => libc::EROFS,
        b"EBUSY" => libc::EBUSY,
        b"EAGAIN" => libc::EAGAIN,
        b"EISCONN" => libc::EISCONN,
        b"E2BIG" => libc::E2BIG,
        b"EPERM" => libc::EPERM,
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            msg_type: MsgType::Write,
            req_id: 7,
            tx_id: 3,
            len: 12,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn oversize_and_unknown_are_rejected_before_allocation() {
        let mut raw = Header {
            msg_type: MsgType::Read,
            req_id: 1,
            tx_id: 0,
            len: 0,
        }
        .encode();
        raw[12..16].copy_from_slice(&(PAYLOAD_MAX as u32 + 1).to_le_bytes());
        assert!(Header::decode(&raw).unwrap_err().is_errno(libc::E2BIG));
        raw[0..4].copy_from_slice(&20u32.to_le_bytes());
        assert!(Header::decode(&raw).unwrap_err().is_errno(libc::EINVAL));
    }

    #[test]
    fn strings_split_and_errors_map() {
        assert_eq!(split_strings(b"a\0bc\0"), vec!["a", "bc"]);
        assert!(split_strings(b"").is_empty());
        assert_eq!(errno_from_name(b"ENOENT\0"), libc::ENOENT);
        assert_eq!(errno_from_name(b"EWHAT\0"), libc::EIO);
        assert!(payload(&[&[b'x'; PAYLOAD_MAX]], None).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::array::uniform16(any::<u8>())) {
            if let Ok(h) = Header::decode(&bytes) {
                prop_assert!(h.len as usize <= PAYLOAD_MAX);
                prop_assert_eq!(Header::decode(&h.encode()).unwrap(), h);
            }
        }
    }
}
