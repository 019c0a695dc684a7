//! The promise under the ordinary hostile conditions of production (DESIGN, "Hostile
//! conditions"), each with the real tool that makes it: a second rotator on the same host, a
//! wall-clock step (libfaketime), a connection flood under a low descriptor limit
//! (`prlimit`), a FIFO at the config path. Every test runs the real binary against the
//! embedded emulator and judges the token at the emulator.

mod common;

use common::{eventually, sigterm, status_becomes, wait_exit, Fixture, RotatorEnv};
use pat_rotator::emulator::{Options, RunningEmulator};
use pat_rotator::reader::Reader;
use std::path::Path;
use std::time::{Duration, Instant};

/// The token in `profile` of `cfg`, and whether the emulator says it is live now.
fn live_at_the_emulator(emu: &RunningEmulator, cfg: &Path, profile: &str) -> bool {
    let Ok(reader) = Reader::new(cfg, profile) else {
        return false;
    };
    match reader.token() {
        Ok(Some(token)) => emu
            .emulator
            .lookup(&token)
            .is_some_and(|r| r.is_live(chrono::Utc::now())),
        _ => false,
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Two rotators on one host, two profiles of one config file, no `PAT_INSTANCE`: with the
/// host name as their shared identity, the second reaped the first's live token at start.
#[tokio::test(flavor = "multi_thread")]
async fn neighbours_on_one_host_never_revoke_each_others_tokens() {
    let (emu, boot, dir, cfg) = Fixture::new(Options::default()).await.into_parts();
    let mut first = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 40, 10, 2);
    let mut second = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 40, 10, 2);
    for env in [&mut first, &mut second] {
        env.unset("PAT_INSTANCE");
    }
    second.set("DATABRICKS_CONFIG_PROFILE", "other");
    let mut a = first.spawn_run(&dir.path().join("first.log"));
    assert!(status_becomes(&first.url("/readyz"), 200, Duration::from_secs(15)).await);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut b = second.spawn_run(&dir.path().join("second.log"));
    assert!(status_becomes(&second.url("/readyz"), 200, Duration::from_secs(15)).await);
    // Past both reaps (at start and after grace + 2 x timeout) of the second.
    let until = Instant::now() + Duration::from_secs(12);
    let mut samples = 0;
    while Instant::now() < until {
        assert!(
            live_at_the_emulator(&emu, &cfg, "DEFAULT"),
            "the first rotator's token was revoked"
        );
        assert!(
            live_at_the_emulator(&emu, &cfg, "other"),
            "the second rotator's token was revoked"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    sigterm(&a);
    sigterm(&b);
    wait_exit(&mut a, Duration::from_secs(25));
    wait_exit(&mut b, Duration::from_secs(25));
    let comments: std::collections::HashSet<String> = emu
        .emulator
        .tokens()
        .into_iter()
        .filter(|t| t.comment.starts_with("pat-rotator:"))
        .map(|t| t.comment)
        .collect();
    assert_eq!(comments.len(), 2, "one identity each: {comments:?}");
    assert_eq!(emu.emulator.counters().dead_token_requests, 0);
    assert!(samples > 20);
    emu.stop().await;
}

/// A FIFO at the config path: every request path answers (no blocking open), SIGTERM ends
/// the process, and a regular file put back is used again.
#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_at_the_config_path_never_wedges_the_service() {
    let (emu, boot, dir, cfg) = Fixture::new(Options::default()).await.into_parts();
    let mut env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 60, 30, 2);
    let mut child = env.spawn_run(&dir.path().join("run.log"));
    assert!(status_becomes(&env.url("/readyz"), 200, Duration::from_secs(15)).await);
    let metadata = env.published_metadata_url();
    let good = std::fs::read(&cfg).unwrap();
    // Renamed over the file in one step: with a moment where the file is missing, the
    // rotator may read that moment and rightly write a new file, over the FIFO too.
    let fifo = dir.path().join("fifo.tmp");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::fs::rename(&fifo, &cfg).unwrap();

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for _ in 0..3 {
        let ready = http.get(env.url("/readyz")).send().await;
        assert_eq!(
            ready.expect("/readyz hung on the FIFO").status().as_u16(),
            503
        );
        let md = http
            .get(&metadata)
            .header("X-Databricks-Metadata-Version", "1")
            .header("X-Databricks-Host", emu.url())
            .send()
            .await
            .expect("the metadata endpoint hung on the FIFO");
        assert_ne!(md.status().as_u16(), 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = std::fs::read_to_string(dir.path().join("run.log")).unwrap();
    assert!(
        log.contains(pat_rotator::store::NOT_A_REGULAR_FILE),
        "the log says why"
    );

    // A regular file back: ready again without a restart.
    let back = dir.path().join("back.tmp");
    std::fs::write(&back, &good).unwrap();
    std::fs::rename(&back, &cfg).unwrap();
    assert!(
        status_becomes(&env.url("/readyz"), 200, Duration::from_secs(15)).await,
        "not ready again after the regular file came back: {}\n{}",
        http.get(env.url("/readyz"))
            .send()
            .await
            .map(|r| r.status().to_string())
            .unwrap_or_default(),
        std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default()
    );

    // And a FIFO again, then SIGTERM: the process ends.
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::fs::rename(&fifo, &cfg).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = http.get(env.url("/readyz")).send().await;
    sigterm(&child);
    let exit = wait_exit(&mut child, Duration::from_secs(25));
    assert!(exit.is_some_and(|s| s.success()), "SIGTERM did not end it");
    emu.stop().await;
}

/// Raises this test process's own open-file limit: the flood needs more sockets than the
/// rotator may have.
fn raise_own_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

/// Holds `count` silent connections to `port`, reopening each one the server closes, until
/// `until`; returns the most held at once.
fn flood(port: u16, count: usize, until: Instant) -> usize {
    use std::io::Read;
    let connect = || {
        // A full backlog makes a plain connect wait for minutes of SYN retries.
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
        s.set_nonblocking(true).ok()?;
        Some(s)
    };
    let mut held: Vec<std::net::TcpStream> = Vec::new();
    let mut most = 0;
    while Instant::now() < until {
        let mut buf = [0u8; 64];
        // Kept while the server keeps it open and silent; an answer or a close ends it.
        held.retain_mut(
            |s| matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        );
        while held.len() < count && Instant::now() < until {
            match connect() {
                Some(s) => held.push(s),
                None => break,
            }
        }
        most = most.max(held.len());
        std::thread::sleep(Duration::from_millis(200));
    }
    most
}

/// 1,400 silent connections against a rotator whose descriptor limit is 256 (soft and
/// hard, so it cannot raise it): before, the forced rotation failed with "Too many open
/// files" and the token died. Now each listener holds at most its share, the rest wait or
/// are refused, and rotations go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_flood_costs_refused_connections_never_the_token() {
    if !common::require_tool("prlimit", Path::new("/usr/bin/prlimit").exists()) {
        return;
    }
    assert!(
        raise_own_limit() >= 2048,
        "the test needs 2,048 descriptors"
    );
    let (emu, boot, dir, cfg) = Fixture::new(Options::default()).await.into_parts();
    let mut env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 12, 8, 2);
    env.wrapper = vec!["prlimit".into(), "--nofile=256:256".into(), "--".into()];
    let mut child = env.spawn_run(&dir.path().join("run.log"));
    assert!(status_becomes(&env.url("/readyz"), 200, Duration::from_secs(15)).await);
    let before = env.metrics().await;
    let until = Instant::now() + Duration::from_secs(20);
    let (listen, control) = (env.listen, env.control);
    let floods = [listen, control].map(|port| std::thread::spawn(move || flood(port, 700, until)));
    // Meanwhile the token on disk must stay live at the emulator.
    let mut dead_samples = 0;
    while Instant::now() < until {
        if !live_at_the_emulator(&emu, &cfg, "DEFAULT") {
            dead_samples += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let held: Vec<usize> = floods.into_iter().map(|f| f.join().unwrap()).collect();
    assert!(
        status_becomes(&env.url("/readyz"), 200, Duration::from_secs(30)).await,
        "not ready after the flood"
    );
    let after = env.metrics().await;
    let rotations = metric(&after, "pat_rotator_rotations_total")
        - metric(&before, "pat_rotator_rotations_total");
    // Failures of every kind: a descriptor missing for the provider's connection shows as
    // `network`, for a file as `store`.
    let failures = |m: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with("pat_rotator_failures_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let failed = failures(&after) - failures(&before);
    eprintln!(
        "flood: connections held by the flooder {held:?}, rotations during it {rotations}, failures {failed}, dead samples {dead_samples}"
    );
    // The flood really held the listeners (else this test proves nothing).
    assert!(
        held.iter().all(|h| *h >= 50),
        "the flooder held only {held:?} connections"
    );
    assert_eq!(dead_samples, 0, "the token died during the flood");
    assert_eq!(failed, 0.0, "rotations failed during the flood");
    assert!(rotations >= 3.0, "{rotations} rotations in 20 s of flood");
    assert_eq!(emu.emulator.counters().dead_token_requests, 0);
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(25)).is_some());
    emu.stop().await;
}

const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A wall-clock step under libfaketime (`FAKETIME_DONT_FAKE_MONOTONIC=1`: only the wall
/// clock moves, as with an NTP step), 2 s after a rotation; lifetime 24, interval 12.
/// Returns the samples of (token live at the emulator, metadata endpoint answered 200).
async fn with_a_clock_step(step: &str) -> (Vec<(bool, bool)>, String) {
    let (emu, boot, dir, cfg) = Fixture::new(Options::default()).await.into_parts();
    let stamp = dir.path().join("faketime");
    std::fs::write(&stamp, "+0\n").unwrap();
    let mut env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 24, 12, 2);
    env.set("LD_PRELOAD", FAKETIME);
    env.set("FAKETIME_TIMESTAMP_FILE", &stamp.display().to_string());
    env.set("FAKETIME_NO_CACHE", "1");
    env.set("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    let mut child = env.spawn_run(&dir.path().join("run.log"));
    assert!(status_becomes(&env.url("/readyz"), 200, Duration::from_secs(15)).await);
    // Not even the bootstrap may rescue a late rotation: only the file's token counts.
    emu.emulator.revoke(&boot);
    let metadata = env.published_metadata_url();
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::write(&stamp, format!("{step}\n")).unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut samples = Vec::new();
    let until = Instant::now() + Duration::from_secs(40);
    while Instant::now() < until {
        let live = live_at_the_emulator(&emu, &cfg, "DEFAULT");
        let served = http
            .get(&metadata)
            .header("X-Databricks-Metadata-Version", "1")
            .header("X-Databricks-Host", emu.url())
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200);
        samples.push((live, served));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let metrics = env.metrics().await;
    sigterm(&child);
    wait_exit(&mut child, Duration::from_secs(25));
    emu.stop().await;
    (samples, metrics)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wall_clock_step_back_never_lets_the_token_die() {
    if !common::require_tool("libfaketime", Path::new(FAKETIME).exists()) {
        return;
    }
    let (samples, metrics) = with_a_clock_step("-30").await;
    let dead = samples.iter().filter(|(live, _)| !live).count();
    assert_eq!(
        dead,
        0,
        "the token on disk was dead in {dead} of {} samples",
        samples.len()
    );
    assert!(metric(&metrics, "pat_rotator_clock_steps_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wall_clock_step_forward_never_refuses_a_live_token() {
    if !common::require_tool("libfaketime", Path::new(FAKETIME).exists()) {
        return;
    }
    let (samples, metrics) = with_a_clock_step("+120").await;
    let dead = samples.iter().filter(|(live, _)| !live).count();
    let refused = samples.iter().filter(|(_, served)| !served).count();
    assert_eq!(dead, 0, "the token on disk was dead in {dead} samples");
    assert_eq!(
        refused,
        0,
        "the metadata endpoint refused a live token in {refused} of {} samples",
        samples.len()
    );
    assert!(metric(&metrics, "pat_rotator_clock_steps_total") >= 1.0);
}

/// SIGTERM while a mint hangs on a slow workspace (PAT_HTTP_TIMEOUT=30): the process ends
/// within 25 s (Kubernetes' default grace is 30 s), the mint abandoned and reaped later.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_hanging_mint_ends_the_process_within_25_s() {
    let (emu, boot, dir, cfg) = Fixture::new(Options::default()).await.into_parts();
    let mut env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 600, 300, 2);
    env.set("PAT_HTTP_TIMEOUT", "30");
    env.set("PAT_WRITE_LOCK_WAIT", "35");
    emu.emulator.set_faults(pat_rotator::emulator::Faults {
        latency_ms: 60_000,
        ..Default::default()
    });
    let log = dir.path().join("run.log");
    let mut child = env.spawn_run(&log);
    // The first rotation (no token yet) is in flight, waiting on the workspace.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = emu.emulator.counters().requests;
    assert!(requests >= 1, "no mint in flight");
    let t0 = Instant::now();
    sigterm(&child);
    let exit = wait_exit(&mut child, Duration::from_secs(40));
    let took = t0.elapsed();
    assert!(exit.is_some(), "SIGTERM did not end the process");
    assert!(
        took <= Duration::from_secs(25),
        "SIGTERM took {took:?}, past Kubernetes' grace"
    );
    emu.stop().await;
}

/// H2: a process of the same user holds `<config>.lock` (a hung reader that honours the lock,
/// `flock -s`) across the forced window, with no bootstrap token. The minted token is kept as
/// the credential of record (not revoked as "unused"), the metadata endpoint serves a live
/// token throughout, the log names the holder's pid, and the token reaches the file as soon as
/// the lock frees. Before: both fresh tokens were revoked and the rotator was left with the
/// expired one, 503 for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_lock_holder_across_the_forced_window_never_kills_the_token() {
    foreign_lock_holder_across_the_forced_window("-s").await;
}

/// The same with an exclusive lock (a writer, or a rotator, stopped while it holds
/// `<config>.lock`): the file cannot even be read. The rotator decides from what it read
/// last, mints near expiry, and serves the token it holds. Before: every read failed "credential
/// busy" and nothing was minted until the token died (seen in `soak --credential oauth-m2m`,
/// the SIGSTOP landing in a write).
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_exclusive_lock_across_the_forced_window_never_kills_the_token() {
    foreign_lock_holder_across_the_forced_window("-x").await;
}

async fn foreign_lock_holder_across_the_forced_window(mode: &str) {
    if !common::require_tool("flock", which("flock")) {
        return;
    }
    let (emu, boot, dir, cfg) = Fixture::new(Options::default()).await.into_parts();
    seeded(&emu, &boot, &cfg);
    let mut env = RotatorEnv::new(&emu.url(), None, &cfg, 20, 8, 3);
    env.set("PAT_WRITE_LOCK_WAIT", "3");
    let log = dir.path().join("run.log");
    let mut child = env.spawn_run(&log);
    assert!(status_becomes(&env.url("/readyz"), 200, Duration::from_secs(15)).await);
    let metadata = env.published_metadata_url();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut lock_path = cfg.clone().into_os_string();
    lock_path.push(".lock");
    let mut holder = std::process::Command::new("flock")
        .arg(mode)
        .arg(&lock_path)
        .args(["sleep", "25"])
        .spawn()
        .unwrap();
    let holder_pid = holder.id();
    let answers = metadata_during(&emu, &metadata, Duration::from_secs(28)).await;
    let _ = holder.wait();
    assert!(
        eventually(Duration::from_secs(10), async || live_at_the_emulator(
            &emu, &cfg, "DEFAULT"
        ))
        .await,
        "the file has no live token after the lock was freed"
    );
    sigterm(&child);
    wait_exit(&mut child, Duration::from_secs(25));
    let text = std::fs::read_to_string(&log).unwrap();
    answers.assert_all_live("while the lock was held", &text);
    assert!(
        text.contains(&format!("pid {holder_pid}")),
        "the log does not name the lock holder (pid {holder_pid}):\n{text}"
    );
    assert_eq!(emu.emulator.counters().dead_token_requests, 0);
}

fn which(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What the metadata endpoint answered during a span: how many answers carried a token
/// live at the emulator when asked, and when the others were asked.
struct Answers {
    live: usize,
    dead: Vec<chrono::DateTime<chrono::Utc>>,
}

impl Answers {
    /// Fails unless every answer carried a live token; `log` says what the rotator did.
    fn assert_all_live(&self, when: &str, log: &str) {
        assert!(
            self.dead.is_empty(),
            "{when}: {} of {} metadata answers had no live token (first at {:?}); log:\n{log}",
            self.dead.len(),
            self.live + self.dead.len(),
            self.dead.first()
        );
    }
}

/// Every answer of the metadata endpoint at `url` during `span`.
async fn metadata_during(emu: &RunningEmulator, url: &str, span: Duration) -> Answers {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let (mut served, mut failed) = (0, Vec::new());
    let until = Instant::now() + span;
    while Instant::now() < until {
        let sent_at = chrono::Utc::now();
        let answer = http
            .get(url)
            .header("X-Databricks-Metadata-Version", "1")
            .header("X-Databricks-Host", emu.url())
            .send()
            .await;
        let token = match answer {
            Ok(r) if r.status().as_u16() == 200 => r
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|j| j["access_token"].as_str().map(str::to_string)),
            _ => None,
        };
        let live = token.is_some_and(|t| {
            emu.emulator
                .lookup(&pat_rotator::Token::new(t))
                .is_some_and(|r| r.is_live(sent_at))
        });
        if live {
            served += 1;
        } else {
            failed.push(sent_at);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Answers {
        live: served,
        dead: failed,
    }
}

/// A config file seeded with the bootstrap token, for rotators that run without one (the
/// token must then be kept alive by the rotation alone).
fn seeded(emu: &RunningEmulator, boot: &pat_rotator::Token, cfg: &Path) {
    std::fs::write(
        cfg,
        format!(
            "[DEFAULT]\nhost = {}\ntoken = {}\n",
            emu.url(),
            boot.expose()
        ),
    )
    .unwrap();
}

/// H1 with the harder holder: a foreign process holds a POSIX lock (`lockf`) over the whole
/// `<config>.rotate.lock` for 22 s from early in a token's life, with no bootstrap. It never
/// shows progress, so once the forced window opens the rotator rotates without it.
/// Before: "it may be stuck", waiting again, and the token died.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_rotation_lock_holder_is_bypassed_in_the_forced_window() {
    let (emu, boot, dir, cfg) = Fixture::new(Options::default()).await.into_parts();
    seeded(&emu, &boot, &cfg);
    let mut env = RotatorEnv::new(&emu.url(), None, &cfg, 20, 8, 3);
    let log = dir.path().join("run.log");
    let mut child = env.spawn_run(&log);
    assert!(status_becomes(&env.url("/readyz"), 200, Duration::from_secs(15)).await);
    let metadata = env.published_metadata_url();
    let mut rotate_lock = cfg.clone().into_os_string();
    rotate_lock.push(".rotate.lock");
    let mut holder = std::process::Command::new("python3")
        .args([
            "-c",
            "import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.lockf(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(22)",
        ])
        .arg(&rotate_lock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let holder_pid = holder.id();
    let answers = metadata_during(&emu, &metadata, Duration::from_secs(24)).await;
    let _ = holder.wait();
    assert!(live_at_the_emulator(&emu, &cfg, "DEFAULT"));
    sigterm(&child);
    wait_exit(&mut child, Duration::from_secs(25));
    let text = std::fs::read_to_string(&log).unwrap();
    answers.assert_all_live("while the lock was held", &text);
    assert!(text.contains(&format!("pid {holder_pid}")), "{text}");
    assert_eq!(emu.emulator.counters().dead_token_requests, 0);
}

/// H1: two rotators on one file, no bootstrap, and the one holding the rotation lock
/// (found by its heartbeat, mid-mint behind a 1.5 s provider) is stopped with SIGSTOP for
/// 15 s, across a forced window. The other sees the heartbeat stop and rotates on its own;
/// the stopped one, resumed, adopts the newer token (its late create answer is used or
/// revoked, never minted with a dead token). Before: the file held an expired token from
/// 3.8 s after the stop to the end.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotator_stopped_while_it_holds_the_rotation_lock_never_kills_the_token() {
    let (emu, boot, dir, cfg) = Fixture::new(Options::default()).await.into_parts();
    seeded(&emu, &boot, &cfg);
    let mut envs = [
        RotatorEnv::new(&emu.url(), None, &cfg, 20, 8, 3),
        RotatorEnv::new(&emu.url(), None, &cfg, 20, 8, 3),
    ];
    let mut children = Vec::new();
    for (i, env) in envs.iter_mut().enumerate() {
        children.push(env.spawn_run(&dir.path().join(format!("run-{i}.log"))));
        assert!(status_becomes(&env.url("/readyz"), 200, Duration::from_secs(15)).await);
    }
    emu.emulator.set_faults(pat_rotator::emulator::Faults {
        latency_ms: 1500,
        ..Default::default()
    });
    // The holder, by its heartbeat: the first change seen within two token lifetimes.
    let beat_of = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".beat"))
            .and_then(|e| std::fs::read_to_string(e.path()).ok())
    };
    let before = beat_of();
    let until = Instant::now() + Duration::from_secs(40);
    let pid = loop {
        assert!(Instant::now() < until, "no rotation lock holder seen");
        let now = beat_of();
        if let Some(beat) = now.as_ref().filter(|_| now != before) {
            break beat.split(' ').next().unwrap().parse::<i32>().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stopped = children.iter().position(|c| c.id() as i32 == pid).unwrap();
    let other = 1 - stopped;
    // SAFETY: signals to our own children.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let metadata = envs[other].published_metadata_url();
    let stopped_answers = metadata_during(&emu, &metadata, Duration::from_secs(15)).await;
    let file_live_while_stopped = live_at_the_emulator(&emu, &cfg, "DEFAULT");
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let answers_after = metadata_during(&emu, &metadata, Duration::from_secs(8)).await;
    let file_live_after = live_at_the_emulator(&emu, &cfg, "DEFAULT");
    for child in &mut children {
        sigterm(child);
        wait_exit(child, Duration::from_secs(25));
    }
    let logs: String = (0..2)
        .map(|i| std::fs::read_to_string(dir.path().join(format!("run-{i}.log"))).unwrap())
        .collect::<Vec<_>>()
        .join("\n----\n");
    stopped_answers.assert_all_live("while the holder was stopped", &logs);
    answers_after.assert_all_live("after it resumed", &logs);
    assert!(file_live_while_stopped && file_live_after, "{logs}");
    assert_eq!(emu.emulator.counters().dead_token_requests, 0, "{logs}");
}
