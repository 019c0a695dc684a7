//! When a replica of the cluster store rotates for its pod alone: the Secret out of reach as
//! the forced window arrives, or a holder that does not replace a token about to die. Kept
//! apart from the store itself: these are the only paths on which a replica mints without
//! the Lease.
//!
//! Invariant: a pod's readers never hold a dead token while the Secret cannot give them a
//! live one, and a replica never rotates alone with a U2M login (a pod-local refresh could
//! spend the shared single-use refresh token).

use super::{alone_before_expiry, mirror, KubeStore};
use crate::store::{BoxFuture, Snapshot};
use chrono::{DateTime, TimeDelta, Utc};

impl KubeStore {
    /// Whether this replica may ever rotate for its pod alone. Not with a U2M login: its
    /// refresh token is single-use and shared through the Secret, so a refresh without the
    /// Secret's claim could spend the one the holder is about to send (a replay, and the
    /// login's whole family revoked). Readers keep the current access token meanwhile.
    pub(super) fn may_rotate_alone(&self) -> bool {
        self.inner.shared.config.credential != crate::config::CredentialKind::OAuthU2m
    }

    /// Whether the local file's token is inside the forced window (or past it) by its record.
    pub(super) fn local_forced(&self, local: &Snapshot) -> bool {
        if !self.may_rotate_alone() {
            return false;
        }
        let threshold =
            TimeDelta::from_std(self.inner.shared.config.threshold()).unwrap_or_default();
        local
            .times()
            .is_some_and(|t| t.expires_at - self.inner.shared.now() <= threshold)
    }

    /// The Secret is behind this pod: its token dies before the live one in this pod's file
    /// (minted alone during an outage or past a stuck holder), or it has none.
    pub(super) fn shared_behind(&self, local: &Snapshot) -> bool {
        let now = self.inner.shared.now();
        self.view(|v| match v.secret.as_ref() {
            Some(c) => match &c.token {
                Some(t) => mirror::keeps_local_token(&c.state, t, Some(local), now),
                None => local.times().is_some_and(|t| t.expires_at > now),
            },
            None => false,
        })
    }

    /// The Secret holds a token that outlives this pod's file's token (the mirror is bringing
    /// it): nothing for this pod to do alone.
    pub(super) fn shared_newer(&self, local: &Snapshot) -> bool {
        let Some(local_expiry) = local.times().map(|t| t.expires_at) else {
            return true;
        };
        self.view(|v| {
            v.secret.as_ref().is_some_and(|c| {
                c.state
                    .times_for(c.token.as_ref())
                    .is_some_and(|t| t.expires_at > local_expiry)
            })
        })
    }

    /// When a replica that is not the lease holder stops waiting for it and rotates alone
    /// (`None`: not before something changes), unless the Secret holds a longer-lived token:
    /// once the holder has had half the forced window, and a successor of a dead holder has
    /// had time to take over (lease duration plus one renewal period), at least one second
    /// before this pod's token expires. A holder that is stuck (alive, renewing its lease,
    /// but not rotating) must not leave a dead token in this pod's file.
    pub(super) fn alone_at(&self, local: &Snapshot) -> Option<DateTime<Utc>> {
        let before_expiry = alone_before_expiry(
            self.inner.shared.config.threshold(),
            self.inner.lease_duration,
        );
        let before_expiry = TimeDelta::from_std(before_expiry).unwrap_or_default();
        if !self.may_rotate_alone() {
            return None;
        }
        local
            .times()
            .map(|t| t.expires_at - before_expiry)
            .filter(|_| !self.shared_newer(local))
    }

    /// Runs `work` as a rotation for this pod alone.
    pub(super) async fn rotate_alone<T>(&self, work: BoxFuture<'_, T>) -> T {
        self.view(|v| v.local_rotation = true);
        let out = work.await;
        self.view(|v| v.local_rotation = false);
        out
    }
}
