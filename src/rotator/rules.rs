//! A workspace's rules met at mint time, as a user would want them met: a maximum token
//! lifetime is learned from the refusal (the cap the answer names, else half the lifetime
//! asked) and asked for from then on, recorded in the state so `status` and every rotator of
//! the file know it; the token quota gets this instance's orphans reaped and one more try,
//! never a loop of mints. Everything else a mint can meet is the caller's error.
//!
//! Why learn the cap rather than refuse to start: a cap set by an admin after the rotator
//! started would otherwise stop every rotation until someone redeploys; asking for less and
//! saying so keeps the token alive, and the forced window follows the shorter lifetime.

use super::{RotateError, Rotator};
use crate::provider::{Provider, ProviderError};
use crate::store::{CredentialStore, Snapshot, StateEdit};
use std::time::Duration;
use tracing::warn;

impl<P: Provider, S: CredentialStore> Rotator<P, S> {
    /// The lifetime a mint asks for: `PAT_TOKEN_LIFETIME`, or the workspace's maximum once
    /// learned (by this process or, through the state, by any rotator of the file).
    pub(super) fn lifetime_for(&self, snap: &Snapshot) -> Duration {
        let learned = *self.lifetime_cap.lock().unwrap_or_else(|p| p.into_inner());
        [
            Some(self.cfg().token_lifetime),
            learned,
            snap.state.max_lifetime_s.map(Duration::from_secs),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.cfg().token_lifetime)
    }

    /// A mint refused by a workspace rule: `Ok` to try once more (with `lifetime` lowered,
    /// or after reaping), `Err` to stop.
    pub(super) async fn meet_rule(
        &self,
        refusal: ProviderError,
        lifetime: &mut Duration,
        reaped: &mut bool,
    ) -> Result<(), RotateError> {
        match refusal {
            ProviderError::LifetimeTooLong { max, ref message } => {
                let cap = max.unwrap_or(*lifetime / 2);
                let threshold = self.cfg().threshold();
                if cap >= *lifetime || cap <= threshold {
                    warn!(message = %message, cap_s = cap.as_secs(), threshold_s = threshold.as_secs(), "the workspace's maximum token lifetime leaves no room for the rotation threshold; lower PAT_ROTATION_INTERVAL (the threshold is min(interval, 60 s))");
                    return Err(refusal.into());
                }
                warn!(asked_s = lifetime.as_secs(), max_s = cap.as_secs(), message = %message, "the workspace caps token lifetime below PAT_TOKEN_LIFETIME; asking for its maximum from now on (lower PAT_TOKEN_LIFETIME to match to silence this)");
                *self.lifetime_cap.lock().unwrap_or_else(|p| p.into_inner()) = Some(cap);
                if let Err(e) = self
                    .store
                    .edit_state(StateEdit::LifetimeCap(cap.as_secs()))
                    .await
                {
                    warn!(error = %e, "could not record the workspace's maximum token lifetime in the state");
                }
                *lifetime = cap;
                Ok(())
            }
            ProviderError::QuotaExceeded { ref message } if !*reaped => {
                *reaped = true;
                warn!(message = %message, "the user's token quota is reached; revoking this instance's orphaned tokens and trying once more");
                self.reap_orphans_locked().await;
                Ok(())
            }
            other => Err(other.into()),
        }
    }
}
