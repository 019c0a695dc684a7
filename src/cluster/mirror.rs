//! The Secret's side of the cluster store: decoding and encoding its keys, reading it,
//! watching it (resumed from the last version; re-read after a 410 or a dropped stream),
//! and mirroring it into this pod's config file.
//!
//! The watch itself is `watch_one` (resumed from bookmarks); the retry interval stays within
//! a lease period so that a returning API server is noticed at once.

use super::watch_one::WatchEnd;
use super::{ClusterError, KubeStore, STATE_KEY, TOKEN_KEY};
use crate::backoff::Backoff;
use crate::store::{revoke_not_before, State};
use crate::Token;
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The token and state a Secret holds, and the version they were read at.
#[derive(Clone)]
pub(super) struct SecretContents {
    pub(super) token: Option<Token>,
    pub(super) state: State,
    pub(super) resource_version: String,
}

/// The Secret's credential, and why its state could not be read if it could not (an
/// unreadable state reads as empty: expiry unknown).
pub(super) fn decode(secret: &Secret) -> (SecretContents, Option<String>) {
    let data = secret.data.as_ref();
    let token = data
        .and_then(|d| d.get(TOKEN_KEY))
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(Token::new);
    let (state, state_error) = match data.and_then(|d| d.get(STATE_KEY)) {
        None => (State::default(), None),
        Some(b) => match serde_json::from_slice::<State>(&b.0) {
            Ok(s) => (s, None),
            Err(e) => (State::default(), Some(e.to_string())),
        },
    };
    let resource_version = secret.metadata.resource_version.clone().unwrap_or_default();
    let credential = SecretContents {
        token,
        state,
        resource_version,
    };
    (credential, state_error)
}

/// Puts `token` and `state` into the Secret, keeping its other keys and metadata (the
/// `resourceVersion` read with it makes the write a compare-and-swap).
pub(super) fn encode(secret: &mut Secret, token: Option<&Token>, state: &State) {
    let data = secret.data.get_or_insert_default();
    // A U2M login's Secret has no token until its first refresh.
    if let Some(token) = token {
        data.insert(
            TOKEN_KEY.into(),
            ByteString(token.expose().as_bytes().to_vec()),
        );
    }
    // The state holds ids, fingerprints and times, and (U2M) the login's refresh token,
    // which belongs in a Secret; never the access token.
    let json = serde_json::to_vec(state).unwrap_or_default();
    data.insert(STATE_KEY.into(), ByteString(json));
    // Written through `data`; a hand-made Secret may carry the same keys in `stringData`,
    // which the API server would merge over them.
    secret.string_data = None;
}

/// Whether this pod keeps its own file's token instead of the Secret's `token`: when the
/// file's token lives and the Secret's is not vouched for by its own state (a re-applied
/// old manifest, a garbled value, a hand-written seed: its fingerprint is not the state's),
/// or is recorded as expiring before it (dead, or just shorter-lived: this pod rotated
/// alone during an outage or past a stuck holder). An unvouched token reaches the file only
/// when the pod has no live token of its own (a new pod, a first seed); the holder verifies
/// it by minting with it and replaces it. The mirror never swaps a token for one that dies
/// sooner.
pub(super) fn keeps_local_token(
    shared: &State,
    token: &Token,
    local: Option<&crate::store::Snapshot>,
    now: DateTime<Utc>,
) -> bool {
    let Some(local) = local.filter(|l| l.token.as_ref() != Some(token)) else {
        return false;
    };
    let Some(local_expiry) = local.times().map(|t| t.expires_at).filter(|e| *e > now) else {
        return false;
    };
    match shared.times_for(Some(token)) {
        None => true,
        Some(t) => t.expires_at < local_expiry,
    }
}

/// The local state after mirroring the Secret: the Secret's state, plus this pod's own
/// pending revocations, plus this pod's own current token (minted during an outage) queued
/// for revocation after the grace when the shared token replaces it. The shared state never
/// brings pod-local records (they are some other pod's).
pub(super) fn mirrored_state(
    local: &State,
    file_token: Option<&Token>,
    new: &Token,
    shared: State,
    now: DateTime<Utc>,
    grace: Duration,
) -> State {
    let mut keep: Vec<_> = local
        .pending_revocations
        .iter()
        .filter(|p| p.pod_local)
        .cloned()
        .collect();
    if local.pod_local && file_token.is_some_and(|c| c != new && local.token_id_for(c).is_some()) {
        keep.extend(local.replaced_current(revoke_not_before(now, grace)));
    }
    let mut state = shared;
    state.pod_local = false;
    state.pending_revocations.retain(|p| !p.pod_local);
    for p in keep {
        state.queue_revocation(p);
    }
    state
}

impl KubeStore {
    /// Reads the Secret and adopts it.
    pub(super) async fn refresh(&self) -> Result<(), ClusterError> {
        let got = self.get_secret().await;
        self.note("secret", &got);
        self.adopt(&got?).await;
        Ok(())
    }

    /// Makes sure the view holds the Secret: as the mirror's watch keeps it, read only when
    /// the view has none (an outage or a broken watch forgot it). A replica whose turn comes
    /// to the forced window then asks the API server nothing while the watch delivers; the
    /// holder's write reads the Secret anyway.
    pub(super) async fn secret_known(&self) -> Result<(), ClusterError> {
        if self.view(|v| v.secret.is_some()) {
            return Ok(());
        }
        self.refresh().await
    }

    /// Takes the Secret as the current shared credential and mirrors it into this pod's
    /// config file (see [`keeps_local_token`] for when the file keeps its own).
    pub(super) async fn adopt(&self, secret: &Secret) {
        let (credential, state_error) = decode(secret);
        if let Some(e) = &state_error {
            warn!(secret = %self.secret_name(), error = %e, "the Secret's state is unreadable; treating the expiry as unknown (it is rewritten at the next rotation)");
        }
        let now = self.inner.shared.now();
        let changed = self.view(|v| {
            let changed = v
                .secret
                .as_ref()
                .is_none_or(|c| c.resource_version != credential.resource_version);
            v.secret = Some(credential.clone());
            v.reachable = true;
            v.last_sync = Some(now);
            changed
        });
        if let Some(token) = credential.token {
            self.copy_into_file(token, credential.state).await;
        }
        self.publish();
        if changed {
            self.inner.changed.raise();
        }
    }

    async fn copy_into_file(&self, token: Token, shared_state: State) {
        let cfg = self.inner.shared.config.clone();
        let now = self.inner.shared.now();
        let local = self.local_snapshot().await.ok();
        if keeps_local_token(&shared_state, &token, local.as_ref(), now) {
            debug!("the Secret's token dies before this pod's own; keeping this pod's until the holder writes a newer one");
            return;
        }
        let store = self.inner.local.clone();
        let host = cfg.host.clone();
        let (grace, wait) = (cfg.revoke_grace, cfg.write_lock_wait);
        let new = token.clone();
        let result = tokio::task::spawn_blocking(move || {
            store.write_copy(&new, host.as_deref(), wait, |current, st| {
                *st = mirrored_state(st, current, &new, shared_state, now, grace);
            })
        })
        .await;
        match result {
            Ok(Ok(true)) => {
                info!(event = "mirrored", token = %token, secret = %self.secret_name(), "the Secret's token is in this pod's config file")
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "cannot mirror the Secret's token into the config file; retrying at the next change")
            }
            Err(e) => warn!(error = %e, "the mirror task failed"),
        }
    }

    /// Watches the Secret until `cancel`, mirroring every change.
    pub(super) async fn run_mirror(&self, cancel: CancellationToken) {
        let cap = (self.inner.lease_duration / 3).max(Duration::from_secs(1));
        let mut retry = Backoff::new(Duration::from_millis(200), cap);
        let name = self.inner.target.secret.clone();
        // Where the next watch request starts (`None`: read the Secret first): from the read
        // the store started with.
        let mut resume = self.view(|v| v.secret.as_ref().map(|c| c.resource_version.clone()));
        while !cancel.is_cancelled() {
            if resume.is_none() || self.view(|v| v.secret.is_none()) {
                // This read answers any earlier "forgotten" too.
                self.inner.forgotten.clear();
                if self.refresh().await.is_err() {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(retry.next_delay(None)) => continue,
                    }
                }
                resume = self.view(|v| v.secret.as_ref().map(|c| c.resource_version.clone()));
            }
            let Some(mut from) = resume.clone() else {
                continue;
            };
            // Another call found the server out of reach and the view forgot the Secret:
            // read it again (this watch may be a connection that outlived the outage, with
            // nothing new to bring).
            let stop = async {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = self.inner.forgotten.raised() => {}
                }
            };
            let end = self
                .watch_one(
                    &self.inner.secrets,
                    &name,
                    &mut from,
                    stop,
                    || {},
                    |s| {
                        retry.reset();
                        async move { self.adopt(&s).await }
                    },
                )
                .await;
            resume = Some(from);
            match end {
                WatchEnd::Closed => {}
                WatchEnd::Stopped | WatchEnd::Reread => resume = None,
                WatchEnd::Deleted => {
                    warn!(secret = %self.secret_name(), "the Secret was deleted; this pod keeps serving its current token until it is back");
                    self.view(|v| v.secret = None);
                    resume = None;
                }
                WatchEnd::Failed(e) => {
                    self.note::<()>("secret", &Err(e));
                    resume = None;
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(retry.next_delay(None)) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{PendingRevocation, Rotation, Snapshot};
    use chrono::TimeDelta;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn minted(token: &Token, id: &str, expires_in: i64, pod_local: bool) -> State {
        let mut st = State::default();
        Rotation {
            pod_local,
            ..Rotation::new(id, now() + TimeDelta::seconds(expires_in), "pod-a")
        }
        .apply(&mut st, token, now());
        st
    }

    fn pending(id: &str, pod_local: bool) -> PendingRevocation {
        PendingRevocation {
            token_id: id.into(),
            token_sha256: Token::new(id).sha256_hex(),
            not_before: now(),
            expires_at: None,
            pod_local,
            seed: false,
        }
    }

    #[test]
    fn a_secret_round_trips_and_keeps_its_other_keys() {
        let mut secret = Secret::default();
        secret
            .data
            .get_or_insert_default()
            .insert("note".into(), ByteString(b"kept".to_vec()));
        let token = Token::new("dapi-shared");
        let state = minted(&token, "t1", 60, false);
        encode(&mut secret, Some(&token), &state);
        let (back, state_error) = decode(&secret);
        assert_eq!(back.token, Some(token.clone()));
        assert_eq!(back.state, state);
        assert!(state_error.is_none());
        let data = secret.data.as_ref().unwrap();
        assert_eq!(data["note"].0, b"kept");
        // The state never carries the token value.
        assert!(!String::from_utf8_lossy(&data[STATE_KEY].0).contains("dapi-shared"));
    }

    #[test]
    fn a_hand_made_seed_reads_as_a_token_with_unknown_expiry() {
        let mut secret = Secret::default();
        secret
            .data
            .get_or_insert_default()
            .insert(TOKEN_KEY.into(), ByteString(b"  dapi-seed\n".to_vec()));
        let (d, _) = decode(&secret);
        assert_eq!(d.token, Some(Token::new("dapi-seed")));
        assert_eq!(d.state, State::default());
        secret
            .data
            .get_or_insert_default()
            .insert(STATE_KEY.into(), ByteString(b"{not json".to_vec()));
        let (d, state_error) = decode(&secret);
        assert!(state_error.is_some());
        assert!(d.state.times_for(d.token.as_ref()).is_none());
    }

    #[test]
    fn mirroring_takes_the_shared_state_and_keeps_only_this_pods_own_revocations() {
        let (old, new) = (Token::new("old"), Token::new("new"));
        let mut local = minted(&old, "old-id", 30, false);
        local.queue_revocation(pending("mine", true));
        local.queue_revocation(pending("shared-earlier", false));
        let mut shared = minted(&new, "new-id", 60, false);
        shared.queue_revocation(pending("old-id", false));
        shared.queue_revocation(pending("someone-elses", true));
        let st = mirrored_state(
            &local,
            Some(&old),
            &new,
            shared,
            now(),
            Duration::from_secs(2),
        );
        let ids: Vec<(&str, bool)> = st
            .pending_revocations
            .iter()
            .map(|p| (p.token_id.as_str(), p.pod_local))
            .collect();
        assert_eq!(ids, vec![("old-id", false), ("mine", true)]);
        assert_eq!(st.token_id.as_deref(), Some("new-id"));
        assert!(!st.pod_local);
    }

    #[test]
    fn this_pods_outage_token_is_queued_for_its_own_revocation_when_replaced() {
        let (local_token, shared_token) = (Token::new("pod-local"), Token::new("shared"));
        let local = minted(&local_token, "local-id", 10, true);
        let shared = minted(&shared_token, "shared-id", 60, false);
        let grace = Duration::from_secs(2);
        let st = mirrored_state(
            &local,
            Some(&local_token),
            &shared_token,
            shared.clone(),
            now(),
            grace,
        );
        let queued = &st.pending_revocations;
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].token_id, "local-id");
        assert!(queued[0].pod_local);
        // The grace (2 s) plus the one second that keeps it after any advertised
        // `expires_on`: written out, not taken from the function under test.
        assert_eq!(queued[0].not_before, now() + TimeDelta::seconds(3));
        // Mirroring the same token again queues nothing more.
        let again = mirrored_state(
            &st,
            Some(&shared_token),
            &shared_token,
            shared,
            now(),
            grace,
        );
        assert_eq!(again.pending_revocations, st.pending_revocations);
    }

    #[test]
    fn the_mirror_never_swaps_a_live_token_for_one_that_dies_sooner() {
        let (shared_token, local_token) = (Token::new("shared"), Token::new("local"));
        let dead = minted(&shared_token, "s", -1, false);
        let live_local = Snapshot {
            token: Some(local_token.clone()),
            host: None,
            state: minted(&local_token, "l", 10, true),
            state_error: None,
        };
        assert!(keeps_local_token(
            &dead,
            &shared_token,
            Some(&live_local),
            now()
        ));
        // A shorter-lived shared token is not mirrored either; a longer-lived one is.
        let shorter = minted(&shared_token, "s", 5, false);
        assert!(keeps_local_token(
            &shorter,
            &shared_token,
            Some(&live_local),
            now()
        ));
        let longer = minted(&shared_token, "s", 11, false);
        assert!(!keeps_local_token(
            &longer,
            &shared_token,
            Some(&live_local),
            now()
        ));
        // The same token in both: nothing kept apart.
        let same = Snapshot {
            token: Some(shared_token.clone()),
            state: longer.clone(),
            ..live_local.clone()
        };
        assert!(!keeps_local_token(
            &longer,
            &shared_token,
            Some(&same),
            now()
        ));
        // A local token that is dead too: the Secret's is mirrored.
        let dead_local = Snapshot {
            state: minted(&local_token, "l", -5, true),
            ..live_local
        };
        assert!(!keeps_local_token(
            &dead,
            &shared_token,
            Some(&dead_local),
            now()
        ));
        // A seed (expiry unknown) is mirrored into a pod with no live token of its own.
        assert!(!keeps_local_token(
            &State::default(),
            &shared_token,
            None,
            now()
        ));
    }

    #[test]
    fn a_token_the_secrets_state_does_not_vouch_for_never_replaces_a_live_one() {
        let (shared_token, local_token) = (Token::new("shared"), Token::new("local"));
        let live_local = Snapshot {
            token: Some(local_token.clone()),
            host: None,
            state: minted(&local_token, "l", 10, false),
            state_error: None,
        };
        // The state key dropped (an old manifest re-applied with kubectl replace).
        assert!(keeps_local_token(
            &State::default(),
            &shared_token,
            Some(&live_local),
            now()
        ));
        // The state kept, the token garbled: the fingerprint does not match.
        let vouches_for_another = minted(&Token::new("the real one"), "s", 100, false);
        assert!(keeps_local_token(
            &vouches_for_another,
            &Token::new("garbage"),
            Some(&live_local),
            now()
        ));
        // Vouched for and longer-lived: mirrored.
        assert!(!keeps_local_token(
            &minted(&shared_token, "s", 100, false),
            &shared_token,
            Some(&live_local),
            now()
        ));
    }
}
