//! OAuth with the real binary and the embedded emulator: M2M keeps a live access token and
//! its secret goes nowhere; `login` stores a U2M refresh token; a rotator killed while its
//! refresh is on the wire never gets the refresh token replayed; `invalid_grant` is
//! terminal, bounded and counted.

mod common;

use common::{sigkill, start_emulator, RotatorEnv};
use pat_rotator::emulator::{Faults, OAuthSettings, Options, ReplayPolicy, RunningEmulator};
use pat_rotator::Token;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// An emulator whose access tokens live `access_ttl_s`, single-use refresh tokens, and a
/// replay that revokes the whole login.
async fn emulator(access_ttl_s: u64) -> RunningEmulator {
    start_emulator(Options {
        oauth: OAuthSettings {
            access_ttl_s,
            ..OAuthSettings::default()
        },
        ..Options::default()
    })
    .await
    .0
}

/// A rotator of `cfg` keeping `credential` (interval 2 s: refreshes at 2 s left).
fn oauth_env(emu: &RunningEmulator, cfg: &Path, credential: &str) -> RotatorEnv {
    let mut env = RotatorEnv::new(&emu.url(), None, cfg, 20, 2, 1);
    env.set("PAT_CREDENTIAL", credential);
    env.unset("PAT_TOKEN_LIFETIME");
    env.unset("PAT_REVOKE_GRACE");
    env.set("PAT_LOGIN_PORT", &common::free_port().to_string());
    env
}

async fn status_code(url: &str) -> u16 {
    reqwest::get(url)
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn wait_ready(env: &RotatorEnv, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if status_code(&env.url("/readyz")).await == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn file_token(cfg: &Path) -> Option<Token> {
    let text = std::fs::read_to_string(cfg).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("token = "))
        .map(|t| Token::new(t.trim()))
}

fn state_json(cfg: &Path) -> serde_json::Value {
    let path = format!("{}.pat-rotator.json", cfg.display());
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default())
        .unwrap_or(serde_json::Value::Null)
}

/// `pat-rotator login`, with this process as the browser: it opens the printed URL and
/// follows the redirect back to the login's loopback port.
async fn log_in(env: &RotatorEnv) {
    use std::io::BufRead;
    let mut child = env
        .command(&["login", "--wait", "30"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let url = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("http"))
    })
    .await
    .unwrap()
    .expect("login printed no URL on a line of its own");
    assert!(url.contains("code_challenge_method=S256") && url.contains("client_id=databricks-cli"));
    let answer = reqwest::get(&url).await.unwrap();
    assert_eq!(answer.status().as_u16(), 200, "the redirect was not served");
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.status.success(),
        "login failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

/// M2M: the file always holds a live access token, refreshed before it dies, and the client
/// secret is in no file, log line, or hook environment.
#[tokio::test]
async fn m2m_keeps_a_live_access_token_and_its_secret_goes_nowhere() {
    let emu = emulator(6).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("databrickscfg");
    let (client_id, secret) = emu.emulator.m2m_client();
    let mut env = oauth_env(&emu, &cfg, "oauth-m2m");
    env.set("DATABRICKS_CLIENT_ID", &client_id);
    env.set("DATABRICKS_CLIENT_SECRET", secret.expose());
    let hook_env = dir.path().join("hook-env");
    env.set(
        "PAT_ON_ROTATE",
        &format!("sh -c 'env >> {}'", hook_env.display()),
    );
    let log = dir.path().join("run.log");
    let mut child = env.spawn_run(&log);
    assert!(
        wait_ready(&env, Duration::from_secs(10)).await,
        "never ready"
    );
    let start = Instant::now();
    let mut seen = std::collections::HashSet::new();
    while start.elapsed() < Duration::from_secs(16) {
        let token = file_token(&cfg).expect("a token in the file");
        let rec = emu
            .emulator
            .lookup(&token)
            .expect("a token the workspace issued");
        assert!(
            rec.oauth && rec.is_live(emu.emulator.now()),
            "the file holds a dead token"
        );
        seen.insert(token.sha256_hex());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sigkill(&mut child);
    let counters = emu.emulator.counters();
    assert!(
        seen.len() >= 3,
        "{} access tokens in 16 s of 6 s ones",
        seen.len()
    );
    assert_eq!(counters.dead_token_requests, 0);
    assert_eq!(counters.creates, 0, "a PAT was minted");
    let mut texts = vec![
        std::fs::read_to_string(&cfg).unwrap(),
        std::fs::read_to_string(&log).unwrap(),
        state_json(&cfg).to_string(),
    ];
    let hooked = std::fs::read_to_string(&hook_env).expect("the hook ran");
    assert!(hooked.contains("PAT_TOKEN_FINGERPRINT="));
    texts.push(hooked);
    for t in texts {
        assert!(
            !t.contains(secret.expose()),
            "the client secret leaked: {t}"
        );
    }
    assert!(
        !std::fs::read_to_string(&cfg).unwrap().contains("client_id"),
        "the profile must hold the token alone"
    );
    emu.stop().await;
}

async fn start_u2m(emu: &RunningEmulator, cfg: &Path, log: &Path) -> (RotatorEnv, Child) {
    let mut env = oauth_env(emu, cfg, "oauth-u2m");
    log_in(&env).await;
    let state = state_json(cfg);
    assert!(state["login"]["refresh_token"].is_string());
    let child = env.spawn_run(log);
    (env, child)
}

/// `kill -9` while the refresh is on the wire (the workspace exchanged the refresh token;
/// the answer never arrived): the refresh token may be spent, so it is never sent again,
/// by the restarted rotator or anyone; the login is reported lost, not ready; a new login
/// brings it back. Under both replay rules a workspace may have: a replay revokes the whole
/// login, or is only refused.
#[tokio::test]
async fn a_rotator_killed_mid_refresh_never_gets_its_refresh_token_replayed() {
    killed_mid_refresh(ReplayPolicy::RevokeFamily).await;
}

#[tokio::test]
async fn a_rotator_killed_mid_refresh_never_replays_where_a_replay_is_only_refused() {
    killed_mid_refresh(ReplayPolicy::Reject).await;
}

async fn killed_mid_refresh(replay: ReplayPolicy) {
    let emu = emulator(6).await;
    emu.emulator.set_oauth_settings(OAuthSettings {
        replay,
        ..emu.emulator.oauth_settings()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("databrickscfg");
    let log = dir.path().join("run.log");
    let (mut env, mut child) = start_u2m(&emu, &cfg, &log).await;
    assert!(
        wait_ready(&env, Duration::from_secs(10)).await,
        "never ready"
    );
    // The next refresh is exchanged at once and answered 3 s later: kill -9 in between.
    let exchanged = emu.emulator.counters().oauth.refreshes;
    emu.emulator.set_faults(Faults {
        latency_ms: 3000,
        ..Faults::default()
    });
    let start = Instant::now();
    while emu.emulator.counters().oauth.refreshes == exchanged {
        assert!(start.elapsed() < Duration::from_secs(15), "no refresh came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sigkill(&mut child);
    let _ = child.wait();
    emu.emulator.set_faults(Faults::default());
    assert!(
        state_json(&cfg)["login"]["in_flight"].is_object(),
        "the claim was not durable before the send"
    );
    let sent = emu.emulator.counters().oauth.token_requests;
    let mut restarted = env.spawn_run(&log);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = emu.emulator.counters().oauth;
    assert_eq!(after.replays, 0, "the refresh token was replayed");
    assert_eq!(after.family_revocations, 0);
    assert_eq!(
        after.token_requests, sent,
        "something was sent with a possibly spent refresh token"
    );
    assert_eq!(status_code(&env.url("/readyz")).await, 503);
    let status = env.command(&["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(
        status["login"]["lost"]
            .as_str()
            .is_some_and(|w| w.contains("never recorded its answer")),
        "{status}"
    );
    // Log in again: the running rotator picks it up by itself.
    log_in(&env).await;
    assert!(
        wait_ready(&env, Duration::from_secs(10)).await,
        "not ready after a new login"
    );
    sigkill(&mut restarted);
    assert_eq!(emu.emulator.counters().oauth.replays, 0);
    emu.stop().await;
}

/// A login revoked by an admin: one refused refresh, then nothing sent for the rest of the
/// run; not ready; the series the alert watches counts it.
#[tokio::test]
async fn invalid_grant_is_terminal_bounded_and_counted() {
    let emu = emulator(6).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("databrickscfg");
    let log = dir.path().join("run.log");
    let (env, mut child) = start_u2m(&emu, &cfg, &log).await;
    assert!(
        wait_ready(&env, Duration::from_secs(10)).await,
        "never ready"
    );
    emu.emulator.revoke_logins();
    let before = emu.emulator.counters().oauth;
    // Within one check period the rotator learns its token is dead and refreshes once.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let after = emu.emulator.counters().oauth;
    let requests = after.token_requests - before.token_requests;
    assert!(
        requests <= 1,
        "{requests} token requests in 20 s after invalid_grant (at most 1)"
    );
    assert_eq!(status_code(&env.url("/readyz")).await, 503);
    let metrics = env.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "pat_rotator_oauth_logins_lost_total 1"),
        "{metrics}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("pat-rotator login"),
        "the log never says what to do"
    );
    sigkill(&mut child);
    emu.stop().await;
}
