//! Service state: what the rotation loop, the listeners and the commands share. The
//! configuration, the store and a snapshot cache over it, session leases, metrics, the
//! loop's own account of itself, the readiness rule and the one rule for handing a token to
//! a reader.
//!
//! Invariants: readiness and "may this token be handed out" are each decided here and
//! nowhere else (`/readyz`, `status`, the metadata endpoint, the proxy and `token` all ask);
//! a snapshot is served from the cache only while neither the config nor the state file
//! changed since it was read.

use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::TokenTimes;
use crate::sessions::Sessions;
pub use crate::store::Clock;
use crate::store::{FileVersion, Snapshot, Store, StoreError};
use crate::Token;
use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// The cluster store's account (`PAT_STORE=kubernetes` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// What a replica of the cluster store knows of the cluster.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterStatus {
    /// This replica holds the rotation Lease.
    pub holder: bool,
    /// Who holds it, as last seen.
    pub lease_holder: Option<String>,
    pub api_reachable: bool,
    /// When the Secret was last read.
    pub last_sync: Option<DateTime<Utc>>,
    /// What stops this replica from working with the Secret or the Lease (a missing
    /// permission, a missing Secret), if anything.
    pub problem: Option<String>,
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
    /// Tokens this process minted: their deadline on the monotonic clock.
    deadlines: Arc<Mutex<Deadlines>>,
}

/// The monotonic deadline of each token this process minted (by SHA-256), the latest few.
/// A wall-clock step moves `expires_at - now` but not these: see [`Shared::plan_times`].
#[derive(Default)]
struct Deadlines(Vec<(String, tokio::time::Instant)>);

/// How many minted tokens' deadlines are kept (the current one and a few replaced ones).
const DEADLINES_KEPT: usize = 8;

type SnapshotKey = (Option<FileVersion>, Option<FileVersion>);

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
            deadlines: Arc::default(),
        })
    }

    /// Records the monotonic deadline of a token this process minted: the instant its
    /// create request was sent plus the lifetime the provider granted.
    pub fn record_deadline(&self, token: &Token, deadline: tokio::time::Instant) {
        let mut d = self.deadlines.lock().unwrap_or_else(|p| p.into_inner());
        let key = token.sha256_hex();
        d.0.retain(|(k, _)| *k != key);
        d.0.push((key, deadline));
        if d.0.len() > DEADLINES_KEPT {
            d.0.remove(0);
        }
    }

    /// The monotonic time left for a token this process minted; `None` for any other.
    fn monotonic_left(&self, token: &Token) -> Option<TimeDelta> {
        let key = token.sha256_hex();
        let d = self.deadlines.lock().unwrap_or_else(|p| p.into_inner());
        let (_, deadline) = d.0.iter().find(|(k, _)| *k == key)?;
        let now = tokio::time::Instant::now();
        Some(if *deadline >= now {
            TimeDelta::from_std(*deadline - now).unwrap_or(TimeDelta::MAX)
        } else {
            -TimeDelta::from_std(now - *deadline).unwrap_or(TimeDelta::MAX)
        })
    }

    /// The times to plan with (the policy, retries): the expiry is the earlier of the
    /// recorded wall-clock expiry and, for a token this process minted, `now` plus its
    /// monotonic time left. A wall-clock step back cannot postpone a rotation; a suspend
    /// (the monotonic clock stops) cannot either.
    pub fn plan_times(&self, snap: &Snapshot, now: DateTime<Utc>) -> Option<TokenTimes> {
        let mut times = snap.times()?;
        if let Some(left) = snap.token.as_ref().and_then(|t| self.monotonic_left(t)) {
            times.expires_at = times.expires_at.min(now + left);
        }
        Some(times)
    }

    /// The times to judge a token's life by (serving it, minting with it, readiness): for a
    /// token this process minted, `now` plus its monotonic time left, whatever the wall
    /// clock says (a step forward must not declare a live token dead); for any other, the
    /// recorded expiry.
    pub fn live_times(&self, snap: &Snapshot, now: DateTime<Utc>) -> Option<TokenTimes> {
        let mut times = snap.times()?;
        if let Some(left) = snap.token.as_ref().and_then(|t| self.monotonic_left(t)) {
            times.expires_at = now + left;
        }
        Some(times)
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

    pub(crate) fn set_status(&self, f: impl FnOnce(&mut LoopStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The token, host and state: from the cache when neither file changed since it was
    /// read (two `stat`s), else read under the shared lock off the async runtime. Files are
    /// only ever replaced whole, so an unchanged version is unchanged content.
    pub async fn read(&self) -> Result<Snapshot, StoreError> {
        let paths = self.store.paths();
        let key = (
            FileVersion::current(&paths.config),
            FileVersion::current(&paths.state),
        );
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
        if let Some(problem) = status
            .cluster
            .as_ref()
            .and_then(|c| c.problem.clone())
            .filter(|_| status.cluster.as_ref().is_some_and(|c| c.api_reachable))
        {
            return Err(format!("cluster store: {problem}"));
        }
        if status.terminal_failure {
            return Err(status
                .last_error
                .unwrap_or_else(|| "the last rotation failed".into()));
        }
        let Some(times) = self.live_times(snap, now) else {
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
        if times.expires_at <= now {
            return Err(format!(
                "the token on disk expired {}s ago (at {})",
                (now - times.expires_at).num_seconds(),
                times.expires_at
            ));
        }
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
        let until = match self.live_times(snap, now) {
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
        match self.live_times(snap, now) {
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
        m.threshold.set(self.config.threshold().as_secs() as i64);
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
