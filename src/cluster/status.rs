//! What the cluster store tells the people who run it: its status (what `/healthz` shows
//! under `cluster` and what keeps a replica unready) and where to seed a token by hand.
//!
//! Invariant: a problem keeps a replica unready only while the API server answers; an
//! outage is ridden out on the pod's own token, ready as long as that token is.

use crate::config::KubeTarget;
use crate::metrics::Metrics;
use crate::shared::BackendStatus;
use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::AtomicI64;

/// What a replica of the cluster store knows of the cluster: its part of `/healthz`
/// (under `cluster`) and of `status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct ClusterStatus {
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

impl ClusterStatus {
    /// As the service shows it: a problem keeps the replica unready only while the API
    /// server answers (an outage is ridden out on the pod's own token).
    pub(super) fn published(&self) -> BackendStatus {
        BackendStatus {
            name: "cluster",
            detail: serde_json::to_value(self).unwrap_or_default(),
            blocks_readiness: self.problem.clone().filter(|_| self.api_reachable),
        }
    }
}

/// One kind of request to the API server: what `pat_rotator_kube_requests_total` counts by.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KubeRequest {
    /// `leases` or `secrets`.
    resource: String,
    /// `get`, `create`, `update`, `watch`.
    verb: String,
    /// `holder` while this replica held the Lease, `replica` otherwise.
    role: String,
}

/// The cluster store's series on `/metrics`, registered when the store starts (a file-store
/// rotator has none): set from each [`ClusterStatus`] the store publishes, and the requests
/// this replica sent the API server (what it costs the cluster, measured where it is sent).
#[derive(Clone, Default)]
pub(super) struct ClusterGauges {
    requests: Family<KubeRequest, Counter>,
    lease_holder: Gauge<i64, AtomicI64>,
    api_reachable: Gauge<i64, AtomicI64>,
    last_sync: Gauge<i64, AtomicI64>,
}

impl ClusterGauges {
    /// The gauges, registered with the process's metrics.
    pub(super) fn registered(metrics: &Metrics) -> ClusterGauges {
        let gauges = ClusterGauges::default();
        let registered = metrics.register_backend(|r| {
            r.register(
                "kube_requests",
                "Cluster store: requests the Kubernetes API server answered for this replica, by resource, verb and whether it held the Lease",
                gauges.requests.clone(),
            );
            r.register(
                "lease_holder",
                "Cluster store: 1 while this replica holds the rotation Lease",
                gauges.lease_holder.clone(),
            );
            r.register(
                "cluster_api_reachable",
                "Cluster store: 1 while the Kubernetes API server answers",
                gauges.api_reachable.clone(),
            );
            r.register(
                "cluster_last_sync_timestamp_seconds",
                "Cluster store: when the Secret was last read (epoch seconds; 0 never)",
                gauges.last_sync.clone(),
            );
        });
        if !registered {
            tracing::warn!("a second store backend in this process: its gauges are not exported");
        }
        gauges
    }

    /// Counts one request (`resource`: `leases/<name>`, `secrets/<name>`, or the collection).
    pub(super) fn requested(&self, resource: &str, verb: &str, holder: bool) {
        let kind = resource.split('/').next().unwrap_or(resource);
        self.requests
            .get_or_create(&KubeRequest {
                resource: kind.to_string(),
                verb: verb.to_string(),
                role: if holder { "holder" } else { "replica" }.to_string(),
            })
            .inc();
    }

    pub(super) fn set(&self, status: &ClusterStatus) {
        self.lease_holder.set(i64::from(status.holder));
        self.api_reachable.set(i64::from(status.api_reachable));
        self.last_sync
            .set(status.last_sync.map_or(0, |t| t.timestamp()));
    }
}

/// Where the token lives under this store, and how to seed it there (what `set` says
/// instead of writing one pod's file, which the Secret's would replace at the next sync).
pub(crate) fn how_to_seed(target: &KubeTarget) -> String {
    let secret = &target.secret;
    format!(
        "with PAT_STORE=kubernetes the token lives in the Secret {secret}, not in this pod's file; seed it there: kubectl create secret generic {secret} --from-literal=token=<PAT> (or kubectl edit secret {secret}), and every replica adopts it"
    )
}
