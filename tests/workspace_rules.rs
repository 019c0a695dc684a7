//! A workspace's rules about tokens met by the real binary on the emulator: a maximum token
//! lifetime is learned and asked for, the token quota gets this instance's orphans reaped
//! and one more try (never a loop of mints), and the token permission taken away leaves the
//! service not ready with what to do, bounded, until a working token appears.

mod common;

use common::{sigkill, Fixture, RotatorEnv};
use pat_rotator::emulator::{Options, Rules};
use std::path::Path;
use std::time::{Duration, Instant};

async fn readyz(env: &RotatorEnv) -> u16 {
    reqwest::get(env.url("/readyz"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn becomes(env: &RotatorEnv, code: u16, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if readyz(env).await == code {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn seeded(fx: &Fixture) {
    std::fs::write(
        &fx.cfg,
        format!(
            "[DEFAULT]\nhost = {}\ntoken = {}\n",
            fx.emu.url(),
            fx.boot.expose()
        ),
    )
    .unwrap();
}

fn state(cfg: &Path) -> serde_json::Value {
    let path = format!("{}.pat-rotator.json", cfg.display());
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default())
        .unwrap_or(serde_json::Value::Null)
}

/// An admin's maximum lifetime below PAT_TOKEN_LIFETIME: the refusal is read, the maximum is
/// asked for from then on (said once in the log, recorded for `status`), the token lives.
#[tokio::test(flavor = "multi_thread")]
async fn a_maximum_token_lifetime_is_learned_and_asked_for() {
    let fx = Fixture::new(Options {
        rules: Rules {
            max_lifetime_s: Some(12),
            ..Rules::default()
        },
        ..Options::default()
    })
    .await;
    seeded(&fx);
    let mut env = RotatorEnv::new(&fx.emu.url(), None, &fx.cfg, 30, 4, 1);
    let log = fx.dir.path().join("run.log");
    let mut child = env.spawn_run(&log);
    assert!(
        becomes(&env, 200, Duration::from_secs(10)).await,
        "never ready"
    );
    // Three lifetimes of 12 s.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let minted: Vec<_> = fx
        .emu
        .emulator
        .tokens()
        .into_iter()
        .filter(|t| t.comment.starts_with("pat-rotator:"))
        .collect();
    assert!(minted.len() >= 3, "{} tokens minted", minted.len());
    for t in &minted {
        let lifetime = (t.expires_at.unwrap() - t.created_at).num_seconds();
        assert_eq!(lifetime, 12, "asked for {lifetime} s");
    }
    assert_eq!(readyz(&env).await, 200);
    assert_eq!(state(&fx.cfg)["max_lifetime_s"], 12);
    let status = env.command(&["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["max_token_lifetime_s"], 12, "{status}");
    sigkill(&mut child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("caps token lifetime").count(),
        1,
        "not said exactly once:\n{text}"
    );
    assert_eq!(fx.emu.emulator.counters().dead_token_requests, 0);
}

/// The quota full of this instance's orphans: they are reaped and the mint is tried once
/// more. Full of other tokens: one more try, then a terminal error naming the quota, the
/// live token still served, and no loop of creates.
#[tokio::test(flavor = "multi_thread")]
async fn the_token_quota_gets_orphans_reaped_and_one_more_try_never_a_loop() {
    const QUOTA: usize = 6;
    let fx = Fixture::new(Options {
        rules: Rules {
            token_quota: QUOTA,
            ..Rules::default()
        },
        ..Options::default()
    })
    .await;
    seeded(&fx);
    let mut env = RotatorEnv::new(&fx.emu.url(), None, &fx.cfg, 20, 4, 1);
    let log = fx.dir.path().join("run.log");
    let mut child = env.spawn_run(&log);
    assert!(
        becomes(&env, 200, Duration::from_secs(10)).await,
        "never ready"
    );
    // After the start's reaps: orphans of this instance (`itest`) fill the quota.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let live = fx.emu.emulator.counters().live_tokens as usize;
    for _ in live..QUOTA {
        fx.emu
            .emulator
            .issue(Some(Duration::from_secs(3600)), "pat-rotator:itest");
    }
    let first = std::fs::read_to_string(&fx.cfg).unwrap();
    // The next rotation (16 s after the first) meets the full quota.
    let start = Instant::now();
    while std::fs::read_to_string(&fx.cfg).unwrap() == first {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no rotation past the full quota"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(readyz(&env).await, 200);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("quota is reached"), "{text}");

    // Now the quota is full of someone else's tokens (once the replaced token is revoked,
    // after the grace).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let live = fx.emu.emulator.counters().live_tokens as usize;
    for _ in live..QUOTA {
        fx.emu
            .emulator
            .issue(Some(Duration::from_secs(3600)), "someone else");
    }
    let creates = fx.emu.emulator.counters().creates;
    let served = std::fs::read_to_string(&fx.cfg).unwrap();
    assert!(
        becomes(&env, 503, Duration::from_secs(25)).await,
        "still ready past the quota"
    );
    let body = reqwest::get(env.url("/readyz"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("quota"),
        "{body}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    // The live token is kept (it dies at its expiry: nothing can replace it).
    assert_eq!(
        std::fs::read_to_string(&fx.cfg).unwrap(),
        served,
        "the live token was not kept"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tried = fx.emu.emulator.counters().creates - creates;
    // A rotation: one create, one after reaping; retried no sooner than every 30 s (a
    // revocation of our own may wake the loop once).
    assert!(tried <= 4, "{tried} creates against a full quota");
    sigkill(&mut child);
    assert_eq!(fx.emu.emulator.counters().dead_token_requests, 0);
}

/// The token permission taken away (every token of the user revoked, creates refused): not
/// ready, saying what to do, bounded; a working token set by hand brings it back.
#[tokio::test(flavor = "multi_thread")]
async fn the_token_permission_taken_away_is_not_ready_bounded_and_recovers() {
    let fx = Fixture::new(Options::default()).await;
    seeded(&fx);
    let mut env = RotatorEnv::new(&fx.emu.url(), None, &fx.cfg, 20, 4, 1);
    let log = fx.dir.path().join("run.log");
    let mut child = env.spawn_run(&log);
    assert!(
        becomes(&env, 200, Duration::from_secs(10)).await,
        "never ready"
    );
    fx.emu.emulator.set_rules(Rules {
        tokens_permitted: false,
        ..Rules::default()
    });
    let before = fx.emu.emulator.counters().requests;
    assert!(
        becomes(&env, 503, Duration::from_secs(10)).await,
        "still ready with every token revoked"
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    let requests = fx.emu.emulator.counters().requests - before;
    assert!(
        requests <= 12,
        "{requests} requests in 20 s with every credential dead"
    );
    let body = reqwest::get(env.url("/readyz"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("permission") && body.contains("oauth-m2m"),
        "{body}"
    );
    // The admin gives the permission back and a working token is set: ready within seconds.
    fx.emu.emulator.set_rules(Rules::default());
    let (fresh, _) = fx
        .emu
        .emulator
        .issue(Some(Duration::from_secs(3600)), "by hand");
    let out = common::run_with_stdin(&mut env.command(&["set"]), fresh.expose().as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        becomes(&env, 200, Duration::from_secs(10)).await,
        "did not recover"
    );
    sigkill(&mut child);
}
