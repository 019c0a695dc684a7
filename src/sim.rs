//! A deterministic simulation of the whole system, in the manner of FoundationDB's simulator:
//! several rotators (the real loop, policy and file store) and their serving views share one
//! config file on a tmpfs (an in-memory file system with the kernel's own lock semantics)
//! and one in-memory provider, in paused tokio time, while a seeded schedule injects faults:
//! a rotator stopped (SIGSTOP: its task is not polled, heartbeat included) and resumed,
//! killed and restarted (with a clock step), foreign lock holders, lost answers, slow,
//! refused and short grants, out-of-band revocations, truncation and deletion, an outage, a
//! quota. After every step it checks the invariant (ARCHITECTURE.md, "Convergence"):
//! - (I) the file holds a live token within [`T_FILE`] whenever a live credential is within
//!   a running rotator's reach and nothing outside the rotators prevents it (a provider
//!   fault, a foreign lock on the file, every rotator stopped);
//! - a token known dead (or not live at the provider) is never served, beyond the detection
//!   bound of an out-of-band revocation;
//! - at most one mint per period, plus what the injected faults may cost.
//!
//! The schedule and the virtual clock come from the seed; the file threads' interleaving is
//! the kernel's, so a replay reproduces the schedule and almost always the run. A failure
//! prints the seed and the command that replays it.

use crate::config::Config;
use crate::rotator::Rotator;
use crate::shared::Shared;
use crate::test_support::FakeProvider;
use crate::Token;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The settings every rotator runs with: lifetime 20 s, interval 8 s (threshold 8 s).
const VARS: [(&str, &str); 6] = [
    ("PAT_TOKEN_LIFETIME", "20"),
    ("PAT_ROTATION_INTERVAL", "8"),
    ("PAT_REVOKE_GRACE", "2"),
    ("PAT_HTTP_TIMEOUT", "1"),
    ("PAT_WRITE_LOCK_WAIT", "2"),
    ("PAT_INSTANCE", "sim"),
];
const PERIOD: Duration = Duration::from_secs(12);
const TICK: Duration = Duration::from_millis(250);
/// How long the file may lack a live token while one is in reach: the threshold (an
/// out-of-band revocation is found within one check), a stall to notice, a mint, retries.
const T_FILE: Duration = Duration::from_secs(14);
/// How long after a revocation behind its back a rotator may still serve the token: one
/// check period (the threshold) plus one turn that can hold the next check up (a rotation
/// lock to see stall, a mint with its retries, a write that waits for the lock).
const DETECTION: Duration = Duration::from_secs(16);

/// A task that can be stopped like a process: while stopped its future is not polled.
#[derive(Default)]
struct Gate {
    stopped: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl Gate {
    fn set(&self, stopped: bool) {
        self.stopped.store(stopped, Ordering::SeqCst);
        if !stopped {
            for w in self.wakers.lock().unwrap().drain(..) {
                w.wake();
            }
        }
    }

    async fn run<F: Future>(self: Arc<Self>, fut: F) -> F::Output {
        let mut fut = pin!(fut);
        std::future::poll_fn(|cx| {
            if self.stopped.load(Ordering::SeqCst) {
                self.wakers.lock().unwrap().push(cx.waker().clone());
                return Poll::Pending;
            }
            fut.as_mut().poll(cx)
        })
        .await
    }
}

/// One rotator process.
struct Node {
    shared: Shared,
    gate: Arc<Gate>,
    task: tokio::task::JoinHandle<()>,
    stopped_until: Option<Instant>,
    /// Since when it runs (started, or resumed): it has had that long to notice a change.
    running_since: Instant,
    /// Since when it serves no live token (while the file holds one).
    unserved_since: Option<Instant>,
}

/// Starts a rotator on `cfg` whose wall clock is `clock` (the host's: a step moves every
/// process's).
fn start(
    cfg: &Path,
    bootstrap: bool,
    provider: &Arc<FakeProvider>,
    clock: &crate::shared::Clock,
    index: usize,
) -> Node {
    let mut vars: Vec<(String, String)> = VARS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    vars.push(("DATABRICKS_HOST".into(), "https://sim.example".into()));
    vars.push(("DATABRICKS_CONFIG_FILE".into(), cfg.display().to_string()));
    if bootstrap {
        vars.push(("DATABRICKS_TOKEN".into(), "boot".into()));
    }
    let config = Config::from_vars(vars).expect("the simulation's settings are valid");
    let mut shared = Shared::new(config).expect("the simulation's store opens");
    shared.clock = clock.clone();
    let gate = Arc::new(Gate::default());
    let rotator = Rotator::new(shared.clone(), provider.clone());
    let task = tokio::spawn(tracing::Instrument::instrument(
        gate.clone().run(async move {
            tokio::select! {
                _ = rotator.run(CancellationToken::new()) => {}
                _ = crate::freeze::watch() => {}
            }
        }),
        tracing::info_span!("node", index),
    ));
    Node {
        shared,
        gate,
        task,
        stopped_until: None,
        running_since: Instant::now(),
        unserved_since: None,
    }
}

/// A lock held by a process that is not a rotator, until a virtual instant.
struct Foreign {
    _file: std::fs::File,
    until: Instant,
    blocks_writes: bool,
}

fn foreign_lock(path: &Path, on_config_lock: bool, until: Instant) -> Option<Foreign> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .ok()?;
    let ok = if on_config_lock {
        // A reader that honours the lock and hangs: shared, so writes wait.
        // SAFETY: flock on a descriptor we own.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) == 0 }
    } else {
        // A whole-file lock on the rotation lock (as `lockf` takes), never released early.
        // SAFETY: an all-zero flock struct is valid; F_OFD_SETLK reads it only.
        let mut range: libc::flock = unsafe { std::mem::zeroed() };
        range.l_type = libc::F_WRLCK as libc::c_short;
        range.l_whence = libc::SEEK_SET as libc::c_short;
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &range) == 0 }
    };
    ok.then_some(Foreign {
        _file: file,
        until,
        blocks_writes: on_config_lock,
    })
}

/// What the schedule did, for the mint budget and the report.
#[derive(Default, Debug)]
struct Tally {
    faults: u64,
    short_grant_time: Duration,
    revoked: Vec<(Token, Instant)>,
}

/// Runs one seed; `Err` says which check failed, when, and what the schedule had done.
async fn run_seed(seed: u64, horizon: Duration) -> Result<Tally, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::tempdir_in(base).map_err(|e| e.to_string())?;
    let cfg = dir.path().join("databrickscfg");
    let provider = Arc::new(FakeProvider::new(crate::test_support::paused_clock()));
    let bootstrap = rng.random_bool(0.5);
    if !bootstrap {
        // Seeded by hand; the bootstrap is then out of reach for good.
        std::fs::write(&cfg, "[DEFAULT]\ntoken = boot\n").map_err(|e| e.to_string())?;
    }
    let (clock, step) = crate::test_support::steppable_clock();
    let mut nodes: Vec<Node> = (0..rng.random_range(1..=3))
        .collect::<Vec<_>>()
        .into_iter()
        .enumerate()
        .map(|(i, _)| start(&cfg, bootstrap, &provider, &clock, i))
        .collect();
    let reader = nodes[0].shared.store.clone();
    let mut tally = Tally::default();
    let (mut foreign, mut fault_until): (Option<Foreign>, Option<Instant>) = (None, None);
    let mut file_bad_since: Option<Instant> = None;
    let started = Instant::now();
    let mut log: Vec<String> = Vec::new();
    let trace = std::env::var_os("PAT_SIM_TRACE").is_some();
    let mut traced = 0;
    while started.elapsed() < horizon {
        if trace {
            for line in &log[traced..] {
                eprintln!("sim: {line}");
            }
            traced = log.len();
        }
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        let at = started.elapsed().as_secs_f64();
        // Faults end.
        if fault_until.is_some_and(|u| now >= u) {
            fault_until = None;
            provider.outage.store(false, Ordering::SeqCst);
            provider.lose_answers.store(false, Ordering::SeqCst);
            provider.quota.store(0, Ordering::SeqCst);
            provider.max_lifetime_s.store(0, Ordering::SeqCst);
            provider.latency_ms.store(0, Ordering::SeqCst);
            log.push(format!("{at:.2}: provider faults end"));
        }
        if foreign.as_ref().is_some_and(|f| now >= f.until) {
            foreign = None;
            log.push(format!("{at:.2}: foreign lock released"));
        }
        for (i, n) in nodes.iter_mut().enumerate() {
            if n.stopped_until.is_some_and(|u| now >= u) {
                n.stopped_until = None;
                n.running_since = now;
                n.gate.set(false);
                log.push(format!("{at:.2}: node {i} resumed"));
            }
        }
        // Faults begin (about one every 4 s).
        if rng.random_bool(0.06) {
            tally.faults += 1;
            let i = rng.random_range(0..nodes.len());
            let span = Duration::from_millis(rng.random_range(1_000..20_000));
            match rng.random_range(0..11) {
                0 if nodes[i].stopped_until.is_none() => {
                    nodes[i].gate.set(true);
                    nodes[i].stopped_until = Some(now + span);
                    log.push(format!("{at:.2}: node {i} stopped for {span:?}"));
                }
                1 => {
                    nodes[i].task.abort();
                    let stepped = if rng.random_bool(0.5) {
                        // Back (N3): a step forward past a lone rotator's whole token makes it
                        // look dead by the record, and it is then never sent (see the note).
                        let by = rng.random_range(-30_000..0);
                        step.fetch_add(by, Ordering::SeqCst);
                        format!(", after the host's clock stepped {by} ms")
                    } else {
                        String::new()
                    };
                    nodes[i] = start(&cfg, bootstrap, &provider, &clock, i);
                    log.push(format!("{at:.2}: node {i} killed and restarted{stepped}"));
                }
                2 if foreign.is_none() => {
                    // On `<config>.lock` rarely and briefly: a write waits for it on a file
                    // thread in real time (virtual time stands still meanwhile), so each
                    // such hold costs seconds of the run.
                    let on_config = seed % 20 == 0 && rng.random_bool(0.5);
                    let span = if on_config {
                        span.min(Duration::from_secs(5))
                    } else {
                        span
                    };
                    let mut path = cfg.clone().into_os_string();
                    path.push(if on_config { ".lock" } else { ".rotate.lock" });
                    foreign = foreign_lock(Path::new(&path), on_config, now + span);
                    log.push(format!(
                        "{at:.2}: foreign lock on {} for {span:?}",
                        Path::new(&path).display()
                    ));
                }
                3 => {
                    if let Ok(snap) = reader.read() {
                        if let Some(t) = snap.token.filter(|t| t.expose() != "boot") {
                            provider.revoke_out_of_band(&t);
                            tally.revoked.push((t, now));
                            log.push(format!("{at:.2}: the file's token revoked out of band"));
                        }
                    }
                }
                4 => {
                    let _ = std::fs::write(&cfg, "");
                    log.push(format!("{at:.2}: config truncated"));
                }
                5 => {
                    let _ = std::fs::remove_file(&cfg);
                    log.push(format!("{at:.2}: config deleted"));
                }
                6 if fault_until.is_none() => {
                    provider
                        .max_lifetime_s
                        .store(rng.random_range(3..12), Ordering::SeqCst);
                    tally.short_grant_time += span;
                    fault_until = Some(now + span);
                    log.push(format!("{at:.2}: short grants for {span:?}"));
                }
                7 if fault_until.is_none() => {
                    provider.lose_answers.store(true, Ordering::SeqCst);
                    fault_until = Some(now + span.min(Duration::from_secs(4)));
                    log.push(format!("{at:.2}: answers lost"));
                }
                8 if fault_until.is_none() => {
                    provider.outage.store(true, Ordering::SeqCst);
                    fault_until = Some(now + span.min(Duration::from_secs(4)));
                    log.push(format!("{at:.2}: provider outage"));
                }
                9 if fault_until.is_none() => {
                    provider
                        .quota
                        .store(provider.live_count() as u64, Ordering::SeqCst);
                    fault_until = Some(now + span.min(Duration::from_secs(4)));
                    log.push(format!("{at:.2}: quota reached"));
                }
                10 if fault_until.is_none() => {
                    provider
                        .latency_ms
                        .store(rng.random_range(100..900), Ordering::SeqCst);
                    fault_until = Some(now + span);
                    log.push(format!("{at:.2}: slow provider"));
                }
                _ => tally.faults -= 1,
            }
        }
        // Let the rotators act on this instant before judging it.
        tokio::task::yield_now().await;
        let fail = |what: String, log: &[String]| {
            Err(format!(
                "seed {seed}: {what} at {at:.2} s\nschedule:\n  {}",
                log.join("\n  ")
            ))
        };
        // Served tokens: never dead beyond the detection bound.
        let file_token = reader.read().ok().and_then(|s| s.token);
        let file_live = file_token.as_ref().is_some_and(|t| provider.is_live(t));
        for (i, n) in nodes.iter_mut().enumerate() {
            if n.stopped_until.is_some() {
                n.unserved_since = None;
                continue;
            }
            let served = match n.shared.view().await {
                Ok(view) => n
                    .shared
                    .servable_until(&view, n.shared.now())
                    .ok()
                    .and(view.snap.token.clone()),
                Err(_) => None,
            };
            if let Some(t) = &served {
                if n.shared.knowledge.is_dead(t) {
                    return fail(format!("node {i} served a token it knows is dead"), &log);
                }
                // A token revoked behind its back (out of band, by a sibling while it was
                // stopped) may be served until its next check finds it.
                let revoked = provider
                    .revoked_at
                    .lock()
                    .unwrap()
                    .get(t.expose())
                    .map(|at| (provider.clock)() - *at);
                let unnoticed = revoked.is_some_and(|ago| {
                    ago.to_std().unwrap_or_default() <= DETECTION
                        || n.running_since.elapsed() <= DETECTION
                });
                if !provider.is_live(t) && !unnoticed {
                    return fail(
                        format!(
                            "node {i} served a token that is not live ({})",
                            if revoked.is_some() {
                                "revoked"
                            } else {
                                "expired"
                            }
                        ),
                        &log,
                    );
                }
            }
            let serving_live = served.as_ref().is_some_and(|t| provider.is_live(t));
            if serving_live || !file_live {
                n.unserved_since = None;
            } else if n.unserved_since.get_or_insert(now).elapsed() > T_FILE {
                return fail(
                    format!("node {i} served no live token for {T_FILE:?} while the file held one"),
                    &log,
                );
            }
        }
        // (I): the file holds a live token within T_FILE while one is in reach.
        let running: Vec<&Node> = nodes.iter().filter(|n| n.stopped_until.is_none()).collect();
        let held_live = running.iter().any(|n| {
            n.shared
                .knowledge
                .held()
                .is_some_and(|h| provider.is_live(&h.token))
        });
        let in_reach = file_live || held_live || bootstrap;
        let excused = fault_until.is_some()
            || foreign.as_ref().is_some_and(|f| f.blocks_writes)
            || running.is_empty();
        if file_live || !in_reach || excused {
            file_bad_since = None;
        } else if file_bad_since.get_or_insert(now).elapsed() > T_FILE {
            return fail(
                format!(
                    "the file held no live token for {T_FILE:?} with a live credential in reach"
                ),
                &log,
            );
        }
        // Mints: one per period, plus what each fault may cost.
        let budget = 2
            + (started.elapsed().as_secs() / PERIOD.as_secs()) * 2
            + tally.faults * 3
            + tally.short_grant_time.as_secs();
        let mints = provider.mints.load(Ordering::SeqCst);
        if mints > budget {
            return fail(format!("{mints} mints against a budget of {budget}"), &log);
        }
    }
    for n in nodes {
        n.task.abort();
    }
    Ok(tally)
}

/// The seeds: `PAT_SIM_SEED` replays one, `PAT_SIM_SEEDS` sets how many run (each a fresh
/// runtime, several at once: the file threads' waits are real).
#[test]
fn the_invariant_holds_from_any_state_the_schedule_reaches() {
    let horizon = Duration::from_secs(
        std::env::var("PAT_SIM_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(90),
    );
    let seeds: Vec<u64> = match std::env::var("PAT_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(one) => vec![one],
        None => {
            let n = std::env::var("PAT_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1000u64);
            (1..=n).collect()
        }
    };
    if std::env::var_os("PAT_SIM_TRACE").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("pat_rotator=debug")
            .with_test_writer()
            .try_init();
    }
    let next = Arc::new(Mutex::new(seeds.clone().into_iter()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let faults = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Eight at once on two cores: most of a slow seed is a file thread's real wait.
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (next, failures, faults) = (next.clone(), failures.clone(), faults.clone());
            std::thread::spawn(move || loop {
                let Some(seed) = next.lock().unwrap().next() else {
                    return;
                };
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .start_paused(true)
                    .build()
                    .unwrap();
                match rt.block_on(run_seed(seed, horizon)) {
                    Ok(t) => {
                        faults.fetch_add(t.faults, Ordering::SeqCst);
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    eprintln!(
        "simulation: {} seeds of {horizon:?}, {} faults injected, {} failed",
        seeds.len(),
        faults.load(Ordering::SeqCst),
        failures.len()
    );
    if let Some(first) = failures.first() {
        let seed = first
            .split(':')
            .next()
            .unwrap_or("")
            .trim_start_matches("seed ");
        panic!(
            "{first}\n\nreplay: PAT_SIM_SEED={seed} cargo test --lib sim::the_invariant_holds -- --nocapture\n({} of {} seeds failed)",
            failures.len(),
            seeds.len()
        );
    }
}
