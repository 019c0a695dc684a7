//! `pat-rotator soak`: the compressed-cycle soak.
//!
//! Runs real rotator and reader processes (this binary) against the embedded emulator:
//! idle and busy phases, provider faults, `kill -9` of rotators, and a verdict. Invariant:
//! the verdict is derived only from what the emulator and the readers observed (requests
//! with dead tokens, 403s, tokens near expiry on disk, gaps without a rotation, leaked
//! tokens), never from the rotators' own claims.

pub mod reader_proc;
pub mod report;

use crate::emulator::{Emulator, Faults, Options, RunningEmulator};
use crate::reader::Reader;
use crate::store::Store;
use reader_proc::{ReaderBench, ReaderLine};
use report::{percentile, Figures, Report, Rotation, Span, TokenLife, Violation};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// Comment prefix of the soak's rotators (`<prefix>:soak-<n>`).
pub const SOAK_COMMENT: &str = "pat-rotator-soak";
const HTTP_TIMEOUT: u64 = 3;
const READER_POLL_MS: u64 = 100;

#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub duration: Duration,
    pub lifetime: u64,
    pub interval: u64,
    pub grace: u64,
    pub readers: usize,
    pub rotators: usize,
    pub faults: bool,
    /// Seconds between `kill -9`s of a rotator; 0 = never.
    pub kill_every: u64,
    /// Seconds per idle or busy phase.
    pub phase: u64,
    pub out: Option<PathBuf>,
    /// Soak a real workspace instead of the emulator (token from DATABRICKS_TOKEN).
    pub host: Option<String>,
    /// Deliberately broken readers: a time-only cache of this many seconds.
    pub reader_cache: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot write the report in {path}: {source}")]
    Report {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> SoakError + '_ {
    move |e| SoakError::Setup(format!("{what}: {e}"))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn free_port() -> Result<u16, SoakError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(setup("cannot find a free port"))
}

struct RotatorProc {
    index: usize,
    env: Vec<(String, String)>,
    control: u16,
    proxy: u16,
    log: PathBuf,
    child: Option<Child>,
    cpu_seconds: f64,
    max_rss_kib: u64,
}

impl RotatorProc {
    fn spawn(&mut self, exe: &Path) -> Result<(), SoakError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(setup("cannot open a rotator log"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        self.child = Some(cmd.spawn().map_err(setup("cannot start a rotator"))?);
        Ok(())
    }

    /// Adds this process's CPU time and resident memory to the totals (from /proc).
    fn sample(&mut self) {
        let Some(pid) = self.child.as_ref().and_then(Child::id) else {
            return;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the ")" that closes the command name: utime is the 12th, stime the 13th.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().collect())
                .unwrap_or_default();
            let ticks = |i: usize| {
                fields
                    .get(i)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            self.cpu_seconds += (ticks(11) + ticks(12)) / hz;
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let rss = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            self.max_rss_kib = self.max_rss_kib.max(rss);
        }
    }

    async fn kill9(&mut self) {
        self.sample();
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// SIGTERM and wait; `false` when it did not exit 0 within 15 s.
    async fn terminate(&mut self) -> bool {
        self.sample();
        let Some(mut c) = self.child.take() else {
            return true;
        };
        if let Some(pid) = c.id() {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        match tokio::time::timeout(Duration::from_secs(15), c.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => {
                let _ = c.start_kill();
                false
            }
        }
    }
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

/// Runs the soak and writes the report; `Ok(report)` whatever the verdict.
pub async fn run(opts: SoakOptions) -> Result<(Report, PathBuf), SoakError> {
    crate::provider::install_crypto_provider();
    let exe = std::env::current_exe().map_err(setup("cannot find this program"))?;
    let out = match &opts.out {
        Some(p) => p.clone(),
        None => PathBuf::from(format!(
            "soak-{}",
            chrono::Utc::now().format("%Y%m%d-%H%M%S")
        )),
    };
    std::fs::create_dir_all(&out).map_err(|e| SoakError::Report {
        path: out.clone(),
        source: e,
    })?;
    let out = std::fs::canonicalize(&out).map_err(|e| SoakError::Report {
        path: out.clone(),
        source: e,
    })?;
    let config = out.join("databrickscfg");
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(out.join("databrickscfg.pat-rotator.json"));

    let (emulator, host, bootstrap): (Option<RunningEmulator>, String, String) = match &opts.host {
        Some(h) => {
            let token = std::env::var("DATABRICKS_TOKEN")
                .map_err(|_| SoakError::Setup("--host needs a token in DATABRICKS_TOKEN".into()))?;
            (None, crate::config::normalize_host(h), token)
        }
        None => {
            // Azure Databricks rejects tokens in their last 30 s, half the default threshold: scaled alike.
            let (emu, boot) = Emulator::new(Options {
                reject_expiring_within: near_expiry_margin(&opts).as_secs().max(1),
                ..Options::default()
            });
            let running = emu
                .spawn("127.0.0.1:0".parse().map_err(setup("address"))?)
                .await
                .map_err(setup("cannot start the emulator"))?;
            let url = running.url();
            (Some(running), url, boot.expose().to_string())
        }
    };
    let started_at = chrono::Utc::now();
    let t0 = now_ms();
    let start = Instant::now();

    // One capability for every rotator, fixed in advance as a Kubernetes Secret would fix it:
    // rotators sharing a file each publish their own URL, readers are told all of them.
    let control_secret = crate::secret::ControlSecret::random();
    let mut rotators = Vec::new();
    for index in 0..opts.rotators {
        let (listen, control, proxy) = (free_port()?, free_port()?, free_port()?);
        let env = vec![
            ("DATABRICKS_HOST".to_string(), host.clone()),
            ("DATABRICKS_TOKEN".into(), bootstrap.clone()),
            (
                "DATABRICKS_CONFIG_FILE".into(),
                config.display().to_string(),
            ),
            ("PAT_TOKEN_LIFETIME".into(), opts.lifetime.to_string()),
            ("PAT_ROTATION_INTERVAL".into(), opts.interval.to_string()),
            ("PAT_REVOKE_GRACE".into(), opts.grace.to_string()),
            ("PAT_HTTP_TIMEOUT".into(), HTTP_TIMEOUT.to_string()),
            ("PAT_WRITE_LOCK_WAIT".into(), (HTTP_TIMEOUT + 1).to_string()),
            ("PAT_LISTEN".into(), format!("127.0.0.1:{listen}")),
            ("PAT_CONTROL_LISTEN".into(), format!("127.0.0.1:{control}")),
            ("PAT_PROXY_LISTEN".into(), format!("127.0.0.1:{proxy}")),
            (
                "PAT_CONTROL_SECRET".into(),
                control_secret.expose().to_string(),
            ),
            ("PAT_SESSION_TTL".into(), "30".into()),
            ("PAT_TOKEN_COMMENT".into(), SOAK_COMMENT.into()),
            ("PAT_INSTANCE".into(), format!("soak-{index}")),
            ("PAT_LOG_FORMAT".into(), "json".into()),
            ("RUST_LOG".into(), "info".into()),
        ];
        let mut r = RotatorProc {
            index,
            env,
            control,
            proxy,
            log: out.join(format!("rotator-{index}.log")),
            child: None,
            cpu_seconds: 0.0,
            max_rss_kib: 0,
        };
        let _ = std::fs::remove_file(&r.log);
        r.spawn(&exe)?;
        rotators.push(r);
    }
    let metadata_urls: Vec<String> = rotators
        .iter()
        .map(|r| {
            crate::server::metadata_url(
                std::net::SocketAddr::from(([127, 0, 0, 1], r.control)),
                &control_secret,
            )
        })
        .collect();
    let proxy_urls: Vec<String> = rotators
        .iter()
        .map(|r| {
            crate::proxy::proxy_url(
                std::net::SocketAddr::from(([127, 0, 0, 1], r.proxy)),
                &control_secret,
            )
        })
        .collect();
    let control_urls: Vec<String> = rotators
        .iter()
        .map(|r| format!("http://127.0.0.1:{}", r.control))
        .collect();

    // Readers: half read the file, half ask the metadata endpoint.
    let lines: Arc<Mutex<Vec<ReaderLine>>> = Arc::new(Mutex::new(Vec::new()));
    let mut readers: Vec<Child> = Vec::new();
    for index in 0..opts.readers {
        // Every kind of reader takes part: the file, the metadata endpoint, the proxy.
        let mode = ["file", "metadata", "proxy"][index % 3];
        let mut cmd = Command::new(&exe);
        cmd.args([
            "soak-reader",
            "--index",
            &index.to_string(),
            "--config",
            &config.display().to_string(),
            "--host",
            &host,
            "--mode",
            mode,
            "--every-ms",
            &READER_POLL_MS.to_string(),
        ]);
        for u in &metadata_urls {
            cmd.args(["--metadata-url", u]);
        }
        for u in &proxy_urls {
            cmd.args(["--proxy-url", u]);
        }
        if let Some(c) = opts.reader_cache {
            cmd.args(["--cache-for", &c.to_string()]);
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(setup("cannot start a reader"))?;
        if let Some(stdout) = child.stdout.take() {
            let sink = lines.clone();
            tokio::spawn(async move {
                let mut rd = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = rd.next_line().await {
                    if let Ok(parsed) = serde_json::from_str::<ReaderLine>(&line) {
                        sink.lock().unwrap_or_else(|p| p.into_inner()).push(parsed);
                    }
                }
            });
        }
        readers.push(child);
    }

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(setup("http client"))?;
    let file_reader = Reader::new(&config, "DEFAULT").map_err(setup("reader"))?;
    let mut violations: Vec<Violation> = Vec::new();
    let mut phases: Vec<Span> = Vec::new();
    let mut faults: Vec<Span> = Vec::new();
    let mut kills: Vec<Span> = Vec::new();
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

    while start.elapsed() < opts.duration {
        let elapsed = start.elapsed();
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
                let i = kill_round % rotators.len();
                kill_round += 1;
                rotators[i].kill9().await;
                kills.push(Span {
                    start_ms: now_ms(),
                    end_ms: now_ms(),
                    label: format!("kill -9 rotator {i}"),
                });
                tokio::time::sleep(Duration::from_millis(500)).await;
                rotators[i].spawn(&exe)?;
                sessions[i] = None;
                next_kill = Some(at + Duration::from_secs(opts.kill_every));
            }
        }
        // The token on disk must never come near its expiry.
        if let (Some(emu), Ok(Some(token))) = (&emulator, file_reader.token()) {
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

    // Stop everything: readers first (they must not outlive the tokens), then the rotators.
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
    for r in rotators.iter_mut() {
        if !r.terminate().await {
            violations.push(Violation {
                at_ms: now_ms(),
                kind: "unclean_stop".into(),
                detail: format!("rotator {} did not exit 0 within 15 s of SIGTERM", r.index),
            });
        }
    }

    let reader_lines = std::mem::take(&mut *lines.lock().unwrap_or_else(|p| p.into_inner()));
    let rotations = parse_rotations(&rotators);
    let snapshot = Store::open(&config, "DEFAULT").and_then(|s| s.read()).ok();
    let tokens: Vec<TokenLife> = emulator
        .as_ref()
        .map(|e| {
            e.emulator
                .tokens()
                .into_iter()
                .filter(|t| t.comment.starts_with(SOAK_COMMENT))
                .map(|t| TokenLife {
                    token_id: t.token_id,
                    comment: t.comment,
                    created_ms: t.created_at.timestamp_millis(),
                    expires_ms: t.expires_at.map(|x| x.timestamp_millis()),
                    revoked_ms: t.revoked_at.map(|x| x.timestamp_millis()),
                })
                .collect()
        })
        .unwrap_or_default();

    // Verdict inputs from the emulator.
    if let Some(emu) = &emulator {
        for ev in emu.emulator.events() {
            violations.push(Violation {
                at_ms: ev.at.timestamp_millis(),
                kind: format!("{}_token_request", ev.kind),
                detail: format!(
                    "{} with token {} by {}",
                    ev.path, ev.token_id, ev.user_agent
                ),
            });
        }
        // A gap longer than the lifetime without a successful rotation.
        let mut created: Vec<i64> = tokens.iter().map(|t| t.created_ms).collect();
        created.sort_unstable();
        let mut prev = t0;
        for c in created.iter().copied().chain([end_ms]) {
            if c - prev > opts.lifetime as i64 * 1000 {
                violations.push(Violation {
                    at_ms: c,
                    kind: "missed_rotation".into(),
                    detail: format!(
                        "{:.1} s without a successful rotation (lifetime {} s)",
                        (c - prev) as f64 / 1000.0,
                        opts.lifetime
                    ),
                });
            }
            prev = c;
        }
        // Leaks: live tokens of the soak's rotators beyond the current and pending ones.
        let now = chrono::Utc::now();
        let mut keep: Vec<String> = Vec::new();
        if let Some(s) = &snapshot {
            keep.extend(s.state.token_id.clone());
            keep.extend(
                s.state
                    .pending_revocations
                    .iter()
                    .map(|p| p.token_id.clone()),
            );
        }
        for t in emu.emulator.tokens().into_iter().filter(|t| {
            t.comment.starts_with(SOAK_COMMENT) && t.is_live(now) && !keep.contains(&t.token_id)
        }) {
            violations.push(Violation {
                at_ms: now_ms(),
                kind: "leaked_token".into(),
                detail: format!(
                    "token {} ({}) is live but neither current nor pending",
                    t.token_id, t.comment
                ),
            });
        }
    }
    for l in reader_lines.iter().filter(|l| l.status == 403) {
        violations.push(Violation {
            at_ms: l.t,
            kind: "reader_403".into(),
            detail: format!(
                "reader {} got 403 with {}",
                l.reader,
                l.fp.clone().unwrap_or_default()
            ),
        });
    }
    violations.sort_by_key(|v| v.at_ms);

    let figures = figures(
        &rotators,
        &rotations,
        &reader_lines,
        &kills,
        emulator.as_ref(),
        (end_ms - t0) as f64 / 1000.0,
    );
    let report = Report {
        started_at,
        settings: serde_json::json!({
            "duration_s": opts.duration.as_secs(), "lifetime_s": opts.lifetime, "interval_s": opts.interval, "grace_s": opts.grace,
            "readers": opts.readers, "rotators": opts.rotators, "faults": opts.faults, "kill_every_s": opts.kill_every,
            "phase_s": opts.phase, "reader_cache_s": opts.reader_cache, "provider": if opts.host.is_some() { "workspace" } else { "embedded emulator" },
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
        tokens,
    };
    let json = serde_json::to_vec_pretty(&report).map_err(|e| SoakError::Report {
        path: out.clone(),
        source: std::io::Error::other(e),
    })?;
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(out.join(name), bytes).map_err(|e| SoakError::Report {
            path: out.join(name),
            source: e,
        })
    };
    write("report.json", &json)?;
    write("timeline.svg", report.svg().as_bytes())?;
    write("summary.txt", report.summary().as_bytes())?;
    if let Some(emu) = emulator {
        emu.stop().await;
    }
    Ok((report, out))
}

/// How close to expiry the token on disk may come: half the threshold, at most 30 s (with the
/// default 60 s threshold, Azure Databricks' 30 s rejection window).
fn near_expiry_margin(opts: &SoakOptions) -> Duration {
    let threshold_ms = opts.interval.min(60) * 1000;
    Duration::from_millis((threshold_ms / 2).min(30_000))
}

async fn open_session(http: &reqwest::Client, base: &str) -> Option<String> {
    let resp = http.post(format!("{base}/v1/sessions")).send().await.ok()?;
    let body: serde_json::Value = resp.json().await.ok()?;
    body.get("id").and_then(|v| v.as_str()).map(str::to_string)
}

/// The `rotated` events from the rotators' JSON logs.
fn parse_rotations(rotators: &[RotatorProc]) -> Vec<Rotation> {
    let mut out = Vec::new();
    for r in rotators {
        let Ok(text) = std::fs::read_to_string(&r.log) else {
            continue;
        };
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v.get("event").and_then(|e| e.as_str()) != Some("rotated") {
                continue;
            }
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
            let n = |k: &str| {
                v.get(k).and_then(|x| {
                    x.as_u64()
                        .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
                })
            };
            out.push(Rotation {
                at_ms: n("written_at_ms").unwrap_or(0) as i64,
                rotator: r.index,
                reason: s("reason"),
                token_id: s("token_id"),
                fingerprint: s("token"),
                latency_ms: n("latency_ms").unwrap_or(0),
            });
        }
    }
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
        provider_requests: counters.map(|c| c.requests).unwrap_or(0),
    }
}
