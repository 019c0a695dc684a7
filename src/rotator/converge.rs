//! The loop's observe and act steps beyond the file: what a turn knows besides it (the
//! credential of record this rotator holds, the tokens the provider rejected, a check of
//! the file's token with the provider when one is due), and the one action that mints
//! nothing: writing the held token back.
//!
//! Invariants: a token is known dead only on the provider's word (a 401/403 on a call made
//! with it, or a relayed one confirmed by a check), and detection is bounded while nothing
//! calls (a check every threshold, so at most 60 s); the held token is kept until a newer
//! live token is on disk, and one that was minted and never written is then revoked, never
//! simply dropped.

use super::Rotator;
use crate::knowledge::Held;
use crate::policy::Observation;
use crate::provider::{Provider, ProviderError};
use crate::store::{CredentialStore, Rotation, Snapshot, StateEdit, SwapOutcome};
use crate::Token;
use chrono::{DateTime, Utc};
use std::time::Duration;
use tracing::{debug, info, warn};

impl<P: Provider, S: CredentialStore> Rotator<P, S> {
    /// How often the file's token is checked with the provider while nothing else tells:
    /// the threshold (at most 60 s), so a token revoked out of band is replaced within one.
    pub(super) fn check_period(&self) -> Duration {
        self.cfg().threshold()
    }

    /// Checks the file's token with the provider when a check is `due` or a relayed
    /// 401/403 made it suspect; a rejection marks it dead. Any other failure proves nothing.
    pub(super) async fn check_token(&self, snap: &Snapshot, due: bool, epoch: u64) {
        let Some(token) = snap.token.as_ref() else {
            return;
        };
        if !self.may_send(snap, token) || crate::freeze::resumed_since(epoch) {
            return;
        }
        let suspect = self.shared.knowledge.take_suspect(token);
        if !due && !suspect {
            return;
        }
        match self.provider.verify(token).await {
            Ok(_) => debug!(suspect, "the provider accepts the token on disk"),
            Err(ProviderError::InvalidToken { status, message }) => {
                self.note_rejected(token, status, &message).await
            }
            Err(e) => debug!(error = %e, "could not check the token on disk; trying again later"),
        }
        // The held token served while the file has none it can use, checked alike.
        let served_held = self
            .shared
            .knowledge
            .held()
            .filter(|h| due && !h.written && Some(&h.token) != snap.token.as_ref());
        if let Some(held) = served_held {
            if let Err(ProviderError::InvalidToken { status, message }) =
                self.provider.verify(&held.token).await
            {
                self.note_rejected(&held.token, status, &message).await;
            }
        }
    }

    /// Whether the file's `token` may be sent to the provider: not known dead, and not
    /// expired by our own record (a dead token sent is a request the provider counts).
    fn may_send(&self, snap: &Snapshot, token: &Token) -> bool {
        let now = self.shared.now();
        !self.shared.known_dead(snap, token)
            && self
                .shared
                .live_times(snap, now)
                .is_none_or(|t| t.expires_at > now)
    }

    /// The provider said `token` is invalid: it is never served again, and the next
    /// decision replaces it. Recorded in the state too, so every rotator that serves the
    /// file stops serving it at its next read rather than at its own next check.
    pub(super) async fn note_rejected(&self, token: &Token, status: u16, message: &str) {
        if self.shared.knowledge.is_dead(token) {
            return;
        }
        warn!(event = "token_rejected", token = %token, status, message, "the provider rejected a current token (revoked out of band, or the user may no longer use tokens); it is no longer served and is replaced now");
        self.shared.metrics.rejected_tokens.inc();
        self.shared.mark_dead(token);
        if let Err(e) = self
            .store
            .edit_state(StateEdit::Rejected(token.sha256_hex()))
            .await
        {
            debug!(error = %e, "could not record the rejected token in the state; other rotators find it at their own check");
        }
    }

    /// The first time this process sees a token it did not mint (at start, or another
    /// rotator's): its time left by the provider's own record and clock, kept as its
    /// monotonic deadline (the earlier of it and the state's expiry is planned with), so a
    /// wall clock stepped since the state was written cannot postpone the forced window nor
    /// make a live token look dead. A token the provider rejects is known dead at once.
    pub(super) async fn learn_time_left(&self, snap: &Snapshot) {
        let Some(token) = snap.token.as_ref() else {
            return;
        };
        let Some(token_id) = snap
            .state
            .token_id_for(token)
            .filter(|_| self.may_send(snap, token) && !self.shared.has_deadline(token))
        else {
            return;
        };
        let asked = tokio::time::Instant::now();
        match self.provider.time_left(token, token_id).await {
            Ok(Some(left)) => {
                let now = self.shared.now();
                let by_provider = now + chrono::TimeDelta::from_std(left).unwrap_or_default();
                if let Some(recorded) = snap.times().map(|t| t.expires_at) {
                    let off = (recorded - by_provider).num_milliseconds() as f64 / 1000.0;
                    if off.abs() > 2.0 {
                        warn!(recorded = %recorded, by_provider = %by_provider, off_s = off, "the recorded expiry differs from the provider's (the wall clock stepped since it was written?); planning with the earlier");
                    }
                }
                self.shared.record_deadline(token, asked + left);
            }
            Ok(None) => debug!("the provider keeps no expiry for the token on disk"),
            Err(ProviderError::InvalidToken { status, message }) => {
                self.note_rejected(token, status, &message).await
            }
            Err(e) => {
                debug!(error = %e, "could not learn the token's expiry from the provider; planning with the recorded one")
            }
        }
    }

    /// What this turn knows: the file's token and times, whether it is dead, and the held
    /// credential when it is another token.
    pub(super) fn observe(&self, snap: &Snapshot, now: DateTime<Utc>) -> Observation {
        let held = self
            .shared
            .held_times(now)
            .filter(|(h, _)| Some(&h.token) != snap.token.as_ref());
        Observation {
            now,
            file_has_token: snap.token.is_some(),
            file_times: self.shared.plan_times(snap, now),
            file_token_dead: snap
                .token
                .as_ref()
                .is_some_and(|t| self.shared.known_dead(snap, t)),
            held: held.as_ref().map(|(_, times)| *times),
            held_replaces_file: held
                .as_ref()
                .is_some_and(|(h, _)| h.replaces.is_some() && h.replaces == snap.token),
            active_sessions: self.shared.sessions.active(),
        }
    }

    /// The file's token becomes the credential of record when its times are known and it
    /// lives (the decision did not prefer the held one); a held token it replaces that was
    /// minted and never written is revoked (a newer token won).
    pub(super) async fn adopt_file_token(&self, snap: &Snapshot, now: DateTime<Utc>) {
        let Some(token) = snap.token.as_ref() else {
            return;
        };
        if self.shared.known_dead(snap, token)
            || self
                .shared
                .plan_times(snap, now)
                .is_none_or(|t| t.expires_at <= now)
        {
            return;
        }
        let (Some(times), Some(token_id)) = (snap.times(), snap.state.token_id_for(token)) else {
            return;
        };
        let replaced = self.shared.hold(Held {
            token: token.clone(),
            token_id: token_id.to_string(),
            times,
            written: true,
            replaces: None,
        });
        if let Some(unwritten) = replaced.filter(|h| !h.written) {
            info!(token = %unwritten.token, "a newer token is on disk; revoking the token this rotator minted and could not write");
            self.revoke_unused(&unwritten.token, &unwritten.token_id, token)
                .await;
        }
    }

    /// Writes the held token into the file over the token the turn read (compare before
    /// swap: a newer token written meanwhile wins, and the next turn decides again).
    pub(super) async fn restore(&self, snap: &Snapshot) -> Result<(), super::RotateError> {
        let cfg = self.cfg();
        let now = self.shared.now();
        let Some((held, _)) = self.shared.held_times(now) else {
            return Ok(());
        };
        // A token that was written may have been replaced and revoked by another rotator
        // since (while this one was stopped, say): asked first.
        if held.written {
            if let Err(ProviderError::InvalidToken { status, message }) =
                self.provider.verify(&held.token).await
            {
                self.note_rejected(&held.token, status, &message).await;
                return Ok(());
            }
        }
        let held_sha = held.token.sha256_hex();
        let rotation = Rotation {
            threshold: Some(cfg.threshold()),
            grace: cfg.revoke_grace,
            granted: held.times.granted,
            expires_boot: self.shared.boot_stamp(&held.token),
            replaces: snap
                .state
                .replaced_current(now)
                .filter(|p| p.token_sha256 != held_sha),
            ..Rotation::new(held.token_id.clone(), held.times.expires_at, &cfg.instance)
        };
        let outcome = self
            .store
            .swap(
                snap.token.clone(),
                held.token.clone(),
                cfg.host.clone(),
                rotation,
                self.shared.clock.clone(),
            )
            .await?;
        match outcome {
            SwapOutcome::Swapped => {
                self.shared.metrics.restores.inc();
                info!(event = "restored", token = %held.token, file_token = %snap.token.as_ref().map(Token::fingerprint).unwrap_or_else(|| "none".into()), "wrote the credential of record back into the config file (it had lost it, or held a dead or older token)");
                self.shared.hold(Held {
                    written: true,
                    ..held
                });
            }
            SwapOutcome::Conflict { .. } => {
                info!("the config file changed before the held token could be written back; deciding again")
            }
        }
        Ok(())
    }
}
