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
use crate::soak::ForeignLock;
use crate::test_support::FakeProvider;
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
/// A foreign lock in force: the open file that holds it, until when, and whether it keeps
/// rotators from writing the file.
struct Foreign {
    _file: std::fs::File,
    until: Instant,
    blocks_writes: bool,
}

/// What the schedule did, for the mint budget and the report.
#[derive(Default, Debug)]
struct Tally {
    faults: u64,
    short_grant_time: Duration,
}

/// Everything one seed runs: the rotators, the file, the provider, the faults in force.
struct World {
    seed: u64,
    rng: StdRng,
    _dir: tempfile::TempDir,
    cfg: PathBuf,
    provider: Arc<FakeProvider>,
    bootstrap: bool,
    clock: crate::shared::Clock,
    step: Arc<std::sync::atomic::AtomicI64>,
    nodes: Vec<Node>,
    reader: crate::store::Store,
    tally: Tally,
    foreign: Option<Foreign>,
    fault_until: Option<Instant>,
    file_bad_since: Option<Instant>,
    started: Instant,
    log: Vec<String>,
}

impl World {
    fn new(seed: u64) -> Result<World, String> {
        let mut rng = StdRng::seed_from_u64(seed);
        // tmpfs where the machine has one (a container's /dev/shm may be missing or
        // read-only: then the temp directory, same semantics, slower fsyncs).
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .map_err(|e| e.to_string())?;
        let cfg = dir.path().join("databrickscfg");
        let provider = Arc::new(FakeProvider::new(crate::test_support::paused_clock()));
        let bootstrap = rng.random_bool(0.5);
        if !bootstrap {
            // Seeded by hand; the bootstrap is then out of reach for good.
            std::fs::write(&cfg, "[DEFAULT]\ntoken = boot\n").map_err(|e| e.to_string())?;
        }
        let (clock, step) = crate::test_support::steppable_clock();
        let nodes: Vec<Node> = (0..rng.random_range(1..=3usize))
            .map(|i| start(&cfg, bootstrap, &provider, &clock, i))
            .collect();
        // The checker's own reads never wait: a file kept locked reads as no live token.
        let reader = nodes[0].shared.store.clone().with_read_wait(Duration::ZERO);
        Ok(World {
            seed,
            rng,
            _dir: dir,
            cfg,
            provider,
            bootstrap,
            clock,
            step,
            nodes,
            reader,
            tally: Tally::default(),
            foreign: None,
            fault_until: None,
            file_bad_since: None,
            started: Instant::now(),
            log: Vec::new(),
        })
    }

    fn note(&mut self, what: String) {
        let at = self.started.elapsed().as_secs_f64();
        self.log.push(format!("{at:.2}: {what}"));
    }

    fn fail(&self, what: String) -> String {
        let at = self.started.elapsed().as_secs_f64();
        format!(
            "seed {}: {what} at {at:.2} s\nschedule:\n  {}",
            self.seed,
            self.log.join("\n  ")
        )
    }

    /// Faults whose time is up end: provider knobs, the foreign lock, stopped rotators.
    fn end_faults(&mut self, now: Instant) {
        if self.fault_until.is_some_and(|u| now >= u) {
            self.fault_until = None;
            let p = &self.provider;
            p.outage.store(false, Ordering::SeqCst);
            p.lose_answers.store(false, Ordering::SeqCst);
            p.quota.store(0, Ordering::SeqCst);
            p.max_lifetime_s.store(0, Ordering::SeqCst);
            p.latency_ms.store(0, Ordering::SeqCst);
            self.note("provider faults end".into());
        }
        if self.foreign.as_ref().is_some_and(|f| now >= f.until) {
            self.foreign = None;
            self.note("foreign lock released".into());
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].stopped_until.is_some_and(|u| now >= u) {
                let n = &mut self.nodes[i];
                n.stopped_until = None;
                n.running_since = now;
                n.gate.set(false);
                self.note(format!("node {i} resumed"));
            }
        }
    }

    /// A fault begins, about one every 4 s.
    fn inject(&mut self, now: Instant) {
        if !self.rng.random_bool(0.06) {
            return;
        }
        self.tally.faults += 1;
        let i = self.rng.random_range(0..self.nodes.len());
        let span = Duration::from_millis(self.rng.random_range(1_000..20_000));
        let kind = self.rng.random_range(0..11);
        let injected = match kind {
            0..=5 => self.inject_local(kind, i, span, now),
            _ => self.inject_provider(kind, span, now),
        };
        if !injected {
            self.tally.faults -= 1;
        }
    }

    /// Faults of the host: a stop, a kill (with a clock step), a foreign lock, a revocation
    /// out of band, a truncated or deleted file.
    fn inject_local(&mut self, kind: u32, i: usize, span: Duration, now: Instant) -> bool {
        match kind {
            0 if self.nodes[i].stopped_until.is_none() => {
                self.nodes[i].gate.set(true);
                self.nodes[i].stopped_until = Some(now + span);
                self.note(format!("node {i} stopped for {span:?}"));
            }
            1 => {
                self.nodes[i].task.abort();
                // Half the restarts follow a step of the host's wall clock, back or forward
                // by up to 30 s: every rotator's clock moves, the restarted one has only its
                // records (the state's boot-clock deadline among them) to judge tokens by.
                let stepped = if self.rng.random_bool(0.5) {
                    let by = self.rng.random_range(-30_000..30_000);
                    self.step.fetch_add(by, Ordering::SeqCst);
                    format!(", after the host's clock stepped {by} ms")
                } else {
                    String::new()
                };
                self.nodes[i] = start(&self.cfg, self.bootstrap, &self.provider, &self.clock, i);
                self.note(format!("node {i} killed and restarted{stepped}"));
            }
            2 if self.foreign.is_none() => {
                // On `<config>.lock` rarely and briefly: a write (and, under `flock -x`, a
                // read of a changed file) waits for it on a file thread in real time
                // (virtual time stands still meanwhile), so each such hold costs seconds.
                let lock = match self.seed.is_multiple_of(20) {
                    true if self.rng.random_bool(0.25) => ForeignLock::ExclusiveWrite,
                    true if self.rng.random_bool(0.33) => ForeignLock::SharedWrite,
                    _ => ForeignLock::WholeRotation,
                };
                let blocks_writes = lock != ForeignLock::WholeRotation;
                let span = match blocks_writes {
                    true => span.min(Duration::from_secs(5)),
                    false => span,
                };
                self.foreign = lock.take(&self.cfg).map(|file| Foreign {
                    _file: file,
                    until: now + span,
                    blocks_writes,
                });
                self.note(format!("foreign {lock:?} for {span:?}"));
            }
            3 => {
                let token = self.reader.read().ok().and_then(|s| s.token);
                if let Some(t) = token.filter(|t| t.expose() != "boot") {
                    self.provider.revoke_out_of_band(&t);
                    self.note("the file's token revoked out of band".into());
                }
            }
            4 => {
                let _ = std::fs::write(&self.cfg, "");
                self.note("config truncated".into());
            }
            5 => {
                let _ = std::fs::remove_file(&self.cfg);
                self.note("config deleted".into());
            }
            _ => return false,
        }
        true
    }

    /// Faults of the provider, one at a time: short grants, lost answers, an outage, the
    /// quota reached, a slow provider.
    fn inject_provider(&mut self, kind: u32, span: Duration, now: Instant) -> bool {
        if self.fault_until.is_some() {
            return false;
        }
        let p = self.provider.clone();
        let short = span.min(Duration::from_secs(4));
        let (until, what) = match kind {
            6 => {
                p.max_lifetime_s
                    .store(self.rng.random_range(3..12), Ordering::SeqCst);
                self.tally.short_grant_time += span;
                (span, "short grants")
            }
            7 => {
                p.lose_answers.store(true, Ordering::SeqCst);
                (short, "answers lost")
            }
            8 => {
                p.outage.store(true, Ordering::SeqCst);
                (short, "provider outage")
            }
            9 => {
                p.quota.store(p.live_count() as u64, Ordering::SeqCst);
                (short, "quota reached")
            }
            _ => {
                p.latency_ms
                    .store(self.rng.random_range(100..900), Ordering::SeqCst);
                (span, "slow provider")
            }
        };
        self.fault_until = Some(now + until);
        self.note(format!("{what} for {until:?}"));
        true
    }

    /// What each running rotator serves: never a token it knows is dead, never one dead at
    /// the provider for longer than it could have noticed, and a live one within
    /// [`T_FILE`] while the file holds one.
    async fn check_serving(&mut self, now: Instant, file_live: bool) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].stopped_until.is_some() {
                self.nodes[i].unserved_since = None;
                continue;
            }
            let shared = self.nodes[i].shared.clone();
            let served = match shared.view().await {
                Ok(view) => shared
                    .servable_until(&view, shared.now())
                    .ok()
                    .and(view.snap.token.clone()),
                Err(_) => None,
            };
            if let Some(t) = &served {
                if shared.knowledge.is_dead(t) {
                    return Err(self.fail(format!("node {i} served a token it knows is dead")));
                }
                // Revoked behind its back (out of band, by a sibling while it was stopped):
                // served at most until its next check finds it.
                let revoked = self
                    .provider
                    .revoked_at
                    .lock()
                    .unwrap()
                    .get(t.expose())
                    .map(|at| (self.provider.clock)() - *at);
                let running = self.nodes[i].running_since.elapsed();
                let unnoticed = revoked.is_some_and(|ago| {
                    ago.to_std().unwrap_or_default() <= DETECTION || running <= DETECTION
                });
                if !self.provider.is_live(t) && !unnoticed {
                    let how = if revoked.is_some() {
                        "revoked"
                    } else {
                        "expired"
                    };
                    return Err(
                        self.fail(format!("node {i} served a token that is not live ({how})"))
                    );
                }
            }
            let serving_live = served.as_ref().is_some_and(|t| self.provider.is_live(t));
            let n = &mut self.nodes[i];
            if serving_live || !file_live {
                n.unserved_since = None;
            } else if n.unserved_since.get_or_insert(now).elapsed() > T_FILE {
                return Err(self.fail(format!(
                    "node {i} served no live token for {T_FILE:?} while the file held one"
                )));
            }
        }
        Ok(())
    }

    /// (I): the file holds a live token within [`T_FILE`] while one is in a running
    /// rotator's reach and nothing outside the rotators prevents it; and the mint budget.
    fn check_file(&mut self, now: Instant, file_live: bool) -> Result<(), String> {
        let running: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|n| n.stopped_until.is_none())
            .collect();
        let held_live = running.iter().any(|n| {
            n.shared
                .knowledge
                .held()
                .is_some_and(|h| self.provider.is_live(&h.token))
        });
        let in_reach = file_live || held_live || self.bootstrap;
        let excused = self.fault_until.is_some()
            || self.foreign.as_ref().is_some_and(|f| f.blocks_writes)
            || running.is_empty();
        if file_live || !in_reach || excused {
            self.file_bad_since = None;
        } else if self.file_bad_since.get_or_insert(now).elapsed() > T_FILE {
            return Err(self.fail(format!(
                "the file held no live token for {T_FILE:?} with a live credential in reach"
            )));
        }
        // One mint per period, plus what each fault may cost.
        let budget = 2
            + (self.started.elapsed().as_secs() / PERIOD.as_secs()) * 2
            + self.tally.faults * 3
            + self.tally.short_grant_time.as_secs();
        let mints = self.provider.mints.load(Ordering::SeqCst);
        if mints > budget {
            return Err(self.fail(format!("{mints} mints against a budget of {budget}")));
        }
        Ok(())
    }
}

/// Runs one seed; `Err` says which check failed, when, and what the schedule had done.
async fn run_seed(seed: u64, horizon: Duration) -> Result<Tally, String> {
    let mut w = World::new(seed)?;
    let trace = std::env::var_os("PAT_SIM_TRACE").is_some();
    let mut traced = 0;
    while w.started.elapsed() < horizon {
        if trace {
            for line in &w.log[traced..] {
                eprintln!("sim: {line}");
            }
            traced = w.log.len();
        }
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        w.end_faults(now);
        w.inject(now);
        // Let the rotators act on this instant before judging it.
        tokio::task::yield_now().await;
        let file_token = w.reader.read().ok().and_then(|s| s.token);
        let file_live = file_token.as_ref().is_some_and(|t| w.provider.is_live(t));
        w.check_serving(now, file_live).await?;
        w.check_file(now, file_live)?;
    }
    for n in w.nodes {
        n.task.abort();
    }
    Ok(w.tally)
}

/// The seeds: `PAT_SIM_SEED` replays one, `PAT_SIM_SEEDS` sets how many run (each a fresh
/// runtime, several at once: the file threads' waits are real).
#[test]
fn the_invariant_holds_from_any_state_the_schedule_reaches() {
    let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let horizon = Duration::from_secs(env("PAT_SIM_SECONDS").unwrap_or(90));
    let seeds: Vec<u64> = match env("PAT_SIM_SEED") {
        Some(one) => vec![one],
        None => (1..=env("PAT_SIM_SEEDS").unwrap_or(1000)).collect(),
    };
    if std::env::var_os("PAT_SIM_TRACE").is_some() {
        let log = tracing_subscriber::fmt().with_env_filter("pat_rotator=debug");
        let _ = log.with_test_writer().try_init();
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
