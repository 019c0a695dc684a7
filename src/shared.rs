//! Service state: what the rotation loop, the listeners and the commands share. The
//! configuration, the store and a snapshot cache over it, session leases, metrics, the
//! loop's own account of itself, the readiness rule and the one rule for handing a token to
//! a reader.
//!
//! Invariants: readiness and "may this token be handed out" are each decided here and
//! nowhere else (`/readyz`, `status`, the metadata endpoint, the proxy and `token` all ask);
//! a snapshot is served from the cache only while neither the config nor the state file
//! changed since it was read.

use crate::boot_clock::{time_left, BootClock, Deadlines};
use crate::config::Config;
use crate::knowledge::{Held, Knowledge};
use crate::metrics::Metrics;
use crate::policy::TokenTimes;
use crate::sessions::Sessions;
pub(crate) use crate::store::Clock;
use crate::store::{CredentialStore, FileVersion, Snapshot, Store, StoreError};
use crate::watch::ChangeFeed;
use crate::Token;
use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long serving and a turn of the loop wait for a locked config file before they go
/// on from their last read.
pub(crate) const LOCKED_READ_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

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
    /// A store backend's own account (the cluster store's Lease and API server), shown
    /// under the backend's name; absent for the file store.
    #[serde(flatten)]
    pub backend: Option<BackendStatus>,
}

/// What a store backend publishes about itself: its detail, shown in `/healthz` under its
/// name, and what, if anything, keeps the service unready (a missing permission, a missing
/// Secret). The service knows no backend: it shows the one and obeys the other.
#[derive(Debug, Clone)]
pub struct BackendStatus {
    pub name: &'static str,
    pub detail: serde_json::Value,
    pub blocks_readiness: Option<String>,
}

impl Serialize for BackendStatus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry(self.name, &self.detail)?;
        map.end()
    }
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
    /// The last view and what it was read at: the metadata endpoint and the proxy serve
    /// every request from it at the cost of one look at `changes` (or two `stat`s without).
    snapshots: Arc<Mutex<Option<CachedView>>>,
    /// The last credential this process read (a view's read, or the loop's turn): what
    /// serving answers from while another process keeps the file locked.
    last_read: Arc<Mutex<Option<Snapshot>>>,
    /// Events on the config and state files, where they cannot be missed.
    changes: Option<Arc<ChangeFeed>>,
    /// Tokens this process minted: their deadline on the monotonic clock.
    deadlines: Arc<Mutex<Deadlines>>,
    /// The host's clock since boot: deadlines written to the state outlive this process.
    pub(crate) boot: BootClock,
    /// The credential of record and the tokens known dead (see [`Knowledge`]).
    pub(crate) knowledge: Knowledge,
}

type CachedView = (CacheKey, Arc<View>);

/// What a cached view was read at: the change feed's generation, or, without a feed, the
/// versions of the config and state files.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CacheKey {
    Generation(u64),
    Versions(Option<FileVersion>, Option<FileVersion>),
}

impl Shared {
    pub fn new(config: Config) -> Result<Shared, StoreError> {
        // What serves a token (the metadata endpoint, the proxy, readiness) waits briefly for
        // a locked file, then answers from what it read last (`Shared::view`).
        let store =
            Store::open(&config.config_file, &config.profile)?.with_read_wait(LOCKED_READ_WAIT);
        let paths = store.paths();
        let changes = ChangeFeed::open(&paths.config, &paths.state).map(Arc::new);
        Ok(Shared {
            changes,
            sessions: Sessions::new(config.session_ttl),
            config: Arc::new(config),
            store,
            metrics: Metrics::new(),
            status: Arc::new(Mutex::new(LoopStatus::default())),
            clock: Arc::new(Utc::now),
            boot: BootClock::host(),
            snapshots: Arc::new(Mutex::new(None)),
            last_read: Arc::default(),
            deadlines: Arc::default(),
            knowledge: Knowledge::default(),
        })
    }

    /// The provider rejected `token`: it is not served again (the next view says so).
    pub(crate) fn mark_dead(&self, token: &Token) {
        self.knowledge.mark_dead(token);
        self.forget_view();
    }

    /// Holds `held` as the credential of record (served while the file has no live token);
    /// returns the one it replaces. Views change only with a never-written held token (the
    /// only kind they serve), so only then is the cached one dropped.
    pub(crate) fn hold(&self, held: Held) -> Option<Held> {
        let before = self.knowledge.has_unwritten();
        let replaced = self.knowledge.hold(held);
        if before || self.knowledge.has_unwritten() {
            self.forget_view();
        }
        replaced
    }

    /// Whether `token` is known dead: the provider said so to this process, or to another
    /// rotator of the file (the state's `rejected`). The one rule serving, readiness and the
    /// loop's observation share.
    pub(crate) fn known_dead(&self, snap: &Snapshot, token: &Token) -> bool {
        self.knowledge.is_dead(token) || snap.state.rejects(token)
    }

    /// The held credential and its times to plan with (the monotonic deadline applied), if
    /// it is not known dead.
    pub(crate) fn held_times(&self, now: DateTime<Utc>) -> Option<(Held, TokenTimes)> {
        let held = self.knowledge.held()?;
        let mut times = held.times;
        if let Some(deadline) = self.deadline_of(&held.token) {
            times.expires_at = times.expires_at.min(now + time_left(deadline));
        }
        Some((held, times))
    }

    /// A call made with the token being served was refused as unauthenticated: the loop
    /// checks it with the provider now.
    pub(crate) async fn suspect_current(&self) {
        if let Ok(view) = self.view().await {
            if let Some(token) = view.snap.token.as_ref() {
                self.knowledge.suspect(token);
            }
        }
    }

    fn forget_view(&self) {
        *self.snapshots.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The snapshot to serve: the file's, or, while the file holds no live token (lost,
    /// dead, expired: a write a foreign lock blocks, a truncated file), the live credential
    /// the rotator holds, described as the state would describe it.
    fn with_held(&self, mut snap: Snapshot, now: DateTime<Utc>) -> Snapshot {
        let Some((held, times)) = self.held_times(now) else {
            return snap;
        };
        // Only a token never written: one that was written may have been replaced and
        // revoked by another rotator since; it is written back after a check instead.
        if held.written || snap.token.as_ref() == Some(&held.token) || times.expires_at <= now {
            return snap;
        }
        let file_live = snap
            .token
            .as_ref()
            .is_some_and(|t| !self.known_dead(&snap, t))
            && self
                .live_times(&snap, now)
                .is_none_or(|t| t.expires_at > now);
        // The held token replaces the file's when the file's is dead, and also when the
        // held one was minted to replace it: a write kept from the file (a foreign lock) must
        // not leave the metadata endpoint and the proxy serving a token the provider already
        // refuses in its last seconds (Azure: the last 30 s), as the soak found.
        let minted_over_it = held.replaces.is_some() && held.replaces == snap.token;
        if !file_live || minted_over_it {
            snap.state.record(
                &held.token,
                Some(held.token_id.clone()),
                held.times.expires_at,
                held.times.rotated_at,
                "held",
            );
            snap.state.granted_ms = held.times.granted.map(|g| g.num_milliseconds());
            snap.token = Some(held.token);
        }
        snap
    }

    /// Records the monotonic deadline of a token this process minted: the instant its
    /// create request was sent plus the lifetime the provider granted.
    pub(crate) fn record_deadline(&self, token: &Token, deadline: tokio::time::Instant) {
        let mut d = self.deadlines.lock().unwrap_or_else(|p| p.into_inner());
        d.record(token, deadline);
        // A view carries the deadline it found when it was built: the next one must see
        // this one.
        self.forget_view();
    }

    /// The monotonic deadline of `token`, if this process minted it.
    fn deadline_of(&self, token: &Token) -> Option<tokio::time::Instant> {
        let d = self.deadlines.lock().unwrap_or_else(|p| p.into_inner());
        d.of(token)
    }

    /// Whether this process knows `token`'s monotonic deadline (it minted it, or learned its
    /// time left from the provider).
    pub(crate) fn has_deadline(&self, token: &Token) -> bool {
        self.deadline_of(token).is_some()
    }

    /// The deadline of `token` on this process's monotonic clock: it minted the token or
    /// learned its time left, or a rotator on this boot of the host recorded its deadline
    /// on the clock since boot in the state (`snap` describes the token). `None` otherwise.
    fn deadline_for(&self, snap: &Snapshot, token: &Token) -> Option<tokio::time::Instant> {
        self.deadline_of(token)
            .or_else(|| self.boot.deadline(snap.state.boot_deadline_for(token)?))
    }

    /// `token`'s deadline as a record for the state, when this process knows it.
    pub(crate) fn boot_stamp(&self, token: &Token) -> Option<crate::store::BootDeadline> {
        self.boot.stamp(self.deadline_of(token)?)
    }

    /// The times to plan with (the policy, retries): the expiry is the earlier of the
    /// recorded wall-clock expiry and, for a token whose monotonic deadline is known
    /// ([`Shared::deadline_for`]), `now` plus its time left. A wall-clock step back cannot
    /// postpone a rotation; a suspend (the monotonic clock stops) cannot either.
    pub(crate) fn plan_times(&self, snap: &Snapshot, now: DateTime<Utc>) -> Option<TokenTimes> {
        let mut times = snap.times()?;
        if let Some(deadline) = snap.token.as_ref().and_then(|t| self.deadline_for(snap, t)) {
            times.expires_at = times.expires_at.min(now + time_left(deadline));
        }
        Some(times)
    }

    /// The times to judge a token's life by (serving it, minting with it, readiness): for a
    /// token whose monotonic deadline is known ([`Shared::deadline_for`]: minted here, or
    /// recorded on this boot), `now` plus its time left, whatever the wall clock says (a
    /// step forward must not declare a live token dead, nor a step back a dead one live);
    /// for any other, the recorded expiry.
    pub(crate) fn live_times(&self, snap: &Snapshot, now: DateTime<Utc>) -> Option<TokenTimes> {
        let mut times = snap.times()?;
        if let Some(deadline) = snap.token.as_ref().and_then(|t| self.deadline_for(snap, t)) {
            times.expires_at = now + time_left(deadline);
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

    /// The token, host and state, as [`Shared::view`] has them (a copy).
    pub async fn read(&self) -> Result<Snapshot, StoreError> {
        Ok(self.view().await?.snap.clone())
    }

    /// The current [`View`]: the cached one when neither file changed since it was read
    /// (one look at the change feed, or two `stat`s where there is none; no copy), else a
    /// fresh read under the shared lock (in place, or on a thread where the read could
    /// wait: [`Store::read_in_place`]). Either way a change made
    /// before the call began is seen by it: never a timed cache.
    pub(crate) async fn view(&self) -> Result<Arc<View>, StoreError> {
        let key = {
            let cached = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
            // Looked at under the lock: two looks must not interleave (see ChangeFeed).
            let key = match &self.changes {
                Some(feed) => CacheKey::Generation(feed.generation()),
                None => {
                    let paths = self.store.paths();
                    CacheKey::Versions(
                        FileVersion::current(&paths.config),
                        FileVersion::current(&paths.state),
                    )
                }
            };
            if let Some((cached_key, view)) = cached.as_ref() {
                // A view whose token died on the clock while a held one lives is read again.
                if *cached_key == key && !self.held_outlives(view) {
                    return Ok(view.clone());
                }
            }
            key
        };
        let snap = match CredentialStore::snapshot(&self.store).await {
            Ok(snap) => {
                self.remember_read(&snap);
                snap
            }
            // Another process keeps the file locked (stopped or hung while it holds the
            // lock): serve from the last read, with the token the rotator holds meanwhile.
            Err(e @ StoreError::Busy { .. }) => self.last_read().ok_or(e)?,
            Err(e) => return Err(e),
        };
        let snap = self.with_held(snap, self.now());
        let view = Arc::new(View::new(snap, self));
        // Keyed by what was seen before the read: the snapshot is at least that new, so a
        // change in between is a miss next time, never a stale hit.
        *self.snapshots.lock().unwrap_or_else(|p| p.into_inner()) = Some((key, view.clone()));
        Ok(view)
    }

    /// The last credential this process read, if any.
    pub(crate) fn last_read(&self) -> Option<Snapshot> {
        self.last_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps `snap` as the last credential read (see `last_read`).
    pub(crate) fn remember_read(&self, snap: &Snapshot) {
        *self.last_read.lock().unwrap_or_else(|p| p.into_inner()) = Some(snap.clone());
    }

    /// Whether the rotator holds a never-written token other than `view`'s while `view`'s
    /// has expired (one atomic load on a request's cache hit in the usual case).
    fn held_outlives(&self, view: &View) -> bool {
        self.knowledge
            .holds_unwritten_other_than(view.snap.token.as_ref())
            && view
                .live_times(self.now())
                .is_some_and(|t| t.expires_at <= self.now())
    }

    /// Ready: a token with known expiry above the threshold is on disk and the last attempt
    /// did not fail terminally. The reason is for humans.
    pub(crate) fn readiness(&self, snap: &Snapshot, now: DateTime<Utc>) -> Result<(), String> {
        let status = self.status();
        if let Some(backend) = &status.backend {
            if let Some(problem) = &backend.blocks_readiness {
                return Err(format!("{} store: {problem}", backend.name));
            }
        }
        if status.terminal_failure {
            return Err(status
                .last_error
                .unwrap_or_else(|| "the last rotation failed".into()));
        }
        if snap
            .token
            .as_ref()
            .is_some_and(|t| self.known_dead(snap, t))
        {
            return Err("the provider rejected the token on disk (revoked out of band, or its user may no longer use tokens); replacing it with another live credential".into());
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
    /// the token on disk, if it may be used now. It may be used until
    /// `min(real expiry, now + PAT_REVOKE_GRACE)`: an old token is revoked no earlier than
    /// one second after `written_at + grace`, and `now` is taken by the caller before the
    /// snapshot was read, so no token is ever revoked before an advertised expiry. A token
    /// set by hand and accepted by the provider (expiry unknown) is served for the grace only,
    /// within [`SEED_TRUST`] of its check; anything else unknown or expired is refused.
    pub(crate) fn servable(
        &self,
        snap: &Snapshot,
        now: DateTime<Utc>,
    ) -> Result<Token, NotServable> {
        let token = snap.token.clone().ok_or(NotServable::NoToken)?;
        if self.known_dead(snap, &token) {
            return Err(NotServable::Rejected);
        }
        let seed_checked_at = snap.state.verified_seed(&token);
        self.serve_until(self.live_times(snap, now), seed_checked_at, now)?;
        Ok(token)
    }

    /// [`Shared::servable`] for a [`View`], without copying the token: until when the
    /// view's token may be handed out.
    pub(crate) fn servable_until(
        &self,
        view: &View,
        now: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, NotServable> {
        if view.snap.token.is_none() {
            return Err(NotServable::NoToken);
        }
        if view.dead {
            return Err(NotServable::Rejected);
        }
        self.serve_until(view.live_times(now), view.seed_checked_at, now)
    }

    fn serve_until(
        &self,
        live: Option<TokenTimes>,
        seed_checked_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, NotServable> {
        let horizon = now + TimeDelta::from_std(self.config.revoke_grace).unwrap_or_default();
        match live {
            Some(times) if times.expires_at <= now => Err(NotServable::Expired),
            // An OAuth access token is never revoked: its real expiry is the answer.
            Some(times) if !self.config.credential.is_pat() => Ok(times.expires_at),
            Some(times) => Ok(times.expires_at.min(horizon)),
            None => match seed_checked_at {
                Some(at) if now - at <= SEED_TRUST => Ok(horizon),
                _ => Err(NotServable::UnknownExpiry),
            },
        }
    }

    pub(crate) fn update_gauges(&self, snap: &Snapshot, now: DateTime<Utc>) {
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

/// One read of the files with what serving a request from it needs, worked out once per
/// read instead of once per request: the token's recorded times and monotonic deadline
/// (each a SHA-256 of the token to look up), the `Authorization` value the proxy sends and
/// the start of the metadata endpoint's answer. Neither derived value appears in `Debug`.
pub(crate) struct View {
    pub snap: Snapshot,
    /// The state's times, when they describe the token on disk.
    times: Option<TokenTimes>,
    /// The token's monotonic deadline, when this process minted it.
    deadline: Option<tokio::time::Instant>,
    /// When the provider accepted the token on disk as a seed, if it did.
    seed_checked_at: Option<DateTime<Utc>>,
    /// The provider rejected the token (views are rebuilt when that becomes known).
    dead: bool,
    bearer: std::sync::OnceLock<Option<axum::http::HeaderValue>>,
    metadata_head: std::sync::OnceLock<String>,
}

impl View {
    fn new(snap: Snapshot, shared: &Shared) -> View {
        let times = snap.times();
        let deadline = snap
            .token
            .as_ref()
            .and_then(|t| shared.deadline_for(&snap, t));
        let seed_checked_at = snap
            .token
            .as_ref()
            .and_then(|t| snap.state.verified_seed(t));
        let dead = snap
            .token
            .as_ref()
            .is_some_and(|t| shared.known_dead(&snap, t));
        View {
            snap,
            times,
            deadline,
            seed_checked_at,
            dead,
            bearer: std::sync::OnceLock::new(),
            metadata_head: std::sync::OnceLock::new(),
        }
    }

    /// [`Shared::live_times`], from what the view worked out when it was built.
    fn live_times(&self, now: DateTime<Utc>) -> Option<TokenTimes> {
        let mut times = self.times?;
        if let Some(deadline) = self.deadline {
            times.expires_at = now + time_left(deadline);
        }
        Some(times)
    }

    /// `Bearer <token>`, marked sensitive (never printed by `Debug`, never compressed into
    /// a header table); `None` without a token or when the token cannot be a header value.
    pub(crate) fn bearer(&self) -> Option<&axum::http::HeaderValue> {
        self.bearer
            .get_or_init(|| {
                let token = self.snap.token.as_ref()?;
                let mut value =
                    axum::http::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                        .ok()?;
                value.set_sensitive(true);
                Some(value)
            })
            .as_ref()
    }

    /// The metadata endpoint's answer for this view's token, advertised until
    /// `expires_on` (Unix seconds): `{"access_token", "token_type", "expires_on"}`.
    pub(crate) fn metadata_answer(&self, expires_on: i64) -> String {
        let head = self.metadata_head.get_or_init(|| {
            let token = self.snap.token.as_ref().map(|t| t.expose()).unwrap_or("");
            // serde_json escapes whatever the file held.
            let quoted = serde_json::Value::from(token).to_string();
            format!(r#"{{"access_token":{quoted},"token_type":"Bearer","expires_on":"#)
        });
        format!("{head}{expires_on}}}")
    }
}

/// Why no token may be handed out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotServable {
    #[error("no token on disk yet")]
    NoToken,
    #[error("the token on disk has expired; see /readyz on the rotator")]
    Expired,
    #[error("the expiry of the token on disk is not known yet; a rotation is due")]
    UnknownExpiry,
    #[error("the provider rejected the token on disk; a replacement is under way, see /readyz on the rotator")]
    Rejected,
}

/// How long after the provider accepted a manually set token it is served without a known
/// expiry; the rotator replaces such a token at once, so this only bridges a slow mint or
/// a provider outage right after `pat-rotator set`.
pub(crate) const SEED_TRUST: TimeDelta = TimeDelta::minutes(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_in(dir: &std::path::Path) -> Shared {
        let cfg = dir.join("databrickscfg");
        std::fs::write(
            &cfg,
            "[DEFAULT]\nhost = https://unit.example\ntoken = first\n",
        )
        .unwrap();
        shared_in_place(dir)
    }

    /// Another process replaces the file (temp file, rename), as a sibling rotator does.
    fn replace_from_another_process(dir: &std::path::Path, token: &str) {
        let script = format!(
            "printf '[DEFAULT]\\nhost = https://unit.example\\ntoken = {token}\\n' > t && mv t databrickscfg"
        );
        let ok = std::process::Command::new("sh")
            .args(["-c", &script])
            .current_dir(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok);
    }

    async fn token_of(shared: &Shared) -> String {
        let view = shared.view().await.unwrap();
        view.snap.token.as_ref().unwrap().expose().to_string()
    }

    async fn sees_each_replacement_at_once(shared: Shared, dir: &std::path::Path) {
        assert_eq!(token_of(&shared).await, "first");
        let cached = shared.view().await.unwrap();
        assert!(
            Arc::ptr_eq(&cached, &shared.view().await.unwrap()),
            "an unchanged file is served from the cache"
        );
        for token in ["second", "third"] {
            replace_from_another_process(dir, token);
            assert_eq!(token_of(&shared).await, token);
        }
    }

    #[tokio::test]
    async fn a_replacement_by_another_process_is_seen_by_the_next_request() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared_in(dir.path());
        assert!(shared.changes.is_some(), "the change feed is in use here");
        sees_each_replacement_at_once(shared, dir.path()).await;
    }

    #[tokio::test]
    async fn without_a_change_feed_the_file_versions_decide() {
        let dir = tempfile::tempdir().unwrap();
        let mut shared = shared_in(dir.path());
        shared.changes = None;
        sees_each_replacement_at_once(shared, dir.path()).await;
    }

    fn held(token: &str, replaces: Option<&str>) -> Held {
        let now = Utc::now();
        Held {
            token: Token::new(token),
            token_id: format!("id-{token}"),
            times: TokenTimes {
                expires_at: now + TimeDelta::seconds(20),
                rotated_at: now,
                granted: None,
            },
            written: false,
            replaces: replaces.map(Token::new),
        }
    }

    /// A token minted to replace the file's, and kept from the file by someone else's lock,
    /// is served at once, while the file's still lives: the file's may already be refused in
    /// its last seconds. A held token minted over another token than the file's is not (the
    /// file's is newer: another rotator wrote it).
    #[tokio::test]
    async fn a_token_held_over_the_files_is_served_before_the_files_dies() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared_in(dir.path());
        shared.hold(held("older-than-the-file", Some("before-first")));
        assert_eq!(token_of(&shared).await, "first");
        shared.hold(held("minted-over-first", Some("first")));
        assert_eq!(token_of(&shared).await, "minted-over-first");
        // Once another process writes a newer token, that one is served.
        replace_from_another_process(dir.path(), "newer");
        assert_eq!(token_of(&shared).await, "newer");
    }

    /// A rotator restarted on the same host after the wall clock stepped judges the token
    /// another process recorded by its deadline on the clock since boot: forward by a
    /// minute, a live token is live (not dead, never sent); back by a minute, it has 20 s
    /// left, not 80 (served past its death).
    #[tokio::test(start_paused = true)]
    async fn a_restart_after_a_clock_step_judges_a_recorded_token_by_the_boot_clock() {
        let dir = tempfile::tempdir().unwrap();
        let minter = shared_in(dir.path());
        let now = Utc::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let rotation = crate::store::Rotation {
            expires_boot: minter.boot.stamp(deadline),
            ..crate::store::Rotation::new("id-fresh", now + TimeDelta::seconds(20), "unit")
        };
        let fresh = Token::new("fresh");
        let first = Token::new("first");
        let swapped = minter.store.swap(
            Some(&first),
            &fresh,
            None,
            Duration::from_secs(1),
            Some(&rotation),
            &|| now,
        );
        assert!(matches!(swapped, Ok(crate::store::SwapOutcome::Swapped)));
        for step in [60, -60] {
            let mut restarted = shared_in_place(dir.path());
            restarted.clock = Arc::new(move || Utc::now() + TimeDelta::seconds(step));
            let snap = restarted.read().await.unwrap();
            let at = restarted.now();
            let left = (restarted.live_times(&snap, at).unwrap().expires_at - at).num_seconds();
            assert!((19..=20).contains(&left), "step {step}: {left} s left");
            let planned = (restarted.plan_times(&snap, at).unwrap().expires_at - at).num_seconds();
            assert!(planned <= 20, "step {step}: planned with {planned} s left");
        }
    }

    /// A second process on the files `shared_in` wrote, without writing them again.
    fn shared_in_place(dir: &std::path::Path) -> Shared {
        let cfg = dir.join("databrickscfg");
        let vars = [
            ("DATABRICKS_HOST", "https://unit.example"),
            ("DATABRICKS_CONFIG_FILE", cfg.to_str().unwrap()),
            ("PAT_INSTANCE", "unit"),
        ];
        let config =
            Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap();
        Shared::new(config).unwrap()
    }
}
