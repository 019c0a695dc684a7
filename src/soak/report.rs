//! The soak's report: the record of what happened, the figures, and a timeline picture.
//!
//! Invariant: the report holds fingerprints and ids, never a token value.

use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Clone, Serialize)]
pub struct Span {
    pub start_ms: i64,
    pub end_ms: i64,
    pub label: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
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
pub struct TokenLife {
    pub token_id: String,
    pub comment: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
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
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub settings: serde_json::Value,
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
}

/// The value at percentile `p` (0..=100) of `values`, nearest-rank.
pub fn percentile<T: Copy + Ord>(values: &[T], p: f64) -> Option<T> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
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

    /// A self-contained SVG timeline: token lives as bars, rotations, phases, faults, kills,
    /// and violations in red.
    pub fn svg(&self) -> String {
        let t0 = self.started_at.timestamp_millis();
        let end = t0 + (self.figures.duration_s * 1000.0) as i64;
        let (left, width) = (110.0, 1060.0);
        let x =
            |ms: i64| left + ((ms.clamp(t0, end) - t0) as f64 / (end - t0).max(1) as f64) * width;
        let lanes = 8usize;
        let token_top = 130.0;
        let height = token_top + lanes as f64 * 14.0 + 90.0;
        let mut s = String::new();
        let _ = write!(
            s,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="1200" height="{height}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="#fff"/>"##
        );
        let _ = write!(
            s,
            r##"<text x="10" y="16" font-size="13" font-weight="bold">pat-rotator soak: {} ({} rotations, {} violations)</text>"##,
            self.verdict,
            self.figures.rotations,
            self.violations.len()
        );
        for (y, label) in [
            (40.0, "sessions"),
            (62.0, "faults"),
            (84.0, "kill -9, lease"),
            (106.0, "rotations"),
            (token_top + 8.0, "tokens"),
        ] {
            let _ = write!(s, r##"<text x="10" y="{}">{label}</text>"##, y + 9.0);
        }
        for p in &self.phases {
            let fill = if p.label == "busy" {
                "#7bc67b"
            } else {
                "#e0e0e0"
            };
            let _ = write!(
                s,
                r##"<rect x="{:.1}" y="40" width="{:.1}" height="12" fill="{fill}"><title>{}</title></rect>"##,
                x(p.start_ms),
                (x(p.end_ms) - x(p.start_ms)).max(1.0),
                p.label
            );
        }
        for f in &self.faults {
            let _ = write!(
                s,
                r##"<rect x="{:.1}" y="62" width="{:.1}" height="12" fill="#f0a030"><title>{}</title></rect>"##,
                x(f.start_ms),
                (x(f.end_ms) - x(f.start_ms)).max(2.0),
                escape(&f.label)
            );
        }
        for (i, l) in self.leases.iter().enumerate() {
            let fill = ["#5b8def", "#e67e22", "#16a085", "#8e44ad", "#7f8c8d"][i % 5];
            let _ = write!(
                s,
                r##"<rect x="{:.1}" y="97" width="{:.1}" height="4" fill="{fill}"><title>lease: {}</title></rect>"##,
                x(l.start_ms),
                (x(l.end_ms) - x(l.start_ms)).max(2.0),
                escape(&l.label)
            );
        }
        for k in &self.kills {
            let kx = x(k.start_ms);
            let _ = write!(
                s,
                r##"<path d="M{kx:.1} 84 l5 12 l-10 0 z" fill="#222"><title>{}</title></path>"##,
                escape(&k.label)
            );
        }
        for r in &self.rotations {
            let color = match r.reason.as_str() {
                "interval" => "#2a7ab0",
                "forced_near_expiry" => "#8e44ad",
                _ => "#555",
            };
            let _ = write!(
                s,
                r##"<line x1="{0:.1}" x2="{0:.1}" y1="106" y2="118" stroke="{color}" stroke-width="2"><title>{1} by rotator {2}, {3} ms</title></line>"##,
                x(r.at_ms),
                r.reason,
                r.rotator,
                r.latency_ms
            );
        }
        for (i, t) in self.tokens.iter().enumerate() {
            let stop = match (t.revoked_ms, t.expires_ms) {
                (Some(r), _) => r,
                (None, Some(e)) => e,
                (None, None) => end,
            };
            let y = token_top + (i % lanes) as f64 * 14.0;
            let fill = if t.revoked_ms.is_some() {
                "#4a90d9"
            } else {
                "#9aa5b1"
            };
            let _ = write!(
                s,
                r##"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="10" rx="2" fill="{fill}"><title>{} {}</title></rect>"##,
                x(t.created_ms),
                (x(stop) - x(t.created_ms)).max(1.0),
                t.token_id,
                if t.revoked_ms.is_some() {
                    "revoked"
                } else {
                    "expired or live"
                }
            );
        }
        let axis_y = token_top + lanes as f64 * 14.0 + 12.0;
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{axis_y}" y2="{axis_y}" stroke="#333"/>"##,
            left + width
        );
        let step = if end - t0 > 300_000 { 60_000 } else { 10_000 };
        let mut t = 0;
        while t0 + t <= end {
            let tx = x(t0 + t);
            let _ = write!(
                s,
                r##"<line x1="{tx:.1}" x2="{tx:.1}" y1="{axis_y}" y2="{}" stroke="#333"/><text x="{tx:.1}" y="{}" text-anchor="middle">{}s</text>"##,
                axis_y + 4.0,
                axis_y + 16.0,
                t / 1000
            );
            t += step;
        }
        for v in &self.violations {
            let vx = x(v.at_ms);
            let _ = write!(
                s,
                r##"<line x1="{vx:.1}" x2="{vx:.1}" y1="36" y2="{axis_y}" stroke="#d00" stroke-width="2"><title>{}: {}</title></line>"##,
                v.kind,
                escape(&v.detail)
            );
        }
        let legend_y = axis_y + 40.0;
        let legend = [
            ("#7bc67b", "busy (sessions open)"),
            ("#e0e0e0", "idle"),
            ("#f0a030", "provider fault"),
            ("#2a7ab0", "interval rotation"),
            ("#8e44ad", "forced near expiry"),
            ("#4a90d9", "token (revoked)"),
            ("#9aa5b1", "token (expired/live)"),
            ("#d00", "violation"),
        ];
        for (i, (color, label)) in legend.iter().enumerate() {
            let lx = 10.0 + i as f64 * 145.0;
            let _ = write!(
                s,
                r##"<rect x="{lx}" y="{legend_y}" width="12" height="12" fill="{color}"/><text x="{}" y="{}">{label}</text>"##,
                lx + 16.0,
                legend_y + 10.0
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&[7u64], 99.0), Some(7));
        assert_eq!(percentile::<u64>(&[], 50.0), None);
    }
}
