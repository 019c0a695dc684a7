//! The rotation loop: decide, rotate single-flight across processes, revoke after grace,
//! recover from a dead token, reap orphans.
//!
//! Invariants:
//! - the loop sleeps until the policy's next wake-up (or a session change, or, while failing,
//!   a change of the config file); it never polls on a fixed interval;
//! - only the holder of `<config>.rotate.lock` mints; a loser waits for the winner and adopts
//!   its token, so replicas sharing a file never revoke each other's tokens;
//! - a minted token is either written (and recorded in the state) or revoked: compare before
//!   swap loses to a manual write by revoking our unused token;
//! - an old token is revoked only after `PAT_REVOKE_GRACE` has passed since its replacement
//!   reached the disk (the metadata endpoint never advertises it for longer than that), and
//!   pending revocations live in the state file, so a restart still performs them;
//! - on 401/403 the loop re-reads the file and tries the bootstrap token; when nothing works
//!   it reports not-ready, says what to do, and recovers within a second of a valid token
//!   appearing in the file.

use crate::config::Config;
use crate::policy::{self, Decision, PolicyConfig, RotateReason};
use crate::provider::{Owner, Provider, ProviderError};
use crate::shared::Shared;
use crate::store::{CredentialStore, Store, StoreError};
use chrono::{DateTime, TimeDelta, Utc};
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

mod cleanup;
mod converge;
mod grant;
/// The `CredentialStore` methods a test wrapper passes unchanged to its `inner` file store
/// (`except` the one it defines itself).
#[cfg(test)]
macro_rules! forward_to_inner {
    () => {
        forward_to_inner!(except snapshot_for_swap);
        async fn snapshot_for_swap(&self) -> Result<crate::store::ForSwap, StoreError> {
            CredentialStore::snapshot_for_swap(&self.inner).await
        }
    };
    (except snapshot_for_swap) => {
        forward_to_inner!(@reads_and_swaps);
        async fn edit_state(&self, edit: crate::store::StateEdit) -> Result<(), StoreError> {
            CredentialStore::edit_state(&self.inner, edit).await
        }
    };
    (except edit_state) => {
        forward_to_inner!(@reads_and_swaps);
        async fn snapshot_for_swap(&self) -> Result<crate::store::ForSwap, StoreError> {
            CredentialStore::snapshot_for_swap(&self.inner).await
        }
    };
    (@reads_and_swaps) => {
        async fn snapshot(&self) -> Result<crate::store::Snapshot, StoreError> {
            CredentialStore::snapshot(&self.inner).await
        }
        async fn swap(
            &self,
            expected: Option<Token>,
            new: Token,
            host: Option<String>,
            rotation: crate::store::Rotation,
            clock: crate::store::Clock,
        ) -> Result<crate::store::SwapOutcome, StoreError> {
            CredentialStore::swap(&self.inner, expected, new, host, rotation, clock).await
        }
        async fn wait_rotation_free(&self, limit: Duration) -> Result<bool, StoreError> {
            CredentialStore::wait_rotation_free(&self.inner, limit).await
        }
    };
}

#[cfg(test)]
mod oauth_tests;
mod rotation;
mod rules;
mod run;
#[cfg(test)]
mod tests;

/// The longest wait before retrying after a local (store) failure.
const LOCAL_RETRY: Duration = Duration::from_secs(5);

/// The wait before retrying while the token on disk is already dead or unknown: 5 to 10 s,
/// jittered so that many replicas do not retry in step.
fn dead_token_retry() -> Duration {
    use rand::Rng;
    Duration::from_millis(rand::rng().random_range(5_000..10_000))
}

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("provider: {0}")]
    Provider(#[from] ProviderError),
    #[error("every credential was rejected (the token in {file}{bootstrap}); seed a valid token with `pat-rotator set` (token on stdin) or replace the bootstrap secret: rotation resumes by itself within a second of a valid token appearing in the file. If every token of the user died at once, the user's permission to use tokens may have been taken away: a workspace admin grants it back (Settings > Advanced > Personal access tokens > Permissions), or keep an OAuth token instead (PAT_CREDENTIAL=oauth-m2m)")]
    DeadToken {
        file: String,
        bootstrap: &'static str,
    },
    #[error("no token to authenticate with: {file} has none and DATABRICKS_TOKEN is not set; seed one with `pat-rotator set` or set DATABRICKS_TOKEN")]
    NoCredential { file: String },
    #[error("another rotator held the rotation lock for longer than {0:?}; it may be stuck")]
    LockTimeout(Duration),
    #[error("the rotation lock's holder made no progress for {0:?}; the token is not near expiry yet, so this rotator waits for the next decision (a stuck holder is bypassed once the forced window opens)")]
    LockStalled(Duration),
    #[error("this process was stopped and resumed during the rotation; it starts over from a fresh read")]
    Resumed,
    #[error("shutdown abandoned a rotation still running after {0:?}; anything it minted is reaped at the next start")]
    Abandoned(Duration),
    #[error("no OAuth login to refresh (PAT_CREDENTIAL=oauth-u2m): run `pat-rotator login` once on this host; the rotator picks it up at once")]
    NoLogin,
    #[error("the OAuth login no longer works: {0}; log in again: `pat-rotator login` (the rotator picks the new login up at once)")]
    LoginLost(String),
    #[error("another rotator is refreshing the OAuth login; waiting for its token")]
    RefreshElsewhere,
    #[error("the provider returned a token that had expired by the time its answer arrived (at {expires_at}); check this host's clock (NTP) and the workspace's maximum token lifetime")]
    TooShort { expires_at: DateTime<Utc> },
}

impl RotateError {
    /// A terminal failure makes the service not-ready until something changes.
    pub fn is_terminal(&self) -> bool {
        match self {
            RotateError::Provider(e) => matches!(
                e,
                ProviderError::QuotaExceeded { .. }
                    | ProviderError::Other { .. }
                    | ProviderError::InvalidGrant { .. }
                    | ProviderError::PermissionDenied { .. }
                    | ProviderError::LifetimeTooLong { .. }
            ),
            RotateError::Store(StoreError::Busy { .. }) => false,
            RotateError::Store(StoreError::Backend { transient, .. }) => !transient,
            RotateError::Store(_) => true,
            RotateError::DeadToken { .. }
            | RotateError::NoCredential { .. }
            | RotateError::TooShort { .. }
            | RotateError::NoLogin
            | RotateError::LoginLost(_) => true,
            RotateError::RefreshElsewhere
            | RotateError::LockTimeout(_)
            | RotateError::LockStalled(_)
            | RotateError::Resumed
            | RotateError::Abandoned(_) => false,
        }
    }

    /// The metric label of this failure: one of `metrics::LOOP_FAILURE_KINDS` or the
    /// provider's `ProviderError::KINDS` (a test in `metrics` builds every variant).
    pub fn kind(&self) -> &'static str {
        match self {
            RotateError::Store(_) => "store",
            RotateError::Provider(e) => e.kind(),
            RotateError::DeadToken { .. } => "dead_token",
            RotateError::NoCredential { .. } => "no_credential",
            RotateError::LockTimeout(_)
            | RotateError::LockStalled(_)
            | RotateError::RefreshElsewhere => "lock_timeout",
            RotateError::NoLogin => "no_login",
            RotateError::LoginLost(_) => "login_lost",
            RotateError::Abandoned(_) | RotateError::Resumed => "abandoned",
            RotateError::TooShort { .. } => "too_short",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationOutcome {
    /// This process minted and wrote a new token.
    Rotated {
        token_id: String,
        fingerprint: String,
        expires_at: DateTime<Utc>,
    },
    /// Another rotator (or a manual write) changed the file; its token is used.
    Adopted,
}

/// Notices wall-clock steps: between two looks, the wall clock and the monotonic clock
/// must agree on the time elapsed (within [`STEP_TOLERANCE`]). Wake-ups are planned on the
/// monotonic clock, and each look re-plans; a step is logged and counted.
struct StepDetector {
    wall: DateTime<Utc>,
    mono: tokio::time::Instant,
}

/// A disagreement larger than this between wall and monotonic elapsed time is a step.
const STEP_TOLERANCE: TimeDelta = TimeDelta::seconds(1);

impl StepDetector {
    fn new(wall: DateTime<Utc>) -> Self {
        StepDetector {
            wall,
            mono: tokio::time::Instant::now(),
        }
    }

    fn observe(&mut self, wall: DateTime<Utc>, shared: &Shared) {
        let mono = tokio::time::Instant::now();
        let mono_elapsed = TimeDelta::from_std(mono - self.mono).unwrap_or(TimeDelta::MAX);
        let step = (wall - self.wall) - mono_elapsed;
        if step.abs() > STEP_TOLERANCE {
            shared.metrics.clock_steps.inc();
            warn!(
                event = "clock_step",
                step_s = step.num_milliseconds() as f64 / 1000.0,
                "the wall clock stepped; re-planning (tokens this process minted keep their monotonic deadlines)"
            );
        }
        self.wall = wall;
        self.mono = mono;
    }
}

/// The rotation loop over a provider `P` and a credential store `S` (the config file by
/// default; see [`CredentialStore`]).
pub struct Rotator<P: Provider, S: CredentialStore = Store> {
    shared: Shared,
    provider: Arc<P>,
    policy: PolicyConfig,
    store: S,
    /// A refreshed OAuth login not yet stored (see `grant`).
    unstored: std::sync::Mutex<Option<grant::Unstored>>,
    /// The workspace's maximum token lifetime, once a refusal said it (see `rules`).
    lifetime_cap: std::sync::Mutex<Option<Duration>>,
}

fn secs(d: Duration) -> TimeDelta {
    TimeDelta::milliseconds(d.as_millis() as i64)
}

#[cfg(test)]
impl<P: Provider> Rotator<P, Store> {
    /// The loop over the service's config file, as `cli::store` opens it (the unit tests'
    /// shorthand).
    pub fn new(shared: Shared, provider: Arc<P>) -> Self {
        let store = shared
            .store
            .clone()
            .with_write_wait(shared.config.write_lock_wait);
        Rotator::with_store(shared, provider, store)
    }
}

impl<P: Provider, S: CredentialStore> Rotator<P, S> {
    /// The loop over another credential store.
    pub fn with_store(shared: Shared, provider: Arc<P>, store: S) -> Self {
        let policy = PolicyConfig::from(shared.config.as_ref());
        Rotator {
            shared,
            provider,
            policy,
            store,
            unstored: std::sync::Mutex::new(None),
            lifetime_cap: std::sync::Mutex::new(None),
        }
    }

    fn cfg(&self) -> &Config {
        &self.shared.config
    }

    /// Who this rotator mints as: the store's instance when it names one (the cluster
    /// store's shared identity), else `PAT_INSTANCE`; and whose tokens it may retire.
    fn owner(&self) -> Owner {
        let cfg = self.cfg();
        let instance = self
            .store
            .token_instance()
            .unwrap_or_else(|| cfg.instance.clone());
        let mut owned = self.store.owned_instances();
        if owned.is_empty() {
            owned.push(cfg.instance.clone());
        }
        Owner {
            family: cfg.token_comment.clone(),
            instance,
            owned,
        }
    }

    /// How old a token of ours must be before reaping it: a sibling rotator of this instance
    /// may have minted it and not yet written it.
    fn reap_min_age(&self) -> TimeDelta {
        secs(self.cfg().revoke_grace + self.cfg().http_timeout * 2)
    }

    fn record_failure(&self, e: &RotateError) {
        self.shared.metrics.failed(e.kind());
        let terminal = e.is_terminal();
        if terminal {
            error!(kind = e.kind(), error = %e, "rotation failed");
        } else {
            warn!(kind = e.kind(), error = %e, "rotation attempt failed; will retry");
        }
        self.shared.set_status(|s| {
            s.last_error = Some(e.to_string());
            s.terminal_failure = terminal;
        });
    }

    /// One decision and, if due (or `force`), one rotation; then due revocations.
    pub async fn once(&self, force: bool) -> Result<Option<RotationOutcome>, RotateError> {
        let snap = self.store.snapshot().await?;
        if let Some(w) = snap.host_mismatch(self.cfg().host.as_deref()) {
            warn!("{w}");
        }
        let now = self.shared.now();
        let decision = if force {
            Decision::Rotate(RotateReason::Manual)
        } else {
            policy::converge(&self.observe(&snap, now), &self.policy).decision
        };
        let result = match decision {
            Decision::Restore => {
                self.restore(&snap).await?;
                None
            }
            Decision::Rotate(reason) => Some(self.rotate(reason, &snap).await?),
            Decision::Skip(reason) => {
                info!(reason = reason.as_str(), "rotation not due");
                None
            }
        };
        let epoch = crate::freeze::epoch();
        let snap = self.store.snapshot().await?;
        self.process_revocations(&snap, epoch).await;
        Ok(result)
    }
}

/// The log record of one rotation, a contract other programs read (the soak's verdict and
/// timeline do): with `PAT_LOG_FORMAT=json`, one line whose `event` is `"rotated"` and whose
/// fields are these. Never a token: `token` is the new token's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub(crate) struct RotatedEvent {
    pub event: String,
    /// Why: the metric label (`interval`, `forced_near_expiry`, `unknown_expiry`, `manual`).
    pub reason: String,
    /// The new token's fingerprint.
    pub token: String,
    pub token_id: String,
    /// From the start of the rotation to the new token on disk.
    pub latency_ms: u64,
    pub started_at_ms: i64,
    pub written_at_ms: i64,
}

impl RotatedEvent {
    pub(crate) const EVENT: &'static str = "rotated";

    /// The record in one JSON log line, if it is one.
    pub fn parse(line: &str) -> Option<RotatedEvent> {
        serde_json::from_str::<RotatedEvent>(line)
            .ok()
            .filter(|e| e.event == Self::EVENT)
    }
}
