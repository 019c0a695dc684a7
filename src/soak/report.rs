//! The soak's report: the record of what happened and the figures (its picture is
//! `timeline.rs`).
//!
//! Invariant: the report holds fingerprints and ids, never a token value.

use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Span {
    pub start_ms: i64,
    pub end_ms: i64,
    pub label: String,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Violation {
    pub at_ms: i64,
    pub kind: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rotation {
    pub at_ms: i64,
    pub rotator: usize,
    pub reason: String,
    pub token_id: String,
    pub fingerprint: String,
    pub latency_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct TokenLife {
    pub token_id: String,
    pub comment: String,
    /// The profile whose rotator minted it (`DEFAULT`, or the neighbour's).
    pub profile: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
}

/// What one kind of reader saw over time: the run cut into equal bins, each counting the
/// reads that succeeded, were refused (403), or found no token or rotator to ask.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReaderRow {
    pub label: String,
    pub bin_ms: i64,
    pub bins: Vec<ReadBin>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct ReadBin {
    pub ok: u32,
    pub refused: u32,
    pub unavailable: u32,
}

impl ReaderRow {
    /// An empty row of `bins` bins covering `duration_ms`.
    pub fn new(label: impl Into<String>, duration_ms: i64, bins: usize) -> ReaderRow {
        let bins = bins.max(1);
        ReaderRow {
            label: label.into(),
            bin_ms: (duration_ms / bins as i64).max(1),
            bins: vec![ReadBin::default(); bins],
        }
    }

    /// Counts one read `at_ms` after the start with its HTTP status (0: no token to call with).
    pub fn count(&mut self, at_ms: i64, status: u16) {
        let i = ((at_ms.max(0) / self.bin_ms) as usize).min(self.bins.len() - 1);
        let bin = &mut self.bins[i];
        match status {
            200..=299 => bin.ok += 1,
            403 => bin.refused += 1,
            _ => bin.unavailable += 1,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Figures {
    pub duration_s: f64,
    pub rotations: usize,
    pub rotations_per_hour: f64,
    pub rotation_latency_ms_p50: Option<u64>,
    pub rotation_latency_ms_p99: Option<u64>,
    pub propagation_ms_p50: Option<i64>,
    pub propagation_ms_p99: Option<i64>,
    pub reader_poll_ms: u64,
    pub reads: usize,
    pub reads_ok: usize,
    pub reads_403: usize,
    pub reads_unavailable: usize,
    /// Successful reads by reader kind (`file`, `metadata`, `proxy`): every kind takes part.
    pub reads_ok_by_kind: std::collections::BTreeMap<String, usize>,
    pub reader_stat_ns: Option<f64>,
    pub reader_cached_read_ns: Option<f64>,
    /// Cached `token()` cost divided by a bare `stat` of the same file, same process.
    pub cached_read_vs_stat: Option<f64>,
    pub rotator_max_rss_kib: u64,
    pub rotator_cpu_seconds: f64,
    pub kills: usize,
    pub dead_token_requests: u64,
    pub provider_requests: u64,
    /// The cluster store: requests to the API server by "<who> <resource> <verb>" (who:
    /// `holder` or `replica` as each replica counts them, `soak` for the soak's own).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub kube_requests: std::collections::BTreeMap<String, u64>,
    /// The same in the steady-state window (one lifetime in until the stop), and its length.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub kube_steady_requests: std::collections::BTreeMap<String, u64>,
    pub kube_steady_minutes: f64,
    /// Requests a replica sent per minute in that window while it did not hold the Lease,
    /// averaged over the replicas (all of them but one hold nothing at any time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_requests_per_replica_minute: Option<f64>,
    /// The emulator's OAuth counters (refreshes, replays, revoked logins).
    #[serde(default)]
    pub oauth: crate::emulator::OAuthCounters,
}

impl Figures {
    /// The cluster store's cost to the API server, in words (`None`: not the cluster store).
    fn kube_cost_line(&self) -> Option<String> {
        let per = self.kube_requests_per_replica_minute?;
        let outside: Vec<String> = self
            .kube_steady_requests
            .iter()
            .filter(|(_, n)| **n > 0)
            .filter_map(|(k, n)| Some(format!("{} {n}", k.strip_prefix("replica ")?)))
            .collect();
        Some(format!(
            "API server: {per:.2} requests per replica per minute outside the lease holder, in the last {:.1} min ({})",
            self.kube_steady_minutes,
            outside.join(", ")
        ))
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub settings: serde_json::Value,
    /// [`super::SoakOptions::describe`]: the settings in words, on the picture and in the summary.
    pub settings_line: String,
    pub verdict: String,
    pub figures: Figures,
    pub violations: Vec<Violation>,
    pub rotations: Vec<Rotation>,
    pub phases: Vec<Span>,
    pub faults: Vec<Span>,
    pub kills: Vec<Span>,
    /// Who held the cluster store's Lease when (`--store kubernetes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<Span>,
    pub tokens: Vec<TokenLife>,
    /// What the readers saw over time, one row per kind of reader.
    pub readers: Vec<ReaderRow>,
}

/// The value at percentile `p` (0..=100) of `values`, nearest-rank.
pub(crate) fn percentile<T: Copy + Ord>(values: &[T], p: f64) -> Option<T> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}

/// The OAuth counters' line of the summary, when the soak used OAuth.
fn oauth_line(o: &crate::emulator::OAuthCounters) -> String {
    if o.token_requests == 0 {
        return String::new();
    }
    format!(
        "oauth: {} token requests, {} refreshes, {} client-credential grants, {} logins, {} refresh tokens replayed, {} logins revoked\n",
        o.token_requests, o.refreshes, o.client_credentials_grants, o.logins, o.replays, o.family_revocations
    )
}

impl Report {
    /// The summary printed at the end and shown in the README.
    pub fn summary(&self) -> String {
        let f = &self.figures;
        let ms = |v: Option<u64>| v.map(|x| format!("{x} ms")).unwrap_or_else(|| "n/a".into());
        let msi = |v: Option<i64>| v.map(|x| format!("{x} ms")).unwrap_or_else(|| "n/a".into());
        let mut s = String::new();
        let _ = writeln!(
            s,
            "verdict: {} ({} violations)",
            self.verdict,
            self.violations.len()
        );
        let _ = writeln!(
            s,
            "rotations: {} in {:.0} s ({:.0}/hour), {} kill -9 restarts",
            f.rotations, f.duration_s, f.rotations_per_hour, f.kills
        );
        if let Some(line) = f.kube_cost_line() {
            let _ = writeln!(s, "{line}");
        }
        let _ = writeln!(
            s,
            "rotation latency (mint start -> on disk): p50 {}, p99 {}",
            ms(f.rotation_latency_ms_p50),
            ms(f.rotation_latency_ms_p99)
        );
        let _ = writeln!(
            s,
            "propagation (on disk -> first reader read, readers poll every {} ms): p50 {}, p99 {}",
            f.reader_poll_ms,
            msi(f.propagation_ms_p50),
            msi(f.propagation_ms_p99)
        );
        let _ = writeln!(
            s,
            "reads: {} ({} ok, {} with 403, {} with no rotator/token to ask); ok by kind: {}",
            f.reads,
            f.reads_ok,
            f.reads_403,
            f.reads_unavailable,
            f.reads_ok_by_kind
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let (Some(stat), Some(cached), Some(ratio)) = (
            f.reader_stat_ns,
            f.reader_cached_read_ns,
            f.cached_read_vs_stat,
        ) {
            let _ = writeln!(
                s,
                "reader cached read: {cached:.0} ns vs bare stat {stat:.0} ns (x{ratio:.2})"
            );
        }
        let _ = writeln!(
            s,
            "rotator: max RSS {} KiB, {:.2} CPU seconds in all",
            f.rotator_max_rss_kib, f.rotator_cpu_seconds
        );
        let _ = writeln!(
            s,
            "provider: {} requests, {} with a revoked or expired token",
            f.provider_requests, f.dead_token_requests
        );
        s.push_str(&oauth_line(&f.oauth));
        if !self.leases.is_empty() {
            let t0 = self.started_at.timestamp_millis();
            let held: Vec<String> = self
                .leases
                .iter()
                .map(|l| {
                    format!(
                        "{} {:.0}-{:.0} s",
                        l.label,
                        (l.start_ms - t0) as f64 / 1000.0,
                        (l.end_ms - t0) as f64 / 1000.0
                    )
                })
                .collect();
            let _ = writeln!(s, "lease holders: {}", held.join(", "));
        }
        for v in self.violations.iter().take(20) {
            let _ = writeln!(
                s,
                "  VIOLATION +{:.1}s {}: {}",
                (v.at_ms - self.started_at.timestamp_millis()) as f64 / 1000.0,
                v.kind,
                v.detail
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picture_of(readers_ran: bool) -> Report {
        let started_at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let t0 = started_at.timestamp_millis();
        let span = |from: i64, to: i64, label: &str| Span {
            start_ms: t0 + from,
            end_ms: t0 + to,
            label: label.into(),
        };
        let rotation = |at: i64, rotator: usize, reason: &str, latency_ms: u64| Rotation {
            at_ms: t0 + at,
            rotator,
            reason: reason.into(),
            token_id: format!("id-{at}"),
            fingerprint: "fp".into(),
            latency_ms,
        };
        let token = |created: i64, expires: i64, revoked: Option<i64>| TokenLife {
            token_id: format!("t-{created}"),
            comment: "soak".into(),
            profile: "DEFAULT".into(),
            created_ms: t0 + created,
            expires_ms: Some(t0 + expires),
            revoked_ms: revoked.map(|r| t0 + r),
        };
        let mut file = ReaderRow::new("readers: file", 60_000, 60);
        let metadata = ReaderRow::new("readers: metadata", 60_000, 60);
        if readers_ran {
            file.count(1_000, 200);
            file.count(30_500, 403);
            file.count(40_000, 0);
        }
        Report {
            started_at,
            settings: serde_json::Value::Null,
            settings_line: "60 s, file store, lifetime 20 s, interval 6 s, grace 3 s".into(),
            verdict: "clean".into(),
            figures: Figures {
                duration_s: 60.0,
                rotations: 3,
                ..Figures::default()
            },
            violations: Vec::new(),
            rotations: vec![
                rotation(0, 0, "unknown_expiry", 12),
                rotation(20_000, 1, "interval", 3),
                rotation(40_000, 0, "forced_near_expiry", 1504),
            ],
            phases: vec![span(0, 30_000, "idle"), span(30_000, 60_000, "busy")],
            faults: vec![
                span(5_000, 15_000, "30% HTTP 503"),
                span(
                    20_000,
                    40_000,
                    "flood: 200 silent connections on every listener",
                ),
            ],
            kills: vec![span(25_000, 25_000, "kill -9 rotator 1")],
            leases: Vec::new(),
            tokens: vec![
                token(0, 20_000, Some(23_000)),
                token(20_000, 45_000, None),
                token(40_000, 80_000, None),
            ],
            readers: vec![file, metadata],
        }
    }

    /// Every text a user needs, written on the picture (a PNG has no hover titles).
    fn labels(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| t.split_once('>'))
            .filter_map(|(_, rest)| rest.split_once("</text>"))
            .map(|(text, _)| text.to_string())
            .collect()
    }

    #[test]
    fn the_picture_labels_faults_kills_rotations_readers_and_settings() {
        let labels = labels(&picture_of(true).svg());
        for want in [
            "60 s, file store, lifetime 20 s, interval 6 s, grace 3 s",
            "30% HTTP 503",
            "flood",
            "r1",
            "r0 12ms",
            "r1 3ms",
            "r0 1504ms",
            "readers: file",
            "readers: metadata",
            "3 reads, 1 403",
            "no reads",
            "kill -9",
            "rotation: unknown expiry (start, seed)",
            "token expired",
            "token live at the end",
            "token revoked",
            "connection flood",
        ] {
            assert!(
                labels.iter().any(|l| l == want),
                "{want:?} is not written on the picture: {labels:?}"
            );
        }
        // The file store has no Lease: its kill row does not say it has.
        assert!(!labels.iter().any(|l| l.contains("lease")), "{labels:?}");
    }

    #[test]
    fn readers_that_never_ran_look_different_from_readers_that_did() {
        let ran = picture_of(true).svg();
        let idle = picture_of(false).svg();
        assert!(labels(&idle).iter().filter(|l| *l == "no reads").count() == 2);
        // The reads themselves are drawn: green, red and grey bins on the file row (and
        // each colour once in the legend).
        for colour in ["#3c9d3c", "#d00", "#888"] {
            let bin = format!(r##"height="12" fill="{colour}"/>"##);
            assert_eq!(
                idle.matches(&bin).count(),
                1,
                "{colour} drawn with no reads"
            );
            assert_eq!(ran.matches(&bin).count(), 2, "no {colour} bin drawn");
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&[7u64], 99.0), Some(7));
        assert_eq!(percentile::<u64>(&[], 50.0), None);
    }
}
