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

use crate::backoff::Backoff;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::{self, Decision, PolicyConfig, RotateReason};
use crate::provider::{Provider, ProviderError};
use crate::sessions::Sessions;
use crate::store::{FileVersion, Rotation, Snapshot, Store, StoreError, SwapOutcome};
use crate::Token;
use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("provider: {0}")]
    Provider(#[from] ProviderError),
    #[error("every credential was rejected (the token in {file}{bootstrap}); seed a valid token with `pat-rotator set` (token on stdin) or replace the bootstrap secret: rotation resumes by itself within a second of a valid token appearing in the file")]
    DeadToken {
        file: String,
        bootstrap: &'static str,
    },
    #[error("no token to authenticate with: {file} has none and DATABRICKS_TOKEN is not set; seed one with `pat-rotator set` or set DATABRICKS_TOKEN")]
    NoCredential { file: String },
    #[error("another rotator held the rotation lock for longer than {0:?}; it may be stuck")]
    LockTimeout(Duration),
    #[error("shutdown abandoned a rotation still running after {0:?}; anything it minted is reaped at the next start")]
    Abandoned(Duration),
    #[error("the provider returned a token that expires at {expires_at}, inside the rotation threshold; check PAT_TOKEN_LIFETIME against the workspace's maximum token lifetime")]
    TooShort { expires_at: DateTime<Utc> },
    #[error("background task failed: {0}")]
    Join(String),
}

impl RotateError {
    /// A terminal failure makes the service not-ready until something changes.
    pub fn is_terminal(&self) -> bool {
        match self {
            RotateError::Provider(e) => matches!(
                e,
                ProviderError::QuotaExceeded { .. } | ProviderError::Other { .. }
            ),
            RotateError::Store(StoreError::Busy { .. }) => false,
            RotateError::Store(_) => true,
            RotateError::DeadToken { .. }
            | RotateError::NoCredential { .. }
            | RotateError::TooShort { .. } => true,
            RotateError::LockTimeout(_) | RotateError::Abandoned(_) | RotateError::Join(_) => false,
        }
    }

    /// The metric label of this failure (one of [`FAILURE_KINDS`]).
    pub fn kind(&self) -> &'static str {
        match self {
            RotateError::Store(_) => "store",
            RotateError::Provider(e) => e.kind(),
            RotateError::DeadToken { .. } => "dead_token",
            RotateError::NoCredential { .. } => "no_credential",
            RotateError::LockTimeout(_) => "lock_timeout",
            RotateError::Abandoned(_) => "abandoned",
            RotateError::TooShort { .. } => "too_short",
            RotateError::Join(_) => "internal",
        }
    }
}

/// Every value [`RotateError::kind`] can take (the provider's kinds included), so the
/// failure counters exist at 0 from the start.
pub const FAILURE_KINDS: &[&str] = &[
    "store",
    "dead_token",
    "no_credential",
    "lock_timeout",
    "abandoned",
    "too_short",
    "internal",
    "invalid_token",
    "quota_exceeded",
    "rate_limited",
    "not_found",
    "server_error",
    "network",
    "timeout",
    "malformed",
    "other",
];

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

/// What the loop last did, for `/healthz`, `/readyz` and `status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoopStatus {
    pub alive: bool,
    pub heartbeat: Option<DateTime<Utc>>,
    pub next_wake: Option<DateTime<Utc>>,
    pub last_decision: Option<String>,
    pub last_rotation: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub terminal_failure: bool,
}

/// Everything the loop and the servers share.
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    pub store: Store,
    pub sessions: Sessions,
    pub metrics: Metrics,
    pub status: Arc<Mutex<LoopStatus>>,
    /// The wall clock; tests inject one that follows tokio's paused time.
    pub clock: Clock,
    /// The last snapshot and the versions of the config and state files it was read at:
    /// the metadata endpoint serves every request from it at the cost of two `stat`s.
    snapshots: Arc<Mutex<Option<(SnapshotKey, Snapshot)>>>,
}

type SnapshotKey = (Option<FileVersion>, Option<FileVersion>);

/// Where "now" comes from.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

impl Shared {
    pub fn new(config: Config) -> Result<Shared, StoreError> {
        let store = Store::open(&config.config_file, &config.profile)?;
        Ok(Shared {
            sessions: Sessions::new(config.session_ttl),
            config: Arc::new(config),
            store,
            metrics: Metrics::new(),
            status: Arc::new(Mutex::new(LoopStatus::default())),
            clock: Arc::new(Utc::now),
            snapshots: Arc::new(Mutex::new(None)),
        })
    }

    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    pub fn status(&self) -> LoopStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_status(&self, f: impl FnOnce(&mut LoopStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The token, host and state: from the cache when neither file changed since it was
    /// read (two `stat`s), else read under the shared lock off the async runtime. Files are
    /// only ever replaced whole, so an unchanged version is unchanged content.
    pub async fn read(&self) -> Result<Snapshot, StoreError> {
        let paths = self.store.paths();
        let key = (file_key(&paths.config), file_key(&paths.state));
        if let Some((cached_key, snap)) = self
            .snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            if *cached_key == key {
                return Ok(snap.clone());
            }
        }
        let store = self.store.clone();
        let snap = match tokio::task::spawn_blocking(move || store.read()).await {
            Ok(r) => r?,
            Err(e) => {
                return Err(StoreError::Io {
                    action: "read",
                    path: self.store.paths().config.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            }
        };
        // Keyed by the versions seen before the read: the snapshot is at least that new, so
        // a change in between is a miss next time, never a stale hit.
        *self.snapshots.lock().unwrap_or_else(|p| p.into_inner()) = Some((key, snap.clone()));
        Ok(snap)
    }

    /// Ready: a token with known expiry above the threshold is on disk and the last attempt
    /// did not fail terminally. The reason is for humans.
    pub fn readiness(&self, snap: &Snapshot, now: DateTime<Utc>) -> Result<(), String> {
        let status = self.status();
        if status.terminal_failure {
            return Err(status
                .last_error
                .unwrap_or_else(|| "the last rotation failed".into()));
        }
        let Some(times) = snap.times() else {
            return Err(if snap.token.is_none() {
                "no token on disk yet".into()
            } else {
                "the expiry of the token on disk is unknown; a rotation is due".into()
            });
        };
        // The threshold the recording rotator used: `status` runs with its caller's
        // environment, which may not be the service's.
        let threshold = snap
            .state
            .threshold_secs
            .map(Duration::from_secs)
            .unwrap_or_else(|| self.config.threshold());
        let threshold = TimeDelta::seconds(threshold.as_secs() as i64);
        if times.expires_at - now <= threshold {
            return Err(format!(
                "the token on disk expires at {} (within the {}s threshold)",
                times.expires_at,
                threshold.num_seconds()
            ));
        }
        Ok(())
    }

    /// The one rule for handing a token to a reader (metadata endpoint, proxy, `token`):
    /// the token on disk with the time until which it may be used. That time is
    /// `min(real expiry, now + PAT_REVOKE_GRACE)`: an old token is revoked no earlier than
    /// one second after `written_at + grace`, and `now` is taken by the caller before the
    /// snapshot was read, so no token is ever revoked before an advertised expiry. A token
    /// set by hand and accepted by the provider (expiry unknown) is served for the grace only,
    /// within [`SEED_TRUST`] of its check; anything else unknown or expired is refused.
    pub fn servable(&self, snap: &Snapshot, now: DateTime<Utc>) -> Result<Servable, NotServable> {
        let token = snap.token.clone().ok_or(NotServable::NoToken)?;
        let horizon = now + TimeDelta::from_std(self.config.revoke_grace).unwrap_or_default();
        let until = match snap.state.times_for(Some(&token)) {
            Some(times) if times.expires_at <= now => return Err(NotServable::Expired),
            Some(times) => times.expires_at.min(horizon),
            None => match snap.state.verified_seed(&token) {
                Some(at) if now - at <= SEED_TRUST => horizon,
                _ => return Err(NotServable::UnknownExpiry),
            },
        };
        Ok(Servable { token, until })
    }

    pub fn update_gauges(&self, snap: &Snapshot, now: DateTime<Utc>) {
        let m = &self.metrics;
        match snap.times() {
            Some(t) => {
                m.token_expiry.set(t.expires_at.timestamp());
                m.seconds_to_expiry
                    .set((t.expires_at - now).num_seconds().max(0));
            }
            None => {
                m.token_expiry.set(0);
                m.seconds_to_expiry.set(0);
            }
        }
        m.pending_revocations
            .set(snap.state.pending_revocations.len() as i64);
        m.active_sessions.set(self.sessions.active() as i64);
        m.ready.set(i64::from(self.readiness(snap, now).is_ok()));
    }
}

/// A token a reader may be handed, and until when.
#[derive(Debug, Clone)]
pub struct Servable {
    pub token: Token,
    pub until: DateTime<Utc>,
}

/// Why no token may be handed out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotServable {
    #[error("no token on disk yet")]
    NoToken,
    #[error("the token on disk has expired; see /readyz on the rotator")]
    Expired,
    #[error("the expiry of the token on disk is not known yet; a rotation is due")]
    UnknownExpiry,
}

/// How long after the provider accepted a manually set token it is served without a known
/// expiry; the rotator replaces such a token at once, so this only bridges a slow mint or
/// a provider outage right after `pat-rotator set`.
pub const SEED_TRUST: TimeDelta = TimeDelta::minutes(5);

pub struct Rotator<P: Provider> {
    shared: Shared,
    provider: Arc<P>,
    policy: PolicyConfig,
}

fn secs(d: Duration) -> TimeDelta {
    TimeDelta::milliseconds(d.as_millis() as i64)
}

impl<P: Provider> Rotator<P> {
    pub fn new(shared: Shared, provider: Arc<P>) -> Self {
        let policy = PolicyConfig::from(shared.config.as_ref());
        Rotator {
            shared,
            provider,
            policy,
        }
    }

    fn cfg(&self) -> &Config {
        &self.shared.config
    }

    /// How old a token of ours must be before reaping it: a sibling rotator of this instance
    /// may have minted it and not yet written it.
    fn reap_min_age(&self) -> TimeDelta {
        secs(self.cfg().revoke_grace + self.cfg().http_timeout * 2)
    }

    /// The service loop; returns when `cancel` fires.
    pub async fn run(&self, cancel: CancellationToken) {
        self.shared.set_status(|s| s.alive = true);
        info!(config = %self.cfg().config_file.display(), profile = %self.cfg().profile, instance = %self.cfg().instance, "rotation loop started");
        if let Ok(snap) = self.shared.read().await {
            if let Some(w) = snap.host_mismatch(self.cfg().host.as_deref()) {
                warn!("{w}");
            }
        }
        let mut failures = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        // Reap at start, and once more after the reap age: orphans a crash left just before
        // this start are too young to reap at first.
        let started = self.shared.now();
        let mut reaps = vec![
            started,
            started + self.reap_min_age() + TimeDelta::seconds(1),
        ];
        // The token this loop last saw, to tell "someone else replaced it" apart.
        let mut last_seen: Option<String> = None;
        // Whether this iteration is one of the policy's decision points (start, its planned
        // wake-up, a session change, a file change while failing) rather than a wake-up for a
        // revocation or the re-plan right after our own rotation: only those count as skips.
        let mut decision_point = true;
        let mut planned: Option<DateTime<Utc>> = None;
        let config = self.shared.store.paths().config.clone();
        let watch = FileWatch::new(&config);
        'run: loop {
            if cancel.is_cancelled() {
                break;
            }
            // Taken before the read: a change after it is seen as a change at the wait below.
            let seen_key = file_key(&config);
            let now = self.shared.now();
            self.shared.set_status(|s| s.heartbeat = Some(now));
            if reaps.first().is_some_and(|at| *at <= now) {
                if self.reap_orphans().await {
                    reaps.remove(0);
                } else {
                    // Skipped (expiry unknown, or a rotation elsewhere): try again once the
                    // rotation this iteration is about to make has recorded the current token.
                    reaps[0] = now + TimeDelta::seconds(5);
                }
            }
            let mut failing = false;
            let mut wake;
            match self.shared.read().await {
                Err(e) => {
                    error!(error = %e, "cannot read the config file");
                    self.record_failure(&RotateError::Store(e));
                    failing = true;
                    wake = now + secs(failures.next_delay(None));
                }
                Ok(snap) => {
                    if let Some(e) = &snap.state_error {
                        warn!(error = %e, path = %self.shared.store.paths().state.display(), "the state file is unreadable; treating the expiry as unknown (it is rewritten at the next rotation)");
                    }
                    let seen = snap.token.as_ref().map(Token::fingerprint);
                    if last_seen.is_some() && seen != last_seen {
                        info!(event = "reload", token = %seen.as_deref().unwrap_or("none"), "the config file holds a token this rotator did not write (another rotator or a manual write); using it");
                    }
                    last_seen = seen;
                    let plan = policy::decide(
                        now,
                        snap.times(),
                        &self.policy,
                        self.shared.sessions.active(),
                    );
                    wake = plan.next_wake;
                    planned = Some(plan.next_wake);
                    self.shared
                        .set_status(|s| s.last_decision = Some(plan.decision.label()));
                    match plan.decision {
                        Decision::Rotate(reason) => {
                            match self.rotate_cancellable(reason, &snap, &cancel).await {
                                Ok(outcome) => {
                                    last_seen = match outcome {
                                        RotationOutcome::Rotated { fingerprint, .. } => {
                                            Some(fingerprint)
                                        }
                                        RotationOutcome::Adopted => None,
                                    };
                                    if failures.attempts() > 0 {
                                        info!(
                                            failed_attempts = failures.attempts(),
                                            "recovered: rotation succeeded after failures"
                                        );
                                    }
                                    failures.reset();
                                    decision_point = false;
                                    continue;
                                }
                                Err(e) => {
                                    self.record_failure(&e);
                                    failing = true;
                                    let mut delay = failures.next_delay(match &e {
                                        RotateError::Provider(p) => p.retry_after(),
                                        _ => None,
                                    });
                                    // While the token still lives, keep several tries before it dies.
                                    if let Some(t) = snap.times().filter(|t| t.expires_at > now) {
                                        let quarter =
                                            ((t.expires_at - now) / 4).to_std().unwrap_or_default();
                                        delay = delay.min(quarter.max(Duration::from_secs(1)));
                                    }
                                    // A local write failure costs no provider call to retry
                                    // (nothing is minted until the write can happen), so a
                                    // fixed mount or freed disk is noticed within seconds.
                                    if matches!(e, RotateError::Store(_)) {
                                        delay = delay.min(LOCAL_RETRY);
                                    }
                                    wake = now + secs(delay);
                                }
                            }
                        }
                        Decision::Skip(reason) if decision_point => {
                            self.shared.metrics.skipped(reason.as_str());
                            info!(reason = reason.as_str(), sessions = self.shared.sessions.active(), next_wake = %plan.next_wake, "rotation not due; skipping");
                            if self.shared.status().terminal_failure {
                                info!("recovered: the token on disk is valid again");
                            }
                            self.shared.set_status(|s| {
                                s.terminal_failure = false;
                                s.last_error = None;
                            });
                        }
                        Decision::Skip(_) => {
                            debug!(next_wake = %plan.next_wake, "not a decision point; nothing due")
                        }
                    }
                    if let Some(next_revocation) = self.process_revocations(&snap).await {
                        wake = wake.min(next_revocation);
                    }
                    self.shared.update_gauges(&snap, self.shared.now());
                }
            }
            if let Some(r) = reaps.first() {
                wake = wake.min(*r);
            }
            self.shared.set_status(|s| s.next_wake = Some(wake));
            let sleep_for = (wake - self.shared.now()).to_std().unwrap_or_default();
            let sleep = tokio::time::sleep(sleep_for);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break 'run,
                    _ = &mut sleep => {
                        decision_point = planned == Some(wake);
                        break;
                    }
                    _ = self.shared.sessions.changed() => {
                        debug!("session change; deciding again");
                        decision_point = true;
                        break;
                    }
                    // Our own writes also raise events; only a file that differs from the one
                    // this iteration read is news.
                    _ = watch.changed() => {
                        if file_key(&config) != seen_key {
                            debug!("the config file was replaced; deciding again");
                            failures.reset();
                            decision_point = true;
                            break;
                        }
                    }
                    _ = wait_for_file_change(&config, seen_key), if failing && !watch.is_active() => {
                        info!("the config file changed while failing; reloading");
                        failures.reset();
                        decision_point = true;
                        break;
                    }
                }
            }
        }
        self.shared.set_status(|s| s.alive = false);
        info!("rotation loop stopped");
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

    /// A rotation that SIGTERM does not cut in half: once started it may finish within one
    /// HTTP timeout (so a minted token is written and recorded); past that it is abandoned
    /// and anything it minted is reaped at the next start.
    async fn rotate_cancellable(
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
                info!("shutdown requested during a rotation; letting it finish");
                match tokio::time::timeout(self.cfg().http_timeout + Duration::from_secs(2), fut).await {
                    Ok(r) => r,
                    Err(_) => Err(RotateError::Abandoned(self.cfg().http_timeout + Duration::from_secs(2))),
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
        let won = self
            .shared
            .store
            .try_rotation(async || {
                // Under the rotation lock: re-read, a winner may have finished just before.
                let fresh = self.shared.read().await?;
                if fresh.token != snap.token {
                    info!(
                        "the config file changed before this rotation started; adopting its token"
                    );
                    return Ok(RotationOutcome::Adopted);
                }
                self.mint_and_write(reason, fresh).await
            })
            .await?;
        if let Some(result) = won {
            return result;
        }
        self.shared.metrics.lock_contention.inc();
        info!(
            reason = reason.as_str(),
            "another rotator holds the rotation lock; waiting for its token"
        );
        let limit = self.cfg().write_lock_wait + self.cfg().http_timeout * 4;
        if !self.shared.store.wait_rotation_free(limit).await? {
            return Err(RotateError::LockTimeout(limit));
        }
        info!("reloaded the config file after another rotator's rotation");
        Ok(RotationOutcome::Adopted)
    }

    async fn mint_and_write(
        &self,
        reason: RotateReason,
        snap: Snapshot,
    ) -> Result<RotationOutcome, RotateError> {
        let cfg = self.cfg();
        let file = cfg.config_file.display().to_string();
        // Mint only what can be written: a token minted into a read-only or full directory
        // would only be revoked again, on every retry.
        let store = self.shared.store.clone();
        tokio::task::spawn_blocking(move || store.check_writable())
            .await
            .map_err(|e| RotateError::Join(e.to_string()))??;
        let bootstrap = cfg.bootstrap_token.clone();
        let mut expected = snap.token.clone();
        let started = self.shared.now();
        // A token our own record says has expired is never sent (after a long stop, say):
        // straight to the bootstrap token.
        let mut tried: Vec<Token> = snap
            .token
            .clone()
            .filter(|_| snap.times().is_some_and(|t| t.expires_at <= started))
            .into_iter()
            .collect();
        if !tried.is_empty() {
            info!("the token in the file has expired by our record; not using it to mint");
        }
        let mut auth = match expected
            .clone()
            .filter(|t| !tried.contains(t))
            .or_else(|| bootstrap.clone().filter(|b| !tried.contains(b)))
        {
            Some(t) => t,
            None if tried.is_empty() => return Err(RotateError::NoCredential { file }),
            None => {
                return Err(RotateError::DeadToken {
                    file,
                    bootstrap: "; DATABRICKS_TOKEN is not set",
                })
            }
        };
        let comment = cfg.token_comment_full();
        let timer = std::time::Instant::now();
        let minted = loop {
            match self
                .provider
                .mint(&auth, cfg.token_lifetime, &comment)
                .await
            {
                Ok(m) => break m,
                Err(ProviderError::InvalidToken { status, message }) => {
                    warn!(status, message = %message, token = %auth, "the provider rejected the token used to mint; looking for another");
                    tried.push(auth.clone());
                    let reread = self.shared.read().await?;
                    if let Some(t) = reread.token.clone().filter(|t| !tried.contains(t)) {
                        info!(token = %t, "the config file holds another token; retrying with it");
                        expected = reread.token;
                        auth = t;
                        continue;
                    }
                    expected = reread.token;
                    if let Some(b) = bootstrap.clone().filter(|b| !tried.contains(b)) {
                        info!(token = %b, "retrying with the bootstrap token DATABRICKS_TOKEN");
                        auth = b;
                        continue;
                    }
                    return Err(RotateError::DeadToken {
                        file,
                        bootstrap: if bootstrap.is_some() {
                            " and DATABRICKS_TOKEN"
                        } else {
                            "; DATABRICKS_TOKEN is not set"
                        },
                    });
                }
                Err(e) => return Err(e.into()),
            }
        };
        let now = self.shared.now();
        let expires_at = local_expiry(started, &minted.info, cfg.token_lifetime);
        self.note_clock_skew(started, now, &minted.info);
        if expires_at - now <= secs(cfg.threshold()) {
            // Would rotate again at once, forever: refuse and revoke it.
            let _ = self
                .provider
                .revoke(&minted.token, &minted.info.token_id)
                .await;
            return Err(RotateError::TooShort { expires_at });
        }
        // The token our state records as current is replaced, whether or not it is still in
        // the file (a deleted or hand-edited file loses it there, not at the provider).
        // The token our state records as current is replaced, whether or not it is still in
        // the file (a deleted or hand-edited file loses it there, not at the provider).
        let rotation = Rotation {
            threshold: Some(cfg.threshold()),
            grace: cfg.revoke_grace,
            replaces: snap.state.replaced_current(now),
            ..Rotation::new(minted.info.token_id.clone(), expires_at, &cfg.instance)
        };
        let store = self.shared.store.clone();
        let (new_token, host, wait) = (minted.token.clone(), cfg.host.clone(), cfg.write_lock_wait);
        let (expected_for_swap, clock) = (expected.clone(), self.shared.clock.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            store.swap(
                expected_for_swap.as_ref(),
                &new_token,
                host.as_deref(),
                wait,
                Some(&rotation),
                &*clock,
            )
        })
        .await
        .map_err(|e| RotateError::Join(e.to_string()))
        .and_then(|r| r.map_err(RotateError::from));
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                // Not written: revoke what we minted so it does not leak.
                self.revoke_unused(&minted.token, &minted.info.token_id, &auth)
                    .await;
                return Err(e);
            }
        };
        match outcome {
            SwapOutcome::Swapped => {
                let latency_ms = timer.elapsed().as_millis() as u64;
                self.shared.metrics.rotated(reason.as_str());
                self.shared.set_status(|s| {
                    s.last_rotation = Some(self.shared.now());
                    s.last_error = None;
                    s.terminal_failure = false;
                });
                info!(
                    event = "rotated",
                    reason = reason.as_str(),
                    token = %minted.token,
                    token_id = %minted.info.token_id,
                    old_token = %expected.as_ref().map(Token::fingerprint).unwrap_or_else(|| "none".into()),
                    expires_at = %expires_at,
                    latency_ms,
                    started_at_ms = started.timestamp_millis(),
                    written_at_ms = self.shared.now().timestamp_millis(),
                    "rotated: new token on disk"
                );
                if let Some(old) = expected.as_ref() {
                    self.run_hook(
                        &minted.token,
                        &minted.info.token_id,
                        expires_at,
                        snap.state.token_id_for(old).map(str::to_string),
                    )
                    .await;
                }
                Ok(RotationOutcome::Rotated {
                    token_id: minted.info.token_id,
                    fingerprint: minted.token.fingerprint(),
                    expires_at,
                })
            }
            SwapOutcome::Conflict { current } => {
                warn!(file_token = %current.as_ref().map(Token::fingerprint).unwrap_or_else(|| "none".into()), "the config file changed during the rotation (a manual write?); revoking the unused new token and adopting the file's");
                self.revoke_unused(&minted.token, &minted.info.token_id, &auth)
                    .await;
                Ok(RotationOutcome::Adopted)
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
        if skew.abs() > LARGE_SKEW {
            warn!(
                skew_s = skew.num_milliseconds() as f64 / 1000.0,
                "the provider's clock differs from ours; expiries are kept on our clock, but check NTP on this host"
            );
        }
    }

    async fn revoke_unused(&self, token: &Token, token_id: &str, fallback_auth: &Token) {
        let first = self.provider.revoke(token, token_id).await;
        let result = match first {
            Err(ProviderError::InvalidToken { .. }) => {
                self.provider.revoke(fallback_auth, token_id).await
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

    /// Runs PAT_ON_ROTATE. On failure the old token is not revoked early: it lives out its
    /// lifetime, because the consumer that was to be told may still hold it.
    async fn run_hook(
        &self,
        token: &Token,
        token_id: &str,
        expires_at: DateTime<Utc>,
        old_id: Option<String>,
    ) {
        let Some(argv) = self.cfg().on_rotate.clone() else {
            return;
        };
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("PAT_TOKEN_FINGERPRINT", token.fingerprint())
            .env("PAT_TOKEN_ID", token_id)
            .env("PAT_TOKEN_EXPIRES_AT", expires_at.to_rfc3339())
            .env(
                "PAT_TOKEN_EXPIRES_AT_EPOCH",
                expires_at.timestamp().to_string(),
            )
            .env("DATABRICKS_CONFIG_FILE", &self.cfg().config_file)
            .env_remove("DATABRICKS_TOKEN")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let result = tokio::time::timeout(self.cfg().http_timeout, cmd.status()).await;
        let failure = match result {
            Ok(Ok(status)) if status.success() => None,
            Ok(Ok(status)) => Some(format!("exited with {status}")),
            Ok(Err(e)) => Some(format!("could not start {:?}: {e}", argv[0])),
            Err(_) => Some(format!(
                "did not finish within {:?}",
                self.cfg().http_timeout
            )),
        };
        let Some(why) = failure else {
            debug!("PAT_ON_ROTATE succeeded");
            return;
        };
        self.shared.metrics.hook_failures.inc();
        warn!(error = %why, "PAT_ON_ROTATE failed; the old token will not be revoked early and lives out its lifetime");
        if let Some(old_id) = old_id {
            let store = self.shared.store.clone();
            let wait = self.cfg().write_lock_wait;
            let _ = tokio::task::spawn_blocking(move || {
                store.update_state(wait, |st| {
                    for p in st
                        .pending_revocations
                        .iter_mut()
                        .filter(|p| p.token_id == old_id)
                    {
                        if let Some(exp) = p.expires_at {
                            p.not_before = p.not_before.max(exp);
                        }
                    }
                })
            })
            .await;
        }
    }

    /// Revokes pending tokens whose grace has passed; returns the next due time.
    async fn process_revocations(&self, snap: &Snapshot) -> Option<DateTime<Utc>> {
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
        let Some(auth) = snap
            .token
            .clone()
            .filter(|_| snap.times().is_some_and(|t| t.expires_at > now))
        else {
            return next;
        };
        let mut done = Vec::new();
        for p in due {
            if p.expires_at.is_some_and(|e| e <= now) {
                done.push(p.token_id.clone());
                continue;
            }
            match self.provider.revoke(&auth, &p.token_id).await {
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
            let store = self.shared.store.clone();
            let wait = self.cfg().write_lock_wait;
            let r = tokio::task::spawn_blocking(move || {
                store.update_state(wait, |st| {
                    st.pending_revocations
                        .retain(|p| !done.contains(&p.token_id))
                })
            })
            .await;
            if let Ok(Err(e)) = r {
                warn!(error = %e, "could not update the state file after revoking");
            }
        }
        next
    }

    /// Revokes tokens carrying this instance's comment that are neither current nor pending
    /// and older than the reap age (left by a crash). Never touches other tokens. Runs under
    /// the rotation lock so that a sibling's rotation cannot change "current" meanwhile.
    /// Returns `false` when it could not look (to be tried again).
    pub async fn reap_orphans(&self) -> bool {
        match self
            .shared
            .store
            .try_rotation(async || self.reap_orphans_locked().await)
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

    async fn reap_orphans_locked(&self) -> bool {
        let Ok(snap) = self.shared.read().await else {
            return false;
        };
        let now = self.shared.now();
        let Some(auth) = snap
            .token
            .clone()
            .filter(|_| snap.times().is_some_and(|t| t.expires_at > now))
        else {
            debug!("current token unknown or expired; orphan reaping postponed");
            return false;
        };
        let comment = self.cfg().token_comment_full();
        let mut keep: Vec<&str> = snap
            .state
            .pending_revocations
            .iter()
            .map(|p| p.token_id.as_str())
            .collect();
        if let Some(id) = snap.state.token_id.as_deref() {
            keep.push(id);
        }
        let infos = match self.provider.list(&auth).await {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "cannot list tokens; orphan reaping postponed");
                return false;
            }
        };
        let min_age = self.reap_min_age();
        for info in infos.iter().filter(|i| {
            i.comment == comment
                && !keep.contains(&i.token_id.as_str())
                && now - i.creation_time >= min_age
        }) {
            match self.provider.revoke(&auth, &info.token_id).await {
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

    /// One decision and, if due (or `force`), one rotation; then due revocations.
    pub async fn once(&self, force: bool) -> Result<Option<RotationOutcome>, RotateError> {
        let snap = self.shared.read().await?;
        if let Some(w) = snap.host_mismatch(self.cfg().host.as_deref()) {
            warn!("{w}");
        }
        let now = self.shared.now();
        let decision = if force {
            Decision::Rotate(RotateReason::Manual)
        } else {
            policy::decide(
                now,
                snap.times(),
                &self.policy,
                self.shared.sessions.active(),
            )
            .decision
        };
        let result = match decision {
            Decision::Rotate(reason) => Some(self.rotate(reason, &snap).await?),
            Decision::Skip(reason) => {
                info!(reason = reason.as_str(), "rotation not due");
                None
            }
        };
        let snap = self.shared.read().await?;
        self.process_revocations(&snap).await;
        Ok(result)
    }
}

/// A minted token's expiry on the local clock: the local time the create request was sent
/// plus the lifetime the provider granted (`expiry_time - creation_time`, both on its clock),
/// so it is never later than the truth whatever the skew between the clocks. Without an
/// expiry from the provider, the lifetime asked for.
pub fn local_expiry(
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
pub fn clock_skew(
    sent_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    info: &crate::provider::TokenInfo,
) -> TimeDelta {
    let midpoint = sent_at + (received_at - sent_at) / 2;
    info.creation_time - midpoint
}

/// The longest wait before retrying after a local (store) failure.
const LOCAL_RETRY: Duration = Duration::from_secs(5);

/// Skew above this is logged as a warning: expiries stay right (they are on our clock), but
/// anything else comparing the two clocks (other tools, Azure's "expiring within 30 s"
/// refusal) is off by as much.
const LARGE_SKEW: TimeDelta = TimeDelta::seconds(5);

fn file_key(path: &std::path::Path) -> Option<FileVersion> {
    FileVersion::of_path(path).ok().flatten()
}

/// Wakes the loop when the config file is replaced or written by someone else
/// (`pat-rotator set`, a sibling rotator). inotify on the file's directory (a rename brings a
/// new inode, so the file itself cannot be watched), written against libc on purpose: the
/// `notify` crate subscribes to every open and read in the directory, and a rotator serving
/// SDK requests reads its own files many times a second; here the kernel delivers only
/// creations, renames, deletions and closes after writing. Without it, changes are seen at
/// the next planned wake-up.
struct FileWatch {
    fd: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
    name: std::ffi::OsString,
}

impl FileWatch {
    fn new(config: &std::path::Path) -> FileWatch {
        let name = config
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        let dir = match config.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let _ = std::fs::create_dir_all(&dir);
        match Self::open(&dir) {
            Ok(fd) => FileWatch { fd: Some(fd), name },
            Err(e) => {
                warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; changes by other processes are seen at the next planned wake-up");
                FileWatch { fd: None, name }
            }
        }
    }

    fn open(
        dir: &std::path::Path,
    ) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain syscalls; the fd is owned by OwnedFd from here on.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let path =
            std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        let mask = libc::IN_CREATE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE
            | libc::IN_CLOSE_WRITE;
        // SAFETY: `path` is a valid C string for the duration of the call.
        if unsafe { libc::inotify_add_watch(raw, path.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is open and owned by the AsyncFd for its whole life.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)
    }

    fn is_active(&self) -> bool {
        self.fd.is_some()
    }

    /// Resolves on an event for the config file's name. Cancel-safe: events are read and
    /// judged within one poll.
    async fn changed(&self) {
        use std::os::fd::AsRawFd;
        let Some(fd) = &self.fd else {
            return std::future::pending().await;
        };
        let mut buf = [0u8; 4096];
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return std::future::pending().await;
            };
            let read = guard.try_io(|inner| {
                // SAFETY: reads into a buffer we own, at most its length.
                let n =
                    unsafe { libc::read(inner.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            if let Ok(Ok(n)) = read {
                if event_names(&buf[..n]).any(|name| name == self.name.as_encoded_bytes()) {
                    return;
                }
            }
        }
    }
}

/// The file names in a buffer of `struct inotify_event`s (16-byte header, then a
/// NUL-padded name of `len` bytes).
fn event_names(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        let header = buf.get(offset..offset + 16)?;
        let len = u32::from_ne_bytes([header[12], header[13], header[14], header[15]]) as usize;
        let name = buf.get(offset + 16..offset + 16 + len)?;
        offset += 16 + len;
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        Some(&name[..end])
    })
}

/// Resolves when the file's identity changes: the fallback while failing when no watcher
/// could be set up (a change is the fastest way back after `pat-rotator set`).
async fn wait_for_file_change(path: &std::path::Path, initial: Option<FileVersion>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if file_key(path) != initial {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The loop itself in paused tokio time: a day passes in milliseconds, against an
    //! in-memory provider that rejects minting with a dead token, as Databricks does.

    use super::*;
    use crate::provider::{MintedToken, TokenInfo};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct FakeToken {
        id: String,
        expires_at: Option<DateTime<Utc>>,
        revoked: bool,
        comment: String,
        created: DateTime<Utc>,
    }

    struct FakeProvider {
        clock: Clock,
        tokens: Mutex<HashMap<String, FakeToken>>,
        next: AtomicU64,
        mints: AtomicU64,
        dead_auth: AtomicU64,
        /// The provider's clock minus ours: shifts every time it reports, not when its
        /// tokens die (a skewed clock moves both ends of a lifetime alike).
        skew: Mutex<TimeDelta>,
    }

    impl FakeProvider {
        fn new(clock: Clock) -> Self {
            let mut tokens = HashMap::new();
            tokens.insert(
                "boot".to_string(),
                FakeToken {
                    id: "boot".into(),
                    expires_at: None,
                    revoked: false,
                    comment: "bootstrap".into(),
                    created: clock(),
                },
            );
            FakeProvider {
                clock,
                tokens: Mutex::new(tokens),
                next: AtomicU64::new(0),
                mints: AtomicU64::new(0),
                dead_auth: AtomicU64::new(0),
                skew: Mutex::new(TimeDelta::zero()),
            }
        }

        fn check(&self, auth: &Token) -> Result<(), ProviderError> {
            let now = (self.clock)();
            let tokens = self.tokens.lock().unwrap();
            match tokens.get(auth.expose()) {
                Some(t) if !t.revoked && t.expires_at.is_none_or(|e| e > now) => Ok(()),
                Some(_) => {
                    self.dead_auth.fetch_add(1, Ordering::SeqCst);
                    Err(ProviderError::InvalidToken {
                        status: 403,
                        message: "Invalid access token.".into(),
                    })
                }
                None => Err(ProviderError::InvalidToken {
                    status: 403,
                    message: "Invalid access token.".into(),
                }),
            }
        }
    }

    impl Provider for FakeProvider {
        async fn mint(
            &self,
            auth: &Token,
            lifetime: Duration,
            comment: &str,
        ) -> Result<MintedToken, ProviderError> {
            self.check(auth)?;
            let n = self.next.fetch_add(1, Ordering::SeqCst);
            self.mints.fetch_add(1, Ordering::SeqCst);
            let now = (self.clock)();
            let expires_at = now + secs(lifetime);
            let value = format!("tok-{n}");
            self.tokens.lock().unwrap().insert(
                value.clone(),
                FakeToken {
                    id: format!("id-{n}"),
                    expires_at: Some(expires_at),
                    revoked: false,
                    comment: comment.into(),
                    created: now,
                },
            );
            let skew = *self.skew.lock().unwrap();
            Ok(MintedToken {
                token: Token::new(value),
                info: TokenInfo {
                    token_id: format!("id-{n}"),
                    creation_time: now + skew,
                    expires_at: Some(expires_at + skew),
                    comment: comment.into(),
                },
            })
        }

        async fn revoke(&self, auth: &Token, token_id: &str) -> Result<(), ProviderError> {
            self.check(auth)?;
            let mut tokens = self.tokens.lock().unwrap();
            match tokens.values_mut().find(|t| t.id == token_id && !t.revoked) {
                Some(t) => {
                    t.revoked = true;
                    Ok(())
                }
                None => Err(ProviderError::NotFound {
                    message: token_id.into(),
                }),
            }
        }

        async fn list(&self, auth: &Token) -> Result<Vec<TokenInfo>, ProviderError> {
            self.check(auth)?;
            let now = (self.clock)();
            Ok(self
                .tokens
                .lock()
                .unwrap()
                .values()
                .filter(|t| !t.revoked && t.expires_at.is_none_or(|e| e > now))
                .map(|t| TokenInfo {
                    token_id: t.id.clone(),
                    creation_time: t.created,
                    expires_at: t.expires_at,
                    comment: t.comment.clone(),
                })
                .collect())
        }

        async fn verify(&self, token: &Token) -> Result<String, ProviderError> {
            self.check(token).map(|_| "user".into())
        }
    }

    /// A clock that follows tokio's (paused) time from the real wall clock at start.
    fn paused_clock() -> Clock {
        let base = Utc::now();
        let start = tokio::time::Instant::now();
        Arc::new(move || {
            base + TimeDelta::from_std(tokio::time::Instant::now() - start).unwrap_or_default()
        })
    }

    fn setup(dir: &std::path::Path, extra: &[(&str, &str)]) -> (Shared, Arc<FakeProvider>) {
        let cfg = dir.join("databrickscfg").display().to_string();
        let mut vars = vec![
            ("DATABRICKS_HOST", "https://unit.example"),
            ("DATABRICKS_TOKEN", "boot"),
            ("DATABRICKS_CONFIG_FILE", cfg.as_str()),
            ("PAT_INSTANCE", "unit"),
        ];
        vars.extend_from_slice(extra);
        let config =
            Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap();
        let mut shared = Shared::new(config).unwrap();
        shared.clock = paused_clock();
        let provider = Arc::new(FakeProvider::new(shared.clock.clone()));
        (shared, provider)
    }

    async fn run_for(
        shared: &Shared,
        provider: &Arc<FakeProvider>,
        span: Duration,
        during: impl AsyncFnOnce(),
    ) {
        let cancel = CancellationToken::new();
        let rotator = Rotator::new(shared.clone(), provider.clone());
        let stop = cancel.clone();
        let task = tokio::spawn(async move { rotator.run(stop).await });
        during().await;
        tokio::time::sleep(span).await;
        cancel.cancel();
        task.await.unwrap();
    }

    fn counter(shared: &Shared, name: &str) -> u64 {
        shared
            .metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    #[tokio::test(start_paused = true)]
    async fn a_day_idle_never_mints_with_a_dead_token_and_wakes_only_at_decision_points() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, provider) = setup(dir.path(), &[]);
        run_for(
            &shared,
            &provider,
            Duration::from_secs(24 * 3600),
            async || {},
        )
        .await;
        let mints = provider.mints.load(Ordering::SeqCst);
        assert_eq!(
            provider.dead_auth.load(Ordering::SeqCst),
            0,
            "a mint or revoke used a dead token"
        );
        // Defaults: lifetime 900 s, forced window at 60 s left: one rotation every 840 s.
        assert!((100..=105).contains(&mints), "{mints} rotations in a day");
        // Idle: one skip at the interval tick per token, nothing in between.
        let skips = counter(&shared, "pat_rotator_skips_total");
        assert!(
            skips <= mints + 3,
            "{skips} skips for {mints} rotations: the loop polls"
        );
        // Old tokens were revoked after the grace period; only the current one is live.
        let live = provider
            .list(&Token::new("boot"))
            .await
            .unwrap()
            .into_iter()
            .filter(|t| t.comment == "pat-rotator:unit")
            .count();
        assert!(live <= 2, "{live} live tokens of this instance");
    }

    #[tokio::test(start_paused = true)]
    async fn busy_rotates_on_the_interval_and_stops_when_the_session_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, provider) = setup(dir.path(), &[]);
        let sessions = shared.sessions.clone();
        run_for(&shared, &provider, Duration::from_secs(3600), async || {
            let lease = sessions.open().unwrap();
            // Keep the lease alive for an hour, then let it go.
            for _ in 0..60 {
                tokio::time::sleep(Duration::from_secs(60)).await;
                sessions.heartbeat(&lease.id);
            }
            sessions.close(&lease.id);
        })
        .await;
        let mints = provider.mints.load(Ordering::SeqCst);
        // One at start, then every 600 s for an hour (6), then every 840 s for an hour (4-5).
        assert!((10..=13).contains(&mints), "{mints} rotations");
        assert!(counter(&shared, "pat_rotator_rotations_total{reason=\"interval\"}") >= 5);
        assert!(
            counter(
                &shared,
                "pat_rotator_rotations_total{reason=\"forced_near_expiry\"}"
            ) >= 4
        );
        assert_eq!(provider.dead_auth.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_file_token_recovers_through_the_bootstrap() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, provider) = setup(dir.path(), &[]);
        provider.tokens.lock().unwrap().insert(
            "dead".into(),
            FakeToken {
                id: "dead".into(),
                expires_at: None,
                revoked: true,
                comment: String::new(),
                created: shared.now(),
            },
        );
        std::fs::write(&shared.store.paths().config, "[DEFAULT]\ntoken = dead\n").unwrap();
        run_for(&shared, &provider, Duration::from_secs(30), async || {}).await;
        let snap = shared.store.read().unwrap();
        assert!(snap
            .token
            .as_ref()
            .is_some_and(|t| t.expose().starts_with("tok-")));
        assert!(shared.readiness(&snap, shared.now()).is_ok());
    }

    fn is_revoked(provider: &FakeProvider, id: &str) -> bool {
        provider
            .tokens
            .lock()
            .unwrap()
            .values()
            .any(|t| t.id == id && t.revoked)
    }

    #[tokio::test(start_paused = true)]
    async fn a_skewed_provider_clock_never_lets_the_token_die() {
        for skew_s in [-7200, -15, 15, 7200] {
            let dir = tempfile::tempdir().unwrap();
            let (shared, provider) = setup(
                dir.path(),
                &[("PAT_TOKEN_LIFETIME", "8"), ("PAT_ROTATION_INTERVAL", "4")],
            );
            *provider.skew.lock().unwrap() = TimeDelta::seconds(skew_s);
            run_for(&shared, &provider, Duration::from_secs(120), async || {}).await;
            let mints = provider.mints.load(Ordering::SeqCst);
            assert_eq!(
                provider.dead_auth.load(Ordering::SeqCst),
                0,
                "skew {skew_s}s: a dead token was used"
            );
            // Forced at 4 s left of 8: a rotation every ~4 s, not a mint-and-revoke storm.
            assert!((25..=35).contains(&mints), "skew {skew_s}s: {mints} mints");
            assert_eq!(
                counter(&shared, "pat_rotator_failures_total"),
                0,
                "skew {skew_s}s"
            );
            let snap = shared.store.read().unwrap();
            let left = snap.times().unwrap().expires_at - shared.now();
            assert!(
                left <= TimeDelta::seconds(8),
                "skew {skew_s}s: expiry after the truth"
            );
            let skew_metric = shared
                .metrics
                .encode()
                .lines()
                .find(|l| l.starts_with("pat_rotator_clock_skew_seconds "))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap();
            assert!((skew_metric - skew_s as f64).abs() < 1.0, "{skew_metric}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unwritable_state_mints_nothing_and_never_revokes_the_visible_token() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, provider) = setup(
            dir.path(),
            &[
                ("PAT_TOKEN_LIFETIME", "60"),
                ("PAT_ROTATION_INTERVAL", "20"),
            ],
        );
        run_for(&shared, &provider, Duration::from_secs(1), async || {}).await;
        let visible = shared.store.read().unwrap().token.unwrap();
        let state = shared.store.paths().state.clone();
        std::fs::remove_file(&state).unwrap();
        std::fs::create_dir(&state).unwrap();
        let before = provider.mints.load(Ordering::SeqCst);
        run_for(&shared, &provider, Duration::from_secs(30), async || {}).await;
        assert_eq!(
            provider.mints.load(Ordering::SeqCst),
            before,
            "a token was minted that could not be written"
        );
        let snap = shared.store.read().unwrap();
        assert_eq!(snap.token.as_ref(), Some(&visible));
        let id = provider
            .tokens
            .lock()
            .unwrap()
            .get(visible.expose())
            .map(|t| t.id.clone())
            .unwrap();
        assert!(!is_revoked(&provider, &id), "the token on disk was revoked");
        assert!(shared.readiness(&snap, shared.now()).is_err());
        // The directory goes: rotation resumes within seconds.
        std::fs::remove_dir(&state).unwrap();
        run_for(&shared, &provider, Duration::from_secs(6), async || {}).await;
        assert!(provider.mints.load(Ordering::SeqCst) > before);
        let snap = shared.store.read().unwrap();
        assert!(shared.readiness(&snap, shared.now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_deleted_config_file_still_gets_its_token_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, provider) = setup(
            dir.path(),
            &[
                ("PAT_TOKEN_LIFETIME", "600"),
                ("PAT_ROTATION_INTERVAL", "300"),
                ("PAT_REVOKE_GRACE", "2"),
            ],
        );
        run_for(&shared, &provider, Duration::from_secs(1), async || {}).await;
        let recorded = shared.store.read().unwrap().state.token_id.unwrap();
        std::fs::remove_file(&shared.store.paths().config).unwrap();
        run_for(&shared, &provider, Duration::from_secs(30), async || {}).await;
        let snap = shared.store.read().unwrap();
        assert_ne!(snap.state.token_id.as_deref(), Some(recorded.as_str()));
        assert!(
            is_revoked(&provider, &recorded),
            "the token of the deleted file lives on at the provider"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_expired_by_our_record_is_never_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, provider) = setup(dir.path(), &[]);
        // As after a long SIGSTOP: the file's token expired a minute ago by our record.
        let now = shared.now();
        provider.tokens.lock().unwrap().insert(
            "stale".into(),
            FakeToken {
                id: "stale".into(),
                expires_at: Some(now - TimeDelta::seconds(60)),
                revoked: false,
                comment: "pat-rotator:unit".into(),
                created: now - TimeDelta::seconds(960),
            },
        );
        let stale = Token::new("stale");
        let seeded = now - TimeDelta::seconds(960);
        let r = crate::store::Rotation::new("stale", now - TimeDelta::seconds(60), "unit");
        shared
            .store
            .swap(
                None,
                &stale,
                None,
                Duration::from_secs(1),
                Some(&r),
                &|| seeded,
            )
            .unwrap();
        run_for(&shared, &provider, Duration::from_secs(5), async || {}).await;
        assert_eq!(
            provider.dead_auth.load(Ordering::SeqCst),
            0,
            "the expired token was sent"
        );
        let snap = shared.store.read().unwrap();
        assert!(shared.readiness(&snap, shared.now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn status_judges_readiness_with_the_services_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let (service, provider) = setup(
            dir.path(),
            &[
                ("PAT_TOKEN_LIFETIME", "50"),
                ("PAT_ROTATION_INTERVAL", "20"),
            ],
        );
        run_for(&service, &provider, Duration::from_secs(15), async || {}).await;
        // `status` with the caller's defaults: interval 600, threshold 60 > the 35 s left.
        let (status, _) = setup(dir.path(), &[]);
        let snap = status.store.read().unwrap();
        assert!(snap.times().unwrap().expires_at - service.now() < TimeDelta::seconds(60));
        assert_eq!(
            status.readiness(&snap, service.now()),
            service.readiness(&snap, service.now())
        );
        assert!(status.readiness(&snap, service.now()).is_ok());
    }
}
