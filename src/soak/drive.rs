//! Driving the soak: idle and busy phases (session leases on every rotator), provider
//! faults, `kill -9` of rotators, and a sample of the token on disk every 250 ms.

use super::report::{Span, Violation};
use super::setup::{setup, Rig};
use super::{near_expiry_margin, now_ms, SoakError, SoakOptions, HTTP_TIMEOUT, SOAK_COMMENT};
use crate::emulator::Faults;
use crate::reader::Reader;
use std::io::IsTerminal;

mod foreign;
mod oauth;
mod stop;
#[cfg(test)]
pub(crate) use foreign::ForeignLock;
pub(crate) use foreign::Revoked;
use std::time::{Duration, Instant};

/// What the driving recorded, for the verdict and the timeline.
pub(super) struct Observed {
    pub violations: Vec<Violation>,
    pub phases: Vec<Span>,
    pub faults: Vec<Span>,
    pub kills: Vec<Span>,
    /// Who held the cluster store's Lease when.
    pub leases: Vec<Span>,
    /// Tokens revoked out of band (`foreign.rs`).
    pub revocations: Vec<Revoked>,
}

pub(super) async fn drive(opts: &SoakOptions, rig: &mut Rig) -> Result<Observed, SoakError> {
    let mut d = Driver::new(opts, rig)?;
    let mut progress = Progress::new(opts.duration);
    while d.rig.start.elapsed() < opts.duration {
        let elapsed = d.rig.start.elapsed();
        d.flood(elapsed);
        d.stop_holder(elapsed);
        d.foreign(elapsed);
        d.phase(elapsed).await;
        d.heartbeat().await;
        d.fault(elapsed);
        d.kill(elapsed).await?;
        d.watch_login().await?;
        d.cluster(elapsed).await;
        d.check_near_expiry();
        progress.update(elapsed, d.progress_line());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    progress.finish();
    Ok(d.finish())
}

/// A provider fault from the plan: when (a fraction of the run), for how long (seconds),
/// its label, and what the emulator does meanwhile.
type PlannedFault = (f64, u64, &'static str, Faults);

/// The soak's driver: what it has planned and what it has seen so far. Each step below is
/// one kind of trouble (or one check), called every 250 ms; each decides for itself whether
/// its moment has come.
struct Driver<'a> {
    opts: SoakOptions,
    rig: &'a mut Rig,
    http: reqwest::Client,
    file_readers: Vec<Reader>,
    seen: Observed,
    /// Idle first, then busy, alternating; sessions on every rotator while busy.
    busy: bool,
    phase_start: i64,
    next_phase: Duration,
    sessions: Vec<Option<String>>,
    last_heartbeat: Instant,
    plan: Vec<PlannedFault>,
    fault_index: usize,
    /// The fault in force: when it ends, its index in the plan, when it began.
    fault_ends: Option<(Instant, usize, i64)>,
    /// No kill and no flood in the tail, so restarted rotators get to reap their orphans.
    quiet_tail: Duration,
    next_kill: Option<Duration>,
    kill_round: usize,
    /// The cluster store's API-server cut, once: when and for how long.
    api_cut: Option<(Duration, Duration)>,
    last_lease_check: Instant,
    near_expiry_reported: Option<String>,
    margin_ms: i64,
    flood_at: Duration,
    flood_length: Duration,
    /// The flood in force: when it ends, when it began.
    flood: Option<(Instant, i64)>,
    flooded: bool,
    /// The SIGSTOP of the rotation lock's holder (`stop.rs`): begun, and its watch.
    stop_started: bool,
    stop_task: Option<tokio::task::JoinHandle<Option<stop::Stopped>>>,
    /// When a rotator was killed while its refresh was on the wire (`oauth.rs`).
    killed_mid_refresh: Option<Instant>,
    logins_lost_documented: usize,
    /// The foreign lock holders and the revocation done so far (`foreign.rs`, as bits).
    foreign_done: u8,
    foreign_lock: Option<foreign::Held>,
    /// The token on disk when the write-lock holder began to wait for the next one.
    foreign_armed: Option<Option<String>>,
}

impl<'a> Driver<'a> {
    fn new(opts: &SoakOptions, rig: &'a mut Rig) -> Result<Driver<'a>, SoakError> {
        let opts = opts.clone();
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
        // The replicas are cut off the API server once, for a whole token lifetime: the
        // forced window arrives during the outage. It ends early enough for the replicas to
        // converge and revoke their own tokens. A U2M fleet cannot refresh while the Secret
        // is out of reach (a refresh needs the Secret's claim; a pod-local one could spend the
        // shared refresh token), so it rides out only an outage its access token outlives:
        // a quarter of a lifetime.
        let cut_length = match opts.credential {
            super::oauth::SoakCredential::U2m => Duration::from_secs(opts.lifetime) / 4,
            _ => Duration::from_secs(opts.lifetime),
        };
        let cut_at = opts
            .duration
            .mul_f64(0.6)
            .min(
                opts.duration
                    .saturating_sub(cut_length + Duration::from_secs(opts.grace + 10)),
            )
            .max(opts.duration.mul_f64(0.3));
        let reap_age = opts.grace + 2 * HTTP_TIMEOUT + 1;
        Ok(Driver {
            http,
            file_readers,
            seen: Observed {
                violations: Vec::new(),
                phases: Vec::new(),
                faults: Vec::new(),
                kills: Vec::new(),
                leases: Vec::new(),
                revocations: Vec::new(),
            },
            busy: false,
            phase_start: rig.t0,
            next_phase: Duration::from_secs(opts.phase),
            sessions: vec![None; rig.rotators.len()],
            last_heartbeat: Instant::now(),
            plan: if opts.faults && rig.emulator.is_some() {
                fault_plan()
            } else {
                Vec::new()
            },
            fault_index: 0,
            fault_ends: None,
            quiet_tail: Duration::from_secs(reap_age + 3),
            next_kill: (opts.kill_every > 0).then(|| Duration::from_secs(opts.kill_every)),
            kill_round: 0,
            api_cut: rig
                .cluster
                .as_ref()
                .filter(|_| opts.faults)
                .map(|_| (cut_at, cut_length)),
            last_lease_check: Instant::now() - Duration::from_secs(1),
            near_expiry_reported: None,
            margin_ms: near_expiry_margin(&opts).as_millis() as i64,
            // A connection flood on every listener of every rotator, for a whole lifetime
            // (so a forced window falls inside it), before the quiet tail.
            flood_at: opts.duration.mul_f64(0.45),
            flood_length: Duration::from_secs(opts.lifetime),
            flood: None,
            flooded: false,
            stop_started: false,
            stop_task: None,
            killed_mid_refresh: None,
            logins_lost_documented: 0,
            foreign_done: 0,
            foreign_lock: None,
            foreign_armed: None,
            opts,
            rig,
        })
    }

    fn flood(&mut self, elapsed: Duration) {
        if !self.flooded
            && elapsed >= self.flood_at
            && elapsed + self.flood_length + self.quiet_tail < self.opts.duration
        {
            self.flooded = true;
            let until = Instant::now() + self.flood_length;
            for port in self.rig.rotators.iter().flat_map(|r| r.ports()) {
                tokio::spawn(hold_silent_connections(port, FLOOD_CONNECTIONS, until));
            }
            self.flood = Some((until, now_ms()));
        }
        if let Some((_, started)) = self.flood.filter(|(until, _)| Instant::now() >= *until) {
            self.seen.faults.push(Span {
                start_ms: started,
                end_ms: now_ms(),
                label: format!("flood: {FLOOD_CONNECTIONS} silent connections on every listener"),
            });
            self.flood = None;
        }
    }

    async fn phase(&mut self, elapsed: Duration) {
        if elapsed < self.next_phase {
            return;
        }
        self.end_phase();
        self.busy = !self.busy;
        self.next_phase += Duration::from_secs(self.opts.phase);
        for (i, base) in self.rig.control_urls.iter().enumerate() {
            if self.busy {
                self.sessions[i] = open_session(&self.http, base).await;
            } else if let Some(id) = self.sessions[i].take() {
                let _ = self
                    .http
                    .delete(format!("{base}/v1/sessions/{id}"))
                    .send()
                    .await;
            }
        }
    }

    fn end_phase(&mut self) {
        self.seen.phases.push(Span {
            start_ms: self.phase_start,
            end_ms: now_ms(),
            label: if self.busy { "busy" } else { "idle" }.into(),
        });
        self.phase_start = now_ms();
    }

    /// While busy, every session is kept alive; a rotator that was restarted lost its
    /// leases and gets a new one.
    async fn heartbeat(&mut self) {
        if !self.busy || self.last_heartbeat.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.last_heartbeat = Instant::now();
        for (i, base) in self.rig.control_urls.iter().enumerate() {
            let alive = match &self.sessions[i] {
                Some(id) => self
                    .http
                    .post(format!("{base}/v1/sessions/{id}/heartbeat"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()),
                None => false,
            };
            if !alive {
                self.sessions[i] = open_session(&self.http, base).await;
            }
        }
    }

    fn fault(&mut self, elapsed: Duration) {
        let Some(emu) = &self.rig.emulator else {
            return;
        };
        if let Some((until, i, started)) = self.fault_ends {
            if Instant::now() >= until {
                emu.emulator.set_faults(Faults::default());
                self.fault_ends = None;
                self.seen.faults.push(Span {
                    start_ms: started,
                    end_ms: now_ms(),
                    label: self.plan[i].2.into(),
                });
            }
        }
        let due = |(at, ..): &PlannedFault| {
            elapsed.as_secs_f64() >= at * self.opts.duration.as_secs_f64()
        };
        // Not while a foreign process holds the rotation lock: a waiter spends 2 s of the
        // forced window's 3 s before the readers' margin to see the stall (the soak's
        // settings; 10 s of 30 at the defaults), so a slow or failing provider on top would
        // kill the token by arithmetic, not find a fault. The plan waits for it.
        let rotation_locked = self
            .foreign_lock
            .as_ref()
            .is_some_and(|h| h.on_rotation_lock());
        if self.fault_ends.is_none()
            && !rotation_locked
            && self.plan.get(self.fault_index).is_some_and(due)
        {
            let (_, length, _, faults) = &self.plan[self.fault_index];
            emu.emulator.set_faults(faults.clone());
            self.fault_ends = Some((
                Instant::now() + Duration::from_secs(*length),
                self.fault_index,
                now_ms(),
            ));
            self.fault_index += 1;
        }
    }

    /// `kill -9` of a rotator (of the cluster store's Lease holder, the one that matters),
    /// then a restart, never in the quiet tail.
    async fn kill(&mut self, elapsed: Duration) -> Result<(), SoakError> {
        let Some(at) = self.next_kill else {
            return Ok(());
        };
        let rotators = &mut self.rig.rotators;
        if elapsed < at || elapsed + self.quiet_tail >= self.opts.duration || rotators.is_empty() {
            return Ok(());
        }
        let holder = match &self.rig.cluster {
            Some(c) => c.holder().await.as_deref().and_then(rotator_index),
            None => None,
        };
        // U2M: every other kill is timed into a refresh.
        let lifetime = Duration::from_secs(self.opts.lifetime);
        let claimant = match self.kill_round % 2 {
            0 => self.refresh_claimant(lifetime).await,
            _ => None,
        };
        let rotators = &mut self.rig.rotators;
        let i = holder
            .or(claimant)
            .unwrap_or(self.kill_round % rotators.len());
        self.kill_round += 1;
        self.note_claimant_kill(i);
        let rotators = &mut self.rig.rotators;
        rotators[i].kill9().await;
        self.seen.kills.push(Span {
            start_ms: now_ms(),
            end_ms: now_ms(),
            label: format!(
                "kill -9 rotator {i}{}",
                if holder.is_some() {
                    " (lease holder)"
                } else if claimant.is_some() {
                    " (mid-refresh)"
                } else {
                    ""
                }
            ),
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A killed lease holder comes back as a new pod (a new name): its old name keeps the
        // Lease until it expires, and another replica takes over.
        if holder.is_some() {
            rotators[i].rename(&format!("soak-{i}-r{}", self.kill_round));
        }
        rotators[i].spawn_listening(&self.rig.exe, false).await?;
        self.sessions[i] = None;
        self.next_kill = Some(at + Duration::from_secs(self.opts.kill_every));
        Ok(())
    }

    /// The cluster store: the API-server cut, once, and who holds the Lease, every second.
    async fn cluster(&mut self, elapsed: Duration) {
        if elapsed >= Duration::from_secs(self.opts.lifetime) {
            if let Some(c) = self.rig.cluster.as_mut() {
                c.mark_settled(&self.rig.rotators).await;
            }
        }
        let Some(c) = &self.rig.cluster else {
            return;
        };
        if let Some((_, length)) = self.api_cut.filter(|(at, _)| elapsed >= *at) {
            c.cut(length);
            self.seen.faults.push(Span {
                start_ms: now_ms(),
                end_ms: now_ms() + length.as_millis() as i64,
                label: format!("API server cut off for {} s", length.as_secs()),
            });
            self.api_cut = None;
        }
        if self.last_lease_check.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_lease_check = Instant::now();
        let holder = c.holder().await.unwrap_or_else(|| "none".into());
        let now = now_ms();
        match self.seen.leases.last_mut() {
            Some(last) if last.label == holder => last.end_ms = now,
            _ => self.seen.leases.push(Span {
                start_ms: now,
                end_ms: now,
                label: holder,
            }),
        }
    }

    /// The token on disk must never come near its expiry.
    fn check_near_expiry(&mut self) {
        let Some(emu) = &self.rig.emulator else {
            return;
        };
        for token in self
            .file_readers
            .iter()
            .filter_map(|r| r.token().ok().flatten())
        {
            let Some(rec) = emu.emulator.lookup(&token) else {
                continue;
            };
            let left = rec.expires_at.map(|e| e.timestamp_millis() - now_ms());
            if left.is_some_and(|l| l < self.margin_ms)
                && self.near_expiry_reported.as_deref() != Some(rec.token_id.as_str())
            {
                self.near_expiry_reported = Some(rec.token_id.clone());
                self.seen.violations.push(Violation {
                    at_ms: now_ms(),
                    kind: "near_expiry".into(),
                    detail: format!(
                        "token {} on disk with {} ms left (margin {} ms) and no replacement",
                        rec.token_id,
                        left.unwrap_or(0),
                        self.margin_ms
                    ),
                });
            }
        }
    }

    /// The live line: phase, rotations so far, reads, and every kind of violation counted.
    fn progress_line(&self) -> String {
        let (reads, bad) = {
            let l = self.rig.lines.lock().unwrap_or_else(|p| p.into_inner());
            (
                l.iter().filter(|r| r.bench.is_none()).count(),
                l.iter().filter(|r| r.status == 403).count(),
            )
        };
        let emulator = self.rig.emulator.as_ref().map(|e| &e.emulator);
        let dead = emulator.map_or(0, |e| e.counters().dead_token_requests);
        // PATs minted, or OAuth access tokens granted (refreshes, client credentials).
        let rotations = emulator.map_or(0, |e| {
            let oauth = e.counters().oauth;
            let pats = e
                .tokens()
                .iter()
                .filter(|t| t.comment.starts_with(SOAK_COMMENT))
                .count();
            pats + (oauth.refreshes + oauth.client_credentials_grants) as usize
        });
        format!(
            "{} | rotations {rotations} | reads {reads} | violations {}",
            if self.busy { "busy" } else { "idle" },
            self.seen.violations.len() + bad + dead as usize
        )
    }

    /// The last phase closed and a fault still in force lifted.
    fn finish(mut self) -> Observed {
        self.end_phase();
        self.release_foreign_lock(true);
        if let (Some(emu), Some((_, i, started))) = (&self.rig.emulator, self.fault_ends) {
            emu.emulator.set_faults(Faults::default());
            self.seen.faults.push(Span {
                start_ms: started,
                end_ms: now_ms(),
                label: self.plan[i].2.into(),
            });
        }
        self.seen
    }
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
fn fault_plan() -> Vec<PlannedFault> {
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

/// The rotator a Lease holder's name stands for: `soak-<i>`, or `soak-<i>-r<k>` once the
/// rotator was killed as the holder and came back under a new name.
fn rotator_index(holder: &str) -> Option<usize> {
    holder
        .strip_prefix("soak-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::rotator_index;

    /// A restarted holder's new name still names its rotator: the soak kept killing the
    /// holder only until one came back under a new name, then killed bystanders.
    #[test]
    fn a_renamed_holder_still_names_its_rotator() {
        assert_eq!(rotator_index("soak-3"), Some(3));
        assert_eq!(rotator_index("soak-3-r5"), Some(3));
        assert_eq!(rotator_index("soak-12-r40"), Some(12));
        assert_eq!(rotator_index("pod-3"), None);
        assert_eq!(rotator_index("soak-"), None);
    }
}
