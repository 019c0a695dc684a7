//! The holder's writes to the Secret: the rotation's compare-and-swap and the state edits
//! (revocations done, reaps), each on the `resourceVersion` it read, then mirrored into this
//! pod's file.
//!
//! Invariant: the Secret's token is replaced only over the token the rotation started from,
//! by the lease holder; a different token found there is adopted, never overwritten.

use super::{mirror, ClusterError, KubeStore};
use crate::store::{Clock, Rotation, StateEdit, SwapOutcome};
use crate::Token;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use tracing::info;

/// How long the holder's write keeps retrying conflicts on the version alone.
const CONFLICT_RETRIES_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Between two attempts of a write that lost a conflict: a few milliseconds apart, so as
/// not to race the other writer in step.
async fn conflict_pause() {
    let pause = rand::random_range(1..20u64);
    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
}

impl KubeStore {
    pub(super) fn not_holder(&self) -> ClusterError {
        ClusterError::NotHolder {
            namespace: self.inner.namespace.clone(),
            name: self.inner.target.lease.clone(),
        }
    }

    /// The holder's write: re-read the Secret under the lease, write only over `expected`,
    /// compare-and-swap on the version just read; then mirror it into this pod's file. A
    /// conflict on the version alone (another writer changed an annotation, a label, the
    /// state, not the token: a GitOps tool, `kubectl annotate`) is written again over a
    /// fresh read; only a different token is adopted (adopting the old token would throw
    /// the new one away and cost another mint).
    pub(super) async fn swap_shared(
        &self,
        expected: Option<Token>,
        new: Token,
        mut rotation: Rotation,
        clock: Clock,
    ) -> Result<SwapOutcome, ClusterError> {
        // Never queue a pod-local token in the shared state: this pod revokes it itself.
        rotation.replaces = rotation.replaces.filter(|p| !p.pod_local);
        // Version-only conflicts are retried for a while, not a few times: a writer that
        // keeps annotating the Secret (hundreds of writes a second in the churn test) can
        // win three races in a row, and giving up throws the minted token away for another
        // mint. The bound keeps a rotation from outliving its HTTP budget.
        let give_up = tokio::time::Instant::now() + CONFLICT_RETRIES_FOR;
        let mut attempt = 0;
        loop {
            attempt += 1;
            if !self.is_holder() {
                return Err(self.not_holder());
            }
            let got = self.get_secret().await;
            self.note("secret", &got);
            let mut secret = got?;
            let (current, _) = mirror::decode(&secret);
            if current.token != expected {
                self.adopt(&secret).await;
                return Ok(SwapOutcome::Conflict {
                    current: current.token,
                });
            }
            let mut state = current.state;
            rotation.apply(&mut state, &new, clock());
            mirror::encode(&mut secret, Some(&new), &state);
            match self.replace_secret(&secret).await {
                Ok(written) => {
                    self.note::<()>("secret", &Ok(()));
                    self.adopt(&written).await;
                    return Ok(SwapOutcome::Swapped);
                }
                Err(ClusterError::Api { code: 409, .. })
                    if tokio::time::Instant::now() < give_up =>
                {
                    info!(
                        event = "secret_conflict",
                        attempt, "the Secret changed between read and write; reading it again"
                    );
                    conflict_pause().await;
                }
                Err(ClusterError::Api { code: 409, .. }) => {
                    info!("the Secret kept changing under the write; adopting what it holds");
                    let current = self.refresh_token().await;
                    return Ok(SwapOutcome::Conflict { current });
                }
                Err(e) => {
                    self.note::<()>("secret", &Err(e.clone()));
                    return Err(e);
                }
            }
        }
    }

    pub(super) async fn get_secret(&self) -> Result<Secret, ClusterError> {
        let name = &self.inner.target.secret;
        self.call("get", &self.secret_resource(), self.inner.secrets.get(name))
            .await
    }

    /// Writes the Secret: a compare-and-swap on the `resourceVersion` it was read with.
    async fn replace_secret(&self, secret: &Secret) -> Result<Secret, ClusterError> {
        let name = &self.inner.target.secret;
        let pp = PostParams::default();
        let write = self.inner.secrets.replace(name, &pp, secret);
        self.call("update", &self.secret_resource(), write).await
    }

    /// Applies a state edit to the Secret's state (compare-and-swap, retried on conflict for
    /// a while; an error past that, so that a caller that must store its edit, as the answer
    /// to a refresh, keeps it and tries again rather than take it as stored).
    pub(super) async fn edit_shared_state(&self, edit: &StateEdit) -> Result<(), ClusterError> {
        let give_up = tokio::time::Instant::now() + CONFLICT_RETRIES_FOR;
        while tokio::time::Instant::now() < give_up {
            let mut secret = self.get_secret().await?;
            let (mut current, _) = mirror::decode(&secret);
            let before = current.state.clone();
            edit.apply(&mut current.state);
            if current.state == before {
                return Ok(());
            }
            mirror::encode(&mut secret, current.token.as_ref(), &current.state);
            match self.replace_secret(&secret).await {
                Ok(written) => {
                    self.adopt(&written).await;
                    return Ok(());
                }
                Err(ClusterError::Api { code: 409, .. }) => conflict_pause().await,
                Err(e) => return Err(e),
            }
        }
        Err(ClusterError::Unreachable {
            action: format!("update {}", self.secret_resource()),
            message: "the Secret kept changing under the write".into(),
        })
    }

    async fn refresh_token(&self) -> Option<Token> {
        let _ = self.refresh().await;
        self.view(|v| v.secret.as_ref().and_then(|c| c.token.clone()))
    }
}

/// `pat-rotator login` under the cluster store: the login goes into the Secret's state, where
/// the lease holder refreshes it (a compare-and-swap on the version read; the Secret is
/// created when it does not exist yet, with no token until the first refresh). Returns the
/// Secret's `namespace/name`.
pub(crate) async fn store_login(
    target: &crate::config::KubeTarget,
    login: crate::store::Login,
) -> Result<String, ClusterError> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let cfg = kube::Config::infer()
        .await
        .map_err(|e| ClusterError::Connect(e.to_string()))?;
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| cfg.default_namespace.clone());
    let client = super::client_for(&cfg)?;
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client, &namespace);
    let name = &target.secret;
    let resource = format!("secrets/{name}");
    let failed = |verb: &'static str, e: kube::Error| {
        super::client::classify(verb, &resource, &namespace, name, e)
    };
    let edit = StateEdit::Login(login);
    for _ in 0..5 {
        let found = secrets.get_opt(name).await.map_err(|e| failed("get", e))?;
        let written = match found {
            Some(mut secret) => {
                let (mut current, _) = mirror::decode(&secret);
                edit.apply(&mut current.state);
                mirror::encode(&mut secret, current.token.as_ref(), &current.state);
                secrets
                    .replace(name, &PostParams::default(), &secret)
                    .await
                    .map_err(|e| failed("update", e))
            }
            None => {
                let mut secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    ..Secret::default()
                };
                let mut state = crate::store::State::default();
                edit.apply(&mut state);
                mirror::encode(&mut secret, None, &state);
                secrets
                    .create(&PostParams::default(), &secret)
                    .await
                    .map_err(|e| failed("create", e))
            }
        };
        match written {
            Ok(_) => return Ok(format!("{namespace}/{name}")),
            // Changed (or created) since the read: read it again.
            Err(ClusterError::Api { code: 409, .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ClusterError::Api {
        action: format!("update {resource}"),
        code: 409,
        message: "the Secret kept changing under the write; run `pat-rotator login` again".into(),
    })
}
