//! Join tokens: `SWMTKN-1-<sha256 of the root CA certificate, hex>-<secret>`.
//!
//! The digest lets a joining node check the manager's CA before it trusts anything the
//! manager says (no trust on first use); the secret is what the manager checks.

use std::fmt;

pub const PREFIX: &str = "SWMTKN";
pub const VERSION: &str = "1";
pub const SECRET_LEN: usize = 25;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    /// Lower-case hex SHA-256 of the root CA certificate (DER).
    pub ca_digest: String,
    /// Lower-case base36 secret.
    pub secret: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed join token: expected SWMTKN-1-<ca digest>-<secret>, got {0} parts")]
    Parts(usize),
    #[error("malformed join token: it must start with SWMTKN-1")]
    Prefix,
    #[error("malformed join token: the CA digest must be 64 hex digits")]
    Digest,
    #[error("malformed join token: the secret must be {SECRET_LEN} characters of [0-9a-z]")]
    Secret,
}

impl JoinToken {
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let parts: Vec<&str> = s.trim().split('-').collect();
        if parts.len() != 4 {
            return Err(TokenError::Parts(parts.len()));
        }
        if parts[0] != PREFIX || parts[1] != VERSION {
            return Err(TokenError::Prefix);
        }
        let digest = parts[2];
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Digest);
        }
        let secret = parts[3];
        if secret.len() != SECRET_LEN || !secret.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()) {
            return Err(TokenError::Secret);
        }
        Ok(JoinToken { ca_digest: digest.to_ascii_lowercase(), secret: secret.to_string() })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}-{VERSION}-{}-{}", self.ca_digest, self.secret)
    }
}

/// Compares two secrets in time independent of where they differ.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn round_trip() {
        let t = JoinToken { ca_digest: D.into(), secret: "abcdefghijklmnopqrstuvwxy".into() };
        let s = t.to_string();
        assert_eq!(s, format!("SWMTKN-1-{D}-abcdefghijklmnopqrstuvwxy"));
        assert_eq!(JoinToken::parse(&s), Ok(t));
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(JoinToken::parse("hello"), Err(TokenError::Parts(1)));
        assert_eq!(JoinToken::parse(&format!("SWMTKN-2-{D}-abcdefghijklmnopqrstuvwxy")), Err(TokenError::Prefix));
        assert_eq!(JoinToken::parse("SWMTKN-1-abc-abcdefghijklmnopqrstuvwxy"), Err(TokenError::Digest));
        assert_eq!(JoinToken::parse(&format!("SWMTKN-1-{D}-short")), Err(TokenError::Secret));
        assert_eq!(JoinToken::parse(&format!("SWMTKN-1-{D}-ABCDEFGHIJKLMNOPQRSTUVWXY")), Err(TokenError::Secret));
    }

    #[test]
    fn secret_comparison() {
        assert!(secrets_equal("abc", "abc"));
        assert!(!secrets_equal("abc", "abd"));
        assert!(!secrets_equal("abc", "abcd"));
    }
}
