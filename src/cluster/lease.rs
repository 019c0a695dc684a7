//! The Lease side of the cluster store: which replica mints, revokes and reaps.
//!
//! Written on the Lease API directly rather than with a lease crate: the rotation needs to
//! ask "do I hold it right now?" without waiting (a deadline on the local monotonic clock,
//! measured from before each renewal was sent), to judge another holder's expiry by how long
//! its record stayed unchanged on our own clock (as client-go does, so skew between pods does
//! not matter), and to report a 403 with the verb that is missing; and it must release the
//! lease at shutdown so a successor takes over at once.
//!
//! Invariant: a replica believes it holds the lease for at most the lease duration after it
//! last sent a renewal that the API server accepted.

use super::{ClusterError, KubeStore};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

impl KubeStore {
    fn lease_resource(&self) -> String {
        format!("leases/{}", self.inner.target.lease)
    }

    fn micro_now(&self) -> MicroTime {
        let ms = self.inner.shared.now().timestamp_millis();
        MicroTime(
            k8s_openapi::jiff::Timestamp::from_millisecond(ms)
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        )
    }

    fn duration_seconds(&self) -> i32 {
        self.inner.lease_duration.as_secs().max(1) as i32
    }

    /// One election step: renew this replica's hold, take a lease nobody renews, or note
    /// who holds it.
    async fn lease_step(&self) -> Result<(), ClusterError> {
        let inner = &self.inner;
        let resource = self.lease_resource();
        let sent = Instant::now();
        let found = self
            .call("get", &resource, inner.leases.get_opt(&inner.target.lease))
            .await?;
        let Some(mut lease) = found else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(inner.target.lease.clone()),
                    namespace: Some(inner.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(inner.holder_id.clone()),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(self.micro_now()),
                    renew_time: Some(self.micro_now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self
                .call(
                    "create",
                    "leases",
                    inner.leases.create(&PostParams::default(), &lease),
                )
                .await
            {
                Ok(written) => {
                    self.held(sent, &written);
                    Ok(())
                }
                // Another replica created it first: it holds it.
                Err(ClusterError::Api { code: 409, .. }) => Ok(()),
                Err(e) => Err(e),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.get_or_insert_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        // Ours only if our own last write is what the server holds: a second replica with the
        // same PAT_INSTANCE (or this pod's previous container) is a holder like any other,
        // so two processes never both believe they hold it.
        let named_us = holder.as_deref() == Some(inner.holder_id.as_str());
        let last_written = self.view(|v| v.lease_written.clone());
        let mine = named_us && last_written.as_deref() == Some(version.as_str());
        if named_us && !mine && last_written.is_some() {
            warn!(lease = %self.lease_name(), instance = %inner.holder_id, "another process renews the rotation lease under this replica's PAT_INSTANCE; give every replica its own (the pod name)");
        }
        let record_age = self.view(|v| match &v.observed {
            Some((seen, at)) if *seen == version => at.elapsed(),
            _ => {
                v.observed = Some((version.clone(), Instant::now()));
                std::time::Duration::ZERO
            }
        });
        let their_duration =
            std::time::Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
        let free = holder.is_none() || record_age > their_duration;
        if !mine && !free {
            self.view(|v| {
                v.held_until = None;
                v.lease_holder = holder;
            });
            return Ok(());
        }
        if !mine {
            spec.holder_identity = Some(inner.holder_id.clone());
            spec.acquire_time = Some(self.micro_now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(self.micro_now());
        spec.lease_duration_seconds = Some(self.duration_seconds());
        match self.replace_lease(&lease).await {
            Ok(written) => {
                if !mine {
                    info!(event = "lease_acquired", lease = %self.lease_name(), previous = %holder.as_deref().unwrap_or("none"), "this replica now holds the rotation lease");
                }
                self.held(sent, &written);
                Ok(())
            }
            // Someone else renewed or took it between our read and write.
            Err(ClusterError::Api { code: 409, .. }) => {
                self.view(|v| v.held_until = None);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Writes the Lease: a compare-and-swap on the `resourceVersion` it was read with.
    async fn replace_lease(&self, lease: &Lease) -> Result<Lease, ClusterError> {
        let name = &self.inner.target.lease;
        let pp = PostParams::default();
        let write = self.inner.leases.replace(name, &pp, lease);
        self.call("update", &self.lease_resource(), write).await
    }

    fn held(&self, sent: Instant, written: &Lease) {
        let id = self.inner.holder_id.clone();
        self.view(|v| {
            v.held_until = Some(sent + self.inner.lease_duration);
            v.lease_holder = Some(id);
            v.lease_written = written.metadata.resource_version.clone();
        });
    }

    /// One step, its outcome recorded and published; wakes waiters when the holder changed.
    pub(super) async fn elect_once(&self) {
        let was = self.is_holder();
        let r = self.lease_step().await;
        if let Err(e) = &r {
            warn!(error = %e, lease = %self.lease_name(), "lease election step failed");
        }
        self.note("lease", &r);
        if self.is_holder() != was {
            if was {
                info!(event = "lease_lost", lease = %self.lease_name(), "this replica no longer holds the rotation lease");
            }
            self.inner.changed.notify_waiters();
        }
    }

    /// Renews or contends every third of the lease duration until `cancel`; then releases
    /// the lease if held, so a successor takes over without waiting for it to expire.
    pub(super) async fn run_election(&self, cancel: CancellationToken) {
        let period = self.inner.lease_duration / 3;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(period) => self.elect_once().await,
            }
        }
        if self.is_holder() {
            self.release().await;
        }
    }

    async fn release(&self) {
        let inner = &self.inner;
        let resource = self.lease_resource();
        let Ok(Some(mut lease)) = self
            .call("get", &resource, inner.leases.get_opt(&inner.target.lease))
            .await
        else {
            return;
        };
        let spec = lease.spec.get_or_insert_default();
        if spec.holder_identity.as_deref() != Some(inner.holder_id.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = Some(self.micro_now());
        spec.lease_duration_seconds = Some(1);
        self.view(|v| v.held_until = None);
        match self.replace_lease(&lease).await {
            Ok(_) => {
                info!(event = "lease_released", lease = %self.lease_name(), "released the rotation lease")
            }
            Err(e) => {
                warn!(error = %e, "could not release the rotation lease; it expires by itself")
            }
        }
    }
}
