//! The service loop as three steps a reader can follow: decide and act on one reading of the
//! credential (`turn`), plan the next wake-up (`plan_wake`: revocations and reaps), and wait
//! for it or for news (`wait`).
//!
//! Invariant: the loop sleeps until the policy's next wake-up, the next revocation or reap,
//! a session change, or a credential another writer changed; never on a fixed interval.
//! Only the policy's own decision points count a skip (a session change is not a decision to
//! report: any local client can open thousands).

use super::LOCAL_RETRY;

/// The least wait after the workspace refused a rotation by one of its rules.
const REFUSAL_RETRY: Duration = Duration::from_secs(30);
use super::{dead_token_retry, secs, RotateError, RotationOutcome, Rotator, StepDetector};
use crate::backoff::Backoff;
use crate::policy::{self, Decision, Plan, SkipReason};
use crate::provider::{Provider, ProviderError};
use crate::store::{CredentialStore, Snapshot, StoreError};
use crate::Token;
use chrono::{DateTime, TimeDelta, Utc};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// What the loop carries from one turn to the next.
struct LoopState {
    failures: Backoff,
    /// When to reap orphans: at start, and once more after the reap age (orphans a crash
    /// left just before this start are too young to reap at first).
    reaps: Vec<DateTime<Utc>>,
    /// The token this loop last saw, to tell "someone else replaced it" apart.
    last_seen: Option<String>,
    /// Whether this turn is one of the policy's decision points (start, its planned
    /// wake-up, a credential change) rather than a wake-up for a revocation, a session
    /// change or the re-plan right after our own rotation: only those count as skips.
    decision_point: bool,
    /// The wake-up the policy planned last.
    planned: Option<DateTime<Utc>>,
    /// Whether the last turn failed.
    failing: bool,
    /// When the file's token is next checked with the provider (`check_period`).
    next_check: DateTime<Utc>,
    steps: StepDetector,
}

/// What a turn leaves to do.
enum Next {
    /// Our own rotation just happened: decide again at once (not a decision point).
    Again,
    /// Sleep until then, unless woken earlier.
    SleepUntil(DateTime<Utc>),
}

/// Why the wait ended.
enum Woke {
    Cancelled,
    /// The planned time came (a decision point if it was the policy's wake-up).
    Timer,
    /// A session opened or closed: decide again, but it is not a decision to report.
    Sessions,
    /// Another writer changed the credential.
    Credential,
    /// A relayed 401/403 made the current token suspect: check it now.
    Suspect,
}

impl<P: Provider, S: CredentialStore> Rotator<P, S> {
    /// The service loop; returns when `cancel` fires.
    pub async fn run(&self, cancel: CancellationToken) {
        self.shared.set_status(|s| s.alive = true);
        info!(config = %self.cfg().config_file.display(), profile = %self.cfg().profile, instance = %self.cfg().instance, "rotation loop started");
        if let Ok(snap) = self.store.snapshot().await {
            if let Some(w) = snap.host_mismatch(self.cfg().host.as_deref()) {
                warn!("{w}");
            }
        }
        let started = self.shared.now();
        let mut st = LoopState {
            failures: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
            reaps: vec![
                started,
                started + self.reap_min_age() + TimeDelta::seconds(1),
            ],
            last_seen: None,
            decision_point: true,
            planned: None,
            failing: false,
            next_check: started + secs(self.check_period()),
            steps: StepDetector::new(started),
        };
        while !cancel.is_cancelled() {
            // Taken before the read: a change after it is seen as a change at the wait.
            let seen = self.store.version();
            let now = self.shared.now();
            st.steps.observe(now, &self.shared);
            self.shared.set_status(|s| s.heartbeat = Some(now));
            let wake = match self.turn(&mut st, now, &cancel).await {
                Next::Again => {
                    st.decision_point = false;
                    continue;
                }
                Next::SleepUntil(wake) => self.plan_wake(&mut st, wake, now).await,
            };
            match self.wait(wake, &seen, &cancel).await {
                Woke::Cancelled => break,
                Woke::Timer => st.decision_point = st.planned == Some(wake),
                Woke::Sessions | Woke::Suspect => st.decision_point = false,
                Woke::Credential => {
                    if st.failing {
                        info!("the credential changed while failing; reloading");
                    }
                    st.failures.reset();
                    st.decision_point = true;
                }
            }
        }
        self.shared.set_status(|s| s.alive = false);
        info!("rotation loop stopped");
    }

    /// Reads the credential, decides, and acts: rotates when due, notes a skip, performs
    /// the revocations whose grace has passed.
    async fn turn(
        &self,
        st: &mut LoopState,
        now: DateTime<Utc>,
        cancel: &CancellationToken,
    ) -> Next {
        st.failing = false;
        // Work that spans a stop of this process starts over from a fresh read.
        let epoch = crate::freeze::epoch();
        let snap = match self.read_for_turn().await {
            Ok(snap) => snap,
            Err(e) => {
                error!(error = %e, "cannot read the config file");
                self.record_failure(&RotateError::Store(e));
                st.failing = true;
                return Next::SleepUntil(now + secs(st.failures.next_delay(None)));
            }
        };
        if let Some(e) = &snap.state_error {
            warn!(error = %e, path = %self.shared.store.paths().state.display(), "the state file is unreadable; treating the expiry as unknown (it is rewritten at the next rotation)");
        }
        let token = snap.token.as_ref().map(Token::fingerprint);
        if st.last_seen.is_some() && token != st.last_seen {
            info!(event = "reload", token = %token.as_deref().unwrap_or("none"), "the config file holds a token this rotator did not write (another rotator or a manual write); using it");
        }
        // Observe: the provider's word on the file's token: its time left until this process
        // knows it (each turn, so an outage at start only delays it), whether it is still
        // valid when a check is due or asked.
        self.learn_time_left(&snap).await;
        st.last_seen = token;
        let check_due = now >= st.next_check;
        if check_due {
            st.next_check = now + secs(self.check_period());
        }
        self.check_token(&snap, check_due, epoch).await;
        let plan = policy::converge(&self.observe(&snap, now), &self.policy);
        st.planned = Some(plan.next_wake);
        self.shared
            .set_status(|s| s.last_decision = Some(plan.decision.label()));
        let mut wake = plan.next_wake;
        match plan.decision {
            Decision::Restore => match self.restore(&snap).await {
                Ok(()) => return Next::Again,
                Err(e) => {
                    self.record_failure(&e);
                    st.failing = true;
                    wake = now + secs(self.retry_delay(&e, &snap, now, &mut st.failures));
                }
            },
            Decision::Rotate(reason) => {
                match self.rotate_cancellable(reason, &snap, cancel).await {
                    Ok(outcome) => {
                        st.last_seen = match outcome {
                            RotationOutcome::Rotated { fingerprint, .. } => Some(fingerprint),
                            RotationOutcome::Adopted => None,
                        };
                        if st.failures.attempts() > 0 {
                            info!(
                                failed_attempts = st.failures.attempts(),
                                "recovered: rotation succeeded after failures"
                            );
                        }
                        st.failures.reset();
                        return Next::Again;
                    }
                    Err(RotateError::Resumed) => {
                        info!("resumed from a stop during a rotation; deciding again from a fresh read");
                        return Next::Again;
                    }
                    Err(e) => {
                        self.record_failure(&e);
                        st.failing = true;
                        wake = now + secs(self.retry_delay(&e, &snap, now, &mut st.failures));
                    }
                }
            }
            Decision::Skip(reason) => {
                // Nothing due: the token on disk is good by the policy, whatever failed
                // before and however this turn came (a token adopted after a failure is
                // followed by a turn that is not a decision point).
                self.clear_failure();
                self.adopt_file_token(&snap, now).await;
                if st.decision_point {
                    self.note_skip(reason, &plan);
                } else {
                    debug!(next_wake = %plan.next_wake, "not a decision point; nothing due");
                }
            }
        }
        if let Some(next_revocation) = self.process_revocations(&snap, epoch).await {
            wake = wake.min(next_revocation);
        }
        self.shared.update_gauges(&snap, self.shared.now());
        Next::SleepUntil(wake.min(st.next_check))
    }

    /// The credential a turn decides from: a fresh read, or, while another process keeps the
    /// file locked (stopped or hung while it holds the lock), the last one this process read.
    async fn read_for_turn(&self) -> Result<Snapshot, StoreError> {
        match self.store.snapshot().await {
            Ok(snap) => {
                self.shared.remember_read(&snap);
                Ok(snap)
            }
            Err(e @ StoreError::Busy { .. }) => {
                let last = self.shared.last_read().ok_or(e)?;
                warn!(holders = %crate::store::lock_holders(&self.shared.store.paths().lock), "the config file stays locked by another process; deciding from what was read last (a rotation due meanwhile is minted, held and served, and written once the lock frees)");
                Ok(last)
            }
            Err(e) => Err(e),
        }
    }

    /// How long to wait after a failed rotation: the backoff (or the provider's
    /// Retry-After), but several tries before a live token dies, a dead token retried every
    /// few seconds (nothing works until a mint does), and a local write failure retried
    /// within seconds (nothing is minted until the write can happen, so a retry costs no
    /// provider call and a fixed mount or freed disk is noticed at once).
    fn retry_delay(
        &self,
        e: &RotateError,
        snap: &Snapshot,
        now: DateTime<Utc>,
        failures: &mut Backoff,
    ) -> Duration {
        let retry_after = match e {
            RotateError::Provider(p) => p.retry_after(),
            _ => None,
        };
        let mut delay = failures.next_delay(retry_after);
        match self
            .shared
            .plan_times(snap, now)
            .filter(|t| t.expires_at > now)
        {
            Some(t) => {
                let quarter = ((t.expires_at - now) / 4).to_std().unwrap_or_default();
                delay = delay.min(quarter.max(Duration::from_secs(1)));
            }
            None => delay = delay.min(dead_token_retry()),
        }
        match e {
            RotateError::Store(_) => delay = delay.min(LOCAL_RETRY),
            // Nothing is sent with a lost or missing login; a new one wakes the loop.
            RotateError::NoLogin | RotateError::LoginLost(_) => delay = super::grant::LOGIN_RECHECK,
            // A workspace's refusal (a wrong client secret, the quota, the token permission
            // taken away, a lifetime cap) stays until someone changes something, and such a
            // change to the file wakes the loop at once: retrying sooner only adds requests.
            RotateError::Provider(
                ProviderError::InvalidGrant { .. }
                | ProviderError::QuotaExceeded { .. }
                | ProviderError::PermissionDenied { .. }
                | ProviderError::LifetimeTooLong { .. },
            ) => delay = delay.max(REFUSAL_RETRY),
            _ => {}
        }
        delay
    }

    /// A decision point with nothing due: counted and logged.
    fn note_skip(&self, reason: SkipReason, plan: &Plan) {
        self.shared.metrics.skipped(reason.as_str());
        info!(reason = reason.as_str(), sessions = self.shared.sessions.active(), next_wake = %plan.next_wake, "rotation not due; skipping");
    }

    /// The last failure no longer applies: the token on disk needs nothing. Readiness
    /// follows at once (a terminal failure kept it at 503 until the next decision point).
    fn clear_failure(&self) {
        if self.shared.status().terminal_failure {
            info!("recovered: the token on disk is valid again");
        }
        self.shared.set_status(|s| {
            s.terminal_failure = false;
            s.last_error = None;
        });
    }

    /// The wake-up: the turn's, or an earlier reap. Reaping comes after the decision: a
    /// rotation due now goes first (a lease holder that just took over must not spend the
    /// forced window listing tokens).
    async fn plan_wake(
        &self,
        st: &mut LoopState,
        mut wake: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> DateTime<Utc> {
        // Another replica reaps (the cluster store's lease holder): a due reap waits for
        // this one to become it, a change that ends the wait (no timer, no API call).
        let reaps_here = self.store.reaps_here();
        if reaps_here && st.reaps.first().is_some_and(|at| *at <= now) {
            if self.reap_orphans().await {
                st.reaps.remove(0);
            } else {
                // Skipped (expiry unknown, or a rotation elsewhere): try again once a
                // rotation has recorded the current token.
                st.reaps[0] = self.shared.now() + TimeDelta::seconds(5);
            }
        }
        if let Some(r) = st.reaps.first().filter(|_| reaps_here) {
            wake = wake.min(*r);
        }
        self.shared.set_status(|s| s.next_wake = Some(wake));
        wake
    }

    /// Sleeps until `wake`, a session change, a credential that differs from `seen`, or
    /// `cancel`. Our own writes also raise store events; only a credential that differs
    /// from the one this turn read is news (a valid token set by hand while failing is
    /// picked up within a second).
    async fn wait(
        &self,
        wake: DateTime<Utc>,
        seen: &S::Version,
        cancel: &CancellationToken,
    ) -> Woke {
        let sleep = tokio::time::sleep((wake - self.shared.now()).to_std().unwrap_or_default());
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Woke::Cancelled,
                _ = &mut sleep => return Woke::Timer,
                _ = self.shared.sessions.changed() => {
                    debug!("session change; deciding again");
                    return Woke::Sessions;
                }
                _ = self.shared.knowledge.suspected() => {
                    debug!("a call with the current token was refused; checking it");
                    return Woke::Suspect;
                }
                _ = self.store.changed() => {
                    if self.store.version() != *seen {
                        debug!("the credential was replaced by another writer; deciding again");
                        return Woke::Credential;
                    }
                }
            }
        }
    }
}
