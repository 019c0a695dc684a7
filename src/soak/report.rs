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

/// What one kind of reader saw over time: the run cut into equal bins, each counting the
/// reads that succeeded, were refused (403), or found no token or rotator to ask.
#[derive(Debug, Clone, Serialize)]
pub struct ReaderRow {
    pub label: String,
    pub bin_ms: i64,
    pub bins: Vec<ReadBin>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ReadBin {
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

    /// A self-contained SVG timeline that tells the story without hovering: the settings,
    /// sessions, faults and kills (labelled), rotations (coloured by reason, each labelled with
    /// its rotator and latency), what each kind of reader saw, token lives, violations in red.
    /// The hover titles repeat the labels for viewers that show them.
    pub fn svg(&self) -> String {
        let t0 = self.started_at.timestamp_millis();
        let end = t0 + (self.figures.duration_s * 1000.0) as i64;
        // The right margin holds each reader row's counts.
        let (left, width) = (130.0, 950.0);
        let x =
            |ms: i64| left + ((ms.clamp(t0, end) - t0) as f64 / (end - t0).max(1) as f64) * width;
        let lanes = 8usize;
        let sessions_y = 48.0;
        let faults_y = 70.0;
        let kills_y = 108.0;
        let rotations_y = 140.0;
        let readers_y = 180.0;
        let token_top = readers_y + self.readers.len() as f64 * 16.0 + 10.0;
        let axis_y = token_top + lanes as f64 * 14.0 + 12.0;
        let legend_y = axis_y + 34.0;
        let height = legend_y + 64.0;
        let mut s = String::new();
        let _ = write!(
            s,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="1200" height="{height}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="#fff"/>"##
        );
        let _ = write!(
            s,
            r##"<text x="10" y="16" font-size="13" font-weight="bold">pat-rotator soak: {} ({} rotations, {} violations)</text><text x="10" y="32">{}</text>"##,
            self.verdict,
            self.figures.rotations,
            self.violations.len(),
            escape(&self.settings_line)
        );
        let kill_row = if self.leases.is_empty() {
            "kill -9"
        } else {
            "kill -9, lease"
        };
        for (y, label) in [
            (sessions_y, "sessions"),
            (faults_y, "faults"),
            (kills_y, kill_row),
            (rotations_y, "rotations"),
            (token_top, "tokens"),
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
                r##"<rect x="{:.1}" y="{sessions_y}" width="{:.1}" height="12" fill="{fill}"><title>{}</title></rect>"##,
                x(p.start_ms),
                (x(p.end_ms) - x(p.start_ms)).max(1.0),
                p.label
            );
        }
        // Each fault's kind written under its bar, on two staggered lines so neighbours do
        // not overwrite each other.
        for (i, f) in self.faults.iter().enumerate() {
            let fx = x(f.start_ms);
            // A connection flood is not a provider fault and often overlaps one: a thinner
            // bar of its own colour along the bottom of the row.
            let (fill, y, h) = if f.label.starts_with("flood") {
                ("#6c5ce7", faults_y + 8.0, 4.0)
            } else {
                ("#f0a030", faults_y, 8.0)
            };
            let _ = write!(
                s,
                r##"<rect x="{fx:.1}" y="{y}" width="{:.1}" height="{h}" fill="{fill}"><title>{1}</title></rect><text x="{fx:.1}" y="{2}" font-size="9">{1}</text>"##,
                (x(f.end_ms) - fx).max(2.0),
                escape(&short_fault(&f.label)),
                faults_y + 22.0 + (i % 2) as f64 * 10.0
            );
        }
        for (i, l) in self.leases.iter().enumerate() {
            let fill = ["#5b8def", "#e67e22", "#16a085", "#8e44ad", "#7f8c8d"][i % 5];
            let _ = write!(
                s,
                r##"<rect x="{:.1}" y="{}" width="{:.1}" height="4" fill="{fill}"><title>lease: {}</title></rect>"##,
                x(l.start_ms),
                kills_y + 14.0,
                (x(l.end_ms) - x(l.start_ms)).max(2.0),
                escape(&l.label)
            );
        }
        for k in &self.kills {
            let kx = x(k.start_ms);
            let _ = write!(
                s,
                r##"<path d="M{kx:.1} {kills_y} l5 10 l-10 0 z" fill="#222"><title>{0}</title></path><text x="{kx:.1}" y="{1}" font-size="9" text-anchor="middle">{2}</text>"##,
                escape(&k.label),
                kills_y + 28.0,
                escape(&short_kill(&k.label))
            );
        }
        for (i, r) in self.rotations.iter().enumerate() {
            let rx = x(r.at_ms);
            let _ = write!(
                s,
                r##"<line x1="{rx:.1}" x2="{rx:.1}" y1="{rotations_y}" y2="{}" stroke="{}" stroke-width="2"><title>{} by rotator {}, {} ms</title></line><text x="{rx:.1}" y="{}" font-size="8" text-anchor="middle">r{3} {4}ms</text>"##,
                rotations_y + 12.0,
                reason_colour(&r.reason),
                r.reason,
                r.rotator,
                r.latency_ms,
                rotations_y + 21.0 + (i % 2) as f64 * 9.0
            );
        }
        for (row, r) in self.readers.iter().enumerate() {
            let y = readers_y + row as f64 * 16.0;
            let reads: u32 = r
                .bins
                .iter()
                .map(|b| b.ok + b.refused + b.unavailable)
                .sum();
            let refused: u32 = r.bins.iter().map(|b| b.refused).sum();
            let _ = write!(
                s,
                r##"<text x="10" y="{}">{}</text><rect x="{left}" y="{y}" width="{width}" height="12" fill="#fff" stroke="#ccc"/>"##,
                y + 10.0,
                escape(&r.label)
            );
            let bin_w = width / r.bins.len() as f64;
            for (i, b) in r.bins.iter().enumerate() {
                // The worst thing a bin saw wins: a 403 over a missing token over success.
                let fill = if b.refused > 0 {
                    "#d00"
                } else if b.unavailable > 0 {
                    "#888"
                } else if b.ok > 0 {
                    "#3c9d3c"
                } else {
                    continue;
                };
                let _ = write!(
                    s,
                    r##"<rect x="{:.1}" y="{y}" width="{:.2}" height="12" fill="{fill}"/>"##,
                    left + i as f64 * bin_w,
                    bin_w + 0.3
                );
            }
            let _ = write!(
                s,
                r##"<text x="{}" y="{}" font-size="9">{}</text>"##,
                left + width + 4.0,
                y + 10.0,
                if reads == 0 {
                    "no reads".to_string()
                } else {
                    format!("{reads} reads, {refused} 403")
                }
            );
        }
        let end_of_run = end;
        for (i, t) in self.tokens.iter().enumerate() {
            let stop = match (t.revoked_ms, t.expires_ms) {
                (Some(r), _) => r,
                (None, Some(e)) => e,
                (None, None) => end,
            };
            let y = token_top + (i % lanes) as f64 * 14.0;
            let (fill, fate) = match (t.revoked_ms, t.expires_ms) {
                (Some(_), _) => ("#4a90d9", "revoked"),
                (None, Some(e)) if e <= end_of_run => ("#c9a26b", "expired"),
                _ => ("#9aa5b1", "live at the end"),
            };
            let _ = write!(
                s,
                r##"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="10" rx="2" fill="{fill}"><title>{} {fate}</title></rect>"##,
                x(t.created_ms),
                (x(stop) - x(t.created_ms)).max(1.0),
                t.token_id,
            );
        }
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
                r##"<line x1="{vx:.1}" x2="{vx:.1}" y1="{sessions_y}" y2="{axis_y}" stroke="#d00" stroke-width="2"><title>{}: {}</title></line><text x="{vx:.1}" y="{}" font-size="9" fill="#d00">{}</text>"##,
                v.kind,
                escape(&v.detail),
                sessions_y - 2.0,
                v.kind
            );
        }
        let legend: [(&str, &str); 15] = [
            ("#7bc67b", "busy (sessions open)"),
            ("#e0e0e0", "idle"),
            ("#f0a030", "provider fault"),
            ("#6c5ce7", "connection flood"),
            (reason_colour("interval"), "rotation: interval"),
            (
                reason_colour("forced_near_expiry"),
                "rotation: forced near expiry",
            ),
            (
                reason_colour("unknown_expiry"),
                "rotation: unknown expiry (start, seed)",
            ),
            (reason_colour("manual"), "rotation: manual"),
            ("#3c9d3c", "reads ok"),
            ("#888", "read found no token"),
            ("#d00", "read refused (403) / violation"),
            ("#4a90d9", "token revoked"),
            ("#c9a26b", "token expired"),
            ("#9aa5b1", "token live at the end"),
            ("#222", "kill -9 (r = rotator)"),
        ];
        for (i, (colour, label)) in legend.iter().enumerate() {
            let lx = 10.0 + (i % 5) as f64 * 236.0;
            let ly = legend_y + (i / 5) as f64 * 18.0;
            let _ = write!(
                s,
                r##"<rect x="{lx}" y="{ly}" width="12" height="12" fill="{colour}"/><text x="{}" y="{}">{label}</text>"##,
                lx + 16.0,
                ly + 10.0
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// The colour of a rotation's reason, on its tick and in the legend.
fn reason_colour(reason: &str) -> &'static str {
    match reason {
        "interval" => "#2a7ab0",
        "forced_near_expiry" => "#8e44ad",
        "unknown_expiry" => "#e67e22",
        _ => "#555",
    }
}

/// A fault's label short enough to print under its bar.
fn short_fault(label: &str) -> String {
    match label.split_once(':') {
        Some((kind, _)) => kind.to_string(),
        None => label.to_string(),
    }
}

/// "kill -9 rotator 1 (lease holder)" as "r1 (holder)".
fn short_kill(label: &str) -> String {
    let rest = label.trim_start_matches("kill -9 rotator ");
    rest.replace(" (lease holder)", " (holder)")
        .split_whitespace()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                format!("r{w}")
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
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
