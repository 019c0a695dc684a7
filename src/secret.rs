//! The one type that holds a token value.
//!
//! Invariant: a token value can only leave this type through [`Token::expose`], which is
//! called where the value is genuinely needed (an `Authorization` header, the config file,
//! the metadata-service answer, `pat-rotator token`). `Debug` and `Display` print a short
//! fingerprint, so a token in a log line, an error, a panic or a metric is impossible by
//! construction. The value lives in one `secrecy::SecretString` shared by every clone (an
//! `Arc`): a clone, which every cached read hands out, copies no secret bytes, and the one
//! copy is zeroised when the last clone is dropped.

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;

/// A personal access token. Compare with `==`; print to get its fingerprint.
#[derive(Clone)]
pub struct Token(Arc<SecretString>);

impl Token {
    pub fn new(value: impl Into<String>) -> Self {
        Token(Arc::new(SecretString::from(value.into())))
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
pub(crate) fn fingerprint_of_sha256(sha256_hex: &str) -> String {
    format!("sha256:{}", &sha256_hex[..sha256_hex.len().min(12)])
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serde for the one token a state keeps by value, an OAuth refresh token: the state file is
/// 0600 and never a reader's file, and nothing else is serialized with its value.
pub(crate) mod by_value {
    use super::Token;

    pub fn serialize<S: serde::Serializer>(token: &Token, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(token.expose())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Token, D::Error> {
        <String as serde::Deserialize>::deserialize(d).map(Token::new)
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.expose() == other.expose()
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

/// The capability that guards every URL handing out a token (`PAT_CONTROL_SECRET`, or a
/// random one per start). Knowing it is the right to a token, exactly as reading the config
/// file is: it lives only in the process and in `<config>.control.json` (0600), is compared
/// in constant time, and prints as `[redacted]`.
#[derive(Clone)]
pub struct ControlSecret(SecretString);

/// The fewest characters `PAT_CONTROL_SECRET` may have: 32 URL-safe characters carry at
/// least 128 bits when chosen at random.
pub(crate) const CONTROL_SECRET_MIN_LEN: usize = 32;

impl ControlSecret {
    /// A fresh random secret: 256 bits as 64 hex digits (URL-safe by construction).
    pub fn random() -> Self {
        let (a, b) = (rand::random::<u128>(), rand::random::<u128>());
        ControlSecret(SecretString::from(format!("{a:032x}{b:032x}")))
    }

    /// Validates a configured secret: at least [`CONTROL_SECRET_MIN_LEN`] characters, all
    /// URL-unreserved (`A-Z a-z 0-9 - _ . ~`), so it can stand as a path segment as is.
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.len() < CONTROL_SECRET_MIN_LEN {
            return Err(format!(
                "must be at least {CONTROL_SECRET_MIN_LEN} characters (it was {}); generate one with `openssl rand -hex 32`",
                value.len()
            ));
        }
        if let Some(bad) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~')))
        {
            return Err(format!(
                "must hold only URL-safe characters (A-Z a-z 0-9 - _ . ~); found {:?}",
                bad.escape_default().to_string()
            ));
        }
        // A secret typed by hand ("aaaa...", a repeated word) is as guessable as none: the
        // length times the bits its distinct characters can carry must reach 96 (a random
        // hex secret of 32 characters carries about 120 by this count, 128 in truth).
        let distinct = value
            .chars()
            .collect::<std::collections::HashSet<_>>()
            .len();
        let bits = value.len() as f64 * (distinct as f64).log2();
        if bits < 96.0 {
            return Err(format!(
                "is too predictable ({distinct} distinct characters over {}); generate one with `openssl rand -hex 32`",
                value.len()
            ));
        }
        Ok(ControlSecret(SecretString::from(value.to_string())))
    }

    /// The value, for building the URLs written to `<config>.control.json`.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Constant-time comparison with a path segment a client sent: the time taken does not
    /// depend on how many leading characters were right.
    pub fn matches(&self, candidate: &str) -> bool {
        use subtle::ConstantTimeEq;
        let ours = self.expose().as_bytes();
        let theirs = candidate.as_bytes();
        // Lengths are public (the minimum is documented); only the content is secret.
        ours.len() == theirs.len() && bool::from(ours.ct_eq(theirs))
    }
}

impl fmt::Debug for ControlSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ControlSecret([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_secret_is_validated_compared_and_redacted() {
        let r = ControlSecret::random();
        assert_eq!(r.expose().len(), 64);
        assert!(ControlSecret::parse(r.expose()).is_ok());
        assert!(ControlSecret::parse("short").is_err());
        assert!(ControlSecret::parse(&format!("{}/x", "a".repeat(40))).is_err());
        assert!(ControlSecret::parse(&format!("{}%2F", "a".repeat(40))).is_err());
        assert!(ControlSecret::parse(&"a".repeat(32)).is_err(), "32 x a");
        assert!(ControlSecret::parse(&"ab".repeat(32)).is_err());
        let value = "k3Jd8sLq0Zp2Xv7Nw4Rt6Yb1Mc9Gh5Ef";
        let s = ControlSecret::parse(value).unwrap();
        assert!(s.matches(value));
        assert!(!s.matches(&value[1..]));
        assert!(!s.matches(&format!("{}j", &value[1..])));
        assert!(!format!("{s:?}").contains("k3Jd"));
    }

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
