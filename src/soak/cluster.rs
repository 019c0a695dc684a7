//! `soak --store kubernetes`: the replicas share one Secret and Lease on the API server that
//! `KUBECONFIG` names, reached through a gate the soak can cut (an API-server outage as the
//! replicas see it: connections reset and refused) without touching the server itself.
//!
//! Invariant: the soak's objects carry a per-run name and are deleted at the end; the
//! rewritten kubeconfig (it may hold credentials) is written 0600 in the report folder.

use super::setup::{setup, RotatorProc};
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
    /// The soak's own requests to the API server ("soak <resource> <verb>"), so that what the
    /// replicas cost can be told from the server's counters.
    own_requests: std::sync::Mutex<KubeRequests>,
    /// Every replica's requests once the fleet settled (one lifetime in), and when: the start
    /// of the steady-state window (no start-up, no shutdown).
    settled: Option<(std::time::Instant, KubeRequests)>,
    /// The replicas' requests in the steady-state window, and its length in minutes.
    pub steady: Option<(KubeRequests, f64)>,
}

/// Requests to the API server by "<who> <resource> <verb>" (who: `holder` or `replica`, as
/// each replica reports it, or `soak`).
pub(crate) type KubeRequests = std::collections::BTreeMap<String, u64>;

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

    /// Opens the gate, writes the replicas' kubeconfig, and seeds a fresh Secret with `seed`
    /// (none for a U2M login, which `pat-rotator login` writes into the Secret's state).
    pub(super) async fn start(out: &Path, seed: Option<&str>) -> Result<ClusterRig, SoakError> {
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
            own_requests: Default::default(),
            settled: None,
            steady: None,
        };
        let object = Secret {
            metadata: ObjectMeta {
                name: Some(rig.secret.clone()),
                ..ObjectMeta::default()
            },
            data: Some(
                seed.map(|seed| (TOKEN_KEY.to_string(), ByteString(seed.as_bytes().to_vec())))
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

    fn count(&self, resource: &str, verb: &str) {
        let mut own = self.own_requests.lock().unwrap_or_else(|p| p.into_inner());
        *own.entry(format!("soak {resource} {verb}")).or_default() += 1;
    }

    /// The soak's own requests so far.
    pub(super) fn own_requests(&self) -> KubeRequests {
        self.own_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Who holds the Lease now (`None`: nobody, or the server did not answer).
    pub(super) async fn holder(&self) -> Option<String> {
        self.count("leases", "get");
        let lease = tokio::time::timeout(Duration::from_secs(2), self.leases.get_opt(&self.lease))
            .await
            .ok()?
            .ok()??;
        lease.spec?.holder_identity.filter(|h| !h.is_empty())
    }

    /// The token id the Secret's state records as current, and its pending revocations.
    pub(super) async fn recorded_ids(&self) -> Vec<String> {
        self.count("secrets", "get");
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

/// What a replica says it sent the API server (`pat_rotator_kube_requests_total` on its
/// `/metrics` at `health_port`), keyed "<role> <resource> <verb>"; empty when it does not
/// answer (a replica is scraped just before it is killed or stopped).
pub(super) async fn replica_requests(health_port: u16) -> KubeRequests {
    let url = format!("http://127.0.0.1:{health_port}/metrics");
    let text = match reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
    {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return KubeRequests::new(),
    };
    parse_kube_requests(&text)
}

/// The `pat_rotator_kube_requests_total` series of a Prometheus text exposition.
fn parse_kube_requests(text: &str) -> KubeRequests {
    let mut out = KubeRequests::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("pat_rotator_kube_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_string())
            })
        };
        let (Some(role), Some(resource), Some(verb)) =
            (label("role"), label("resource"), label("verb"))
        else {
            continue;
        };
        let n = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        *out.entry(format!("{role} {resource} {verb}")).or_default() += n;
    }
    out
}

impl RotatorProc {
    /// Adds what this process says it sent the API server (cluster store only).
    pub(super) async fn sample_kube_requests(&mut self) {
        let kube = self
            .env
            .iter()
            .any(|(k, v)| k == "PAT_STORE" && v == "kubernetes");
        if let (true, Some(&health)) = (kube && self.child.is_some(), self.ports().first()) {
            let seen = replica_requests(health).await;
            add_requests(&mut self.kube_requests, &seen);
        }
    }
}

impl ClusterRig {
    /// The soak's cluster: seeded with the bootstrap PAT, or empty for a U2M login (which
    /// `pat-rotator login` writes into the Secret's state).
    pub(super) async fn for_soak(
        opts: &super::SoakOptions,
        out: &Path,
        bootstrap: &str,
    ) -> Result<ClusterRig, SoakError> {
        let u2m = opts.credential == super::oauth::SoakCredential::U2m;
        ClusterRig::start(out, (!u2m).then_some(bootstrap)).await
    }

    /// Opens the steady-state window (once): every replica's requests so far.
    pub(super) async fn mark_settled(&mut self, rotators: &[RotatorProc]) {
        if self.settled.is_none() {
            self.settled = Some((std::time::Instant::now(), requests_now(rotators).await));
        }
    }

    /// Closes the steady-state window, before anything is stopped.
    pub(super) async fn mark_end(&mut self, rotators: &[RotatorProc]) {
        let Some((at, before)) = &self.settled else {
            return;
        };
        let mut window = requests_now(rotators).await;
        for (k, n) in before {
            if let Some(v) = window.get_mut(k) {
                *v = v.saturating_sub(*n);
            }
        }
        self.steady = Some((window, at.elapsed().as_secs_f64() / 60.0));
    }
}

/// What every replica has sent so far: its processes killed before, and the live one.
async fn requests_now(rotators: &[RotatorProc]) -> KubeRequests {
    let mut total = KubeRequests::new();
    for r in rotators {
        add_requests(&mut total, &r.kube_requests);
        if let (true, Some(&health)) = (r.child.is_some(), r.ports().first()) {
            add_requests(&mut total, &replica_requests(health).await);
        }
    }
    total
}

/// Adds `more` into `total`.
pub(super) fn add_requests(total: &mut KubeRequests, more: &KubeRequests) {
    for (k, n) in more {
        *total.entry(k.clone()).or_default() += n;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicas_request_counters_are_read_from_its_metrics() {
        let text = "# HELP pat_rotator_kube_requests Cluster store: requests\n\
pat_rotator_kube_requests_total{resource=\"leases\",verb=\"watch\",role=\"replica\"} 2\n\
pat_rotator_kube_requests_total{resource=\"secrets\",verb=\"get\",role=\"holder\"} 5\n\
pat_rotator_lease_holder 1\n";
        let got = parse_kube_requests(text);
        assert_eq!(got.get("replica leases watch"), Some(&2));
        assert_eq!(got.get("holder secrets get"), Some(&5));
        assert_eq!(got.len(), 2);
    }
}
