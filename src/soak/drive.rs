//! Driving the soak: idle and busy phases (session leases on every rotator), provider
//! faults, `kill -9` of rotators, and a sample of the token on disk every 250 ms.

use super::report::{Span, Violation};
use super::setup::{setup, Rig};
use super::{near_expiry_margin, now_ms, SoakError, SoakOptions, HTTP_TIMEOUT, SOAK_COMMENT};
use crate::emulator::Faults;
use crate::reader::Reader;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// What the driving recorded, for the verdict and the timeline.
pub(super) struct Observed {
    pub violations: Vec<Violation>,
    pub phases: Vec<Span>,
    pub faults: Vec<Span>,
    pub kills: Vec<Span>,
    /// Who held the cluster store's Lease when.
    pub leases: Vec<Span>,
}

pub(super) async fn drive(opts: &SoakOptions, rig: &mut Rig) -> Result<Observed, SoakError> {
    let opts = opts.clone();
    let (exe, t0, start) = (rig.exe.clone(), rig.t0, rig.start);
    let (control_urls, lines) = (rig.control_urls.clone(), rig.lines.clone());
    let emulator = &rig.emulator;
    let rotators = &mut rig.rotators;
    let cluster = &rig.cluster;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(setup("http client"))?;
    let file_readers = rig
        .profiles
        .iter()
        .map(|(c, profile)| Reader::new(c, profile))
        .collect::<Result<Vec<_>, _>>()
        .map_err(setup("reader"))?;
    let mut violations: Vec<Violation> = Vec::new();
    let mut phases: Vec<Span> = Vec::new();
    let mut faults: Vec<Span> = Vec::new();
    let mut kills: Vec<Span> = Vec::new();
    let mut leases: Vec<Span> = Vec::new();
    let mut last_lease_check = Instant::now() - Duration::from_secs(1);
    // The replicas are cut off the API server once, for a whole token lifetime: the forced
    // window arrives during the outage.
    // It ends early enough for the replicas to converge and revoke their own tokens.
    let cut_length = Duration::from_secs(opts.lifetime);
    let cut_at = opts
        .duration
        .mul_f64(0.6)
        .min(
            opts.duration
                .saturating_sub(cut_length + Duration::from_secs(opts.grace + 10)),
        )
        .max(opts.duration.mul_f64(0.3));
    let mut api_cut = cluster.as_ref().map(|_| (cut_at, cut_length));
    let mut sessions: Vec<Option<String>> = vec![None; rotators.len()];
    let mut busy = false;
    let mut phase_start = t0;
    let mut next_phase = Duration::from_secs(opts.phase);
    let plan = if opts.faults && emulator.is_some() {
        fault_plan()
    } else {
        Vec::new()
    };
    let mut fault_index = 0;
    let mut fault_ends: Option<(Instant, usize, i64)> = None;
    let reap_age = opts.grace + 2 * HTTP_TIMEOUT + 1;
    let quiet_tail = Duration::from_secs(reap_age + 3);
    let mut next_kill = (opts.kill_every > 0).then(|| Duration::from_secs(opts.kill_every));
    let mut kill_round = 0usize;
    let mut near_expiry_reported: Option<String> = None;
    let margin_ms = near_expiry_margin(&opts).as_millis() as i64;
    let mut progress = Progress::new(opts.duration);
    let mut last_heartbeat = Instant::now();

    // A connection flood on every listener of every rotator, for a whole lifetime (so a
    // forced window falls inside it), before the quiet tail.
    let flood_at = opts.duration.mul_f64(0.45);
    let flood_length = Duration::from_secs(opts.lifetime);
    let mut flood: Option<(Instant, i64)> = None;
    let mut flooded = false;

    while start.elapsed() < opts.duration {
        let elapsed = start.elapsed();
        if !flooded && elapsed >= flood_at && elapsed + flood_length + quiet_tail < opts.duration {
            flooded = true;
            let until = Instant::now() + flood_length;
            for port in rotators.iter().flat_map(|r| r.ports()) {
                tokio::spawn(hold_silent_connections(port, FLOOD_CONNECTIONS, until));
            }
            flood = Some((until, now_ms()));
        }
        if let Some((_, started)) = flood.filter(|(until, _)| Instant::now() >= *until) {
            faults.push(Span {
                start_ms: started,
                end_ms: now_ms(),
                label: format!("flood: {FLOOD_CONNECTIONS} silent connections on every listener"),
            });
            flood = None;
        }
        // Phases: idle first, then busy, alternating; sessions on every rotator while busy.
        if elapsed >= next_phase {
            phases.push(Span {
                start_ms: phase_start,
                end_ms: now_ms(),
                label: if busy { "busy" } else { "idle" }.into(),
            });
            busy = !busy;
            phase_start = now_ms();
            next_phase += Duration::from_secs(opts.phase);
            for (i, base) in control_urls.iter().enumerate() {
                if busy {
                    sessions[i] = open_session(&http, base).await;
                } else if let Some(id) = sessions[i].take() {
                    let _ = http.delete(format!("{base}/v1/sessions/{id}")).send().await;
                }
            }
        }
        if busy && last_heartbeat.elapsed() >= Duration::from_secs(5) {
            last_heartbeat = Instant::now();
            for (i, base) in control_urls.iter().enumerate() {
                match &sessions[i] {
                    Some(id) => {
                        let ok = http
                            .post(format!("{base}/v1/sessions/{id}/heartbeat"))
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success());
                        if !ok {
                            // The rotator was restarted: its leases are gone.
                            sessions[i] = open_session(&http, base).await;
                        }
                    }
                    None => sessions[i] = open_session(&http, base).await,
                }
            }
        }
        // Faults.
        if let Some(emu) = &emulator {
            if let Some((until, i, started)) = fault_ends {
                if Instant::now() >= until {
                    emu.emulator.set_faults(Faults::default());
                    fault_ends = None;
                    faults.push(Span {
                        start_ms: started,
                        end_ms: now_ms(),
                        label: plan[i].2.into(),
                    });
                }
            }
            if fault_ends.is_none()
                && fault_index < plan.len()
                && elapsed.as_secs_f64() >= plan[fault_index].0 * opts.duration.as_secs_f64()
            {
                emu.emulator.set_faults(plan[fault_index].3.clone());
                fault_ends = Some((
                    Instant::now() + Duration::from_secs(plan[fault_index].1),
                    fault_index,
                    now_ms(),
                ));
                fault_index += 1;
            }
        }
        // kill -9, never in the quiet tail so restarted rotators get to reap their orphans.
        if let Some(at) = next_kill {
            if elapsed >= at && elapsed + quiet_tail < opts.duration && !rotators.is_empty() {
                // Replicas of the cluster store: the lease holder, the one that matters.
                let holder = match cluster {
                    Some(c) => c.holder().await.and_then(|h| {
                        h.strip_prefix("soak-")
                            .and_then(|n| n.parse::<usize>().ok())
                    }),
                    None => None,
                };
                let i = holder.unwrap_or(kill_round % rotators.len());
                kill_round += 1;
                rotators[i].kill9().await;
                kills.push(Span {
                    start_ms: now_ms(),
                    end_ms: now_ms(),
                    label: format!(
                        "kill -9 rotator {i}{}",
                        if holder.is_some() {
                            " (lease holder)"
                        } else {
                            ""
                        }
                    ),
                });
                tokio::time::sleep(Duration::from_millis(500)).await;
                // A killed lease holder comes back as a new pod (a new name): its old name
                // keeps the Lease until it expires, and another replica takes over.
                if holder.is_some() {
                    rotators[i].rename(&format!("soak-{i}-r{kill_round}"));
                }
                rotators[i].spawn_listening(&exe, false).await?;
                sessions[i] = None;
                next_kill = Some(at + Duration::from_secs(opts.kill_every));
            }
        }
        if let Some(c) = cluster {
            if let Some((at, length)) = api_cut {
                if elapsed >= at {
                    c.cut(length);
                    faults.push(Span {
                        start_ms: now_ms(),
                        end_ms: now_ms() + length.as_millis() as i64,
                        label: format!("API server cut off for {} s", length.as_secs()),
                    });
                    api_cut = None;
                }
            }
            if last_lease_check.elapsed() >= Duration::from_secs(1) {
                last_lease_check = Instant::now();
                let holder = c.holder().await.unwrap_or_else(|| "none".into());
                let now = now_ms();
                match leases.last_mut() {
                    Some(last) if last.label == holder => last.end_ms = now,
                    _ => leases.push(Span {
                        start_ms: now,
                        end_ms: now,
                        label: holder,
                    }),
                }
            }
        }
        // The token on disk must never come near its expiry.
        for token in file_readers.iter().filter_map(|r| r.token().ok().flatten()) {
            let Some(emu) = &emulator else { break };
            if let Some(rec) = emu.emulator.lookup(&token) {
                let left = rec.expires_at.map(|e| e.timestamp_millis() - now_ms());
                if left.is_some_and(|l| l < margin_ms)
                    && near_expiry_reported.as_deref() != Some(rec.token_id.as_str())
                {
                    near_expiry_reported = Some(rec.token_id.clone());
                    violations.push(Violation { at_ms: now_ms(), kind: "near_expiry".into(), detail: format!("token {} on disk with {} ms left (margin {margin_ms} ms) and no replacement", rec.token_id, left.unwrap_or(0)) });
                }
            }
        }
        let (reads, bad) = {
            let l = lines.lock().unwrap_or_else(|p| p.into_inner());
            (
                l.iter().filter(|r| r.bench.is_none()).count(),
                l.iter().filter(|r| r.status == 403).count(),
            )
        };
        let dead = emulator
            .as_ref()
            .map(|e| e.emulator.counters().dead_token_requests)
            .unwrap_or(0);
        let rotations = emulator
            .as_ref()
            .map(|e| {
                e.emulator
                    .tokens()
                    .iter()
                    .filter(|t| t.comment.starts_with(SOAK_COMMENT))
                    .count()
            })
            .unwrap_or(0);
        progress.update(
            elapsed,
            format!(
                "{} | rotations {rotations} | reads {reads} | violations {}",
                if busy { "busy" } else { "idle" },
                violations.len() + bad + dead as usize
            ),
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    progress.finish();
    phases.push(Span {
        start_ms: phase_start,
        end_ms: now_ms(),
        label: if busy { "busy" } else { "idle" }.into(),
    });
    if let (Some(emu), Some((_, i, started))) = (&emulator, fault_ends) {
        emu.emulator.set_faults(Faults::default());
        faults.push(Span {
            start_ms: started,
            end_ms: now_ms(),
            label: plan[i].2.into(),
        });
    }

    Ok(Observed {
        violations,
        phases,
        faults,
        kills,
        leases,
    })
}

/// Silent connections held on each listener during the flood.
const FLOOD_CONNECTIONS: usize = 200;

/// Holds `count` silent connections to `port` until `until`, opening a new one for each the
/// listener closes (its request-head timeout): what a careless or hostile local client does.
async fn hold_silent_connections(port: u16, count: usize, until: Instant) {
    let mut held: Vec<tokio::net::TcpStream> = Vec::new();
    while Instant::now() < until {
        held.retain(|s| {
            let mut buf = [0u8; 16];
            matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        });
        while held.len() < count && Instant::now() < until {
            let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
            match tokio::time::timeout(Duration::from_millis(200), connect).await {
                Ok(Ok(s)) => held.push(s),
                _ => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn open_session(http: &reqwest::Client, base: &str) -> Option<String> {
    let resp = http.post(format!("{base}/v1/sessions")).send().await.ok()?;
    let body: serde_json::Value = resp.json().await.ok()?;
    body.get("id").and_then(|v| v.as_str()).map(str::to_string)
}

/// The fault schedule: (start fraction of the run, seconds, description, faults).
fn fault_plan() -> Vec<(f64, u64, &'static str, Faults)> {
    vec![
        (
            0.15,
            10,
            "latency 1.5 s",
            Faults {
                latency_ms: 1500,
                ..Faults::default()
            },
        ),
        (
            0.35,
            10,
            "30% HTTP 503",
            Faults {
                error_rate: 0.3,
                error_status: 503,
                ..Faults::default()
            },
        ),
        (
            0.55,
            8,
            "50% HTTP 429, Retry-After 1",
            Faults {
                error_rate: 0.5,
                error_status: 429,
                retry_after: Some(1),
                ..Faults::default()
            },
        ),
        (
            0.75,
            3,
            "outage 3 s",
            Faults {
                outage_seconds: Some(3),
                ..Faults::default()
            },
        ),
    ]
}

struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_plain: Instant,
}

impl Progress {
    fn new(total: Duration) -> Progress {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total.as_secs());
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len}s {msg}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Progress {
            bar,
            last_plain: Instant::now(),
        }
    }

    fn update(&mut self, elapsed: Duration, msg: String) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(elapsed.as_secs());
                bar.set_message(msg);
            }
            None if self.last_plain.elapsed() >= Duration::from_secs(10) => {
                self.last_plain = Instant::now();
                println!("[{:>4}s] {msg}", elapsed.as_secs());
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
