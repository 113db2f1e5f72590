//! Client-side page sealing: a memory server only ever holds ciphertext.
//!
//! ```text
//!  sealed page = version u64 LE | nonce (24 bytes) | XChaCha20-Poly1305(page) | tag (16 bytes)
//!  key         = BLAKE3-derive-key("remoca memserver v1 page key", master secret | namespace LE)
//!  AAD         = "remoca-page-v1" | pool u8 | namespace u64 LE | key u64 LE | version u64 LE
//! ```
//!
//! The nonce is random (192 bits, so random nonces never collide in practice, even across
//! client restarts with the same secret). The AAD binds the page to its pool, namespace, key
//! and version: a page moved to another key or namespace fails authentication ([`SealError::
//! Tampered`]), and an old but genuine page replayed by a server carries an older version than
//! the client expects ([`SealError::Stale`]). Either is an error, never wrong data.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use dashmap::DashMap;
use rand::RngCore;
use thiserror::Error;

use crate::protocol::Pool;

const KEY_CONTEXT: &str = "remoca memserver v1 page key";
const AAD_TAG: &[u8] = b"remoca-page-v1";
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes a sealed page adds to its plaintext.
pub const SEAL_OVERHEAD: usize = 8 + NONCE_LEN + TAG_LEN;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SealError {
    #[error("sealed page is {0} bytes, shorter than its {SEAL_OVERHEAD}-byte envelope")]
    Short(usize),
    #[error("page failed authentication (tampered, or stored under another key)")]
    Tampered,
    #[error("stale page: version {found}, expected {expected}")]
    Stale { found: u64, expected: u64 },
}

/// The secret from which every namespace's page key is derived. Only clients hold it.
#[derive(Clone)]
pub struct PageSecret([u8; 32]);

impl std::fmt::Debug for PageSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageSecret(..)")
    }
}

impl PageSecret {
    pub fn new(bytes: [u8; 32]) -> PageSecret {
        PageSecret(bytes)
    }

    /// Derive from arbitrary secret material (for example a key file).
    pub fn derive(material: &[u8]) -> PageSecret {
        PageSecret(blake3::derive_key(
            "remoca memserver v1 page secret",
            material,
        ))
    }

    /// A fresh random secret (pages sealed with it are readable only by this process).
    pub fn random() -> PageSecret {
        let mut b = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut b);
        PageSecret(b)
    }
}

/// Seals and opens pages, caching one cipher per namespace.
pub struct PageCipher {
    secret: PageSecret,
    ciphers: DashMap<u64, XChaCha20Poly1305>,
}

impl std::fmt::Debug for PageCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCipher")
            .field("namespaces", &self.ciphers.len())
            .finish_non_exhaustive()
    }
}

fn aad(pool: Pool, namespace: u64, key: u64, version: u64) -> [u8; 14 + 25] {
    let mut a = [0u8; 14 + 25];
    a[..14].copy_from_slice(AAD_TAG);
    a[14] = pool as u8;
    a[15..23].copy_from_slice(&namespace.to_le_bytes());
    a[23..31].copy_from_slice(&key.to_le_bytes());
    a[31..39].copy_from_slice(&version.to_le_bytes());
    a
}

impl PageCipher {
    pub fn new(secret: PageSecret) -> PageCipher {
        PageCipher {
            secret,
            ciphers: DashMap::new(),
        }
    }

    fn cipher(&self, namespace: u64) -> XChaCha20Poly1305 {
        if let Some(c) = self.ciphers.get(&namespace) {
            return c.clone();
        }
        let mut material = [0u8; 40];
        material[..32].copy_from_slice(&self.secret.0);
        material[32..].copy_from_slice(&namespace.to_le_bytes());
        let key = blake3::derive_key(KEY_CONTEXT, &material);
        let c = XChaCha20Poly1305::new(&key.into());
        self.ciphers.insert(namespace, c.clone());
        c
    }

    /// Encrypt and authenticate `page` for (pool, namespace, key) at `version`.
    pub fn seal(&self, pool: Pool, namespace: u64, key: u64, version: u64, page: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher(namespace)
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: page,
                    aad: &aad(pool, namespace, key, version),
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for pages");
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + page.len());
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// The version a sealed page claims (unauthenticated until [`PageCipher::open`]).
    pub fn version_of(sealed: &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(sealed.get(..8)?.try_into().ok()?))
    }

    /// Check and decrypt a sealed page that must be (pool, namespace, key) at `expected`.
    ///
    /// # Errors
    /// [`SealError::Tampered`] if any byte or the binding is wrong; [`SealError::Stale`] for a
    /// genuine page of another version.
    pub fn open(
        &self,
        pool: Pool,
        namespace: u64,
        key: u64,
        expected: u64,
        sealed: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(SealError::Short(sealed.len()));
        }
        let version = u64::from_le_bytes(sealed[..8].try_into().expect("8 bytes"));
        let nonce = XNonce::from_slice(&sealed[8..8 + NONCE_LEN]);
        let plain = self
            .cipher(namespace)
            .decrypt(
                nonce,
                Payload {
                    msg: &sealed[8 + NONCE_LEN..],
                    aad: &aad(pool, namespace, key, version),
                },
            )
            .map_err(|_| SealError::Tampered)?;
        if version != expected {
            return Err(SealError::Stale {
                found: version,
                expected,
            });
        }
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> PageCipher {
        PageCipher::new(PageSecret::new([5; 32]))
    }

    #[test]
    fn round_trip_and_server_sees_no_plaintext() {
        let c = cipher();
        let page = vec![0x41u8; 4096];
        let s = c.seal(Pool::Persistent, 1, 2, 3, &page);
        assert_eq!(s.len(), 4096 + SEAL_OVERHEAD);
        assert!(!s.windows(64).any(|w| w == &page[..64]));
        assert_eq!(c.open(Pool::Persistent, 1, 2, 3, &s).unwrap(), page);
    }

    #[test]
    fn tampered_swapped_and_stale_pages_are_errors() {
        let c = cipher();
        let s = c.seal(Pool::Persistent, 1, 2, 3, b"secret page");
        let mut t = s.clone();
        let n = t.len() - 1;
        t[n] ^= 1;
        assert_eq!(
            c.open(Pool::Persistent, 1, 2, 3, &t),
            Err(SealError::Tampered)
        );
        assert_eq!(
            c.open(Pool::Persistent, 1, 9, 3, &s),
            Err(SealError::Tampered)
        );
        assert_eq!(
            c.open(Pool::Persistent, 9, 2, 3, &s),
            Err(SealError::Tampered)
        );
        assert_eq!(
            c.open(Pool::Ephemeral, 1, 2, 3, &s),
            Err(SealError::Tampered)
        );
        // Forging the version field breaks authentication too.
        let mut v = s.clone();
        v[..8].copy_from_slice(&4u64.to_le_bytes());
        assert_eq!(
            c.open(Pool::Persistent, 1, 2, 4, &v),
            Err(SealError::Tampered)
        );
        // A genuine older version replayed.
        assert_eq!(
            c.open(Pool::Persistent, 1, 2, 4, &s),
            Err(SealError::Stale {
                found: 3,
                expected: 4
            })
        );
        let other = PageCipher::new(PageSecret::new([6; 32]));
        assert_eq!(
            other.open(Pool::Persistent, 1, 2, 3, &s),
            Err(SealError::Tampered)
        );
        assert_eq!(
            c.open(Pool::Persistent, 1, 2, 3, &s[..10]),
            Err(SealError::Short(10))
        );
    }
}
