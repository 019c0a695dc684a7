//! One rotation: single-flight under the rotation lock, mint with a fallback chain of
//! credentials, write with compare-before-swap, and what to do with a token that could not
//! be written.

use super::{secs, RotateError, RotatedEvent, RotationOutcome, Rotator};
use crate::knowledge::Held;
use crate::policy::{RotateReason, TokenTimes};
use crate::provider::{Grant, Identified, MintedToken, Owner, Provider, ProviderError};
use crate::store::{
    CredentialStore, ForSwap, Rotation, RotationWait, Snapshot, StateEdit, StoreError, SwapOutcome,
};
use crate::Token;
use chrono::{DateTime, TimeDelta, Utc};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

impl<P: Provider, S: CredentialStore> Rotator<P, S> {
    /// A rotation that SIGTERM does not cut in half: once started it may finish within one
    /// HTTP timeout (so a minted token is written and recorded); past that it is abandoned
    /// and anything it minted is reaped at the next start.
    pub(super) async fn rotate_cancellable(
        &self,
        reason: RotateReason,
        snap: &Snapshot,
        cancel: &CancellationToken,
    ) -> Result<RotationOutcome, RotateError> {
        let fut = self.rotate(reason, snap);
        tokio::pin!(fut);
        tokio::select! {
            r = &mut fut => r,
            _ = cancel.cancelled() => {
                let drain = shutdown_drain(self.cfg().http_timeout);
                info!(drain_s = drain.as_secs(), "shutdown requested during a rotation; letting it finish");
                match tokio::time::timeout(drain, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(RotateError::Abandoned(drain)),
                }
            }
        }
    }

    /// One rotation, single-flight across processes: the holder of the rotation lock mints;
    /// a rotator that finds it held waits for the winner and adopts its token.
    pub async fn rotate(
        &self,
        reason: RotateReason,
        snap: &Snapshot,
    ) -> Result<RotationOutcome, RotateError> {
        // Under the rotation lock: a winner may have finished just before.
        let under_lock = self.mint_over(reason, snap);
        let won = self.store.try_rotation(Box::pin(under_lock)).await?;
        if let Some(result) = won {
            return result;
        }
        self.shared.metrics.lock_contention.inc();
        info!(
            reason = reason.as_str(),
            "another rotator holds the rotation lock; waiting for its token"
        );
        let limit = self.cfg().write_lock_wait + self.cfg().http_timeout * 4;
        let stall = stall_after(self.cfg().threshold());
        match self.store.wait_rotation(limit, stall).await? {
            RotationWait::Free => {
                info!("reloaded the config file after another rotator's rotation");
                Ok(RotationOutcome::Adopted)
            }
            RotationWait::StillHeld => Err(RotateError::LockTimeout(limit)),
            RotationWait::Stalled if reason.cannot_wait() => {
                self.shared.metrics.lock_takeovers.inc();
                warn!(stall_s = stall.as_secs_f64(), holders = %crate::store::lock_holders(&self.shared.store.paths().rotate_lock), reason = reason.as_str(), "the rotation lock's holder has made no progress (stopped, hung, or not a rotator); rotating without it: at most one extra token, and a holder that resumes adopts this one");
                self.mint_over(reason, snap).await
            }
            RotationWait::Stalled => Err(RotateError::LockStalled(stall)),
        }
    }

    /// Reads again and mints over `snap`'s token, unless the credential changed since (then
    /// its token is adopted). Only what can be written is minted: a token minted into a
    /// read-only or full directory would only be revoked again, on every retry.
    async fn mint_over(
        &self,
        reason: RotateReason,
        snap: &Snapshot,
    ) -> Result<RotationOutcome, RotateError> {
        let ForSwap {
            snapshot: fresh,
            writable,
        } = match self.store.snapshot_for_swap().await {
            Ok(f) => f,
            // Locked by a process that does not let go (stopped, hung) and the token cannot
            // wait: mint over what was read last; the token is held and served until the
            // file can take it.
            Err(StoreError::Busy { .. }) if reason.cannot_wait() => {
                return self.mint_and_write(reason, snap.clone()).await
            }
            Err(e) => return Err(e.into()),
        };
        if fresh.token != snap.token {
            info!("the credential changed since this rotation was decided; adopting its token");
            return Ok(RotationOutcome::Adopted);
        }
        writable?;
        self.mint_and_write(reason, fresh).await
    }

    /// Mints and writes. A token minted and not written (a lock held by someone else, a
    /// full disk) is the credential of record, served meanwhile and written back by the next
    /// turn that can; a newer token on disk gets it revoked (`adopt_file_token`).
    async fn mint_and_write(
        &self,
        reason: RotateReason,
        snap: Snapshot,
    ) -> Result<RotationOutcome, RotateError> {
        let cfg = self.cfg();
        let epoch = crate::freeze::epoch();
        let started = self.shared.now();
        let started_mono = tokio::time::Instant::now();
        // The token the file holds: what compare-before-swap expects to replace.
        let mut expected = snap.token.clone();
        let owner = self.owner();
        let timer = std::time::Instant::now();
        let (minted, auth) = self
            .mint_with_a_live_credential(&snap, started, &mut expected, &owner, epoch)
            .await?;
        let asked = self.lifetime_for(&snap);
        let (expires_at, granted) = self
            .record_expiry(&minted, started, started_mono, asked)
            .await?;
        let now = self.shared.now();
        let replaces = self
            .replaces(&snap, expected.as_ref(), &auth, &minted, &owner)
            .await;
        let rotation = self.rotation_record(&minted, expires_at, granted, replaces);
        let held = Held {
            token: minted.token.clone(),
            token_id: minted.info.token_id.clone(),
            times: TokenTimes {
                expires_at,
                rotated_at: now,
                granted: Some(granted),
            },
            written: false,
            replaces: expected.clone(),
        };
        let outcome = self
            .store
            .swap(
                expected.clone(),
                minted.token.clone(),
                cfg.host.clone(),
                rotation,
                self.shared.clock.clone(),
            )
            .await
            .map_err(RotateError::from);
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                warn!(token = %minted.token, error = %e, holders = %crate::store::lock_holders(&self.shared.store.paths().lock), "the new token could not be written; it is held and served, and written as soon as the file can be");
                self.shared.hold(held);
                return Err(e);
            }
        };
        match outcome {
            SwapOutcome::Swapped => {
                self.shared.hold(Held {
                    written: true,
                    ..held
                });
                self.announce(
                    reason,
                    &minted,
                    expected.as_ref(),
                    expires_at,
                    started,
                    timer,
                );
                if expected.is_some() {
                    self.tell_the_consumer(&minted, expires_at, snap.state.token_id.clone())
                        .await;
                }
                Ok(RotationOutcome::Rotated {
                    token_id: minted.info.token_id,
                    fingerprint: minted.token.fingerprint(),
                    expires_at,
                })
            }
            SwapOutcome::Conflict { current }
                if current
                    .as_ref()
                    .is_none_or(|t| self.shared.knowledge.is_dead(t)) =>
            {
                warn!("the config file lost its token (or holds a dead one) during the rotation; the new token is held and written back at once");
                self.shared.hold(held);
                Ok(RotationOutcome::Adopted)
            }
            SwapOutcome::Conflict { current } => {
                warn!(file_token = %current.as_ref().map(Token::fingerprint).unwrap_or_else(|| "none".into()), "the config file changed during the rotation (a manual write?); revoking the unused new token and adopting the file's");
                self.revoke_unused(&minted.token, &minted.info.token_id, &auth)
                    .await;
                Ok(RotationOutcome::Adopted)
            }
        }
    }

    /// What the state records about a rotation's new token.
    fn rotation_record(
        &self,
        minted: &MintedToken,
        expires_at: DateTime<Utc>,
        granted: TimeDelta,
        replaces: Option<crate::store::PendingRevocation>,
    ) -> Rotation {
        let cfg = self.cfg();
        Rotation {
            threshold: Some(cfg.threshold()),
            grace: cfg.revoke_grace,
            granted: Some(granted),
            expires_boot: self.shared.boot_stamp(&minted.token),
            replaces,
            ..Rotation::new(minted.info.token_id.clone(), expires_at, &cfg.instance)
        }
    }

    /// What the new token replaces, to revoke after the grace: the token our state records as
    /// current, whether or not it is still in the file (a deleted or hand-edited file loses
    /// it there, not at the provider); else, with `PAT_REVOKE_SEED`, the seed that minted it.
    async fn replaces(
        &self,
        snap: &Snapshot,
        expected: Option<&Token>,
        auth: &Token,
        minted: &MintedToken,
        owner: &Owner,
    ) -> Option<crate::store::PendingRevocation> {
        if !self.provider.capabilities().retires {
            return None;
        }
        match snap.state.replaced_current(self.shared.now()) {
            Some(p) => Some(p),
            None if self.cfg().revoke_seed && expected == Some(auth) => {
                self.seed_revocation(auth, minted, owner).await
            }
            None => None,
        }
    }

    /// A rotation's token is on disk: the metric, the status and the [`RotatedEvent`] line.
    fn announce(
        &self,
        reason: RotateReason,
        minted: &MintedToken,
        replaced: Option<&Token>,
        expires_at: DateTime<Utc>,
        started: DateTime<Utc>,
        timer: std::time::Instant,
    ) {
        let latency_ms = timer.elapsed().as_millis() as u64;
        self.shared.metrics.rotated(reason.as_str());
        self.shared.set_status(|s| {
            s.last_rotation = Some(self.shared.now());
            s.last_error = None;
            s.terminal_failure = false;
        });
        info!(
            event = RotatedEvent::EVENT,
            reason = reason.as_str(),
            token = %minted.token,
            token_id = %minted.info.token_id,
            old_token = %replaced.map(Token::fingerprint).unwrap_or_else(|| "none".into()),
            expires_at = %expires_at,
            latency_ms,
            started_at_ms = started.timestamp_millis(),
            written_at_ms = self.shared.now().timestamp_millis(),
            "rotated: new token on disk"
        );
    }

    /// The new token's absolute expiry, recorded as of when the rotation began (never later
    /// than the truth), with the same lifetime kept against the monotonic clock, which a
    /// wall-clock step cannot move, and the lifetime granted. A shorter grant than asked is
    /// used, not refused: its forced window moves to half the grant (`policy::forced_window`)
    /// and a warning says so. Only a token dead on arrival is refused.
    async fn record_expiry(
        &self,
        minted: &MintedToken,
        started: DateTime<Utc>,
        started_mono: tokio::time::Instant,
        asked: Duration,
    ) -> Result<(DateTime<Utc>, TimeDelta), RotateError> {
        let cfg = self.cfg();
        let now = self.shared.now();
        let expires_at = local_expiry(started, &minted.info, asked);
        let granted = (expires_at - started).max(TimeDelta::zero());
        self.shared.record_deadline(
            &minted.token,
            started_mono + granted.to_std().unwrap_or_default(),
        );
        self.note_clock_skew(minted.sent_at.max(started), now, &minted.info);
        if expires_at <= now {
            let _ = self
                .provider
                .retire(&minted.token, &minted.info.token_id)
                .await;
            return Err(RotateError::TooShort { expires_at });
        }
        let asked = secs(asked);
        if self.provider.capabilities().lifetime_asked && granted < asked - TimeDelta::seconds(1) {
            let window = crate::policy::forced_window(
                secs(cfg.threshold()),
                &TokenTimes {
                    expires_at,
                    rotated_at: started,
                    granted: Some(granted),
                },
            );
            warn!(
                granted_s = granted.num_milliseconds() as f64 / 1000.0,
                asked_s = asked.num_seconds(),
                forced_window_s = window.num_milliseconds() as f64 / 1000.0,
                "the provider granted a shorter lifetime than PAT_TOKEN_LIFETIME asks (a workspace's maximum token lifetime?); the token is used and replaced earlier. Lower PAT_TOKEN_LIFETIME to match"
            );
        }
        Ok((expires_at, granted))
    }

    /// Mints the replacement with the first credential that still works, in order: the
    /// file's token, then this pod's own live token, then `DATABRICKS_TOKEN`; each is tried
    /// once. A token our own record says has expired (after a long stop, say) is never sent.
    /// A rejected credential re-reads the file into `expected`: another process may have
    /// rotated meanwhile. Returns the new token and the credential that minted it.
    async fn mint_with_a_live_credential(
        &self,
        snap: &Snapshot,
        started: DateTime<Utc>,
        expected: &mut Option<Token>,
        owner: &Owner,
        epoch: u64,
    ) -> Result<(MintedToken, Token), RotateError> {
        if self.provider.capabilities().grant != Grant::LiveCredential {
            let minted = self.mint_with_grant(snap, epoch).await?;
            return Ok((minted.clone(), minted.token));
        }
        let cfg = self.cfg();
        let file = cfg.config_file.display().to_string();
        let bootstrap = cfg.bootstrap_token.clone();
        let fallback = self.store.fallback_credential().await;
        let held = self
            .shared
            .held_times(started)
            .filter(|(_, t)| t.expires_at > started)
            .map(|(h, _)| h.token);
        let mut tried: Vec<Token> = snap
            .token
            .clone()
            .filter(|_| {
                self.shared
                    .live_times(snap, started)
                    .is_some_and(|t| t.expires_at <= started)
            })
            .into_iter()
            .collect();
        if !tried.is_empty() {
            info!("the token in the file has expired by our record; not using it to mint");
        }
        // A token the provider already rejected (to any rotator of the file) is never sent.
        for t in [&snap.token, &held, &fallback, &bootstrap]
            .into_iter()
            .flatten()
        {
            if self.shared.known_dead(snap, t) && !tried.contains(t) {
                tried.push(t.clone());
            }
        }
        let (mut lifetime, mut reaped) = (self.lifetime_for(snap), false);
        loop {
            let Some(auth) = [
                expected.clone(),
                held.clone(),
                fallback.clone(),
                bootstrap.clone(),
            ]
            .into_iter()
            .flatten()
            .find(|t| !tried.contains(t)) else {
                return Err(if tried.is_empty() {
                    RotateError::NoCredential { file }
                } else {
                    RotateError::DeadToken {
                        file,
                        bootstrap: if bootstrap.is_some() {
                            " and DATABRICKS_TOKEN"
                        } else {
                            "; DATABRICKS_TOKEN is not set"
                        },
                    }
                });
            };
            if !tried.is_empty() {
                let source = if bootstrap.as_ref() == Some(&auth) {
                    "the bootstrap token DATABRICKS_TOKEN"
                } else if held.as_ref() == Some(&auth) {
                    "the live token this rotator holds"
                } else if fallback.as_ref() == Some(&auth) {
                    "this pod's own live token"
                } else {
                    "the token now in the config file"
                };
                info!(token = %auth, "retrying with {source}");
            }
            if crate::freeze::resumed_since(epoch) {
                return Err(RotateError::Resumed);
            }
            match self.provider.mint(&auth, lifetime, owner).await {
                Ok(m) => return Ok((m, auth)),
                Err(
                    e @ (ProviderError::LifetimeTooLong { .. }
                    | ProviderError::QuotaExceeded { .. }),
                ) => self.meet_rule(e, &mut lifetime, &mut reaped).await?,
                Err(ProviderError::InvalidToken { status, message }) => {
                    warn!(status, message = %message, token = %auth, "the provider rejected the token used to mint; looking for another");
                    self.note_rejected(&auth, status, &message).await;
                    tried.push(auth);
                    // Another process may have rotated meanwhile.
                    *expected = self.store.snapshot().await?.token;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// `PAT_ON_ROTATE` for a replacement (not a first token). The consumer that was to be
    /// told may still hold the old token (`old_id`) when the hook failed: that token lives
    /// out its lifetime instead of being revoked after the grace.
    async fn tell_the_consumer(
        &self,
        minted: &MintedToken,
        expires_at: DateTime<Utc>,
        old_id: Option<String>,
    ) {
        let told = crate::hook::run_on_rotate(
            &self.shared,
            &minted.token,
            &minted.info.token_id,
            expires_at,
        )
        .await;
        if let (false, Some(old_id)) = (told, old_id) {
            if let Err(e) = self
                .store
                .edit_state(StateEdit::KeepUntilExpiry(old_id))
                .await
            {
                warn!(error = %e, "could not postpone the old token's revocation");
            }
        }
    }

    /// `PAT_REVOKE_SEED`: the revocation of the seed `seed` (a token this rotator did not
    /// mint, which just authenticated the mint of `minted`), once the provider can say for
    /// certain which of its credentials the seed is ([`Provider::identify`]).
    async fn seed_revocation(
        &self,
        seed: &Token,
        minted: &MintedToken,
        owner: &Owner,
    ) -> Option<crate::store::PendingRevocation> {
        match self.provider.identify(seed, minted, owner).await {
            Ok(Identified::Found(seed_info)) => {
                info!(token = %seed, token_id = %seed_info.token_id, "PAT_REVOKE_SEED: the seed token is revoked after the grace");
                Some(crate::store::PendingRevocation {
                    token_id: seed_info.token_id,
                    token_sha256: seed.sha256_hex(),
                    not_before: self.shared.now(),
                    expires_at: seed_info.expires_at,
                    pod_local: false,
                    seed: true,
                })
            }
            Ok(Identified::Ambiguous(candidates)) => {
                warn!(token = %seed, candidates, "PAT_REVOKE_SEED: the seed's id cannot be told apart from the owner's other tokens not minted by pat-rotator; it is left alone (revoke it by hand once the rotation is running)");
                None
            }
            Err(e) => {
                warn!(error = %e, "PAT_REVOKE_SEED: cannot list tokens to find the seed's id; the seed is left to expire on its own");
                None
            }
        }
    }

    fn note_clock_skew(
        &self,
        sent_at: DateTime<Utc>,
        received_at: DateTime<Utc>,
        info: &crate::provider::TokenInfo,
    ) {
        let skew = clock_skew(sent_at, received_at, info);
        self.shared
            .metrics
            .clock_skew_seconds
            .set(skew.num_milliseconds() as f64 / 1000.0);
        if unexplained_skew(skew, sent_at, received_at).abs() > LARGE_SKEW {
            warn!(
                skew_s = skew.num_milliseconds() as f64 / 1000.0,
                "the provider's clock differs from ours; expiries are kept on our clock, but check NTP on this host"
            );
        }
    }

    pub(super) async fn revoke_unused(&self, token: &Token, token_id: &str, fallback_auth: &Token) {
        if !self.provider.capabilities().retires {
            return;
        }
        let first = self.provider.retire(token, token_id).await;
        let result = match first {
            Err(ProviderError::InvalidToken { .. }) => {
                self.provider.retire(fallback_auth, token_id).await
            }
            other => other,
        };
        match result {
            Ok(()) | Err(ProviderError::NotFound { .. }) => {
                info!(token_id, "revoked an unused minted token")
            }
            Err(e) => {
                warn!(token_id, error = %e, "could not revoke an unused minted token; it will be reaped at the next start")
            }
        }
    }
}

/// How long a rotation lock's holder may show no progress before a waiter that cannot wait
/// rotates without it: a quarter of the threshold, between 2 s (ten missed heartbeats, not a
/// busy machine) and 10 s.
pub(super) fn stall_after(threshold: Duration) -> Duration {
    (threshold / 4).clamp(Duration::from_secs(2), Duration::from_secs(10))
}

/// How long a rotation in flight may go on after SIGTERM: one HTTP timeout and a little,
/// but never past [`MAX_SHUTDOWN_DRAIN`] (with the listeners' drain, the process must end
/// within Kubernetes' default 30 s grace; an abandoned mint is reaped at the next start).
pub(super) fn shutdown_drain(http_timeout: Duration) -> Duration {
    (http_timeout + Duration::from_secs(2)).min(MAX_SHUTDOWN_DRAIN)
}

/// The most a rotation delays the end of the process after SIGTERM.
pub(crate) const MAX_SHUTDOWN_DRAIN: Duration = Duration::from_secs(18);

/// A minted token's expiry on the local clock: the local time the create request was sent
/// plus the lifetime the provider granted (`expiry_time - creation_time`, both on its clock),
/// so it is never later than the truth whatever the skew between the clocks. Without an
/// expiry from the provider, the lifetime asked for.
pub(crate) fn local_expiry(
    sent_at: DateTime<Utc>,
    info: &crate::provider::TokenInfo,
    requested: Duration,
) -> DateTime<Utc> {
    match info.expires_at {
        Some(exp) => sent_at + (exp - info.creation_time).max(TimeDelta::zero()),
        None => sent_at + secs(requested),
    }
}

/// The provider's clock minus ours, estimated from one create: its `creation_time` against
/// the midpoint of our send and receive times.
pub(crate) fn clock_skew(
    sent_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    info: &crate::provider::TokenInfo,
) -> TimeDelta {
    let midpoint = sent_at + (received_at - sent_at) / 2;
    info.creation_time - midpoint
}

/// The part of a measured skew that the round trip cannot explain: the provider stamped
/// `creation_time` somewhere between our send and our receipt, so up to half the round trip
/// either way is no skew at all (a slow provider once raised a false warning).
pub(crate) fn unexplained_skew(
    skew: TimeDelta,
    sent_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
) -> TimeDelta {
    let half_trip = ((received_at - sent_at) / 2).abs();
    if skew.abs() <= half_trip {
        TimeDelta::zero()
    } else if skew > TimeDelta::zero() {
        skew - half_trip
    } else {
        skew + half_trip
    }
}

/// Skew above this is logged as a warning: expiries stay right (they are on our clock), but
/// anything else comparing the two clocks (other tools, Azure's "expiring within 30 s"
/// refusal) is off by as much.
const LARGE_SKEW: TimeDelta = TimeDelta::seconds(5);
