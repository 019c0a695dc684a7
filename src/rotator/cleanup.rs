//! Revoking replaced tokens after their grace, and reaping tokens a crash left behind.
//!
//! Invariants: a token is revoked only once its grace has passed and never while it is the
//! token on disk, and only when the provider holds it as this rotator's ([`Origin::ThisInstance`]
//! or [`Origin::Owned`]; or it is the recorded seed and `PAT_REVOKE_SEED` is on); another
//! rotator's token stays pending for it, and a token no pat-rotator minted is dropped from the
//! list unrevoked. Reaping touches only tokens minted as this exact instance that are neither
//! current nor pending and older than the reap age.

use super::Rotator;
use crate::provider::{Origin, Provider, ProviderError};
use crate::store::{CredentialStore, Snapshot, StateEdit};
use chrono::{DateTime, TimeDelta, Utc};
use tracing::{debug, info, warn};

impl<P: Provider, S: CredentialStore> Rotator<P, S> {
    /// Revokes pending tokens whose grace has passed; returns the next due time.
    /// `epoch`: when `snap` was read ([`crate::freeze`]); after a stop of the process the
    /// work waits for a fresh read (the next turn, at once).
    pub(super) async fn process_revocations(
        &self,
        snap: &Snapshot,
        epoch: u64,
    ) -> Option<DateTime<Utc>> {
        let now = self.shared.now();
        let pending = &snap.state.pending_revocations;
        if pending.is_empty() {
            return None;
        }
        let due = snap.state.revocable(snap.token.as_ref(), now);
        let mut next = pending
            .iter()
            .map(|p| p.not_before)
            .filter(|t| *t > now)
            .min();
        if due.is_empty() {
            return next;
        }
        let Some(auth) = snap.token.clone().filter(|_| {
            self.shared
                .live_times(snap, now)
                .is_some_and(|t| t.expires_at > now)
        }) else {
            return next;
        };
        // Only a token the provider holds as ours (or the recorded seed, with
        // PAT_REVOKE_SEED) is ever retired: a state file or Secret naming a foreign token id
        // must not get it revoked.
        if crate::freeze::resumed_since(epoch) {
            return Some(now);
        }
        let held = match self.provider.held(&auth, &self.owner()).await {
            Ok(h) => h,
            Err(e) => {
                if let ProviderError::InvalidToken { status, message } = &e {
                    self.note_rejected(&auth, *status, message).await;
                }
                warn!(error = %e, "cannot list tokens to confirm ownership before revoking; will retry");
                self.shared.metrics.failed(e.kind());
                let retry = now + TimeDelta::seconds(5);
                return Some(next.map_or(retry, |n| n.min(retry)));
            }
        };
        let mut done = Vec::new();
        for p in due {
            if p.expires_at.is_some_and(|e| e <= now) {
                done.push(p.token_id.clone());
                continue;
            }
            let Some(h) = held.iter().find(|h| h.info.token_id == p.token_id) else {
                // Gone already (revoked elsewhere, or expired).
                done.push(p.token_id.clone());
                continue;
            };
            let seed = p.seed && self.cfg().revoke_seed;
            // Another rotator's token is left to it even when a state record flags it as the
            // seed: the flag is this file's say, the comment the provider's.
            match h.origin {
                Origin::ThisInstance | Origin::Owned => {}
                Origin::AnotherRotator => {
                    // A sibling rotator of this file (or an earlier name of this pod) minted
                    // it: left pending for its owner, or to expire on its own.
                    debug!(token_id = %p.token_id, comment = %h.info.comment, "a pending revocation of another rotator's token; left to its owner");
                    continue;
                }
                Origin::Foreign if seed => {}
                Origin::Foreign => {
                    warn!(token_id = %p.token_id, comment = %h.info.comment, "a pending revocation names a token no pat-rotator minted; dropping it without revoking");
                    done.push(p.token_id.clone());
                    continue;
                }
            }
            if crate::freeze::resumed_since(epoch) {
                break;
            }
            match self.provider.retire(&auth, &p.token_id).await {
                Ok(()) => {
                    self.shared.metrics.revocations.inc();
                    info!(event = "revoked", token_id = %p.token_id, token = %crate::secret::fingerprint_of_sha256(&p.token_sha256), "revoked the old token after the grace period");
                    done.push(p.token_id.clone());
                }
                Err(ProviderError::NotFound { .. }) => done.push(p.token_id.clone()),
                Err(e) => {
                    warn!(token_id = %p.token_id, error = %e, "could not revoke the old token; will retry");
                    self.shared.metrics.failed(e.kind());
                    let retry = now + TimeDelta::seconds(5);
                    next = Some(next.map_or(retry, |n| n.min(retry)));
                }
            }
        }
        if !done.is_empty() {
            if let Err(e) = self.store.edit_state(StateEdit::Revoked(done)).await {
                warn!(error = %e, "could not update the state file after revoking");
            }
        }
        next
    }

    /// Revokes tokens minted as this instance that are neither current nor pending
    /// and older than the reap age (left by a crash). Never touches other tokens. Runs under
    /// the rotation lock so that a sibling's rotation cannot change "current" meanwhile.
    /// Returns `false` when it could not look (to be tried again).
    pub(crate) async fn reap_orphans(&self) -> bool {
        match self
            .store
            .try_rotation(Box::pin(self.reap_orphans_locked()))
            .await
        {
            Ok(Some(done)) => done,
            Ok(None) => {
                debug!("rotation in progress elsewhere; orphan reaping postponed");
                false
            }
            Err(e) => {
                warn!(error = %e, "cannot take the rotation lock; orphan reaping postponed");
                false
            }
        }
    }

    pub(super) async fn reap_orphans_locked(&self) -> bool {
        let epoch = crate::freeze::epoch();
        let Ok(snap) = self.store.snapshot().await else {
            return false;
        };
        let now = self.shared.now();
        let Some(auth) = snap.token.clone().filter(|_| {
            self.shared
                .live_times(&snap, now)
                .is_some_and(|t| t.expires_at > now)
        }) else {
            debug!("current token unknown or expired; orphan reaping postponed");
            return false;
        };
        let mut keep: Vec<&str> = snap
            .state
            .pending_revocations
            .iter()
            .map(|p| p.token_id.as_str())
            .collect();
        if let Some(id) = snap.state.token_id.as_deref() {
            keep.push(id);
        }
        // The token this rotator holds and could not write yet is not an orphan.
        let kept_held = self.shared.knowledge.held().map(|h| h.token_id);
        keep.extend(kept_held.as_deref());
        if crate::freeze::resumed_since(epoch) {
            return false;
        }
        let held = match self.provider.held(&auth, &self.owner()).await {
            Ok(h) => h,
            Err(ProviderError::InvalidToken { status, message }) => {
                self.note_rejected(&auth, status, &message).await;
                return false;
            }
            Err(e) => {
                warn!(error = %e, "cannot list tokens; orphan reaping postponed");
                return false;
            }
        };
        let min_age = self.reap_min_age();
        for info in held
            .iter()
            .filter(|h| h.origin == Origin::ThisInstance)
            .map(|h| &h.info)
            .filter(|i| !keep.contains(&i.token_id.as_str()) && now - i.creation_time >= min_age)
        {
            if crate::freeze::resumed_since(epoch) {
                return false;
            }
            match self.provider.retire(&auth, &info.token_id).await {
                Ok(()) | Err(ProviderError::NotFound { .. }) => {
                    info!(event = "reaped", token_id = %info.token_id, created = %info.creation_time, "revoked an orphaned token of this instance")
                }
                Err(e) => {
                    warn!(token_id = %info.token_id, error = %e, "could not reap an orphaned token")
                }
            }
        }
        true
    }
}
