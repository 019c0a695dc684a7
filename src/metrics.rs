//! Prometheus metrics for the service surface.
//!
//! Invariant: labels are fixed, low-cardinality names (reasons, error kinds): never a token,
//! a fingerprint or an id, so nothing secret and nothing unbounded reaches a scrape.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, OnceLock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

/// The loop's own failure kinds (`RotateError::kind` apart from the provider's, which come
/// from `ProviderError::KINDS`): the label values of `pat_rotator_failures_total`, at 0 from
/// the start.
pub(crate) const LOOP_FAILURE_KINDS: &[&str] = &[
    "store",
    "dead_token",
    "no_credential",
    "lock_timeout",
    "abandoned",
    "too_short",
    "no_login",
    "login_lost",
];

/// The outcome classes of a proxied request: the upstream status class, or why none came.
pub(crate) const PROXY_CLASSES: &[&str] = &[
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "upstream_error",
    "no_token",
    "client_error",
];

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// The series the credential store's backend adds (the cluster store's Lease and API
    /// server), registered by the backend when it starts: a file-store rotator exports
    /// no cluster series.
    backend: Arc<OnceLock<Registry>>,
    pub rotations: Family<ReasonLabel, Counter>,
    pub skips: Family<ReasonLabel, Counter>,
    pub failures: Family<KindLabel, Counter>,
    pub lock_contention: Counter,
    pub revocations: Counter,
    pub hook_failures: Counter,
    pub token_expiry: Gauge<i64, AtomicI64>,
    pub seconds_to_expiry: Gauge<i64, AtomicI64>,
    pub threshold: Gauge<i64, AtomicI64>,
    pub active_sessions: Gauge<i64, AtomicI64>,
    pub pending_revocations: Gauge<i64, AtomicI64>,
    pub ready: Gauge<i64, AtomicI64>,
    pub clock_skew_seconds: Gauge<f64, AtomicU64>,
    pub proxy_requests: Family<ClassLabel, Counter>,
    /// The series of `proxy_requests` for each of [`PROXY_CLASSES`], in that order: a
    /// proxied request counts itself without a label allocation or the family's lock.
    proxy_by_class: Arc<[Counter]>,
    pub proxy_retries: Counter,
    pub proxy_upstream_seconds: Histogram,
    pub proxy_open_streams: Gauge<i64, AtomicI64>,
    pub sessions_refused: Counter,
    pub clock_steps: Counter,
    pub restores: Counter,
    pub rejected_tokens: Counter,
    pub logins_lost: Counter,
    pub lock_takeovers: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pat_rotator");
        let mut m = Metrics {
            registry: Arc::new(Registry::default()),
            backend: Arc::new(OnceLock::new()),
            rotations: Family::default(),
            skips: Family::default(),
            failures: Family::default(),
            lock_contention: Counter::default(),
            revocations: Counter::default(),
            hook_failures: Counter::default(),
            token_expiry: Gauge::default(),
            seconds_to_expiry: Gauge::default(),
            threshold: Gauge::default(),
            active_sessions: Gauge::default(),
            pending_revocations: Gauge::default(),
            ready: Gauge::default(),
            clock_skew_seconds: Gauge::default(),
            proxy_requests: Family::default(),
            proxy_by_class: Arc::from([]),
            proxy_retries: Counter::default(),
            proxy_upstream_seconds: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            proxy_open_streams: Gauge::default(),
            sessions_refused: Counter::default(),
            clock_steps: Counter::default(),
            restores: Counter::default(),
            rejected_tokens: Counter::default(),
            logins_lost: Counter::default(),
            lock_takeovers: Counter::default(),
        };
        m.seed_labels();
        m.register_loop(&mut registry);
        m.register_proxy(&mut registry);
        Metrics {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// Every known label value from the start at 0, so a dashboard's rate() and an alert on
    /// "absent" see the series before the first event; the proxy's classes are also kept,
    /// so that counting a request allocates no label.
    fn seed_labels(&mut self) {
        self.proxy_by_class = PROXY_CLASSES
            .iter()
            .map(|class| {
                self.proxy_requests
                    .get_or_create(&ClassLabel {
                        class: (*class).into(),
                    })
                    .clone()
            })
            .collect();
        for reason in crate::policy::RotateReason::ALL {
            let _ = self.rotations.get_or_create(&ReasonLabel {
                reason: reason.as_str().into(),
            });
        }
        for reason in crate::policy::SkipReason::ALL {
            let _ = self.skips.get_or_create(&ReasonLabel {
                reason: reason.as_str().into(),
            });
        }
        let provider_kinds = crate::provider::ProviderError::KINDS;
        for kind in LOOP_FAILURE_KINDS.iter().chain(provider_kinds) {
            let _ = self.failures.get_or_create(&KindLabel {
                kind: (*kind).into(),
            });
        }
    }

    /// The loop's own account: rotations, skips, failures, the token's expiry, sessions.
    fn register_loop(&self, registry: &mut Registry) {
        registry.register("rotations", "Rotations by reason", self.rotations.clone());
        registry.register("skips", "Skipped decisions by reason", self.skips.clone());
        registry.register("failures", "Failed attempts by kind", self.failures.clone());
        registry.register(
            "lock_contention",
            "Rotations lost to another rotator holding the rotation lock",
            self.lock_contention.clone(),
        );
        registry.register(
            "revocations",
            "Old tokens revoked after the grace period",
            self.revocations.clone(),
        );
        registry.register(
            "hook_failures",
            "PAT_ON_ROTATE runs that failed",
            self.hook_failures.clone(),
        );
        registry.register(
            "token_expiry_timestamp_seconds",
            "Expiry of the token on disk (epoch seconds; 0 when unknown)",
            self.token_expiry.clone(),
        );
        registry.register(
            "token_seconds_to_expiry",
            "Seconds until the token on disk expires (0 when unknown)",
            self.seconds_to_expiry.clone(),
        );
        registry.register(
            "rotation_threshold_seconds",
            "The rotation threshold min(PAT_ROTATION_INTERVAL, 60 s): a token closer than this to its expiry is rotated (and an alert's line)",
            self.threshold.clone(),
        );
        registry.register(
            "active_sessions",
            "Live session leases",
            self.active_sessions.clone(),
        );
        registry.register(
            "pending_revocations",
            "Old tokens waiting for their grace period to end",
            self.pending_revocations.clone(),
        );
        registry.register(
            "clock_skew_seconds",
            "The provider's clock minus ours, measured at the last mint (expiries are kept on our clock)",
            self.clock_skew_seconds.clone(),
        );
        registry.register(
            "sessions_refused",
            "Session opens refused because the lease table was full (a full table counts as active)",
            self.sessions_refused.clone(),
        );
        registry.register(
            "clock_steps",
            "Wall-clock steps seen (wall and monotonic elapsed time disagreed by more than a second)",
            self.clock_steps.clone(),
        );
        registry.register(
            "lock_takeovers",
            "Rotations made without the rotation lock because its holder made no progress near expiry",
            self.lock_takeovers.clone(),
        );
        registry.register(
            "restores",
            "The credential of record written back to a file that had lost it, or held a dead or older token (no mint)",
            self.restores.clone(),
        );
        registry.register(
            "rejected_tokens",
            "Current tokens the provider rejected as invalid (revoked out of band, or the user lost the right to use tokens)",
            self.rejected_tokens.clone(),
        );
        registry.register(
            "oauth_logins_lost",
            "OAuth U2M logins that stopped working (invalid_grant, a refresh answer lost on the wire); `pat-rotator login` again",
            self.logins_lost.clone(),
        );
        registry.register("ready", "1 when a token above the threshold is on disk and the last attempt did not fail terminally", self.ready.clone());
    }

    /// The authenticating proxy.
    fn register_proxy(&self, registry: &mut Registry) {
        registry.register(
            "proxy_requests",
            "Proxied requests by upstream status class (or upstream_error, no_token, client_error)",
            self.proxy_requests.clone(),
        );
        registry.register(
            "proxy_retries",
            "Proxied requests retried once after the token was refused",
            self.proxy_retries.clone(),
        );
        registry.register(
            "proxy_upstream_seconds",
            "Time from a proxied request to the workspace's response headers",
            self.proxy_upstream_seconds.clone(),
        );
        registry.register(
            "proxy_open_streams",
            "Proxied response bodies being relayed now",
            self.proxy_open_streams.clone(),
        );
    }

    /// Adds the backend's series (under the same `pat_rotator_` prefix); once per
    /// process: a second backend's are ignored, and `false` says so.
    pub(crate) fn register_backend(&self, register: impl FnOnce(&mut Registry)) -> bool {
        let mut registry = Registry::with_prefix("pat_rotator");
        register(&mut registry);
        self.backend.set(registry).is_ok()
    }

    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail except on a formatter error, which String never returns.
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let _ = encode_registry(&mut out, &self.registry);
        if let Some(backend) = self.backend.get() {
            let _ = encode_registry(&mut out, backend);
        }
        let _ = encode_eof(&mut out);
        out
    }

    pub fn rotated(&self, reason: &str) {
        self.rotations
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
    pub fn skipped(&self, reason: &str) {
        self.skips
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
    pub fn proxied(&self, class: &str) {
        if let Some(i) = PROXY_CLASSES.iter().position(|c| *c == class) {
            self.proxy_by_class[i].inc();
            return;
        }
        self.proxy_requests
            .get_or_create(&ClassLabel {
                class: class.to_string(),
            })
            .inc();
    }
    pub fn failed(&self, kind: &str) {
        self.failures
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_known_label_is_exported_at_zero_from_the_start() {
        let text = super::Metrics::new().encode();
        for line in [
            "pat_rotator_skips_total{reason=\"idle\"} 0",
            "pat_rotator_skips_total{reason=\"not_due\"} 0",
            "pat_rotator_rotations_total{reason=\"forced_near_expiry\"} 0",
            "pat_rotator_failures_total{kind=\"dead_token\"} 0",
            "pat_rotator_failures_total{kind=\"store\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    /// A backend's series appear once it registers them (none before), in the same text
    /// with one `# EOF` at its end; a second backend is refused, not exported twice.
    #[test]
    fn a_backend_adds_its_series_once_and_the_text_stays_one_exposition() {
        use prometheus_client::metrics::gauge::Gauge;
        let m = super::Metrics::new();
        assert!(!m.encode().contains("pat_rotator_lease_holder"));
        let gauge: Gauge = Gauge::default();
        gauge.set(1);
        assert!(m.register_backend(|r| r.register("lease_holder", "test", gauge.clone())));
        assert!(!m.register_backend(|r| r.register("other", "test", Gauge::<i64>::default())));
        let text = m.encode();
        assert!(text.contains("\npat_rotator_lease_holder 1\n"), "{text}");
        assert!(!text.contains("pat_rotator_other"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("pat_rotator_ready"), "{text}");
    }

    /// Every failure the loop can record, built variant by variant (not taken from the
    /// list the metrics are created from), has its series at 0 from the start.
    #[test]
    fn every_failure_kind_the_code_can_produce_is_exported() {
        use crate::provider::ProviderError as P;
        use crate::rotator::RotateError as R;
        use std::time::Duration;
        let text = super::Metrics::new().encode();
        let s = String::new;
        let provider = [
            P::InvalidToken {
                status: 403,
                message: s(),
            },
            P::QuotaExceeded { message: s() },
            P::RateLimited { retry_after: None },
            P::NotFound { message: s() },
            P::Server {
                status: 503,
                message: s(),
                retry_after: None,
            },
            P::Network(s()),
            P::Timeout(Duration::ZERO),
            P::Malformed(s()),
            P::Other {
                status: 418,
                message: s(),
            },
            P::InvalidGrant {
                error: s(),
                message: s(),
            },
            P::NotSent(s()),
            P::PermissionDenied { message: s() },
            P::LifetimeTooLong {
                max: None,
                message: s(),
            },
        ];
        let mut errors: Vec<R> = provider.into_iter().map(R::Provider).collect();
        errors.extend([
            R::Store(crate::store::StoreError::EmptyToken),
            R::DeadToken {
                file: s(),
                bootstrap: "",
            },
            R::NoCredential { file: s() },
            R::LockTimeout(Duration::ZERO),
            R::Abandoned(Duration::ZERO),
            R::TooShort {
                expires_at: chrono::Utc::now(),
            },
            R::NoLogin,
            R::LoginLost(s()),
            R::RefreshElsewhere,
        ]);
        for e in errors {
            let line = format!("pat_rotator_failures_total{{kind=\"{}\"}} 0", e.kind());
            assert!(text.contains(&line), "missing {line}");
        }
    }
}
