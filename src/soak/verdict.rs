//! The soak's verdict: stop everything, then judge only from what the emulator and the
//! readers observed (requests with dead tokens, 403s, gaps without a rotation, leaked
//! tokens), never from the rotators' own claims; and the figures of the report.

use super::drive::{Observed, Revoked};
use super::reader_proc::{ReadMode, ReaderBench, ReaderLine};
use super::report::{percentile, Figures, ReaderRow, Report, Rotation, Span, TokenLife, Violation};
use super::setup::{Rig, RotatorProc, NEIGHBOUR_PROFILE};
use super::{now_ms, SoakOptions, HTTP_TIMEOUT, READER_POLL_MS, SOAK_COMMENT};
use crate::emulator::{DeadTokenEvent, OAuthCounters, RunningEmulator, TokenRecord};
use crate::rotator::RotatedEvent;
use crate::store::Store;
use std::collections::HashMap;
use std::time::Duration;

pub(super) async fn judge(opts: &SoakOptions, rig: &mut Rig, observed: Observed) -> Report {
    let Observed {
        mut violations,
        phases,
        mut faults,
        kills,
        leases,
        revocations,
    } = observed;
    let (profiles, t0, started_at, lines) = (
        rig.profiles.clone(),
        rig.t0,
        rig.started_at,
        rig.lines.clone(),
    );
    let end_ms = stop_everything(rig, &mut violations).await;
    let (emulator, rotators) = (&rig.emulator, &mut rig.rotators);

    let reader_lines = std::mem::take(&mut *lines.lock().unwrap_or_else(|p| p.into_inner()));
    let rotations = parse_rotations(rotators);
    let snapshots: Vec<_> = profiles
        .iter()
        .filter_map(|(c, profile)| Store::open(c, profile).and_then(|s| s.read()).ok())
        .collect();
    let shared_ids = match &rig.cluster {
        Some(c) => c.recorded_ids().await,
        None => Vec::new(),
    };
    let tokens = token_lives(emulator.as_ref(), rig.neighbour_instance.as_deref());
    let bound = revocation_bound_ms(opts);

    // Verdict inputs from the emulator.
    if let Some(emu) = &emulator {
        let keep = current_and_pending(shared_ids, &snapshots);
        let kept: std::collections::BTreeSet<&str> =
            profiles.iter().map(|(_, p)| p.as_str()).collect();
        let kept: Vec<&str> = kept.into_iter().collect();
        let events = unexcused_events(emu.emulator.events(), &revocations, bound);
        violations.extend(dead_token_requests(&events));
        violations.extend(replayed_refresh_tokens(
            &emu.emulator.counters().oauth,
            now_ms(),
        ));
        violations.extend(missed_rotations(opts.lifetime, &tokens, &kept, t0, end_ms));
        violations.extend(leaked_tokens(
            &emu.emulator.tokens(),
            &keep,
            chrono::Utc::now(),
        ));
    }
    let (refused, found) = refusals(&reader_lines, &revocations, bound);
    violations.extend(refused);
    faults.extend(found);
    violations.sort_by_key(|v| v.at_ms);

    let mut figures = figures(
        rotators,
        &rotations,
        &reader_lines,
        &kills,
        emulator.as_ref(),
        (end_ms - t0) as f64 / 1000.0,
    );
    if let Some(c) = &rig.cluster {
        kube_cost(&mut figures, rotators, c);
    }
    let readers = reader_rows(
        &reader_lines,
        started_at.timestamp_millis(),
        end_ms,
        // The neighbour's reader comes after the others (file store only).
        (!opts.kubernetes).then_some(opts.readers),
    );
    Report {
        started_at,
        settings_line: opts.describe(),
        readers,
        settings: serde_json::json!({
            "duration_s": opts.duration.as_secs(), "lifetime_s": opts.lifetime, "interval_s": opts.interval, "grace_s": opts.grace,
            "readers": opts.readers, "rotators": opts.rotators, "faults": opts.faults, "kill_every_s": opts.kill_every,
            "phase_s": opts.phase, "reader_cache_s": opts.reader_cache, "provider": if opts.host.is_some() { "workspace" } else { "embedded emulator" },
            "store": if opts.kubernetes { "kubernetes" } else { "file" },
            "credential": opts.credential.name(),
        }),
        verdict: if violations.is_empty() {
            "clean".into()
        } else {
            "VIOLATIONS".into()
        },
        figures,
        violations,
        rotations,
        phases,
        faults,
        kills,
        leases,
        tokens,
    }
}

/// Stops everything: readers first (they must not outlive the tokens), then the rotators,
/// each of which must exit 0 on SIGTERM. Returns when the readers stopped: the end of the
/// run for every figure.
async fn stop_everything(rig: &mut Rig, violations: &mut Vec<Violation>) -> i64 {
    let readers = std::mem::take(&mut rig.readers);
    for r in &readers {
        if let Some(pid) = r.id() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
    for mut r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(10), r.wait()).await;
    }
    let end_ms = now_ms();
    if let Some(c) = rig.cluster.as_mut() {
        c.mark_end(&rig.rotators).await;
    }
    for r in rig.rotators.iter_mut() {
        if !r.terminate().await {
            violations.push(Violation {
                at_ms: now_ms(),
                kind: "unclean_stop".into(),
                detail: format!("rotator {} did not exit 0 within 15 s of SIGTERM", r.index),
            });
        }
    }
    end_ms
}

/// Every token the soak's rotators minted, from the emulator's own records, each with the
/// profile it was minted for (the neighbour's instance, or the soak's own profile).
fn token_lives(emulator: Option<&RunningEmulator>, neighbour: Option<&str>) -> Vec<TokenLife> {
    let records = emulator.map(|e| e.emulator.tokens()).unwrap_or_default();
    records
        .into_iter()
        .filter(|t| t.comment.starts_with(SOAK_COMMENT) || t.oauth)
        .map(|t| {
            let instance = t.comment.split_once(':').map(|(_, i)| i);
            let profile = match (instance, neighbour) {
                (Some(i), Some(n)) if i == n => NEIGHBOUR_PROFILE,
                _ => "DEFAULT",
            };
            TokenLife {
                token_id: t.token_id,
                profile: profile.into(),
                comment: t.comment,
                created_ms: t.created_at.timestamp_millis(),
                expires_ms: t.expires_at.map(|x| x.timestamp_millis()),
                revoked_ms: t.revoked_at.map(|x| x.timestamp_millis()),
            }
        })
        .collect()
}

/// Every request the emulator saw with a revoked or expired token.
fn dead_token_requests(events: &[DeadTokenEvent]) -> Vec<Violation> {
    events
        .iter()
        .map(|ev| Violation {
            at_ms: ev.at.timestamp_millis(),
            kind: format!("{}_token_request", ev.kind),
            detail: format!(
                "{} with token {} by {}",
                ev.path, ev.token_id, ev.user_agent
            ),
        })
        .collect()
}

/// A refresh token sent twice, and a login revoked for it (the emulator's strictest rule).
fn replayed_refresh_tokens(oauth: &OAuthCounters, at_ms: i64) -> Vec<Violation> {
    let mut found = Vec::new();
    if oauth.replays > 0 {
        found.push(Violation {
            at_ms,
            kind: "refresh_token_replayed".into(),
            detail: format!("{} used refresh tokens were sent again", oauth.replays),
        });
    }
    if oauth.family_revocations > 0 {
        found.push(Violation {
            at_ms,
            kind: "login_revoked".into(),
            detail: format!(
                "{} logins were revoked whole for a replay",
                oauth.family_revocations
            ),
        });
    }
    found
}

/// A gap longer than the lifetime without a successful rotation, judged for each profile
/// apart: one profile's rotations must not hide another's gap. `profiles` are the ones a
/// rotator kept, so a profile that never rotated is a gap from start to end.
fn missed_rotations(
    lifetime_s: u64,
    tokens: &[TokenLife],
    profiles: &[&str],
    t0: i64,
    end_ms: i64,
) -> Vec<Violation> {
    let mut missed = Vec::new();
    for profile in profiles {
        let mut created: Vec<i64> = tokens
            .iter()
            .filter(|t| t.profile == *profile)
            .map(|t| t.created_ms)
            .collect();
        created.sort_unstable();
        let mut prev = t0;
        for c in created.iter().copied().chain([end_ms]) {
            if c - prev > lifetime_s as i64 * 1000 {
                missed.push(Violation {
                    at_ms: c,
                    kind: "missed_rotation".into(),
                    detail: format!(
                        "{:.1} s without a successful rotation of profile {profile} (lifetime {lifetime_s} s)",
                        (c - prev) as f64 / 1000.0,
                    ),
                });
            }
            prev = c;
        }
    }
    missed
}

/// Leaks: live tokens of the soak's rotators beyond the current and pending ones (`keep`).
fn leaked_tokens(
    tokens: &[TokenRecord],
    keep: &[String],
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<Violation> {
    tokens
        .iter()
        .filter(|t| {
            t.comment.starts_with(SOAK_COMMENT) && t.is_live(now) && !keep.contains(&t.token_id)
        })
        .map(|t| Violation {
            at_ms: now.timestamp_millis(),
            kind: "leaked_token".into(),
            detail: format!(
                "token {} ({}) is live but neither current nor pending",
                t.token_id, t.comment
            ),
        })
        .collect()
}

/// How long after a revocation out of band the revoked token may still be used: one check
/// period (the threshold) plus one turn (a mint with its retries).
fn revocation_bound_ms(opts: &SoakOptions) -> i64 {
    let threshold = crate::policy::threshold(Duration::from_secs(opts.interval));
    (threshold + Duration::from_secs(2 * HTTP_TIMEOUT + 2)).as_millis() as i64
}

/// The ids of the tokens the soak ends with: the Secret's, and each file's current and
/// pending ones (anything else still live is a leak).
fn current_and_pending(mut ids: Vec<String>, snapshots: &[crate::store::Snapshot]) -> Vec<String> {
    for s in snapshots {
        ids.extend(s.state.token_id.clone());
        ids.extend(
            s.state
                .pending_revocations
                .iter()
                .map(|p| p.token_id.clone()),
        );
    }
    ids
}

/// The readers' refusals a revocation out of band does not allow, as violations, and how
/// long each revocation was seen, as spans.
fn refusals(
    reader_lines: &[ReaderLine],
    revocations: &[Revoked],
    bound: i64,
) -> (Vec<Violation>, Vec<Span>) {
    let (allowed, refused): (Vec<ReaderLine>, Vec<ReaderLine>) =
        reader_lines.iter().cloned().partition(|l| {
            // A proxy's client never sees the token: a refusal through the proxy right
            // after a revocation is the revoked token's (the proxy rotates on it).
            let through_proxy = l.mode == Some(ReadMode::Proxy);
            let theirs =
                |r: &Revoked| through_proxy || l.fp.as_deref() == Some(r.fingerprint.as_str());
            l.status == 403 && revocation_allows(revocations, theirs, l.t, bound)
        });
    (
        refused_reads(&refused),
        revocations_found(revocations, &allowed, bound),
    )
}

/// The dead-token requests no revocation out of band allows (see [`revocation_allows`]).
fn unexcused_events(
    events: Vec<DeadTokenEvent>,
    revocations: &[Revoked],
    bound: i64,
) -> Vec<DeadTokenEvent> {
    events
        .into_iter()
        .filter(|ev| {
            let theirs = |r: &Revoked| ev.kind == "revoked" && ev.token_id == r.token_id;
            !revocation_allows(revocations, theirs, ev.at.timestamp_millis(), bound)
        })
        .collect()
}

/// Whether a use of a token at `at_ms` is one `theirs` revocation allows: from the
/// revocation to [`revocation_bound_ms`] after it.
fn revocation_allows(
    revocations: &[Revoked],
    theirs: impl Fn(&Revoked) -> bool,
    at_ms: i64,
    bound: i64,
) -> bool {
    revocations
        .iter()
        .any(|r| theirs(r) && at_ms >= r.at_ms && at_ms <= r.at_ms + bound)
}

/// For each revocation, how long readers kept being refused with its token (`allowed`: the
/// refusals within the bound), as a span of the report's faults.
fn revocations_found(revocations: &[Revoked], allowed: &[ReaderLine], bound: i64) -> Vec<Span> {
    revocations
        .iter()
        .map(|r| {
            let last = allowed
                .iter()
                .filter(|l| l.t >= r.at_ms)
                .map(|l| l.t)
                .max()
                .unwrap_or(r.at_ms);
            Span {
                start_ms: r.at_ms,
                end_ms: last,
                label: format!(
                    "token {} refused to readers for {:.1} s after its revocation (bound {:.1} s)",
                    r.token_id,
                    (last - r.at_ms) as f64 / 1000.0,
                    bound as f64 / 1000.0
                ),
            }
        })
        .collect()
}

/// Every read a reader saw refused with 403.
fn refused_reads(lines: &[ReaderLine]) -> Vec<Violation> {
    lines
        .iter()
        .filter(|l| l.status == 403)
        .map(|l| Violation {
            at_ms: l.t,
            kind: "reader_403".into(),
            detail: format!(
                "reader {} got 403 with {}",
                l.reader,
                l.fp.clone().unwrap_or_default()
            ),
        })
        .collect()
}

/// One row per kind of reader (the file, the metadata endpoint, the proxy, the neighbour's
/// file reader), each read in its time bin. A kind that never read draws as an empty row.
fn reader_rows(
    lines: &[ReaderLine],
    t0: i64,
    end_ms: i64,
    neighbour: Option<usize>,
) -> Vec<ReaderRow> {
    // About one bin per second, at most 600 across the picture.
    let duration = (end_ms - t0).max(1);
    let bins = (duration / 1000).clamp(1, 600) as usize;
    let mut rows: Vec<ReaderRow> = ["file", "metadata", "proxy"]
        .iter()
        .map(|kind| ReaderRow::new(format!("readers: {kind}"), duration, bins))
        .collect();
    if neighbour.is_some() {
        rows.push(ReaderRow::new("neighbour: file", duration, bins));
    }
    for l in lines.iter().filter(|l| l.bench.is_none()) {
        let row = if Some(l.reader) == neighbour {
            rows.len() - 1
        } else {
            match l.mode {
                Some(ReadMode::Metadata) => 1,
                Some(ReadMode::Proxy) => 2,
                _ => 0,
            }
        };
        rows[row].count(l.t - t0, l.status);
    }
    rows
}

/// The rotations the rotators logged ([`RotatedEvent`] records in their JSON logs).
fn parse_rotations(rotators: &[RotatorProc]) -> Vec<Rotation> {
    let mut out: Vec<Rotation> = rotators
        .iter()
        .filter_map(|r| {
            std::fs::read_to_string(&r.log)
                .ok()
                .map(|text| (r.index, text))
        })
        .flat_map(|(index, text)| {
            text.lines()
                .filter_map(RotatedEvent::parse)
                .map(|e| Rotation {
                    at_ms: e.written_at_ms,
                    rotator: index,
                    reason: e.reason,
                    token_id: e.token_id,
                    fingerprint: e.token,
                    latency_ms: e.latency_ms,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort_by_key(|r| r.at_ms);
    out
}

fn figures(
    rotators: &[RotatorProc],
    rotations: &[Rotation],
    lines: &[ReaderLine],
    kills: &[Span],
    emulator: Option<&RunningEmulator>,
    duration_s: f64,
) -> Figures {
    let latencies: Vec<u64> = rotations.iter().map(|r| r.latency_ms).collect();
    // Propagation: from a rotation's write to the first read of that token by any reader.
    let mut first_seen: HashMap<&str, i64> = HashMap::new();
    for l in lines.iter().filter(|l| l.bench.is_none()) {
        if let Some(fp) = &l.fp {
            first_seen
                .entry(fp.as_str())
                .and_modify(|t| *t = (*t).min(l.t))
                .or_insert(l.t);
        }
    }
    let propagation: Vec<i64> = rotations
        .iter()
        .filter_map(|r| {
            first_seen
                .get(r.fingerprint.as_str())
                .map(|seen| (seen - r.at_ms).max(0))
        })
        .collect();
    let benches: Vec<ReaderBench> = lines.iter().filter_map(|l| l.bench).collect();
    let (stat, cached) = if benches.is_empty() {
        (None, None)
    } else {
        let n = benches.len() as f64;
        (
            Some(benches.iter().map(|b| b.stat_ns).sum::<f64>() / n),
            Some(benches.iter().map(|b| b.cached_ns).sum::<f64>() / n),
        )
    };
    let reads: Vec<&ReaderLine> = lines.iter().filter(|l| l.bench.is_none()).collect();
    let counters = emulator.map(|e| e.emulator.counters());
    Figures {
        duration_s,
        rotations: rotations.len(),
        rotations_per_hour: rotations.len() as f64 * 3600.0 / duration_s.max(1.0),
        rotation_latency_ms_p50: percentile(&latencies, 50.0),
        rotation_latency_ms_p99: percentile(&latencies, 99.0),
        propagation_ms_p50: percentile(&propagation, 50.0),
        propagation_ms_p99: percentile(&propagation, 99.0),
        reader_poll_ms: READER_POLL_MS,
        reads: reads.len(),
        reads_ok: reads.iter().filter(|l| l.status == 200).count(),
        reads_403: reads.iter().filter(|l| l.status == 403).count(),
        reads_unavailable: reads.iter().filter(|l| l.status == 0).count(),
        reads_ok_by_kind: reads
            .iter()
            .filter(|l| l.status == 200)
            .filter_map(|l| l.mode)
            .fold(std::collections::BTreeMap::new(), |mut m, mode| {
                let kind = serde_json::to_value(mode)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                *m.entry(kind).or_insert(0) += 1;
                m
            }),
        reader_stat_ns: stat,
        reader_cached_read_ns: cached,
        cached_read_vs_stat: stat.zip(cached).map(|(s, c)| c / s.max(1.0)),
        rotator_max_rss_kib: rotators.iter().map(|r| r.max_rss_kib).max().unwrap_or(0),
        rotator_cpu_seconds: rotators.iter().map(|r| r.cpu_seconds).sum(),
        kills: kills.len(),
        dead_token_requests: counters
            .as_ref()
            .map(|c| c.dead_token_requests)
            .unwrap_or(0),
        provider_requests: counters.as_ref().map(|c| c.requests).unwrap_or(0),
        oauth: counters.map(|c| c.oauth).unwrap_or_default(),
        kube_requests: Default::default(),
        kube_steady_requests: Default::default(),
        kube_steady_minutes: 0.0,
        kube_requests_per_replica_minute: None,
    }
}

/// What the replicas (and the soak itself) cost the API server: every process's own count
/// over the whole run, and in the steady-state window (from one lifetime in until the stop:
/// no start-up, no shutdown) the average per replica per minute outside the lease holder.
fn kube_cost(
    figures: &mut Figures,
    rotators: &[RotatorProc],
    cluster: &super::cluster::ClusterRig,
) {
    let mut total = cluster.own_requests();
    for r in rotators {
        super::cluster::add_requests(&mut total, &r.kube_requests);
    }
    figures.kube_requests = total;
    let Some((window, minutes)) = &cluster.steady else {
        return;
    };
    let outside: u64 = window
        .iter()
        .filter(|(k, _)| k.starts_with("replica "))
        .map(|(_, n)| n)
        .sum();
    let replica_minutes = rotators.len().saturating_sub(1).max(1) as f64 * minutes;
    figures.kube_requests_per_replica_minute =
        (replica_minutes > 0.0).then(|| outside as f64 / replica_minutes);
    figures.kube_steady_requests = window.clone();
    figures.kube_steady_minutes = *minutes;
}

#[cfg(test)]
#[path = "verdict_tests.rs"]
mod tests;
