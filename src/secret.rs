//! The one type that holds a token value.
//!
//! Invariant: a token value can only leave this type through [`Token::expose`], which is
//! called where the value is genuinely needed (an `Authorization` header, the config file,
//! the metadata-service answer, `pat-rotator token`). `Debug` and `Display` print a short
//! fingerprint, so a token in a log line, an error, a panic or a metric is impossible by
//! construction. The value lives in a `secrecy::SecretString`, so it is zeroised on drop.

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use std::fmt;

/// A personal access token. Compare with `==`; print to get its fingerprint.
#[derive(Clone)]
pub struct Token(SecretString);

impl Token {
    pub fn new(value: impl Into<String>) -> Self {
        Token(SecretString::from(value.into()))
    }

    /// The raw value. Every call site is a place where the value leaves the process.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    pub fn is_empty(&self) -> bool {
        self.expose().trim().is_empty()
    }

    /// Full hex SHA-256 of the value: what the state file records to tie itself to a token.
    pub fn sha256_hex(&self) -> String {
        sha256_hex(self.expose().as_bytes())
    }

    /// Short fingerprint safe for logs, metrics and status output.
    pub fn fingerprint(&self) -> String {
        fingerprint_of_sha256(&self.sha256_hex())
    }
}

/// The short form of a full SHA-256 fingerprint, as shown to people.
pub fn fingerprint_of_sha256(sha256_hex: &str) -> String {
    format!("sha256:{}", &sha256_hex[..sha256_hex.len().min(12)])
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}
impl Eq for Token {}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.fingerprint())
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let t = Token::new("dapi-super-secret-value");
        let shown = format!("{t:?} {t} {:?}", Some(&t));
        assert!(!shown.contains("super-secret"), "{shown}");
        assert!(shown.contains("sha256:"));
        assert_eq!(t.fingerprint().len(), "sha256:".len() + 12);
    }

    #[test]
    fn equality_is_by_value() {
        assert_eq!(Token::new("a"), Token::new("a"));
        assert_ne!(Token::new("a"), Token::new("b"));
        assert!(Token::new("  ").is_empty());
    }
}
