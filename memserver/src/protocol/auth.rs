//! Pre-shared-key challenge-response, mutual.
//!
//! ```text
//!  client                                   server
//!  HELLO { client_nonce (32 random) }  -->
//!                                       <-- HELLO reply { server_nonce (32 random), auth_required }
//!  AUTH  { BLAKE3-keyed(K, "client" | server_nonce | client_nonce) } -->
//!                                       <-- AUTH reply { BLAKE3-keyed(K, "server" | client_nonce | server_nonce) }
//! ```
//!
//! `K = BLAKE3-derive-key("remoca memserver v1 pre-shared key", key file bytes)`. Both nonces
//! are fresh per connection, so a recorded AUTH frame is useless on another connection, and the
//! server's proof lets the client check it is talking to a holder of the key. Proofs are
//! compared in constant time (`blake3::Hash` equality). The key never crosses the wire and is
//! unrelated to the page-encryption key, which only clients hold.

use thiserror::Error;

use super::control::NONCE_LEN;
use super::message::PROOF_LEN;

const DERIVE_CONTEXT: &str = "remoca memserver v1 pre-shared key";
/// Shortest accepted secret.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("pre-shared key is {0} bytes; at least {MIN_SECRET_LEN} are required")]
    TooShort(usize),
}

/// The authentication key shared by servers and their clients.
#[derive(Clone)]
pub struct AuthKey([u8; 32]);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthKey(..)")
    }
}

impl AuthKey {
    /// Derive the key from a secret (the contents of a key file; surrounding whitespace is
    /// ignored so `openssl rand -hex 32 > key` works).
    ///
    /// # Errors
    /// `TooShort` when fewer than 16 bytes remain.
    pub fn from_secret(secret: &[u8]) -> Result<AuthKey, AuthError> {
        let s = secret.trim_ascii();
        if s.len() < MIN_SECRET_LEN {
            return Err(AuthError::TooShort(s.len()));
        }
        Ok(AuthKey(blake3::derive_key(DERIVE_CONTEXT, s)))
    }

    fn mac(&self, role: &[u8], a: &[u8; NONCE_LEN], b: &[u8; NONCE_LEN]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(role);
        h.update(a);
        h.update(b);
        h.finalize()
    }

    /// What the client sends in AUTH.
    pub fn client_proof(
        &self,
        server_nonce: &[u8; NONCE_LEN],
        client_nonce: &[u8; NONCE_LEN],
    ) -> [u8; PROOF_LEN] {
        *self.mac(b"client", server_nonce, client_nonce).as_bytes()
    }

    /// What the server answers to a valid AUTH.
    pub fn server_proof(
        &self,
        server_nonce: &[u8; NONCE_LEN],
        client_nonce: &[u8; NONCE_LEN],
    ) -> [u8; PROOF_LEN] {
        *self.mac(b"server", client_nonce, server_nonce).as_bytes()
    }

    /// Constant-time check of a client's proof.
    pub fn verify_client(
        &self,
        server_nonce: &[u8; NONCE_LEN],
        client_nonce: &[u8; NONCE_LEN],
        proof: &[u8; PROOF_LEN],
    ) -> bool {
        self.mac(b"client", server_nonce, client_nonce) == blake3::Hash::from(*proof)
    }

    /// Constant-time check of the server's proof.
    pub fn verify_server(
        &self,
        server_nonce: &[u8; NONCE_LEN],
        client_nonce: &[u8; NONCE_LEN],
        proof: &[u8; PROOF_LEN],
    ) -> bool {
        self.mac(b"server", client_nonce, server_nonce) == blake3::Hash::from(*proof)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_key_and_nonces() {
        let k = AuthKey::from_secret(b"0123456789abcdef0123\n").unwrap();
        let other = AuthKey::from_secret(b"fedcba9876543210fedc").unwrap();
        let (s, c) = ([1u8; 32], [2u8; 32]);
        let p = k.client_proof(&s, &c);
        assert!(k.verify_client(&s, &c, &p));
        assert!(!other.verify_client(&s, &c, &p));
        assert!(
            !k.verify_client(&[3u8; 32], &c, &p),
            "replay on a new nonce"
        );
        let sp = k.server_proof(&s, &c);
        assert!(k.verify_server(&s, &c, &sp));
        assert!(
            !k.verify_client(&s, &c, &sp),
            "server proof is not a client proof"
        );
    }

    #[test]
    fn short_secrets_are_refused() {
        assert_eq!(
            AuthKey::from_secret(b"  short \n").unwrap_err(),
            AuthError::TooShort(5)
        );
    }
}
