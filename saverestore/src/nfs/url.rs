//! `nfs://host[:port]/export/path/file` URLs.

use std::fmt;
use std::str::FromStr;

use super::NfsError;

/// A parsed NFS URL. The export is found by asking the server's MOUNT service for the
/// longest prefix of the path that it exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsUrl {
    pub host: String,
    /// NFS port; `None` asks the portmapper.
    pub port: Option<u16>,
    /// Absolute path, export included.
    pub path: String,
}

impl FromStr for NfsUrl {
    type Err = NfsError;
    fn from_str(s: &str) -> Result<Self, NfsError> {
        let bad = || NfsError::BadUrl(s.to_string());
        let rest = s.strip_prefix("nfs://").ok_or_else(bad)?;
        let (authority, path) = rest.find('/').map(|i| rest.split_at(i)).ok_or_else(bad)?;
        let path = path.split('?').next().unwrap_or(path);
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| bad())?)),
            None => (authority, None),
        };
        if host.is_empty() || path.len() < 2 || path.ends_with('/') {
            return Err(bad());
        }
        Ok(NfsUrl {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }
}

impl fmt::Display for NfsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "nfs://{}:{}{}", self.host, p, self.path),
            None => write!(f, "nfs://{}{}", self.host, self.path),
        }
    }
}

impl NfsUrl {
    /// Directory part and file name.
    pub fn split(&self) -> (&str, &str) {
        let i = self.path.rfind('/').expect("absolute path");
        (
            if i == 0 { "/" } else { &self.path[..i] },
            &self.path[i + 1..],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let u: NfsUrl = "nfs://127.0.0.1:2049/srv/export/g.rsv".parse().unwrap();
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(u.port, Some(2049));
        assert_eq!(u.split(), ("/srv/export", "g.rsv"));
        assert_eq!(u.to_string(), "nfs://127.0.0.1:2049/srv/export/g.rsv");
        let u: NfsUrl = "nfs://server/x".parse().unwrap();
        assert_eq!((u.port, u.split()), (None, ("/", "x")));
        for bad in [
            "nfs://",
            "nfs://h",
            "nfs://h/",
            "nfs://:1/x",
            "nfs://h:x/y",
            "http://h/x",
            "nfs://h/dir/",
        ] {
            assert!(bad.parse::<NfsUrl>().is_err(), "{bad}");
        }
    }
}
