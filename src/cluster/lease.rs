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
//! last sent a renewal that the API server accepted; so it stops believing no later than any
//! other replica can judge the lease free (that replica saw the accepted record after it was
//! sent, and waits a full duration from then). The rules are pure (`LeaseHold`, the clock
//! passed in) and tested in paused time; the API calls around them on a real API server.

use super::watch_one::WatchEnd;
use super::{ClusterError, KubeStore};
use crate::backoff::Backoff;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The Lease record as read: who it names, its version, the duration its holder wrote.
#[derive(Debug, Clone, Copy)]
pub(super) struct LeaseRecord<'a> {
    pub holder: Option<&'a str>,
    pub version: &'a str,
    pub duration: Duration,
}

/// The Lease as this replica last saw it (a watch event or a read).
#[derive(Debug, Clone)]
pub(super) struct SeenLease {
    pub holder: Option<String>,
    pub version: String,
    pub duration: Duration,
    /// The object itself: a replica takes a lapsed Lease over it without reading it again.
    pub object: Lease,
}

impl SeenLease {
    fn of(lease: &Lease) -> SeenLease {
        let spec = lease.spec.as_ref();
        SeenLease {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            version: lease.metadata.resource_version.clone().unwrap_or_default(),
            duration: lease_record_duration(spec.and_then(|s| s.lease_duration_seconds)),
            object: lease.clone(),
        }
    }

    pub fn record(&self) -> LeaseRecord<'_> {
        LeaseRecord {
            holder: self.holder.as_deref(),
            version: &self.version,
            duration: self.duration,
        }
    }
}

/// The duration a Lease records (15 s when it records none, as client-go).
fn lease_record_duration(seconds: Option<i32>) -> Duration {
    Duration::from_secs(seconds.unwrap_or(15).max(1) as u64)
}

/// What one read of the Lease means for this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeaseReading {
    /// The server holds our own last accepted write: renew it.
    Ours,
    /// Nobody holds it, or its record stayed unchanged for its duration on our clock: take it.
    Free,
    /// Another process holds it (one with our name too, if the write is not ours): leave it.
    Held,
}

/// This replica's side of the election, on the local monotonic clock: until when it holds
/// the Lease, which Lease version its own last write produced, and since when it has seen
/// the current record unchanged. Pure: every rule takes `now`.
#[derive(Debug, Default)]
pub(super) struct LeaseHold {
    held_until: Option<Instant>,
    written: Option<String>,
    observed: Option<(String, Instant)>,
}

impl LeaseHold {
    /// Whether this replica holds the Lease at `now`.
    pub fn holds(&self, now: Instant) -> bool {
        self.held_until.is_some_and(|t| t > now)
    }

    /// Whether this replica has written the Lease before (and so knows its own version).
    pub(crate) fn has_written(&self) -> bool {
        self.written.is_some()
    }

    /// Reads `record` at `now`. Ours only if our own last write is what the server holds:
    /// a second replica with the same `PAT_INSTANCE` (or this pod's previous container) is a
    /// holder like any other, so two processes never both believe they hold it. Another
    /// holder's lease is free once its record stayed unchanged for its duration on our
    /// clock, whatever its `renewTime` says (clocks between pods may differ).
    pub fn read(&mut self, us: &str, record: LeaseRecord<'_>, now: Instant) -> LeaseReading {
        let named_us = record.holder == Some(us);
        if named_us && self.written.as_deref() == Some(record.version) {
            return LeaseReading::Ours;
        }
        let unchanged_for = match &self.observed {
            Some((seen, since)) if seen == record.version => now.saturating_duration_since(*since),
            _ => {
                self.observed = Some((record.version.to_owned(), now));
                Duration::ZERO
            }
        };
        if record.holder.is_none() || unchanged_for > record.duration {
            LeaseReading::Free
        } else {
            self.held_until = None;
            LeaseReading::Held
        }
    }

    /// When the record last read (as `version`) lapses on our clock if it stays unchanged:
    /// the moment [`LeaseHold::read`] would first judge it free. `None`: that record was not
    /// read yet.
    pub fn lapses_at(&self, version: &str, duration: Duration) -> Option<Instant> {
        self.observed
            .as_ref()
            .filter(|(seen, _)| seen == version)
            .map(|(_, since)| *since + duration + Duration::from_millis(1))
    }

    /// A write sent at `sent` was accepted as `version`: held until `sent + duration`,
    /// measured from before the call, so a slow answer never stretches the hold past what
    /// the API server granted.
    pub fn accepted(&mut self, sent: Instant, version: Option<String>, duration: Duration) {
        self.held_until = Some(sent + duration);
        self.written = version;
    }

    /// Another process wrote the Lease between our read and write, or we released it.
    pub fn lost(&mut self) {
        self.held_until = None;
    }
}

/// The duration as the Lease records it (whole seconds, at least one). Other replicas judge
/// this replica's hold by it, so it must not be shorter than the hold itself.
pub(super) fn record_seconds(duration: Duration) -> i32 {
    duration.as_secs().clamp(1, i32::MAX as u64) as i32
}

/// How often a replica renews or contends: a third of the duration, so two renewals can
/// fail before its hold lapses.
pub(super) fn renew_period(duration: Duration) -> Duration {
    duration / 3
}

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
        record_seconds(self.inner.lease_duration)
    }

    /// One election step: renew this replica's hold, take a lease nobody renews, or note
    /// who holds it.
    async fn lease_step(&self) -> Result<(), ClusterError> {
        let inner = &self.inner;
        let sent = Instant::now();
        let Some(mut lease) = self.lease_to_write_over(sent).await? else {
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
        let seen = SeenLease::of(&lease);
        let holder = seen.holder.clone();
        let (reading, had_written) = self.view(|v| {
            let had_written = v.lease.has_written();
            (
                v.lease
                    .read(&inner.holder_id, seen.record(), Instant::now()),
                had_written,
            )
        });
        let spec = lease.spec.get_or_insert_default();
        let named_us = holder.as_deref() == Some(inner.holder_id.as_str());
        if named_us && reading != LeaseReading::Ours && had_written {
            warn!(lease = %self.lease_name(), instance = %inner.holder_id, "another process renews the rotation lease under this replica's PAT_INSTANCE; give every replica its own (the pod name)");
        }
        let mine = reading == LeaseReading::Ours;
        if reading == LeaseReading::Held {
            self.view(|v| v.lease_holder = holder);
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
                // What we wrote over is stale: forget it. The watch brings the newer record,
                // or the next step reads it (and restarts a watch found behind).
                self.view(|v| {
                    v.lease.lost();
                    v.lease_written = None;
                    v.lease_seen = None;
                });
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The Lease as a write at `sent` goes over it (`None`: there is none). The holder
    /// renews over its own last write, and a replica that watches the Lease takes it over
    /// the record the watch brought: each a compare-and-swap on that version, so a conflict
    /// means another process wrote since. Without either, the Lease is read first.
    async fn lease_to_write_over(&self, sent: Instant) -> Result<Option<Lease>, ClusterError> {
        let known = self.view(|v| {
            if v.lease.holds(sent) {
                v.lease_written.clone()
            } else {
                v.watched_lease(sent).map(|seen| seen.object.clone())
            }
        });
        if known.is_some() {
            return Ok(known);
        }
        let inner = &self.inner;
        let got = self
            .call(
                "get",
                &self.lease_resource(),
                inner.leases.get_opt(&inner.target.lease),
            )
            .await?;
        self.read_lease(got.as_ref(), false);
        Ok(got)
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
        let version = written.metadata.resource_version.clone();
        self.view(|v| {
            v.lease.accepted(sent, version, self.inner.lease_duration);
            v.lease_holder = Some(id);
            v.lease_written = Some(written.clone());
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
            self.inner.changed.raise();
        }
    }

    /// Takes part in the election until `cancel`, then releases the lease if held, so a
    /// successor takes over without waiting for it to expire.
    pub(super) async fn run_election(&self, cancel: CancellationToken) {
        tokio::join!(self.run_lease_watch(&cancel), self.run_elector(&cancel));
        if self.is_holder() {
            self.release().await;
        }
    }

    /// The holder renews every renewal period; a replica that watches the Lease steps only
    /// once the record it last saw is free (nobody named, or unchanged for its duration on
    /// our clock, so the holder's renewals cost it nothing); a replica whose watch is down
    /// reads the Lease every renewal period. Never more than one step a period, so a server
    /// that fails every read is not read in a loop.
    async fn run_elector(&self, cancel: &CancellationToken) {
        let period = renew_period(self.inner.lease_duration);
        let mut next = Instant::now() + period;
        // Watching replicas see a lapse at the same moment: each waits a little of its own
        // before taking over, so the first one's write reaches the others (through their
        // watch) before they try, and a takeover costs the API server one write, not one per
        // replica. At most a second, so a takeover stays within the lease plus 2 s.
        let takeover_spread =
            rand::random_range(Duration::ZERO..period.min(Duration::from_secs(1)));
        loop {
            let wake = self.view(|v| match v.watched_lease(Instant::now()) {
                Some(seen) => v
                    .lease
                    .lapses_at(&seen.version, seen.duration)
                    .map_or(next, |lapse| (lapse + takeover_spread).max(next)),
                None => next,
            });
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.inner.lease_seen.raised() => {}
            }
            let now = Instant::now();
            let due = now >= next
                && self.view(|v| match v.watched_lease(now).cloned() {
                    Some(seen) => {
                        v.lease.read(&self.inner.holder_id, seen.record(), now)
                            != LeaseReading::Held
                    }
                    None => true,
                });
            if due {
                self.elect_once().await;
                next = Instant::now() + period;
            }
        }
    }

    /// Watches the Lease until `cancel`: every renewal and takeover reaches this replica as
    /// an event. It starts from the server's cache (`"0"`: the current record comes first),
    /// resumes from bookmarks, and starts again when the election found it behind.
    async fn run_lease_watch(&self, cancel: &CancellationToken) {
        let period = renew_period(self.inner.lease_duration).max(Duration::from_secs(1));
        let mut retry = Backoff::new(Duration::from_millis(200), period);
        let name = self.inner.target.lease.clone();
        let mut resume = String::from("0");
        let mut warned_denied = false;
        while !cancel.is_cancelled() {
            self.inner.lease_watch_stale.clear();
            let stop = async {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = self.inner.lease_watch_stale.raised() => {}
                }
            };
            let opened = || self.view(|v| v.lease_watch_live = true);
            let end = self
                .watch_one(
                    &self.inner.leases,
                    &name,
                    &mut resume,
                    stop,
                    opened,
                    |lease| {
                        retry.reset();
                        self.read_lease(Some(&lease), true);
                        std::future::ready(())
                    },
                )
                .await;
            let failed = match end {
                WatchEnd::Closed | WatchEnd::Stopped => None,
                WatchEnd::Reread => {
                    resume = String::from("0");
                    None
                }
                WatchEnd::Deleted => {
                    self.read_lease(None, true);
                    resume = String::from("0");
                    None
                }
                WatchEnd::Failed(e) => Some(e),
            };
            let Some(e) = failed else { continue };
            // Until it is back, the election reads the Lease every renewal period.
            self.view(|v| v.lease_watch_live = false);
            self.inner.lease_seen.raise();
            let delay = match &e {
                ClusterError::Denied { .. } => {
                    if !std::mem::replace(&mut warned_denied, true) {
                        warn!(error = %e, "cannot watch the rotation Lease; reading it every renewal period instead (grant watch on leases to make that free)");
                    }
                    Duration::from_secs(60)
                }
                _ => {
                    if matches!(e, ClusterError::Unreachable { .. }) {
                        self.note::<()>("lease", &Err(e));
                    }
                    retry.next_delay(None)
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Records the Lease as a watch event or a read brought it (`None`: there is none) and
    /// wakes the election. A read that finds a version the watch has not brought while the
    /// watch claims to be live means the watch is behind (a stream that stopped delivering):
    /// it starts again.
    fn read_lease(&self, lease: Option<&Lease>, from_watch: bool) {
        let seen = lease.map(SeenLease::of);
        let behind = self.view(|v| {
            let behind = !from_watch
                && v.lease_watch_live
                && v.lease_seen.as_ref().map(|s| &s.version) != seen.as_ref().map(|s| &s.version);
            v.lease_seen = seen;
            behind
        });
        if behind {
            debug!(lease = %self.lease_name(), "the Lease changed without a watch event; watching it again");
            self.inner.lease_watch_stale.raise();
        }
        self.inner.lease_seen.raise();
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
        self.view(|v| {
            v.lease.lost();
            v.lease_written = None;
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::lease_duration_for_threshold;
    use proptest::prelude::*;

    const D: Duration = Duration::from_secs(15);

    fn record<'a>(holder: Option<&'a str>, version: &'a str) -> LeaseRecord<'a> {
        LeaseRecord {
            holder,
            version,
            duration: D,
        }
    }

    /// A renewal that took 4 s to be answered still holds only until 15 s after it was
    /// sent: the API server counts from when it accepted, which is no earlier than sent.
    #[tokio::test(start_paused = true)]
    async fn a_hold_is_measured_from_before_the_renewal_was_sent() {
        let mut hold = LeaseHold::default();
        assert!(!hold.holds(Instant::now()));
        let sent = Instant::now();
        tokio::time::advance(Duration::from_secs(4)).await;
        hold.accepted(sent, Some("7".into()), D);
        tokio::time::advance(Duration::from_millis(10_900)).await;
        assert!(hold.holds(Instant::now()), "14.9 s after sending");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(
            !hold.holds(Instant::now()),
            "15 s after sending, not 15 s after the answer"
        );
        // Our own write is what the server holds: renew it.
        assert_eq!(
            hold.read("a", record(Some("a"), "7"), Instant::now()),
            LeaseReading::Ours
        );
    }

    /// Another holder's lease is free once its record stayed unchanged for its duration on
    /// our clock; each renewal (a new version) starts that count again. The record's
    /// `renewTime` is not an input at all, so a skewed clock in another pod cannot matter.
    #[tokio::test(start_paused = true)]
    async fn another_holder_is_judged_by_how_long_its_record_stayed_unchanged_on_our_clock() {
        let mut hold = LeaseHold::default();
        let read = |hold: &mut LeaseHold, v| hold.read("a", record(Some("b"), v), Instant::now());
        assert_eq!(read(&mut hold, "1"), LeaseReading::Held);
        tokio::time::advance(Duration::from_secs(14)).await;
        assert_eq!(read(&mut hold, "1"), LeaseReading::Held);
        // b renewed: a new version, counted from now.
        assert_eq!(read(&mut hold, "2"), LeaseReading::Held);
        tokio::time::advance(D).await;
        assert_eq!(
            read(&mut hold, "2"),
            LeaseReading::Held,
            "exactly its duration"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(read(&mut hold, "2"), LeaseReading::Free);
        // Nobody named: free at once.
        let mut fresh = LeaseHold::default();
        assert_eq!(
            fresh.read("a", record(None, "3"), Instant::now()),
            LeaseReading::Free
        );
    }

    /// A record naming us that our own last write did not produce was written by another
    /// process with our `PAT_INSTANCE` (or our previous container): held, and our belief
    /// that we hold it ends at once.
    #[tokio::test(start_paused = true)]
    async fn a_record_with_our_name_but_not_our_write_is_someone_elses() {
        let mut hold = LeaseHold::default();
        hold.accepted(Instant::now(), Some("5".into()), D);
        assert!(hold.holds(Instant::now()));
        assert_eq!(
            hold.read("a", record(Some("a"), "6"), Instant::now()),
            LeaseReading::Held
        );
        assert!(!hold.holds(Instant::now()));
        // A restarted container has no write of its own: the record is held until it
        // stays unchanged for its duration.
        let mut restarted = LeaseHold::default();
        assert_eq!(
            restarted.read("a", record(Some("a"), "6"), Instant::now()),
            LeaseReading::Held
        );
    }

    proptest! {
        /// Never two holders: replica A's last accepted renewal was sent at 0 and answered
        /// after `latency`; replica B first reads that record `seen_after` later and then
        /// every one of its renewal periods (B may run with another threshold, as in a
        /// rolling update that changes the interval). When B judges the lease free, A no
        /// longer believes it holds it, and B takes over within the duration plus one period
        /// of first seeing it. The duration comes from the threshold formula and B reads it
        /// as the Lease records it.
        #[test]
        fn a_lapsed_holder_stops_believing_before_a_successor_takes_over(
            threshold_ms in 2_000u64..40_000,
            b_threshold_ms in 2_000u64..40_000,
            latency_ms in 0u64..1_000,
            seen_after_ms in 0u64..1_000,
        ) {
            let threshold = Duration::from_millis(threshold_ms);
            let duration = lease_duration_for_threshold(threshold);
            let recorded = Duration::from_secs(record_seconds(duration) as u64);
            let period = renew_period(lease_duration_for_threshold(Duration::from_millis(b_threshold_ms)));
            let t0 = Instant::now();
            let mut a = LeaseHold::default();
            a.accepted(t0, Some("10".into()), duration);
            let first_seen = t0 + Duration::from_millis(latency_ms + seen_after_ms);
            let mut b = LeaseHold::default();
            let mut at = first_seen;
            let rec = LeaseRecord { holder: Some("a"), version: "10", duration: recorded };
            while b.read("b", rec, at) == LeaseReading::Held {
                prop_assert!(at <= first_seen + recorded + period, "B never takes over");
                at += period;
            }
            prop_assert!(!a.holds(at), "A still holds at B's takeover ({duration:?} held, {recorded:?} recorded)");
            prop_assert!(at <= first_seen + recorded + period + Duration::from_millis(1));
        }

        /// The duration: `min(15 s, threshold / 2)` in whole seconds, at least one; a
        /// successor (duration plus one renewal period) takes over inside the forced window
        /// for every threshold of two seconds and more.
        #[test]
        fn the_lease_duration_fits_the_forced_window(threshold_ms in 2_000u64..10_000_000) {
            let threshold = Duration::from_millis(threshold_ms);
            let d = lease_duration_for_threshold(threshold);
            prop_assert_eq!(d.subsec_nanos(), 0, "the Lease counts whole seconds");
            prop_assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(15));
            prop_assert!(d <= (threshold / 2).max(Duration::from_secs(1)));
            prop_assert_eq!(Duration::from_secs(record_seconds(d) as u64), d);
            prop_assert!(d + renew_period(d) < threshold);
        }
    }
}
