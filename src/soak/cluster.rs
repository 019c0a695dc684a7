//! `soak --store kubernetes`: the replicas share one Secret and Lease on the API server that
//! `KUBECONFIG` names, reached through a gate the soak can cut (an API-server outage as the
//! replicas see it: connections reset and refused) without touching the server itself.
//!
//! Invariant: the soak's objects carry a per-run name and are deleted at the end; the
//! rewritten kubeconfig (it may hold credentials) is written 0600 in the report folder.

use super::setup::setup;
use super::SoakError;
use crate::cluster::{STATE_KEY, TOKEN_KEY};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The soak's view of the cluster.
pub(super) struct ClusterRig {
    pub secret: String,
    pub lease: String,
    pub namespace: String,
    /// The kubeconfig the replicas use: the user's, with the server behind the gate.
    pub kubeconfig: PathBuf,
    secrets: Api<Secret>,
    leases: Api<Lease>,
    gate: Gate,
}

impl ClusterRig {
    /// What a replica of the cluster store adds to a rotator's environment.
    pub(super) fn replica_env(&self) -> [(String, String); 5] {
        [
            ("PAT_STORE".to_string(), "kubernetes".to_string()),
            ("PAT_KUBE_SECRET".to_string(), self.secret.clone()),
            ("PAT_KUBE_NAMESPACE".to_string(), self.namespace.clone()),
            (
                "KUBECONFIG".to_string(),
                self.kubeconfig.display().to_string(),
            ),
            ("PAT_REVOKE_SEED".to_string(), "true".to_string()),
        ]
    }

    /// Opens the gate, writes the replicas' kubeconfig, and seeds a fresh Secret with `seed`.
    pub(super) async fn start(out: &Path, seed: &str) -> Result<ClusterRig, SoakError> {
        let path = std::env::var_os("KUBECONFIG")
            .map(PathBuf::from)
            .ok_or_else(|| {
                SoakError::Setup(
                    "--store kubernetes needs KUBECONFIG (the API server the replicas share)"
                        .into(),
                )
            })?;
        let mut kubeconfig =
            kube::config::Kubeconfig::read_from(&path).map_err(setup("cannot read KUBECONFIG"))?;
        let options = kube::config::KubeConfigOptions::default();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig.clone(), &options)
            .await
            .map_err(setup("cannot use KUBECONFIG"))?;
        let namespace = config.default_namespace.clone();
        let upstream = upstream_addr(config.cluster_url.host(), config.cluster_url.port_u16())?;
        let gate = Gate::open(upstream).await?;
        // The replicas reach the server through the gate; the certificate is still checked
        // against the server's own name.
        let context = kubeconfig.current_context.clone().unwrap_or_default();
        let cluster_name = kubeconfig
            .contexts
            .iter()
            .find(|c| c.name == context)
            .and_then(|c| c.context.as_ref())
            .map(|c| c.cluster.clone())
            .ok_or_else(|| SoakError::Setup(format!("KUBECONFIG has no context {context:?}")))?;
        for named in &mut kubeconfig.clusters {
            if named.name == cluster_name {
                if let Some(cluster) = named.cluster.as_mut() {
                    cluster.tls_server_name = config.cluster_url.host().map(str::to_string);
                    cluster.server = Some(format!("https://{}", gate.addr));
                }
            }
        }
        let json = serde_json::to_vec_pretty(&kubeconfig).map_err(setup("kubeconfig"))?;
        let rewritten = out.join("kubeconfig.json");
        crate::store::atomic_write_private(&rewritten, &json)
            .map_err(setup("cannot write the replicas' kubeconfig"))?;

        let client = crate::cluster::client_for(&config)
            .map_err(setup("cannot connect to the API server"))?;
        let secret = format!("pat-rotator-soak-{}", chrono::Utc::now().format("%H%M%S"));
        let rig = ClusterRig {
            lease: format!("{secret}-rotation"),
            secret,
            namespace: namespace.clone(),
            kubeconfig: rewritten,
            secrets: Api::namespaced(client.clone(), &namespace),
            leases: Api::namespaced(client, &namespace),
            gate,
        };
        let object = Secret {
            metadata: ObjectMeta {
                name: Some(rig.secret.clone()),
                ..ObjectMeta::default()
            },
            data: Some(
                [(TOKEN_KEY.to_string(), ByteString(seed.as_bytes().to_vec()))]
                    .into_iter()
                    .collect(),
            ),
            ..Secret::default()
        };
        rig.secrets
            .create(&PostParams::default(), &object)
            .await
            .map_err(setup("cannot create the soak's Secret"))?;
        Ok(rig)
    }

    /// Who holds the Lease now (`None`: nobody, or the server did not answer).
    pub(super) async fn holder(&self) -> Option<String> {
        let lease = tokio::time::timeout(Duration::from_secs(2), self.leases.get_opt(&self.lease))
            .await
            .ok()?
            .ok()??;
        lease.spec?.holder_identity.filter(|h| !h.is_empty())
    }

    /// The token id the Secret's state records as current, and its pending revocations.
    pub(super) async fn recorded_ids(&self) -> Vec<String> {
        let Ok(Ok(secret)) =
            tokio::time::timeout(Duration::from_secs(5), self.secrets.get(&self.secret)).await
        else {
            return Vec::new();
        };
        let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(STATE_KEY)) else {
            return Vec::new();
        };
        let Ok(state) = serde_json::from_slice::<crate::store::State>(&bytes.0) else {
            return Vec::new();
        };
        state
            .token_id
            .into_iter()
            .chain(state.pending_revocations.into_iter().map(|p| p.token_id))
            .collect()
    }

    /// Cuts the replicas off the API server for `duration` (the soak's own view stays).
    pub(super) fn cut(&self, duration: Duration) {
        self.gate.cut(duration);
    }

    /// Deletes the soak's Secret and Lease.
    pub(super) async fn cleanup(&self) {
        let dp = DeleteParams::default();
        let _ = self.secrets.delete(&self.secret, &dp).await;
        let _ = self.leases.delete(&self.lease, &dp).await;
        self.gate.stop.cancel();
    }
}

fn upstream_addr(host: Option<&str>, port: Option<u16>) -> Result<SocketAddr, SoakError> {
    let host = host.unwrap_or("127.0.0.1").trim_matches(['[', ']']);
    let port = port.unwrap_or(443);
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(setup("cannot resolve the API server"))?
        .next()
        .ok_or_else(|| SoakError::Setup(format!("the API server {host}:{port} has no address")))
}

/// A loopback TCP forwarder to the API server that can be cut: while cut, open connections
/// are dropped and new ones closed at once. Written by hand: a soak-only fault injector of
/// a few lines, where a proxy crate would add far more than it saves.
struct Gate {
    addr: SocketAddr,
    /// Replaced (and the old one cancelled) at each cut: every connection watches the one it
    /// started under.
    epoch: Arc<std::sync::Mutex<(CancellationToken, tokio::time::Instant)>>,
    stop: CancellationToken,
}

impl Gate {
    async fn open(upstream: SocketAddr) -> Result<Gate, SoakError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(setup("cannot open the API server gate"))?;
        let addr = listener.local_addr().map_err(setup("gate address"))?;
        let epoch = Arc::new(std::sync::Mutex::new((
            CancellationToken::new(),
            tokio::time::Instant::now(),
        )));
        let stop = CancellationToken::new();
        let (e, s) = (epoch.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = s.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((inbound, _)) = accepted else { continue };
                let (cut, open_at) = {
                    let g = e.lock().unwrap_or_else(|p| p.into_inner());
                    (g.0.clone(), g.1)
                };
                if tokio::time::Instant::now() < open_at {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut a, mut b) = (inbound, outbound);
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    }
                });
            }
        });
        Ok(Gate { addr, epoch, stop })
    }

    fn cut(&self, duration: Duration) {
        let mut g = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        g.0.cancel();
        *g = (
            CancellationToken::new(),
            tokio::time::Instant::now() + duration,
        );
    }
}
