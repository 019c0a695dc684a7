//! The soak's picture: a self-contained SVG timeline of the report, readable without
//! hovering (every mark is labelled; the hover titles repeat the labels).
//!
//! Invariant: drawn from the report alone, so it holds fingerprints and ids, never a
//! token value, and shows nothing the report does not say.

use super::report::Report;
use std::fmt::Write as _;

impl Report {
    /// A self-contained SVG timeline that tells the story without hovering: the settings,
    /// sessions, faults and kills (labelled), rotations (coloured by reason, each labelled with
    /// its rotator and latency), what each kind of reader saw, token lives, violations in red.
    /// The hover titles repeat the labels for viewers that show them.
    pub fn svg(&self) -> String {
        let layout = Layout::new(self);
        let Layout {
            sessions_y,
            faults_y,
            kills_y,
            rotations_y,
            token_top,
            legend_y,
            ..
        } = layout;
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
        self.svg_phases(&layout, &mut s);
        self.svg_faults(&layout, &mut s);
        self.svg_kills(&layout, &mut s);
        self.svg_rotations(&layout, &mut s);
        self.svg_readers(&layout, &mut s);
        self.svg_tokens(&layout, &mut s);
        self.svg_axis(&layout, &mut s);
        self.svg_violations(&layout, &mut s);
        self.svg_legend(&layout, &mut s);
        s.push_str("</svg>\n");
        s
    }

    /// The sessions row: busy and idle phases.
    fn svg_phases(&self, layout: &Layout, s: &mut String) {
        let Layout { sessions_y, .. } = *layout;
        let x = |ms: i64| layout.x(ms);
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
    }

    /// The faults row: provider faults, and connection floods as a thinner bar.
    fn svg_faults(&self, layout: &Layout, s: &mut String) {
        let Layout { faults_y, .. } = *layout;
        let x = |ms: i64| layout.x(ms);
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
    }

    /// The kills row: who held the Lease (cluster store), and each `kill -9`.
    fn svg_kills(&self, layout: &Layout, s: &mut String) {
        let Layout { kills_y, .. } = *layout;
        let x = |ms: i64| layout.x(ms);
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
    }

    /// The rotations row: a tick per rotation, coloured by reason, with its rotator and latency.
    fn svg_rotations(&self, layout: &Layout, s: &mut String) {
        let Layout { rotations_y, .. } = *layout;
        let x = |ms: i64| layout.x(ms);
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
    }

    /// One row per reader: what it saw in each time bin (the worst wins), and its counts.
    fn svg_readers(&self, layout: &Layout, s: &mut String) {
        let Layout {
            left,
            width,
            readers_y,
            ..
        } = *layout;
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
    }

    /// Each token's life, from mint to revocation or expiry, in lanes.
    fn svg_tokens(&self, layout: &Layout, s: &mut String) {
        let Layout {
            lanes,
            token_top,
            end,
            ..
        } = *layout;
        let x = |ms: i64| layout.x(ms);
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
    }

    /// The time axis.
    fn svg_axis(&self, layout: &Layout, s: &mut String) {
        let Layout {
            left,
            width,
            axis_y,
            t0,
            end,
            ..
        } = *layout;
        let x = |ms: i64| layout.x(ms);
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
    }

    /// Each violation, a red line across every row.
    fn svg_violations(&self, layout: &Layout, s: &mut String) {
        let Layout {
            sessions_y, axis_y, ..
        } = *layout;
        let x = |ms: i64| layout.x(ms);
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
    }

    /// What each colour means.
    fn svg_legend(&self, layout: &Layout, s: &mut String) {
        let Layout { legend_y, .. } = *layout;
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
    }
}

/// Where each row of the timeline sits, and the run's span on the time axis (the right
/// margin holds each reader row's counts).
#[derive(Clone, Copy)]
struct Layout {
    t0: i64,
    end: i64,
    left: f64,
    width: f64,
    /// Token lives are drawn in this many lanes, by turns.
    lanes: usize,
    sessions_y: f64,
    faults_y: f64,
    kills_y: f64,
    rotations_y: f64,
    readers_y: f64,
    token_top: f64,
    axis_y: f64,
    legend_y: f64,
}

impl Layout {
    fn new(report: &Report) -> Layout {
        let t0 = report.started_at.timestamp_millis();
        let lanes = 8usize;
        let readers_y = 180.0;
        let token_top = readers_y + report.readers.len() as f64 * 16.0 + 10.0;
        let axis_y = token_top + lanes as f64 * 14.0 + 12.0;
        Layout {
            t0,
            end: t0 + (report.figures.duration_s * 1000.0) as i64,
            left: 130.0,
            width: 950.0,
            lanes,
            sessions_y: 48.0,
            faults_y: 70.0,
            kills_y: 108.0,
            rotations_y: 140.0,
            readers_y,
            token_top,
            axis_y,
            legend_y: axis_y + 34.0,
        }
    }

    /// The x of a moment (epoch milliseconds), clamped to the run.
    fn x(&self, ms: i64) -> f64 {
        let (t0, end) = (self.t0, self.end);
        self.left + ((ms.clamp(t0, end) - t0) as f64 / (end - t0).max(1) as f64) * self.width
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
