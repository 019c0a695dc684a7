//! The Secret's side of the cluster store: decoding and encoding its keys, reading it,
//! watching it (resumed from the last version; re-read after a 410 or a dropped stream),
//! and mirroring it into this pod's config file.
//!
//! The watch loop is written on `Api::watch` rather than kube-runtime's `watcher`: one named
//! object needs a `get` (not a `list`) to start from, and the retry interval must stay within
//! a lease period so that a returning API server is noticed at once, not after a backoff of
//! tens of seconds.

use super::{ClusterError, KubeStore, SharedCredential, STATE_KEY, TOKEN_KEY};
use crate::backoff::Backoff;
use crate::store::{revoke_not_before, State};
use crate::Token;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::WatchParams;
use kube::core::WatchEvent;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long one watch request lasts before the server closes it and it is re-issued.
const WATCH_SECONDS: u32 = 60;

/// The token and state a Secret holds (an unreadable state reads as empty: expiry unknown).
pub(super) struct Decoded {
    pub(super) token: Option<Token>,
    pub(super) state: State,
    pub(super) state_error: Option<String>,
}

pub(super) fn decode(secret: &Secret) -> Decoded {
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
    Decoded {
        token,
        state,
        state_error,
    }
}

/// Puts `token` and `state` into the Secret, keeping its other keys and metadata (the
/// `resourceVersion` read with it makes the write a compare-and-swap).
pub(super) fn encode(secret: &mut Secret, token: &Token, state: &State) {
    let data = secret.data.get_or_insert_default();
    data.insert(
        TOKEN_KEY.into(),
        ByteString(token.expose().as_bytes().to_vec()),
    );
    // The state holds ids, fingerprints and times, never a token value.
    let json = serde_json::to_vec(state).unwrap_or_default();
    data.insert(STATE_KEY.into(), ByteString(json));
    // Written through `data`; a hand-made Secret may carry the same keys in `stringData`,
    // which the API server would merge over them.
    secret.string_data = None;
}

impl KubeStore {
    /// Reads the Secret and adopts it.
    pub(super) async fn refresh(&self) -> Result<(), ClusterError> {
        let got = self
            .call(
                "get",
                &self.secret_resource(),
                self.inner.secrets.get(&self.inner.target.secret),
            )
            .await;
        self.note("secret", &got);
        self.adopt(&got?).await;
        Ok(())
    }

    /// Takes the Secret as the current shared credential and mirrors it into this pod's
    /// config file, unless it records its token as expired while the file's token still
    /// lives (after an outage this pod may hold a fresher, pod-local token).
    pub(super) async fn adopt(&self, secret: &Secret) {
        let decoded = decode(secret);
        if let Some(e) = &decoded.state_error {
            warn!(secret = %self.secret_name(), error = %e, "the Secret's state is unreadable; treating the expiry as unknown (it is rewritten at the next rotation)");
        }
        let version = secret.metadata.resource_version.clone().unwrap_or_default();
        let now = self.inner.shared.now();
        let changed = self.view(|v| {
            let changed = v
                .secret
                .as_ref()
                .is_none_or(|c| c.resource_version != version);
            v.secret = Some(SharedCredential {
                token: decoded.token.clone(),
                state: decoded.state.clone(),
                resource_version: version,
            });
            v.reachable = true;
            v.last_sync = Some(now);
            changed
        });
        if let Some(token) = decoded.token {
            self.mirror(token, decoded.state).await;
        }
        self.publish();
        if changed {
            self.inner.changed.notify_waiters();
        }
    }

    async fn mirror(&self, token: Token, shared_state: State) {
        let cfg = self.inner.shared.config.clone();
        let now = self.inner.shared.now();
        let secret_dead = shared_state
            .times_for(Some(&token))
            .is_some_and(|t| t.expires_at <= now);
        if secret_dead {
            let local_alive = self
                .local_snapshot()
                .await
                .ok()
                .and_then(|s| s.times())
                .is_some_and(|t| t.expires_at > now);
            if local_alive {
                debug!("the Secret's token has expired by its record; keeping this pod's live token until the holder replaces it");
                return;
            }
        }
        let store = self.inner.local.clone();
        let host = cfg.host.clone();
        let (grace, wait) = (cfg.revoke_grace, cfg.write_lock_wait);
        let new = token.clone();
        let result = tokio::task::spawn_blocking(move || {
            store.mirror(&new, host.as_deref(), wait, |current, st| {
                let mut keep: Vec<_> = st
                    .pending_revocations
                    .iter()
                    .filter(|p| p.pod_local)
                    .cloned()
                    .collect();
                // This pod's own token (minted during an outage) gives way to the shared
                // one: this pod revokes it after the grace.
                if st.pod_local && current.is_some_and(|c| c != &new && st.token_id_for(c).is_some())
                {
                    keep.extend(st.replaced_current(revoke_not_before(now, grace)));
                }
                *st = shared_state;
                st.pod_local = false;
                st.pending_revocations.retain(|p| !p.pod_local);
                for p in keep {
                    st.queue_revocation(p);
                }
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
        let selector = format!("metadata.name={}", self.inner.target.secret);
        let resource = self.secret_resource();
        while !cancel.is_cancelled() {
            let mut version = self.view(|v| v.secret.as_ref().map(|c| c.resource_version.clone()));
            if version.is_none() {
                if self.refresh().await.is_err() {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(retry.next_delay(None)) => continue,
                    }
                }
                version = self.view(|v| v.secret.as_ref().map(|c| c.resource_version.clone()));
            }
            let Some(version) = version else { continue };
            let params = WatchParams::default().fields(&selector).timeout(WATCH_SECONDS);
            let stream = match self
                .call("watch", &resource, self.inner.secrets.watch(&params, &version))
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    self.note::<()>("secret", &Err(e));
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(retry.next_delay(None)) => continue,
                    }
                }
            };
            let mut stream = std::pin::pin!(stream);
            loop {
                let event = tokio::select! {
                    _ = cancel.cancelled() => return,
                    e = stream.next() => e,
                };
                match event {
                    Some(Ok(WatchEvent::Added(s) | WatchEvent::Modified(s))) => {
                        retry.reset();
                        self.adopt(&s).await;
                    }
                    Some(Ok(WatchEvent::Deleted(_))) => {
                        warn!(secret = %self.secret_name(), "the Secret was deleted; this pod keeps serving its current token until it is back");
                        self.view(|v| v.secret = None);
                        break;
                    }
                    Some(Ok(WatchEvent::Bookmark(_))) => {}
                    Some(Ok(WatchEvent::Error(status))) => {
                        // 410: the version is too old to resume from; read the Secret again.
                        debug!(code = status.code, "the watch ended; reading the Secret again");
                        self.view(|v| v.secret = None);
                        break;
                    }
                    Some(Err(e)) => {
                        let e = self.classify("watch", &resource, e);
                        self.note::<()>("secret", &Err(e));
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(retry.next_delay(None)) => {}
                        }
                        break;
                    }
                    // The server closed the watch at its timeout: resume from the version.
                    None => break,
                }
            }
        }
    }
}
