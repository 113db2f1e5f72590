//! Control messages: the HELLO exchange and the STATS reply, encoded with bincode 2 (standard
//! config, varint integers) inside a frame payload.
//!
//! Decoding is bounded by `CONTROL_LIMIT` bytes (bincode's own allocation limit), and the frame
//! layer has already limited the payload to `MAX_PAYLOAD`. The HELLO frame's header always
//! carries version 1 so that any later version can still read a peer's HELLO and answer with
//! `VersionMismatch` and its supported range.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::frame::FrameError;

/// Upper bound bincode may allocate while decoding one control message.
pub const CONTROL_LIMIT: usize = 1 << 20;
/// Length of the nonces exchanged in HELLO.
pub const NONCE_LEN: usize = 32;

/// First frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u8,
    pub max_version: u8,
    /// Fresh random bytes per connection (challenge for the server's proof).
    pub client_nonce: [u8; NONCE_LEN],
    /// Free text for logs, at most 64 bytes used.
    pub client_name: String,
}

/// The server's answer to HELLO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The version both sides will speak (or, with `VersionMismatch`, the server's maximum).
    pub version: u8,
    pub min_version: u8,
    /// Whether an AUTH frame must follow before any other request.
    pub auth_required: bool,
    /// Fresh random bytes per connection (challenge for the client's proof).
    pub server_nonce: [u8; NONCE_LEN],
}

/// Counters of one pool (server-wide or for one namespace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCounters {
    pub pages: u64,
    pub bytes: u64,
    pub puts: u64,
    pub hits: u64,
    pub misses: u64,
    pub deletes: u64,
    pub evictions: u64,
    /// PUTs refused for lack of room (`PersistentFull` or `NoSpace`).
    pub refused: u64,
}

/// Counters of one namespace, per pool (index 0 ephemeral, 1 persistent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceStats {
    pub namespace: u64,
    pub pools: [PoolCounters; 2],
}

/// What STATS returns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// `--capacity` in bytes.
    pub capacity: u64,
    /// `--headroom` in bytes.
    pub headroom: u64,
    /// The store's current ceiling: min(capacity, what headroom allows).
    pub limit: u64,
    /// Bytes held (values plus per-entry overhead).
    pub used: u64,
    /// `MemAvailable` at the last sample, in bytes.
    pub host_available: u64,
    pub connections: u64,
    pub uptime_secs: u64,
    /// Index 0 ephemeral, 1 persistent.
    pub pools: [PoolCounters; 2],
    /// Largest namespaces first; at most `MAX_STATS_NAMESPACES`.
    pub namespaces: Vec<NamespaceStats>,
    /// Namespaces left out of `namespaces`.
    pub namespaces_omitted: u64,
}

/// Most namespaces a STATS reply lists.
pub const MAX_STATS_NAMESPACES: usize = 256;

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<CONTROL_LIMIT>,
> {
    bincode::config::standard().with_limit::<CONTROL_LIMIT>()
}

/// Encode a control message.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, config()).expect("control messages always encode")
}

/// Decode a control message that must fill the whole payload.
///
/// # Errors
/// `FrameError::Control` for anything bincode rejects or trailing bytes.
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, FrameError> {
    let (v, used) = bincode::serde::decode_from_slice(b, config())
        .map_err(|e| FrameError::Control(e.to_string()))?;
    if used != b.len() {
        return Err(FrameError::Control(format!(
            "{} trailing bytes",
            b.len() - used
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips() {
        let h = Hello {
            min_version: 1,
            max_version: 1,
            client_nonce: [7; NONCE_LEN],
            client_name: "t".into(),
        };
        assert_eq!(decode::<Hello>(&encode(&h)).unwrap(), h);
    }

    #[test]
    fn huge_length_prefix_is_refused_not_allocated() {
        // A StatsSnapshot whose namespace vector claims u64::MAX entries.
        let mut b = encode(&StatsSnapshot::default());
        b.truncate(b.len() - 2);
        b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert!(decode::<StatsSnapshot>(&b).is_err());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut b = encode(&PoolCounters::default());
        b.push(0);
        assert!(decode::<PoolCounters>(&b).is_err());
    }
}
