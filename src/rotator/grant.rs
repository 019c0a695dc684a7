//! Minting with the provider's own grant (OAuth): a client secret, or a U2M login's
//! single-use refresh token, claimed in the state before it is sent and replaced there
//! before the access token it bought is published.
//!
//! Invariant (the one ARCHITECTURE.md's "OAuth: a refresh token is sent once" states): a
//! refresh token is sent only under this process's durable claim on it; the answer's refresh
//! token is durable before the access token is written or served; a refresh token that may
//! have been exchanged without our hearing the answer (a timeout, a connection cut after the
//! request, a process killed mid-refresh) is never sent again: the login is reported lost
//! and the access token already out keeps serving until it expires. An error *answer*
//! (HTTP 429 or 5xx, a refusal other than `invalid_grant`) says no exchange happened, so
//! the claim ends and the token stays usable.

use super::{RotateError, Rotator};
use crate::provider::{Grant, Granted, MintedToken, Provider, ProviderError};
use crate::store::{CredentialStore, Login, RefreshClaim, Snapshot, StateEdit};
use chrono::{DateTime, TimeDelta, Utc};
use std::time::Duration;
use tracing::{error, info, warn};

/// How long a claim whose process still runs is taken as a refresh on the wire: past this
/// it is one whose answer was lost (a refresh waits 30 s at least, `PAT_HTTP_TIMEOUT` at
/// most 300 s).
const CLAIM_ALIVE_FOR: TimeDelta = TimeDelta::seconds(330);

/// A refresh answered whose refresh token could not yet be stored: kept in memory (the only
/// copy of the login) and stored before anything else is done with the login.
pub(super) struct Unstored {
    claim: RefreshClaim,
    granted: Granted,
}

impl<P: Provider, S: CredentialStore> Rotator<P, S> {
    /// Mints with the provider's own grant: its secret, or the login's refresh token.
    pub(super) async fn mint_with_grant(
        &self,
        snap: &Snapshot,
        epoch: u64,
    ) -> Result<MintedToken, RotateError> {
        if crate::freeze::resumed_since(epoch) {
            return Err(RotateError::Resumed);
        }
        match self.provider.capabilities().grant {
            Grant::RefreshToken => self.refresh_login(snap, epoch).await,
            _ => Ok(self.provider.mint_granted(None).await?.minted),
        }
    }

    /// One refresh of the U2M login `snap`'s state holds, under its durable claim.
    async fn refresh_login(&self, snap: &Snapshot, epoch: u64) -> Result<MintedToken, RotateError> {
        if let Some(minted) = self.store_unstored().await? {
            return Ok(minted);
        }
        let login = snap.state.login.clone().ok_or(RotateError::NoLogin)?;
        if let Some(why) = &login.lost {
            return Err(RotateError::LoginLost(why.clone()));
        }
        if let Some(claim) = &login.in_flight {
            return Err(self.judge_claim(&login, claim).await);
        }
        let claim = RefreshClaim {
            token_sha256: login.refresh_token.sha256_hex(),
            nonce: format!("{:032x}", rand::random::<u128>()),
            by: self.cfg().instance.clone(),
            pid: std::process::id(),
            host: Some(crate::config::host_name()),
            at: self.shared.now(),
        };
        self.store
            .edit_state(StateEdit::ClaimRefresh(claim.clone()))
            .await?;
        let claimed = self.store.snapshot().await?;
        if !claimed
            .state
            .login
            .as_ref()
            .is_some_and(|l| l.claimed_by(&claim))
        {
            info!("another rotator claimed the login's refresh first; adopting its token");
            return Err(RotateError::RefreshElsewhere);
        }
        if crate::freeze::resumed_since(epoch) {
            self.end_claim(&claim).await;
            return Err(RotateError::Resumed);
        }
        let sent = self.provider.mint_granted(Some(&login.refresh_token)).await;
        match sent {
            Ok(granted) => self.store_refreshed(claim, granted, &login).await,
            Err(e) if !may_have_spent(&e) => {
                self.end_claim(&claim).await;
                Err(self.refused(&login, e).await)
            }
            Err(e) => {
                let why = format!("the answer to a refresh was lost ({e}): the workspace may have exchanged the refresh token, and sending it again could get the login revoked");
                Err(self.lose_login(&login, why).await)
            }
        }
    }

    /// A refused refresh: `invalid_grant` loses the login, anything else is an error the
    /// loop retries (the token was not exchanged).
    async fn refused(&self, login: &Login, e: ProviderError) -> RotateError {
        match e {
            ProviderError::InvalidGrant { error, message } => {
                let why = format!("the workspace refused the refresh token ({error}: {message}); the login was revoked, expired, or reached its absolute lifetime");
                self.lose_login(login, why).await
            }
            other => other.into(),
        }
    }

    /// A claim already on the login: a refresh on the wire in a live process (wait for
    /// it), or one whose answer nobody will record (the login is lost).
    ///
    /// A claim made on another host (another pod of the cluster store) cannot be checked by
    /// its pid: only the Lease holder refreshes, and the claimant no longer holds it (this
    /// process does), so whatever answer it got can no longer be trusted to reach the
    /// Secret before its access token is used: the login is lost, never the token resent.
    async fn judge_claim(&self, login: &Login, claim: &RefreshClaim) -> RotateError {
        let age = self.shared.now() - claim.at;
        let ours = claim.pid == std::process::id();
        let here = claim
            .host
            .as_deref()
            .is_none_or(|h| h == crate::config::host_name());
        if here
            && !ours
            && process_alive(claim.pid)
            && age < CLAIM_ALIVE_FOR
            && age > -CLAIM_ALIVE_FOR
        {
            return RotateError::RefreshElsewhere;
        }
        let why = format!(
            "a refresh sent by {} (pid {}) at {} never recorded its answer (the process ended, or gave up, while the request was on the wire): the refresh token may be spent, and is never sent again",
            claim.by, claim.pid, claim.at
        );
        self.lose_login(login, why).await
    }

    /// Marks the login lost (for every rotator of the file) and says what to do.
    async fn lose_login(&self, login: &Login, why: String) -> RotateError {
        self.shared.metrics.logins_lost.inc();
        error!(reason = %why, "the OAuth login no longer works; log in again: `pat-rotator login`");
        if let Err(e) = self
            .store
            .edit_state(StateEdit::LoginLost {
                token_sha256: login.refresh_token.sha256_hex(),
                why: why.clone(),
            })
            .await
        {
            warn!(error = %e, "could not record the lost login in the state");
        }
        RotateError::LoginLost(why)
    }

    /// Ends this process's claim: its request was certainly not exchanged.
    async fn end_claim(&self, claim: &RefreshClaim) {
        let edit = StateEdit::RefreshUnsent {
            nonce: claim.nonce.clone(),
        };
        if let Err(e) = self.store.edit_state(edit).await {
            warn!(error = %e, "could not end the refresh claim; the next turn reports the login as lost unless this process retries it");
        }
    }

    /// Stores the answer's refresh token before its access token goes anywhere; a workspace
    /// with multi-use refresh tokens (no new one in the answer) keeps the one sent.
    async fn store_refreshed(
        &self,
        claim: RefreshClaim,
        granted: Granted,
        login: &Login,
    ) -> Result<MintedToken, RotateError> {
        let granted = Granted {
            refresh_token: granted
                .refresh_token
                .clone()
                .or_else(|| Some(login.refresh_token.clone())),
            ..granted
        };
        *self.unstored.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Unstored { claim, granted });
        match self.store_unstored().await? {
            Some(minted) => Ok(minted),
            None => Err(RotateError::LoginLost(
                "the refreshed login vanished before it was stored".into(),
            )),
        }
    }

    /// Stores a refresh answer kept in memory, if any; its access token once stored.
    async fn store_unstored(&self) -> Result<Option<MintedToken>, RotateError> {
        let Some((edit, granted)) = self.unstored_edit() else {
            return Ok(None);
        };
        if let Err(e) = self.store.edit_state(edit).await {
            warn!(error = %e, "the refreshed login could not be stored yet; it is kept in memory and its access token is not used until it is stored");
            return Err(e.into());
        }
        *self.unstored.lock().unwrap_or_else(|p| p.into_inner()) = None;
        info!(token = %granted.minted.token, "OAuth login refreshed; the new refresh token is stored");
        Ok(Some(granted.minted))
    }

    fn unstored_edit(&self) -> Option<(StateEdit, Granted)> {
        let guard = self.unstored.lock().unwrap_or_else(|p| p.into_inner());
        let u = guard.as_ref()?;
        let now: DateTime<Utc> = u.granted.minted.info.creation_time;
        Some((
            StateEdit::Refreshed {
                nonce: u.claim.nonce.clone(),
                refresh_token: u.granted.refresh_token.clone()?,
                refresh_expires_at: u
                    .granted
                    .refresh_expires_in
                    .and_then(|d| TimeDelta::from_std(d).ok())
                    .map(|d| now + d),
            },
            u.granted.clone(),
        ))
    }
}

/// Whether a failed refresh may have reached the workspace and been exchanged there: no
/// answer came (a timeout, a cut connection, an unreadable answer). An error answer says
/// it was not; a connection never made says it was not sent.
fn may_have_spent(e: &ProviderError) -> bool {
    matches!(
        e,
        ProviderError::Timeout(_) | ProviderError::Network(_) | ProviderError::Malformed(_)
    )
}

/// Whether process `pid` of this host still runs (a claim's sender).
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 sends nothing; it only checks the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The wait before a rotator tries a lost or missing login again: a new login wakes it at
/// once (a change of the state), so this only bounds how often it says so.
pub(super) const LOGIN_RECHECK: Duration = Duration::from_secs(300);
