//! The rotation service as a user runs it: the real binary against the embedded emulator,
//! in compressed time (lifetimes of seconds).

mod common;

use common::{eventually, sigkill, sigterm, status_becomes, wait_exit, Fixture, RotatorEnv};
use pat_rotator::emulator::RunningEmulator;
use pat_rotator::provider::{Databricks, Provider, RetryPolicy};
use pat_rotator::reader::Reader;
use pat_rotator::store::Store;
use pat_rotator::Token;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Watches the file for `duration`: every 200 ms the token on disk must be live at the
/// emulator, and every 500 ms a client call with it must succeed. Returns the tokens seen.
async fn watch(emu: &RunningEmulator, cfg: &Path, duration: Duration) -> HashSet<String> {
    let reader = Reader::new(cfg, "DEFAULT").unwrap();
    let client = Databricks::new(
        &emu.url(),
        Duration::from_secs(5),
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        },
    )
    .unwrap();
    let mut seen = HashSet::new();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        if let Some(token) = reader.token().unwrap() {
            let record = emu
                .emulator
                .lookup(&token)
                .expect("the file holds a token the provider never issued");
            assert!(
                record.is_live(chrono::Utc::now()),
                "the file holds a dead token: {record:?}"
            );
            if n.is_multiple_of(3) {
                client
                    .verify(&token)
                    .await
                    .expect("a client call with the file's token failed");
            }
            seen.insert(token.expose().to_string());
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    seen
}

fn assert_log_is_clean(log: &Path, secrets: impl IntoIterator<Item = String>) {
    let text = std::fs::read_to_string(log).unwrap();
    for s in secrets {
        assert!(!text.contains(&s), "a token value appears in the log");
    }
}

fn stop(child: &mut std::process::Child) {
    sigterm(child);
    let status =
        wait_exit(child, Duration::from_secs(10)).expect("did not stop within 10 s of SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}

fn leaked(emu: &RunningEmulator, cfg: &Path, comment: &str) -> Vec<String> {
    let snap = Store::open(cfg, "DEFAULT").unwrap().read().unwrap();
    let mut keep: HashSet<String> = snap
        .state
        .pending_revocations
        .iter()
        .map(|p| p.token_id.clone())
        .collect();
    keep.extend(snap.state.token_id.clone());
    let now = chrono::Utc::now();
    emu.emulator
        .tokens()
        .into_iter()
        .filter(|t| t.comment == comment && t.is_live(now) && !keep.contains(&t.token_id))
        .map(|t| t.token_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_for_many_lifetimes_never_lets_the_token_die() {
    let (emu, boot, dir, cfg) = Fixture::rejecting(1).await.into_parts();
    let mut env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 8, 4, 1);
    let log = dir.path().join("rotator.log");
    let mut child = env.spawn_run(&log);
    assert!(
        status_becomes(&env.url("/readyz"), 200, Duration::from_secs(10)).await,
        "never became ready"
    );
    // Five lifetimes with no session at all.
    let seen = watch(&emu, &cfg, Duration::from_secs(40)).await;
    let counters = emu.emulator.counters();
    // Decisions are reported with the metric label names, never Rust's Debug forms.
    let health: serde_json::Value = reqwest::get(env.url("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let decision = health["loop"]["last_decision"].as_str().unwrap_or_default();
    assert!(
        ["rotate:", "skip:"].iter().any(|p| decision.starts_with(p)),
        "{health}"
    );
    stop(&mut child);
    println!(
        "idle: {} rotations, {} dead-token requests, {} tokens seen",
        counters.creates,
        counters.dead_token_requests,
        seen.len()
    );
    assert_eq!(
        counters.dead_token_requests,
        0,
        "{:?}",
        emu.emulator.events()
    );
    // At least one rotation per lifetime, whatever the load: fewer and a token would have
    // died (the dead-token count above is the invariant; this only shows the run ran).
    assert!(
        counters.creates >= 5,
        "only {} rotations in 5 lifetimes",
        counters.creates
    );
    assert!(seen.len() >= 5);
    let log_text = std::fs::read_to_string(&log).unwrap();
    // The rotations were forced near expiry (idle): read from the typed JSON fields.
    let forced = log_text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "rotated" && r["reason"] == "forced_near_expiry")
        .count();
    assert!(forced >= 4, "{forced} forced rotations logged");
    assert!(
        !log_text.contains("None") && !log_text.contains("Skip(") && !log_text.contains("Some("),
        "a Debug form in the log"
    );
    assert_log_is_clean(&log, seen.into_iter().chain([boot.expose().to_string()]));
    assert!(leaked(&emu, &cfg, "pat-rotator:itest").is_empty());
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_rotators_sharing_a_file_mint_once_per_period() {
    let (emu, boot, dir, cfg) = Fixture::rejecting(0).await.into_parts();
    let mut a = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 20, 5, 1);
    let mut b = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 20, 5, 1);
    let mut ra = a.spawn_run(&dir.path().join("a.log"));
    let mut rb = b.spawn_run(&dir.path().join("b.log"));
    let http = reqwest::Client::new();
    for env in [&a, &b] {
        let url = env.control_url("/v1/sessions");
        assert!(
            eventually(Duration::from_secs(10), async || http
                .post(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 201))
            .await
        );
    }
    assert!(status_becomes(&a.url("/readyz"), 200, Duration::from_secs(10)).await);
    let creates_before = emu.emulator.counters().creates;
    watch(&emu, &cfg, Duration::from_secs(30)).await;
    let creates = emu.emulator.counters().creates - creates_before;
    let metrics_a = http
        .get(a.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    stop(&mut ra);
    stop(&mut rb);
    let counters = emu.emulator.counters();
    println!(
        "shared file: {creates} mints in 30 s with interval 5 s; {} dead-token requests",
        counters.dead_token_requests
    );
    assert_eq!(
        counters.dead_token_requests,
        0,
        "{:?}",
        emu.emulator.events()
    );
    // The invariant is the ceiling: two rotators minting each period would give about 12.
    // The floor only shows the rotators ran; a loaded machine may delay a wake-up, never
    // add a mint.
    assert!(
        (3..=8).contains(&creates),
        "expected about one mint per 5 s period (6), got {creates}"
    );
    assert!(
        metrics_a.contains("pat_rotator_active_sessions 1"),
        "{metrics_a}"
    );
    assert!(leaked(&emu, &cfg, "pat-rotator:itest").is_empty());
    emu.stop().await;
}

fn run_set(env: &RotatorEnv, token: &str, force: bool) -> std::process::Output {
    let args: &[&str] = if force { &["set", "--force"] } else { &["set"] };
    common::run_with_stdin(&mut env.command(args), token.as_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_token_recovers_through_the_bootstrap_or_a_manual_set() {
    let (emu, boot, dir, cfg) = Fixture::rejecting(0).await.into_parts();
    // Dead token in the file, valid bootstrap: recovers by itself.
    let (dead, _) = emu.emulator.issue(Some(Duration::from_secs(600)), "old");
    emu.emulator.revoke(&dead);
    std::fs::write(
        &cfg,
        format!(
            "[DEFAULT]\nhost = {}\ntoken = {}\n",
            emu.url(),
            dead.expose()
        ),
    )
    .unwrap();
    let mut env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 8, 4, 1);
    let log = dir.path().join("a.log");
    let mut child = env.spawn_run(&log);
    assert!(
        status_becomes(&env.url("/readyz"), 200, Duration::from_secs(10)).await,
        "did not recover through the bootstrap token"
    );
    stop(&mut child);

    // Both dead: not ready, with a message that says what to do; then `set` brings it back.
    let (dead2, _) = emu.emulator.issue(Some(Duration::from_secs(600)), "old");
    emu.emulator.revoke(&dead2);
    std::fs::write(
        &cfg,
        format!(
            "[DEFAULT]\nhost = {}\ntoken = {}\n",
            emu.url(),
            dead2.expose()
        ),
    )
    .unwrap();
    let (dead_boot, _) = emu.emulator.issue(None, "bootstrap2");
    emu.emulator.revoke(&dead_boot);
    let mut env = RotatorEnv::new(&emu.url(), Some(dead_boot.expose()), &cfg, 8, 4, 1);
    let log2 = dir.path().join("b.log");
    let mut child = env.spawn_run(&log2);
    let http = reqwest::Client::new();
    let url = env.url("/readyz");
    assert!(
        eventually(Duration::from_secs(10), async || {
            let Ok(r) = http.get(&url).send().await else {
                return false;
            };
            r.status() == 503
                && r.text()
                    .await
                    .unwrap_or_default()
                    .contains("pat-rotator set")
        })
        .await,
        "not-ready with advice never showed"
    );
    // A token the provider rejects is refused by set.
    let refused = run_set(&env, dead.expose(), false);
    assert!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("rejects")
    );
    let (fresh, _) = emu
        .emulator
        .issue(Some(Duration::from_secs(600)), "handed-over");
    let out = run_set(&env, fresh.expose(), false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = Instant::now();
    assert!(
        status_becomes(&url, 200, Duration::from_secs(10)).await,
        "not ready again after set"
    );
    println!("ready again {:?} after set", t.elapsed());
    stop(&mut child);
    assert_log_is_clean(
        &log2,
        [
            fresh.expose().to_string(),
            dead2.expose().to_string(),
            dead_boot.expose().to_string(),
        ],
    );
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_rotation_leaves_a_consistent_file_and_nothing_leaks() {
    let (emu, boot, dir, cfg) = Fixture::rejecting(0).await.into_parts();
    let mut env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 8, 4, 1);
    // Every create takes 0.8 s, so SIGTERMs land in the middle of rotations.
    emu.emulator.set_faults(pat_rotator::emulator::Faults {
        latency_ms: 800,
        ..Default::default()
    });
    for round in 0..5u64 {
        let mut child = env.spawn_run(&dir.path().join(format!("run{round}.log")));
        // SIGTERM exactly while a create is in flight (minted, not yet answered).
        let in_flight = || {
            let c = emu.emulator.counters();
            c.creates > c.creates_answered
        };
        assert!(
            eventually(Duration::from_secs(15), async || in_flight()).await,
            "round {round}: no create was ever in flight"
        );
        stop(&mut child);
        let snap = Store::open(&cfg, "DEFAULT").unwrap().read().unwrap();
        let token = snap.token.clone().expect("a token on disk");
        assert!(
            snap.state.times_for(Some(&token)).is_some(),
            "round {round}: the state does not describe the file's token"
        );
        assert!(emu
            .emulator
            .lookup(&token)
            .unwrap()
            .is_live(chrono::Utc::now()));
    }
    emu.emulator.set_faults(Default::default());
    // A last run outlives the reap age (grace 1 s + 2 x timeout 2 s) and reaps what is left.
    let mut child = env.spawn_run(&dir.path().join("final.log"));
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop(&mut child);
    let leaks = leaked(&emu, &cfg, "pat-rotator:itest");
    assert!(leaks.is_empty(), "leaked tokens: {leaks:?}");
    assert_eq!(emu.emulator.counters().dead_token_requests, 0);
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn once_status_token_and_the_metadata_endpoint() {
    let (emu, boot, dir, cfg) = Fixture::rejecting(0).await.into_parts();
    std::fs::write(&cfg, "; keep me\n[other]\ntoken = untouched\n").unwrap();
    let mut env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 60, 30, 2);
    let hook_out = dir.path().join("hook.env");
    let capability = "hook-must-never-see-this-capability-0123456789";
    env.set("PAT_CONTROL_SECRET", capability);
    env.set(
        "PAT_ON_ROTATE",
        &format!("sh -c 'env > {}'", hook_out.display()),
    );
    let once = env.command(&["once"]).output().unwrap();
    assert_eq!(
        once.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    let again = env.command(&["once"]).output().unwrap();
    assert_eq!(again.status.code(), Some(3), "a fresh token is not due");
    let rotated_out = env.command(&["token"]).output().unwrap().stdout;
    let forced = env.command(&["once", "--force"]).output().unwrap();
    assert_eq!(forced.status.code(), Some(0));
    // The token just rotated out is pending revocation: `set` refuses to put it back.
    let before = std::fs::read_to_string(&cfg).unwrap();
    let refused = common::run_with_stdin(&mut env.command(&["set"]), &rotated_out);
    assert!(!refused.status.success(), "set wrote a token being revoked");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("being revoked"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), before);
    // With the cluster store the token lives in the Secret: `set` refuses (78) and says so.
    let mut in_cluster = env.command(&["set"]);
    in_cluster.env("PAT_STORE", "kubernetes");
    let refused = common::run_with_stdin(&mut in_cluster, &rotated_out);
    assert_eq!(refused.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("kubectl create secret"));
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), before);
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.starts_with("; keep me\n[other]\ntoken = untouched\n"),
        "{text}"
    );

    let token = env.command(&["token"]).output().unwrap();
    assert!(token.status.success());
    let value = String::from_utf8_lossy(&token.stdout).trim().to_string();
    assert!(emu
        .emulator
        .lookup(&Token::new(value.clone()))
        .unwrap()
        .is_live(chrono::Utc::now()));

    let hook_env = std::fs::read_to_string(&hook_out).unwrap();
    assert!(
        hook_env.contains("PAT_TOKEN_FINGERPRINT=sha256:")
            && hook_env.contains("PAT_TOKEN_EXPIRES_AT=")
    );
    assert!(
        !hook_env.contains(&value)
            && !hook_env.contains(boot.expose())
            && !hook_env.contains(capability),
        "the hook must never see a token or the capability"
    );

    let status = env
        .command(&["status", "--json", "--verify"])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let s = String::from_utf8_lossy(&status.stdout);
    assert!(!s.contains(&value));
    let json: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(json["ready"], true);
    assert_eq!(json["verified_user"], pat_rotator::emulator::USER_NAME);
    assert_eq!(
        json["pending_revocations"].as_array().unwrap().len(),
        1,
        "the forced rotation left the old token pending"
    );
    assert!(
        json["metadata_url"].is_null(),
        "no service runs yet, so no URL is published"
    );

    let mut child = env.spawn_run(&dir.path().join("run.log"));
    assert!(status_becomes(&env.url("/healthz"), 200, Duration::from_secs(10)).await);
    let metadata_url = env.published_metadata_url();
    let http = reqwest::Client::new();
    let ask = |version: Option<&'static str>, host: Option<String>| {
        let mut req = http.get(&metadata_url);
        if let Some(v) = version {
            req = req.header("X-Databricks-Metadata-Version", v);
        }
        if let Some(h) = host {
            req = req.header("X-Databricks-Host", h);
        }
        req.send()
    };
    assert_eq!(
        ask(None, Some(emu.url())).await.unwrap().status().as_u16(),
        400
    );
    assert_eq!(ask(Some("1"), None).await.unwrap().status().as_u16(), 400);
    assert_eq!(
        ask(Some("2"), Some(emu.url()))
            .await
            .unwrap()
            .status()
            .as_u16(),
        400
    );
    let wrong = ask(Some("1"), Some("https://elsewhere.example".into()))
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 403);
    let ok = ask(Some("1"), Some(format!("{}/", emu.url())))
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let body: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    let served = Token::new(body["access_token"].as_str().unwrap());
    let record = emu.emulator.lookup(&served).unwrap();
    let expires_on = body["expires_on"]
        .as_i64()
        .expect("expires_on is a JSON number");
    assert!(
        expires_on <= record.expires_at.unwrap().timestamp(),
        "expires_on past the real expiry"
    );
    assert!(
        expires_on <= chrono::Utc::now().timestamp() + 2,
        "expires_on past now + grace"
    );
    let metrics = env.metrics().await;
    assert!(
        metrics.contains("pat_rotator_token_seconds_to_expiry")
            && !metrics.contains(served.expose())
    );
    stop(&mut child);
    emu.stop().await;
}

#[test]
fn invalid_configuration_exits_78_naming_the_variable() {
    let out = std::process::Command::new(common::bin())
        .arg("config")
        .env("PAT_TOKEN_LIFETIME", "abc")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PAT_TOKEN_LIFETIME"));
    let out = std::process::Command::new(common::bin())
        .arg("run")
        .env("PAT_ROTATION_INTERVAL", "900")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PAT_ROTATION_INTERVAL"));
    for args in [&["--help"][..], &["run", "--help"][..]] {
        let help = std::process::Command::new(common::bin())
            .args(args)
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        for v in pat_rotator::config::VARIABLES {
            assert!(help.contains(v.name), "{args:?} does not list {}", v.name);
        }
    }
    let status_help = std::process::Command::new(common::bin())
        .args(["status", "--help"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&status_help.stdout).contains("JSON"),
        "status --help describes --json"
    );
    let ok = std::process::Command::new(common::bin())
        .arg("config")
        .env("DATABRICKS_TOKEN", "dapi-secret")
        .env("PAT_TOKEN_LIFETIME", "8")
        .env("PAT_ROTATION_INTERVAL", "4")
        .output()
        .unwrap();
    assert!(ok.status.success());
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        text.contains("(environment)")
            && text.contains("(default)")
            && !text.contains("dapi-secret")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manual_set_is_picked_up_at_once_not_at_the_next_wake_up() {
    let (emu, boot, dir, cfg) = Fixture::rejecting(0).await.into_parts();
    // Long lifetimes: the next planned wake-up is 5 minutes away, and a long HTTP timeout puts
    // the second orphan reap 43 s out; the first (retried 5 s after start) is let pass.
    let mut env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 900, 300, 2);
    env.set("PAT_HTTP_TIMEOUT", "20");
    env.set("PAT_WRITE_LOCK_WAIT", "25");
    let mut child = env.spawn_run(&dir.path().join("run.log"));
    assert!(status_becomes(&env.url("/readyz"), 200, Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let creates = emu.emulator.counters().creates;
    let (seeded, _) = emu
        .emulator
        .issue(Some(Duration::from_secs(3600)), "handed-over");
    let out = run_set(&env, seeded.expose(), false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The seeded token's expiry is unknown: the rotator replaces it within seconds, because
    // it watches the file, instead of at its next planned wake-up.
    let reader = Reader::new(&cfg, "DEFAULT").unwrap();
    let replaced = eventually(Duration::from_secs(3), async || {
        reader.token().unwrap().is_some_and(|t| t != seeded)
            && emu.emulator.counters().creates > creates
    })
    .await;
    assert!(replaced, "the rotator did not react to the manual write");
    assert!(status_becomes(&env.url("/readyz"), 200, Duration::from_secs(5)).await);
    stop(&mut child);
    emu.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_just_set_is_served_while_its_replacement_is_slow() {
    let (emu, boot, dir, cfg) = Fixture::rejecting(0).await.into_parts();
    let mut env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 60, 30, 2);
    let mut child = env.spawn_run(&dir.path().join("run.log"));
    assert!(status_becomes(&env.url("/readyz"), 200, Duration::from_secs(15)).await);
    let url = env.published_metadata_url();
    // The provider turns slow (slower than the rotator's 2 s timeout): the replacement of
    // the token set by hand cannot be minted for a while.
    let (seed, _) = emu.emulator.issue(Some(Duration::from_secs(600)), "seed");
    emu.emulator.set_faults(pat_rotator::emulator::Faults {
        latency_ms: 3000,
        ..Default::default()
    });
    let mut set = env.command(&["set"]);
    set.env("PAT_HTTP_TIMEOUT", "5")
        .env("PAT_WRITE_LOCK_WAIT", "6");
    let out = common::run_with_stdin(&mut set, seed.expose().as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resp = reqwest::Client::new()
        .get(&url)
        .header("X-Databricks-Metadata-Version", "1")
        .header("X-Databricks-Host", emu.url())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "the verified token is served");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["access_token"].as_str(), Some(seed.expose()));
    let expires_on = body["expires_on"].as_i64().unwrap();
    assert!(
        expires_on <= chrono::Utc::now().timestamp() + 2,
        "honest, short expires_on"
    );
    emu.emulator
        .set_faults(pat_rotator::emulator::Faults::default());
    stop(&mut child);
    emu.stop().await;
}

/// `status` tells the truth about who serves the file: a running rotator (its process alive
/// and answering), none after a clean stop (the control file removed), and an expired token
/// as expired. `token` names the missing file and `DATABRICKS_CONFIG_FILE`; `config` with a
/// bad variable prints the whole table with that row marked.
#[tokio::test(flavor = "multi_thread")]
async fn status_says_whether_a_rotator_serves_the_file_and_words_expiry_truthfully() {
    let (emu, boot, dir, cfg) = Fixture::rejecting(0).await.into_parts();
    let mut env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 8, 4, 1);
    let status_json = |env: &RotatorEnv| -> serde_json::Value {
        let out = env.command(&["status", "--json"]).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let mut child = env.spawn_run(&dir.path().join("run.log"));
    assert!(status_becomes(&env.url("/readyz"), 200, Duration::from_secs(15)).await);
    let running = status_json(&env);
    assert_eq!(running["rotator_running"], true, "{running}");
    assert_eq!(running["rotator_pid"], child.id());
    assert!(running["metadata_url"].is_string());

    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(25)).is_some_and(|s| s.success()));
    let control = PathBuf::from(format!("{}.control.json", cfg.display()));
    assert!(!control.exists(), "a clean stop removes the control file");
    let stopped = status_json(&env);
    assert_eq!(stopped["rotator_running"], false, "{stopped}");
    assert!(stopped["metadata_url"].is_null(), "no URL nobody serves");
    let text = env.command(&["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("none serves this file"), "{text}");

    // A control file left by a process that is gone (kill -9) is not believed either.
    let mut killed = env.spawn_run(&dir.path().join("run2.log"));
    assert!(status_becomes(&env.url("/readyz"), 200, Duration::from_secs(15)).await);
    sigkill(&mut killed);
    assert!(control.exists());
    assert_eq!(status_json(&env)["rotator_running"], false);

    // Past the token's expiry: "expired N s ago", never "-N s left".
    assert!(
        eventually(Duration::from_secs(15), async || status_json(&env)
            ["expired"]
            == true)
        .await
    );
    let text = env.command(&["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("expired") && text.contains("s ago"), "{text}");
    assert!(!text.contains("s left"), "{text}");

    // `token` never prints a token that is not live by the record: non-zero, nothing on stdout.
    let out = env.command(&["token"]).output().unwrap();
    assert!(
        !out.status.success(),
        "`token` succeeded with an expired token"
    );
    assert!(out.stdout.is_empty(), "`token` printed an expired token");

    // A config file readable by group or others is reported.
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let text = env.command(&["status"]).output().unwrap();
    let text =
        String::from_utf8_lossy(&text.stdout).to_string() + &String::from_utf8_lossy(&text.stderr);
    assert!(
        text.contains("chmod 600"),
        "no warning for a group-readable config: {text}"
    );
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let text = env.command(&["status"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&text.stdout).contains("chmod 600"));

    // In a directory others may write, a running rotator publishes no control file: status
    // says it cannot tell, never that none serves the file.
    let mode = |m: u32| std::os::unix::fs::PermissionsExt::from_mode(m);
    std::fs::set_permissions(dir.path(), mode(0o775)).unwrap();
    let mut grouped = env.spawn_run(&dir.path().join("run3.log"));
    assert!(status_becomes(&env.url("/readyz"), 200, Duration::from_secs(15)).await);
    let seen = status_json(&env);
    assert!(seen["rotator_running"].is_null(), "{seen}");
    let text = env.command(&["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("cannot be told here"), "{text}");
    assert!(!text.contains("none serves"), "{text}");
    sigterm(&grouped);
    assert!(wait_exit(&mut grouped, Duration::from_secs(25)).is_some_and(|s| s.success()));
    std::fs::set_permissions(dir.path(), mode(0o700)).unwrap();

    // `token` without a config file names it and the variable.
    let mut missing = env.command(&["token"]);
    missing.env(
        "DATABRICKS_CONFIG_FILE",
        dir.path().join("nowhere/databrickscfg"),
    );
    let out = missing.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("DATABRICKS_CONFIG_FILE") && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        !dir.path().join("nowhere").exists(),
        "reading created a directory"
    );

    // `config` with one bad variable: the whole table, the bad row marked.
    let mut bad = env.command(&["config"]);
    bad.env("PAT_TOKEN_LIFETIME", "abc");
    let out = bad.output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(78));
    let marked: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("<-- invalid"))
        .collect();
    assert_eq!(marked.len(), 1, "{table}");
    assert!(marked[0].starts_with("PAT_TOKEN_LIFETIME"));
    assert!(
        table.contains("PAT_ROTATION_INTERVAL"),
        "the rest of the table is there"
    );
    assert!(
        !table.contains(boot.expose()),
        "the bootstrap token is never shown"
    );
    emu.stop().await;
}

/// "Never revoke before an advertised `expires_on`": a long-lived SDK client trusts the
/// `expires_on` the metadata endpoint gave it and reuses the token until then. Every token
/// the endpoint handed out, with the latest `expires_on` it was advertised with, is compared
/// with the moment the emulator recorded its revocation.
#[tokio::test(flavor = "multi_thread")]
async fn no_token_is_revoked_before_the_expires_on_the_metadata_endpoint_advertised() {
    let (emu, boot, dir, cfg) = Fixture::rejecting(0).await.into_parts();
    // Lifetime 8, interval 4, grace 2: a rotation every 4 s, a revocation 3 s after each.
    let mut env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 8, 4, 2);
    let mut child = env.spawn_run(&dir.path().join("run.log"));
    assert!(status_becomes(&env.url("/readyz"), 200, Duration::from_secs(15)).await);
    let metadata = env.published_metadata_url();
    let http = reqwest::Client::new();
    // token -> the latest expires_on it was handed out with (epoch seconds).
    let mut advertised: std::collections::HashMap<String, i64> = Default::default();
    let until = Instant::now() + Duration::from_secs(24);
    while Instant::now() < until {
        let answer: serde_json::Value = http
            .get(&metadata)
            .header("X-Databricks-Metadata-Version", "1")
            .header("X-Databricks-Host", emu.url())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = answer["access_token"].as_str().unwrap().to_string();
        let expires_on = answer["expires_on"].as_i64().unwrap();
        let latest = advertised.entry(token).or_insert(expires_on);
        *latest = (*latest).max(expires_on);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past every advertised expires_on, so each revocation due has happened.
    tokio::time::sleep(Duration::from_secs(4)).await;
    sigterm(&child);
    wait_exit(&mut child, Duration::from_secs(10));
    let mut revoked = 0;
    for (token, expires_on) in &advertised {
        let record = emu.emulator.lookup(&Token::new(token.clone())).unwrap();
        if let Some(at) = record.revoked_at {
            revoked += 1;
            assert!(
                at.timestamp() >= *expires_on,
                "token {} revoked at {at}, before the expires_on {expires_on} it was handed out with",
                record.token_id
            );
        }
    }
    println!(
        "{} tokens handed out, {revoked} of them revoked",
        advertised.len()
    );
    // The check saw revocations: without them it would hold vacuously.
    assert!(revoked >= 2, "only {revoked} revoked tokens to check");
    emu.stop().await;
}

/// `status` and `token` are read-only: on a config path whose directory does not exist
/// they create neither the directory nor a lock file (`status` created both).
#[tokio::test(flavor = "multi_thread")]
async fn read_only_commands_leave_no_file_behind() {
    let (emu, boot, dir, _) = Fixture::rejecting(0).await.into_parts();
    let missing = dir.path().join("not-yet").join("databrickscfg");
    let env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &missing, 60, 30, 2);
    for args in [&["status"][..], &["status", "--json"], &["token"]] {
        let _ = env.command(args).output().unwrap();
        assert!(
            !dir.path().join("not-yet").exists(),
            "`{}` created the config directory",
            args.join(" ")
        );
    }
    // With the directory there, no lock file either.
    std::fs::create_dir(dir.path().join("not-yet")).unwrap();
    let _ = env.command(&["status"]).output().unwrap();
    let entries: Vec<_> = std::fs::read_dir(dir.path().join("not-yet"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(entries.is_empty(), "status left {entries:?}");
}

/// The config directory deleted and recreated under a running rotator: the token is written
/// back and the control file published again, so `status --json` still finds the URLs.
#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_directory_gets_the_token_and_the_control_file_back() {
    use std::os::unix::fs::DirBuilderExt;
    let (emu, boot, dir, _) = Fixture::rejecting(0).await.into_parts();
    let home = dir.path().join("home");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&home)
        .unwrap();
    let cfg = home.join("databrickscfg");
    let mut env = RotatorEnv::new(&emu.url(), Some(boot.expose()), &cfg, 60, 30, 2);
    let log = dir.path().join("run.log");
    let mut child = env.spawn_run(&log);
    let metadata = env.published_metadata_url();
    std::fs::remove_dir_all(&home).unwrap();
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&home)
        .unwrap();
    let start = std::time::Instant::now();
    let control = home.join("databrickscfg.control.json");
    while !(control.exists() && cfg.exists()) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(15),
            "not back within 15 s: {:?}",
            std::fs::read_dir(&home)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(env.published_metadata_url(), metadata);
    sigterm(&child);
    wait_exit(&mut child, std::time::Duration::from_secs(25));
}
