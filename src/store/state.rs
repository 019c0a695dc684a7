//! The state file's records: which token the file holds (id, fingerprint, expiry, last
//! rotation) and which replaced tokens await revocation.
//!
//! Invariant: a record describes the token whose SHA-256 it carries and nothing else; a
//! mismatch with the config file's token means "expiry unknown".

use crate::policy::TokenTimes;
use crate::secret::fingerprint_of_sha256;
use crate::Token;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A token awaiting revocation after the grace period.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingRevocation {
    pub token_id: String,
    pub token_sha256: String,
    pub not_before: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Minted by this pod alone while the cluster store was unreachable: this pod revokes
    /// it, whether or not it holds the lease (see [`State::pod_local`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pod_local: bool,
    /// The seed (a token no pat-rotator minted), queued by `PAT_REVOKE_SEED`: its comment is
    /// not ours, so only this mark (and the setting still on) lets it be revoked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seed: bool,
}

/// A token's deadline on the host's clock since boot (`boot_clock`), valid on that boot only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BootDeadline {
    /// `/proc/sys/kernel/random/boot_id` of the boot that wrote it.
    pub boot: String,
    /// Milliseconds since that boot.
    pub at_ms: u64,
}

/// How many rejected tokens the state remembers.
const REJECTED_KEPT: usize = 8;

/// The state file. The `token_*`, `expires_at` and `rotated_at` fields describe one token.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    #[serde(default)]
    pub token_id: Option<String>,
    #[serde(default)]
    pub token_sha256: Option<String>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// The same expiry on the host's clock since boot: a wall-clock step cannot move it, so
    /// a rotator restarted on this host judges the token by it (see `Shared::live_times`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_boot: Option<BootDeadline>,
    #[serde(default)]
    pub rotated_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub rotated_by: Option<String>,
    /// The rotation threshold of the rotator that recorded this token, so that `status` (run
    /// with whatever environment its caller has) judges readiness as the service does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_secs: Option<u64>,
    /// The lifetime the provider granted the current token, in milliseconds: a shorter
    /// grant than asked moves its forced window (`policy::forced_window`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_ms: Option<i64>,
    /// When the provider accepted a manually set token (expiry unknown): it may be served
    /// briefly until the rotator replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub pending_revocations: Vec<PendingRevocation>,
    /// SHA-256 of tokens the provider rejected (the latest few): every rotator sharing the
    /// file stops serving them at once, not at its own next check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<String>,
    /// The current token was minted by this pod alone, while the cluster store was
    /// unreachable (never set by the file store): when the shared token replaces it, this
    /// pod queues it for revocation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pod_local: bool,
    /// The workspace's maximum token lifetime in seconds, learned from a refused create
    /// (`maxTokenLifetimeDays`): what a rotation asks for when `PAT_TOKEN_LIFETIME` is longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_s: Option<u64>,
    /// The OAuth U2M login (`PAT_CREDENTIAL=oauth-u2m`): its refresh token and the claim of
    /// the refresh in flight. Never touched by a PAT's records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<Login>,
}

/// An OAuth U2M login, as `pat-rotator login` stored it and each refresh rotated it.
///
/// Invariant (what makes "a refresh token is never sent twice" hold across processes and
/// restarts): a refresh token is sent only by the holder of a [`RefreshClaim`] on it,
/// recorded durably before the request; a claim is taken only when none is on the login, and
/// it ends when the answer's refresh token replaces it or when the request was certainly
/// never sent. A claim nobody ends (a process killed while its refresh was on the wire) marks
/// its refresh token as possibly spent: it is never sent again, and the login is lost.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Login {
    /// The single-use refresh token that mints the next access token.
    #[serde(with = "crate::secret::by_value")]
    pub refresh_token: Token,
    pub logged_in_at: DateTime<Utc>,
    /// When the refresh token stops working as the workspace said (its TTL, capped by the
    /// session's absolute lifetime); `None` when it did not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_expires_at: Option<DateTime<Utc>>,
    /// Refreshes since the login.
    #[serde(default)]
    pub refreshes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<RefreshClaim>,
    /// Why the login no longer works (`invalid_grant`, an answer lost on the wire): nothing
    /// is sent with it again; `pat-rotator login` replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
}

impl Login {
    /// A fresh login's record.
    pub fn new(
        refresh_token: Token,
        at: DateTime<Utc>,
        refresh_expires_at: Option<DateTime<Utc>>,
    ) -> Login {
        Login {
            refresh_token,
            logged_in_at: at,
            refresh_expires_at,
            refreshes: 0,
            in_flight: None,
            lost: None,
        }
    }

    /// Whether `claim` is the one on this login.
    pub fn claimed_by(&self, claim: &RefreshClaim) -> bool {
        self.in_flight
            .as_ref()
            .is_some_and(|c| c.nonce == claim.nonce)
    }
}

/// "This process is sending this refresh token": see [`Login`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefreshClaim {
    pub token_sha256: String,
    /// Tells this claim from any other on the same token.
    pub nonce: String,
    pub by: String,
    pub pid: u32,
    /// The host the claimant runs on (its pod, under the cluster store): its `pid` means
    /// something only there. Absent in claims written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub at: DateTime<Utc>,
}

/// The whole state file. Its top level describes the profile named in `profile` (the
/// contract's fields stay where every reader expects them); rotators of other profiles of the
/// same config file keep theirs under `other_profiles`, so they never take each other's
/// state for "expiry unknown" and rotate in a loop.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct StateFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) profile: Option<String>,
    #[serde(flatten)]
    pub(super) top: State,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub(super) other_profiles: std::collections::BTreeMap<String, State>,
}

impl StateFile {
    pub(super) fn owns_top(&self, profile: &str) -> bool {
        self.profile.as_deref().is_none_or(|p| p == profile)
    }
}

impl State {
    /// The recorded times, if this state describes `token`.
    pub fn times_for(&self, token: Option<&Token>) -> Option<TokenTimes> {
        let token = token?;
        if self.token_sha256.as_deref() != Some(token.sha256_hex().as_str()) {
            return None;
        }
        Some(TokenTimes {
            expires_at: self.expires_at?,
            rotated_at: self.rotated_at?,
            granted: self.granted_ms.map(chrono::TimeDelta::milliseconds),
        })
    }

    /// Records that the provider rejected the token with SHA-256 `sha`.
    pub(crate) fn note_rejected(&mut self, sha: &str) {
        if !self.rejected.iter().any(|r| r == sha) {
            self.rejected.push(sha.to_string());
            if self.rejected.len() > REJECTED_KEPT {
                self.rejected.remove(0);
            }
        }
    }

    /// Whether the provider rejected `token`, as some rotator recorded.
    pub(crate) fn rejects(&self, token: &Token) -> bool {
        let sha = token.sha256_hex();
        self.rejected.contains(&sha)
    }

    /// `token`'s deadline on the host's clock since boot, if this state describes it.
    pub(crate) fn boot_deadline_for(&self, token: &Token) -> Option<&BootDeadline> {
        (self.token_sha256.as_deref() == Some(token.sha256_hex().as_str()))
            .then_some(self.expires_boot.as_ref())
            .flatten()
    }

    /// The provider id of `token`, if this state describes it.
    pub(crate) fn token_id_for(&self, token: &Token) -> Option<&str> {
        (self.token_sha256.as_deref() == Some(token.sha256_hex().as_str()))
            .then_some(self.token_id.as_deref())
            .flatten()
    }

    /// Records `token` as current.
    pub fn record(
        &mut self,
        token: &Token,
        token_id: Option<String>,
        expires_at: DateTime<Utc>,
        rotated_at: DateTime<Utc>,
        by: &str,
    ) {
        self.token_id = token_id;
        self.token_sha256 = Some(token.sha256_hex());
        self.expires_at = Some(expires_at);
        self.expires_boot = None;
        self.rotated_at = Some(rotated_at);
        self.rotated_by = Some(by.to_string());
        self.granted_ms = None;
        self.verified_at = None;
        self.pod_local = false;
    }

    /// The pending revocations that may be carried out now while `on_disk` is the token in
    /// the file: due, and never the token a reader can see (a state written just before a
    /// config write that then failed queues the old token while it is still on disk).
    pub(crate) fn revocable(
        &self,
        on_disk: Option<&Token>,
        now: DateTime<Utc>,
    ) -> Vec<&PendingRevocation> {
        let visible = on_disk.map(Token::sha256_hex);
        self.pending_revocations
            .iter()
            .filter(|p| p.not_before <= now && Some(&p.token_sha256) != visible.as_ref())
            .collect()
    }

    /// The token this state records as current, as a revocation to queue when it is
    /// replaced: whether or not it is still in the file (a deleted or hand-edited file loses
    /// it there, but it lives on at the provider until revoked).
    pub(crate) fn replaced_current(&self, not_before: DateTime<Utc>) -> Option<PendingRevocation> {
        Some(PendingRevocation {
            token_id: self.token_id.clone()?,
            token_sha256: self.token_sha256.clone()?,
            not_before,
            expires_at: self.expires_at,
            pod_local: self.pod_local,
            seed: false,
        })
    }

    /// Queues `p`, once per token id (a later entry replaces an earlier one).
    pub(crate) fn queue_revocation(&mut self, p: PendingRevocation) {
        self.pending_revocations
            .retain(|q| q.token_id != p.token_id);
        self.pending_revocations.push(p);
    }

    /// Forgets the current token (after a manual `set`): its expiry is unknown.
    pub(crate) fn clear_current(&mut self) {
        self.token_id = None;
        self.token_sha256 = None;
        self.expires_at = None;
        self.expires_boot = None;
        self.rotated_at = None;
        self.rotated_by = None;
        self.threshold_secs = None;
        self.granted_ms = None;
        self.verified_at = None;
        self.pod_local = false;
    }

    /// When the provider last accepted `token`, if it is a manually set token this state
    /// describes without a known expiry.
    pub(crate) fn verified_seed(&self, token: &Token) -> Option<DateTime<Utc>> {
        (self.token_sha256.as_deref() == Some(token.sha256_hex().as_str()))
            .then_some(self.verified_at)
            .flatten()
    }

    pub fn fingerprint(&self) -> Option<String> {
        self.token_sha256.as_deref().map(fingerprint_of_sha256)
    }
}

/// What a rotation records about the token it writes.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub token_id: String,
    /// On the local clock (see the rotator's `local_expiry`).
    pub expires_at: DateTime<Utc>,
    /// The instance that minted it.
    pub rotated_by: String,
    /// The rotation threshold in use, so `status` judges readiness as the service does.
    pub threshold: Option<Duration>,
    /// How long the replaced token stays valid once this one is on disk.
    pub grace: Duration,
    /// The lifetime the provider granted (see [`State::granted_ms`]).
    pub granted: Option<chrono::TimeDelta>,
    /// The expiry on the host's clock since boot (see [`State::expires_boot`]).
    pub expires_boot: Option<BootDeadline>,
    /// The token this one replaces, to revoke after the grace; its `not_before` is set when
    /// the new token is written.
    pub replaces: Option<PendingRevocation>,
    /// Minted by this pod alone (the cluster store unreachable); see [`State::pod_local`].
    pub pod_local: bool,
}

impl Rotation {
    /// A rotation that records `token_id` and replaces nothing.
    pub fn new(token_id: impl Into<String>, expires_at: DateTime<Utc>, rotated_by: &str) -> Self {
        Rotation {
            token_id: token_id.into(),
            expires_at,
            rotated_by: rotated_by.to_string(),
            threshold: None,
            grace: Duration::ZERO,
            granted: None,
            expires_boot: None,
            replaces: None,
            pod_local: false,
        }
    }

    pub fn apply(&self, state: &mut State, token: &Token, written_at: DateTime<Utc>) {
        state.record(
            token,
            Some(self.token_id.clone()),
            self.expires_at,
            written_at,
            &self.rotated_by,
        );
        state.threshold_secs = self.threshold.map(|t| t.as_secs());
        state.granted_ms = self.granted.map(|g| g.num_milliseconds());
        state.expires_boot = self.expires_boot.clone();
        state.pod_local = self.pod_local;
        if let Some(old) = &self.replaces {
            state.queue_revocation(PendingRevocation {
                not_before: revoke_not_before(written_at, self.grace),
                ..old.clone()
            });
        }
    }
}

/// The earliest instant a replaced token may be revoked: the grace after its replacement
/// reached the disk, plus one second so that no `expires_on` a reader was told (at most
/// `now + grace`, in whole seconds, with `now` taken before its read) is ever later.
pub(crate) fn revoke_not_before(written_at: DateTime<Utc>, grace: Duration) -> DateTime<Utc> {
    written_at
        + chrono::TimeDelta::from_std(grace).unwrap_or(chrono::TimeDelta::MAX / 2)
        + chrono::TimeDelta::seconds(1)
}
