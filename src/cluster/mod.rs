//! The cluster store (`PAT_STORE=kubernetes`): replicas in several pods share one
//! credential. A Kubernetes Secret is the durable home of the token (key `token`) and its
//! state (key `state`, never a token value); a `coordination.k8s.io/v1` Lease elects the one
//! replica that mints, revokes and reaps; every replica mirrors the Secret into its own
//! config file, so the readers of its pod (files, the metadata endpoint, the proxy) work as
//! with the file store.
//!
//! Invariants:
//! - the Secret is written only by compare-and-swap on its `resourceVersion`, by the lease
//!   holder, over the token the rotation started from; a conflict is adopted, never
//!   overwritten (the CAS is the fence: a holder that lost its lease mid-rotation loses the
//!   write and revokes what it minted);
//! - a replica's config file never receives a token that dies before the file's own live
//!   token; when the API server is unreachable and the forced window arrives (or the holder
//!   has not replaced the token late in that window), the replica rotates alone with a
//!   pod-scoped comment, marks the token `pod_local`, and revokes it itself after the grace
//!   once a newer shared token is back;
//! - non-holders never see the shared pending revocations (only their own pod-local ones),
//!   so only the holder revokes shared tokens;
//! - a Secret object is never logged or formatted (`Debug` on it prints its data).

use crate::config::KubeTarget;
use crate::shared::Shared;
use crate::store::{
    BoxFuture, Clock, CredentialStore, FileVersion, ForSwap, Rotation, Snapshot, StateEdit, Store,
    StoreError, SwapOutcome,
};
use crate::Token;
use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use signal::Signal;
use status::ClusterGauges;
pub(crate) use status::{how_to_seed, ClusterStatus};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
pub(crate) use writes::store_login;

mod alone;
mod client;
mod lease;
mod mirror;
mod signal;
mod status;
mod watch_one;
mod writes;

use mirror::SecretContents;

/// The keys of the Secret.
pub(crate) const TOKEN_KEY: &str = "token";
pub(crate) const STATE_KEY: &str = "state";

/// Why the cluster store could not do what was asked; each says what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ClusterError {
    #[error("the Kubernetes API server is unreachable ({action}: {message}); readers keep the current token, and if it nears expiry before the server is back this pod rotates on its own and converges afterwards")]
    Unreachable { action: String, message: String },
    #[error("forbidden: the service account may not {verb} {resource} in namespace {namespace}; grant it (the chart's Role has every verb needed: get, list, watch, update on the Secret; get, create, update, watch on Leases); this replica recovers by itself once it is granted")]
    Denied {
        verb: &'static str,
        resource: String,
        namespace: String,
    },
    #[error("the Secret {namespace}/{name} does not exist; create it with the first token: kubectl -n {namespace} create secret generic {name} --from-literal=token=<a valid PAT> (the Helm chart creates it from its bootstrap value)")]
    MissingSecret { namespace: String, name: String },
    #[error("this replica no longer holds the Lease {namespace}/{name}; the replica that holds it rotates")]
    NotHolder { namespace: String, name: String },
    #[error("the Kubernetes API answered {action} with {code}: {message}")]
    Api {
        action: String,
        code: u16,
        message: String,
    },
    #[error("cannot configure the Kubernetes client: {0}; run in a pod with a service account, or set KUBECONFIG")]
    Connect(String),
}

impl ClusterError {
    /// Transient: the replica keeps serving and retries.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            ClusterError::Unreachable { .. } | ClusterError::NotHolder { .. }
        )
    }
}

impl From<ClusterError> for StoreError {
    fn from(e: ClusterError) -> Self {
        StoreError::Backend {
            transient: e.is_transient(),
            error: Box::new(e),
        }
    }
}

/// What a replica knows of the cluster, published to `/readyz`, `/metrics` and `status`.
#[derive(Default)]
struct View {
    /// The Secret as last read (watch, re-read or our own write), while that read is
    /// current: cleared when the API server stops answering.
    secret: Option<SecretContents>,
    /// This replica's side of the election (see `lease::LeaseHold`).
    lease: lease::LeaseHold,
    /// The Lease as this replica's own last accepted write left it (the holder renews over
    /// it without reading it first).
    lease_written: Option<Lease>,
    /// The Lease as last seen (a watch event or a read), and whether the watch is live.
    lease_seen: Option<lease::SeenLease>,
    lease_watch_live: bool,
    lease_holder: Option<String>,
    reachable: bool,
    last_sync: Option<DateTime<Utc>>,
    /// Problems by source ("lease", "secret"), cleared by the next success of that source.
    problems: std::collections::BTreeMap<&'static str, String>,
    /// A rotation runs on this pod alone (the Secret could not be read near expiry).
    local_rotation: bool,
}

impl View {
    /// The Lease as the live watch last brought it, for a replica that does not hold it (the
    /// holder renews on its own schedule; without a watch the election reads instead).
    fn watched_lease(&self, now: Instant) -> Option<&lease::SeenLease> {
        self.lease_seen
            .as_ref()
            .filter(|_| self.lease_watch_live && !self.lease.holds(now))
    }
}

struct Inner {
    secrets: Api<Secret>,
    leases: Api<Lease>,
    namespace: String,
    target: KubeTarget,
    /// `PAT_INSTANCE`: the Lease holder identity (the pod name).
    holder_id: String,
    lease_duration: Duration,
    /// Per API call (watches excepted): a hung API server must not hold up the loop.
    call_timeout: Duration,
    local: Store,
    shared: Shared,
    view: Mutex<View>,
    /// Raised when the Secret or the Lease changed the view; the rotation loop waits on it.
    changed: Signal,
    /// Raised when the Lease was seen anew (or its watch went down): the election looks again.
    lease_seen: Signal,
    /// Raised when a read found the Lease ahead of its watch: the watch starts again.
    lease_watch_stale: Signal,
    /// Raised when the view forgets the Secret (any call found the API server out of
    /// reach): the mirror reads it again instead of waiting on a watch that may have
    /// outlived the outage and, with the Secret unchanged, would never bring it back.
    forgotten: Signal,
    gauges: ClusterGauges,
}

/// See the module documentation.
#[derive(Clone)]
pub(crate) struct KubeStore {
    inner: Arc<Inner>,
}

/// `min(15 s, threshold / 2)` in whole seconds, at least one: a holder that dies is
/// replaced well inside the forced window. Whole seconds because the Lease records whole
/// seconds and other replicas judge this one's hold by the record: a hold of 3.5 s recorded
/// as 3 s let a successor take over while this replica still believed it held the lease.
pub(crate) fn lease_duration_for_threshold(threshold: Duration) -> Duration {
    Duration::from_secs((threshold / 2).as_secs().clamp(1, 15))
}

/// How long before its token expires a replica that is not the lease holder stops waiting
/// for it and rotates alone: as soon as a successor of a holder that died as the forced
/// window opened could have taken over (lease duration plus one renewal period into the
/// window), at least one second before expiry. Any later and the fallback runs into the
/// provider's refusal window: Azure refuses tokens in their last 30 s, half the default
/// threshold, so at the defaults (threshold 60 s, lease 15 s) the fallback starts with 40 s
/// left and has 10 s before the refusal starts. (Half the threshold, as before, was exactly
/// where Azure starts refusing: a fleet whose holder failed then had no credential left.)
pub(crate) fn alone_before_expiry(threshold: Duration, lease: Duration) -> Duration {
    let takeover = lease + lease / 3;
    threshold
        .saturating_sub(takeover)
        .max(Duration::from_secs(1))
}

/// A client for `config` (see the `client` module for its TLS).
pub(crate) fn client_for(config: &kube::Config) -> Result<kube::Client, ClusterError> {
    client::build(config, Duration::from_secs(5))
}

impl KubeStore {
    /// Connects (in-cluster service account, else `KUBECONFIG`), reads the Secret once and
    /// takes part in one election, then runs the election and the mirror until `cancel`.
    pub async fn start(
        shared: Shared,
        target: KubeTarget,
        cancel: CancellationToken,
    ) -> Result<(KubeStore, tokio::task::JoinHandle<()>), ClusterError> {
        let cfg = shared.config.clone();
        let client_cfg = kube::Config::infer()
            .await
            .map_err(|e| ClusterError::Connect(e.to_string()))?;
        let lease_duration = lease_duration_for_threshold(cfg.threshold());
        let namespace = target
            .namespace
            .clone()
            .unwrap_or_else(|| client_cfg.default_namespace.clone());
        let client = client::build(&client_cfg, lease_duration.min(cfg.http_timeout))?;
        let local = shared.store.clone().with_write_wait(cfg.write_lock_wait);
        let gauges = ClusterGauges::registered(&shared.metrics);
        let store = KubeStore {
            inner: Arc::new(Inner {
                secrets: Api::namespaced(client.clone(), &namespace),
                leases: Api::namespaced(client, &namespace),
                namespace,
                target,
                holder_id: cfg.instance.clone(),
                lease_duration,
                call_timeout: lease_duration.min(cfg.http_timeout),
                local,
                shared,
                view: Mutex::new(View::default()),
                changed: Signal::new(),
                lease_seen: Signal::new(),
                lease_watch_stale: Signal::new(),
                forgotten: Signal::new(),
                gauges,
            }),
        };
        info!(secret = %store.secret_name(), lease = %store.lease_name(), holder = %store.inner.holder_id, lease_duration_s = lease_duration.as_secs(), "cluster store: sharing the credential through a Secret and a Lease");
        if let Err(e) = store.refresh().await {
            warn!(error = %e, "cannot read the Secret yet; serving the token in the config file meanwhile");
        }
        store.elect_once().await;
        let tasks = {
            let (a, b) = (store.clone(), store.clone());
            let (ca, cb) = (cancel.clone(), cancel);
            tokio::spawn(async move {
                tokio::join!(a.run_election(ca), b.run_mirror(cb));
            })
        };
        Ok((store, tasks))
    }

    fn secret_name(&self) -> String {
        format!("{}/{}", self.inner.namespace, self.inner.target.secret)
    }

    fn lease_name(&self) -> String {
        format!("{}/{}", self.inner.namespace, self.inner.target.lease)
    }

    fn view<T>(&self, f: impl FnOnce(&mut View) -> T) -> T {
        f(&mut self.inner.view.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether this replica holds the Lease now.
    pub fn is_holder(&self) -> bool {
        self.view(|v| v.lease.holds(Instant::now()))
    }

    /// Records the outcome of one API call of `source` and publishes the status.
    fn note<T>(&self, source: &'static str, r: &Result<T, ClusterError>) {
        let now = self.inner.shared.now();
        let forgotten = self.view(|v| match r {
            Ok(_) => {
                v.reachable = true;
                v.problems.remove(source);
                if source == "secret" {
                    v.last_sync = Some(now);
                }
                false
            }
            Err(e) => {
                let unreachable = matches!(e, ClusterError::Unreachable { .. });
                // A server that answered (a 403, a missing Secret) is reachable.
                v.reachable = !unreachable && (v.reachable || !e.is_transient());
                // What was read before is no longer known to be current.
                v.problems.insert(source, e.to_string());
                (unreachable || source == "secret") && v.secret.take().is_some()
            }
        });
        if forgotten {
            self.inner.forgotten.raise();
        }
        self.publish();
    }

    /// Copies the view into the service status and gauges.
    fn publish(&self) {
        let status = self.view(|v| ClusterStatus {
            holder: v.lease.holds(Instant::now()),
            lease_holder: v.lease_holder.clone(),
            api_reachable: v.reachable,
            last_sync: v.last_sync,
            problem: v.problems.values().next().cloned(),
        });
        self.inner.gauges.set(&status);
        self.inner
            .shared
            .set_status(|s| s.backend = Some(status.published()));
    }

    /// Runs one call to the API server with the per-call deadline, classifying failures;
    /// counts it when the server answered (what this replica costs the cluster).
    async fn call<T>(
        &self,
        verb: &'static str,
        resource: &str,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, ClusterError> {
        let holder = self.is_holder();
        let answered = || self.inner.gauges.requested(resource, verb, holder);
        match tokio::time::timeout(self.inner.call_timeout, fut).await {
            Err(_) => Err(ClusterError::Unreachable {
                action: format!("{verb} {resource}"),
                message: format!("no answer within {:?}", self.inner.call_timeout),
            }),
            Ok(Ok(v)) => {
                answered();
                Ok(v)
            }
            Ok(Err(e)) => {
                if matches!(e, kube::Error::Api(_)) {
                    answered();
                }
                Err(self.classify(verb, resource, e))
            }
        }
    }

    fn classify(&self, verb: &'static str, resource: &str, e: kube::Error) -> ClusterError {
        client::classify(
            verb,
            resource,
            &self.inner.namespace,
            &self.inner.target.secret,
            e,
        )
    }

    fn secret_resource(&self) -> String {
        format!("secrets/{}", self.inner.target.secret)
    }

    /// The shared credential as a snapshot: its token and state, this pod's host, and the
    /// pending revocations this replica may carry out (all while it holds the Lease, else
    /// only its pod-local ones).
    fn shared_snapshot(&self, cred: &SecretContents, local: &Snapshot) -> Snapshot {
        let mut state = cred.state.clone();
        state.pending_revocations.extend(
            local
                .state
                .pending_revocations
                .iter()
                .filter(|p| p.pod_local)
                .cloned(),
        );
        Snapshot {
            token: cred.token.clone(),
            host: local.host.clone(),
            state,
            state_error: None,
        }
    }

    /// The credential this replica works on, given its file's: the Secret's when it is
    /// known and not behind the pod (the holder's always: it replaces it), the file's
    /// otherwise; a non-holder sees only its pod-local revocations.
    fn seen_from(&self, local: Snapshot) -> Snapshot {
        let holder = self.is_holder();
        let (cred, local_rotation) = self.view(|v| (v.secret.clone(), v.local_rotation));
        let mut snap = match cred {
            // A holder works on the Secret even when it is behind: it replaces it.
            Some(cred) if !local_rotation && (holder || !self.shared_behind(&local)) => {
                self.shared_snapshot(&cred, &local)
            }
            // The Secret is not known now, or is behind this pod: the file is the best
            // knowledge.
            _ => local,
        };
        if !holder {
            snap.state.pending_revocations.retain(|p| p.pod_local);
        }
        snap
    }

    async fn local_snapshot(&self) -> Result<Snapshot, StoreError> {
        CredentialStore::snapshot(&self.inner.local).await
    }
}

impl CredentialStore for KubeStore {
    type Version = (Option<String>, Option<FileVersion>, bool);

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(self.seen_from(self.local_snapshot().await?))
    }

    async fn snapshot_for_swap(&self) -> Result<ForSwap, StoreError> {
        let ForSwap { snapshot, writable } =
            CredentialStore::snapshot_for_swap(&self.inner.local).await?;
        // Only the holder swaps the Secret; a rotation for this pod alone needs no Lease.
        let may_swap = self.view(|v| v.local_rotation) || self.is_holder();
        let writable = writable.and_then(|()| {
            may_swap
                .then_some(())
                .ok_or_else(|| self.not_holder().into())
        });
        let snapshot = self.seen_from(snapshot);
        Ok(ForSwap { snapshot, writable })
    }

    async fn swap(
        &self,
        expected: Option<Token>,
        new: Token,
        host: Option<String>,
        mut rotation: Rotation,
        clock: Clock,
    ) -> Result<SwapOutcome, StoreError> {
        if self.view(|v| v.local_rotation) {
            // This pod alone: its readers must not hold a dead token while the Secret is out
            // of reach. Only a pod-local token it replaces is its to revoke.
            rotation.pod_local = true;
            rotation.replaces = rotation.replaces.filter(|p| p.pod_local);
            return CredentialStore::swap(&self.inner.local, expected, new, host, rotation, clock)
                .await;
        }
        self.swap_shared(expected, new, rotation, clock)
            .await
            .map_err(StoreError::from)
    }

    async fn edit_state(&self, edit: StateEdit) -> Result<(), StoreError> {
        CredentialStore::edit_state(&self.inner.local, edit.clone()).await?;
        // A U2M login's records go to the Secret from any replica: each is guarded by its
        // own claim nonce or token hash (a compare-and-swap like the rest), and the answer
        // to a refresh must reach the Secret even from a replica that lost the Lease while
        // it was on the wire, or the new refresh token would be nowhere.
        let login_record = matches!(
            edit,
            StateEdit::Login(_)
                | StateEdit::Refreshed { .. }
                | StateEdit::RefreshUnsent { .. }
                | StateEdit::LoginLost { .. }
        );
        if login_record || (self.is_holder() && !self.view(|v| v.local_rotation)) {
            self.edit_shared_state(&edit).await?;
        }
        Ok(())
    }

    fn try_rotation<'a, T: Send + 'a>(
        &'a self,
        work: BoxFuture<'a, T>,
    ) -> BoxFuture<'a, Result<Option<T>, StoreError>> {
        Box::pin(async move {
            match self.secret_known().await {
                Ok(()) if self.is_holder() => Ok(Some(work.await)),
                Ok(()) => {
                    let local = self.local_snapshot().await?;
                    let now = self.inner.shared.now();
                    if self.alone_at(&local).is_none_or(|at| at > now) {
                        return Ok(None);
                    }
                    warn!(holder = %self.view(|v| v.lease_holder.clone()).unwrap_or_default(), "the lease holder has not replaced the token and this pod's token is near expiry: rotating for this pod alone (it converges on the Secret's token once the holder writes one)");
                    Ok(Some(self.rotate_alone(work).await))
                }
                Err(e) => {
                    let local = self.local_snapshot().await?;
                    if !self.local_forced(&local) {
                        return Err(e.into());
                    }
                    warn!(error = %e, "the Secret is out of reach and this pod's token is near expiry: rotating for this pod alone (it converges on the Secret's token once the API server answers)");
                    Ok(Some(self.rotate_alone(work).await))
                }
            }
        })
    }

    async fn wait_rotation_free(&self, limit: Duration) -> Result<bool, StoreError> {
        let start = self.view(|v| v.secret.as_ref().map(|c| c.resource_version.clone()));
        let deadline = Instant::now() + limit;
        // This pod waits for the holder only until it must rotate alone: the wait then ends
        // as "free" and the next attempt rotates.
        let local = self.local_snapshot().await?;
        let alone_at = self
            .alone_at(&local)
            .map(|d| Instant::now() + (d - self.inner.shared.now()).to_std().unwrap_or_default());
        loop {
            let now_version = self.view(|v| v.secret.as_ref().map(|c| c.resource_version.clone()));
            if self.is_holder()
                || (now_version.is_some() && now_version != start)
                || alone_at.is_some_and(|a| a <= Instant::now())
            {
                return Ok(true);
            }
            if !self.view(|v| v.reachable) {
                return Err(ClusterError::Unreachable {
                    action: "wait for the lease holder's rotation".into(),
                    message: "the API server stopped answering".into(),
                }
                .into());
            }
            let until = alone_at.map_or(deadline, |a| a.min(deadline));
            let notified = self.inner.changed.raised();
            if tokio::time::timeout_at(until, notified).await.is_err() && until == deadline {
                return Ok(false);
            }
        }
    }

    fn version(&self) -> Self::Version {
        let (rv, holder) = self.view(|v| {
            (
                v.secret.as_ref().map(|c| c.resource_version.clone()),
                v.lease.holds(Instant::now()),
            )
        });
        (rv, CredentialStore::version(&self.inner.local), holder)
    }

    async fn changed(&self) {
        tokio::select! {
            _ = self.inner.changed.raised() => {}
            _ = CredentialStore::changed(&self.inner.local) => {}
        }
    }

    fn token_instance(&self) -> Option<String> {
        let shared = format!("{}/{}", self.inner.namespace, self.inner.target.secret);
        Some(if self.view(|v| v.local_rotation) {
            format!("{shared}/{}", self.inner.holder_id)
        } else {
            shared
        })
    }

    fn reaps_here(&self) -> bool {
        self.is_holder()
    }

    fn owned_instances(&self) -> Vec<String> {
        let shared = format!("{}/{}", self.inner.namespace, self.inner.target.secret);
        vec![format!("{shared}/{}", self.inner.holder_id), shared]
    }

    async fn fallback_credential(&self) -> Option<Token> {
        // After an outage the Secret may hold a token that died meanwhile, while this pod's
        // own (pod-local) token still lives: the holder mints the next shared token with it.
        let local = self.local_snapshot().await.ok()?;
        let now = self.inner.shared.now();
        local
            .token
            .clone()
            .filter(|_| local.times().is_some_and(|t| t.expires_at > now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deadlines of one forced window, in order: a successor takes over, then a replica
    /// falls back alone, then (Azure's rule, at most 30 s, half the threshold) the provider
    /// refuses the token. Checked at every threshold where Azure's rule leaves room for a
    /// takeover at all (the lease formula gives lease + lease/3 = 20 s from 45 s up).
    #[test]
    fn the_fallback_comes_after_a_takeover_and_before_the_refusal_window() {
        for threshold_s in [45u64, 50, 60] {
            let threshold = Duration::from_secs(threshold_s);
            let lease = lease_duration_for_threshold(threshold);
            let fallback_left = alone_before_expiry(threshold, lease);
            let takeover_done_left = threshold - (lease + lease / 3);
            let azure_refusal_left = (threshold / 2).min(Duration::from_secs(30));
            assert!(
                fallback_left <= takeover_done_left,
                "{threshold_s}: before a takeover"
            );
            assert!(
                fallback_left >= azure_refusal_left + Duration::from_secs(2),
                "{threshold_s}: the fallback has {fallback_left:?} left, the refusal starts at {azure_refusal_left:?}"
            );
        }
        // At the defaults: 40 s left, 10 s before Azure refuses.
        let d = Duration::from_secs(60);
        assert_eq!(
            alone_before_expiry(d, lease_duration_for_threshold(d)),
            Duration::from_secs(40)
        );
        // Compressed: never less than a second.
        assert!(
            alone_before_expiry(Duration::from_secs(2), Duration::from_secs(1))
                >= Duration::from_secs(1)
        );
    }
}
