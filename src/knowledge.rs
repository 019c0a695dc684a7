//! What the rotator knows beyond the files: the credential of record it holds in memory,
//! and the tokens the provider said are dead.
//!
//! Invariants: a token the provider rejected as invalid (to the rotator, or through the
//! proxy and confirmed by the rotator) is never handed out again by this process; a token
//! this process minted or adopted is held here until a newer one replaces it, so a file
//! that loses it (truncated, deleted, a write a foreign lock blocked) gets it back instead
//! of the token being abandoned while it may be the only live one. Values only, no I/O.

use crate::policy::TokenTimes;
use crate::Token;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// The credential of record: the live token this rotator holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Held {
    pub token: Token,
    pub token_id: String,
    /// On the wall clock, as recorded; the loop applies the monotonic deadline.
    pub times: TokenTimes,
    /// Whether it ever reached the file (a token minted and never written is revoked when
    /// a newer token replaces it; one that was written is the state's to revoke).
    pub written: bool,
    /// The token it was minted to replace, if it was minted here (not adopted).
    pub replaces: Option<Token>,
}

/// How many dead tokens are remembered (the current one and a few before it).
const DEAD_KEPT: usize = 16;

#[derive(Default)]
struct Inner {
    held: Option<Held>,
    /// SHA-256 of tokens the provider rejected.
    dead: VecDeque<String>,
    /// SHA-256 of tokens a relayed 401/403 made suspect: the loop verifies them.
    suspects: Vec<String>,
}

/// Shared between the loop and the listeners; cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Knowledge {
    inner: Arc<Mutex<Inner>>,
    suspicion: Arc<Notify>,
    /// A held token that was never written exists: the only kind a view serves in place of
    /// the file's. Kept apart so a request's cache hit asks it without taking the lock.
    unwritten: Arc<AtomicBool>,
}

impl Knowledge {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `held` as the credential of record; returns the one it replaces, if another.
    pub fn hold(&self, held: Held) -> Option<Held> {
        let mut inner = self.lock();
        let replaced = match &inner.held {
            Some(h) if h.token == held.token => {
                let written = h.written || held.written;
                inner.held = Some(Held { written, ..held });
                None
            }
            _ => inner.held.replace(held),
        };
        self.note_unwritten(&inner);
        replaced
    }

    fn note_unwritten(&self, inner: &Inner) {
        let unwritten = inner.held.as_ref().is_some_and(|h| !h.written);
        self.unwritten.store(unwritten, Ordering::Relaxed);
    }

    /// Whether a held token that was never written exists (no lock taken).
    pub fn has_unwritten(&self) -> bool {
        self.unwritten.load(Ordering::Relaxed)
    }

    pub fn held(&self) -> Option<Held> {
        self.lock().held.clone()
    }

    /// Whether a never-written token other than `token` is held (the lock only when one
    /// exists at all).
    pub fn holds_unwritten_other_than(&self, token: Option<&Token>) -> bool {
        self.has_unwritten()
            && self
                .lock()
                .held
                .as_ref()
                .is_some_and(|h| !h.written && Some(&h.token) != token)
    }

    /// The provider rejected `token`: it is never served again, and no longer held.
    pub fn mark_dead(&self, token: &Token) {
        let mut inner = self.lock();
        let key = token.sha256_hex();
        inner.suspects.retain(|k| *k != key);
        if !inner.dead.contains(&key) {
            inner.dead.push_back(key);
            if inner.dead.len() > DEAD_KEPT {
                inner.dead.pop_front();
            }
        }
        if inner.held.as_ref().is_some_and(|h| h.token == *token) {
            inner.held = None;
        }
        self.note_unwritten(&inner);
    }

    pub fn is_dead(&self, token: &Token) -> bool {
        let key = token.sha256_hex();
        self.lock().dead.contains(&key)
    }

    /// A call made with `token` was refused as unauthenticated: the loop checks it with the
    /// provider at once (a 403 may also be a permission on one API, so this alone proves
    /// nothing).
    pub fn suspect(&self, token: &Token) {
        let key = token.sha256_hex();
        {
            let mut inner = self.lock();
            if inner.dead.contains(&key) || inner.suspects.contains(&key) {
                return;
            }
            inner.suspects.push(key);
        }
        self.suspicion.notify_one();
    }

    /// Whether `token` was reported suspect since it was last checked; clears the report.
    pub fn take_suspect(&self, token: &Token) -> bool {
        let key = token.sha256_hex();
        let mut inner = self.lock();
        let found = inner.suspects.contains(&key);
        inner.suspects.clear();
        found
    }

    /// Completes when a token is reported suspect (or was since the last call).
    pub async fn suspected(&self) {
        self.suspicion.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};

    fn held(token: &str, written: bool) -> Held {
        let at = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap();
        Held {
            token: Token::new(token),
            token_id: token.into(),
            times: TokenTimes {
                expires_at: at,
                rotated_at: at,
                granted: None,
            },
            written,
            replaces: None,
        }
    }

    #[test]
    fn a_dead_token_is_no_longer_held_and_stays_known_dead() {
        let k = Knowledge::default();
        assert_eq!(k.hold(held("a", true)), None);
        k.mark_dead(&Token::new("a"));
        assert!(k.is_dead(&Token::new("a")));
        assert_eq!(k.held(), None);
        for i in 0..DEAD_KEPT {
            k.mark_dead(&Token::new(format!("x{i}")));
        }
        assert!(!k.is_dead(&Token::new("a")), "the list is bounded");
    }

    #[test]
    fn holding_the_same_token_again_keeps_that_it_was_written() {
        let k = Knowledge::default();
        k.hold(held("a", true));
        assert_eq!(k.hold(held("a", false)), None);
        assert!(k.held().unwrap().written);
        assert!(!k.has_unwritten());
        assert_eq!(
            k.hold(held("b", false)).map(|h| h.token_id),
            Some("a".into())
        );
        assert!(k.has_unwritten());
        assert!(k.holds_unwritten_other_than(Some(&Token::new("a"))));
        assert!(!k.holds_unwritten_other_than(Some(&Token::new("b"))));
        k.mark_dead(&Token::new("b"));
        assert!(!k.has_unwritten());
    }

    #[test]
    fn a_suspect_is_reported_once_and_never_for_a_known_dead_token() {
        let k = Knowledge::default();
        k.suspect(&Token::new("a"));
        assert!(k.take_suspect(&Token::new("a")));
        assert!(!k.take_suspect(&Token::new("a")));
        k.mark_dead(&Token::new("b"));
        k.suspect(&Token::new("b"));
        assert!(!k.take_suspect(&Token::new("b")));
    }
}
