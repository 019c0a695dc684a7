//! The loop itself in paused tokio time: a day passes in milliseconds, against an
//! in-memory provider that rejects minting with a dead token, as Databricks does.

use super::*;
use crate::test_support::{paused_clock, FakeProvider, FakeToken};
use crate::Token;
use std::sync::atomic::Ordering;
use tokio_util::sync::CancellationToken;

fn setup(dir: &std::path::Path, extra: &[(&str, &str)]) -> (Shared, Arc<FakeProvider>) {
    let cfg = dir.join("databrickscfg").display().to_string();
    let mut vars = vec![
        ("DATABRICKS_HOST", "https://unit.example"),
        ("DATABRICKS_TOKEN", "boot"),
        ("DATABRICKS_CONFIG_FILE", cfg.as_str()),
        ("PAT_INSTANCE", "unit"),
    ];
    vars.extend_from_slice(extra);
    let config =
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap();
    let mut shared = Shared::new(config).unwrap();
    shared.clock = paused_clock();
    let provider = Arc::new(FakeProvider::new(shared.clock.clone()));
    (shared, provider)
}

async fn run_for(
    shared: &Shared,
    provider: &Arc<FakeProvider>,
    span: Duration,
    during: impl AsyncFnOnce(),
) {
    let cancel = CancellationToken::new();
    let rotator = Rotator::new(shared.clone(), provider.clone());
    let stop = cancel.clone();
    let task = tokio::spawn(async move { rotator.run(stop).await });
    during().await;
    tokio::time::sleep(span).await;
    cancel.cancel();
    task.await.unwrap();
}

pub(super) fn counter(shared: &Shared, name: &str) -> u64 {
    shared
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(start_paused = true)]
async fn a_day_idle_never_mints_with_a_dead_token_and_wakes_only_at_decision_points() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(dir.path(), &[]);
    run_for(
        &shared,
        &provider,
        Duration::from_secs(24 * 3600),
        async || {},
    )
    .await;
    let mints = provider.mints.load(Ordering::SeqCst);
    assert_eq!(
        provider.dead_auth.load(Ordering::SeqCst),
        0,
        "a mint or revoke used a dead token"
    );
    // Defaults: lifetime 900 s, forced window at 60 s left: one rotation every 840 s.
    assert!((100..=105).contains(&mints), "{mints} rotations in a day");
    // Idle: one skip at the interval tick per token, nothing in between.
    let skips = counter(&shared, "pat_rotator_skips_total");
    assert!(
        skips <= mints + 3,
        "{skips} skips for {mints} rotations: the loop polls"
    );
    // Old tokens were revoked after the grace period; only the current one is live.
    let live = provider
        .list(&Token::new("boot"))
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.comment == "pat-rotator:unit")
        .count();
    assert!(live <= 2, "{live} live tokens of this instance");
}

#[tokio::test(start_paused = true)]
async fn busy_rotates_on_the_interval_and_stops_when_the_session_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(dir.path(), &[]);
    let sessions = shared.sessions.clone();
    run_for(&shared, &provider, Duration::from_secs(3600), async || {
        let lease = sessions.open().unwrap();
        // Keep the lease alive for an hour, then let it go.
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            sessions.heartbeat(&lease.id);
        }
        sessions.close(&lease.id);
    })
    .await;
    let mints = provider.mints.load(Ordering::SeqCst);
    // One at start, then every 600 s for an hour (6), then every 840 s for an hour (4-5).
    assert!((10..=13).contains(&mints), "{mints} rotations");
    assert!(counter(&shared, "pat_rotator_rotations_total{reason=\"interval\"}") >= 5);
    assert!(
        counter(
            &shared,
            "pat_rotator_rotations_total{reason=\"forced_near_expiry\"}"
        ) >= 4
    );
    assert_eq!(provider.dead_auth.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_dead_file_token_recovers_through_the_bootstrap() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(dir.path(), &[]);
    provider.tokens.lock().unwrap().insert(
        "dead".into(),
        FakeToken {
            id: "dead".into(),
            expires_at: None,
            revoked: true,
            comment: String::new(),
            created: shared.now(),
        },
    );
    std::fs::write(&shared.store.paths().config, "[DEFAULT]\ntoken = dead\n").unwrap();
    run_for(&shared, &provider, Duration::from_secs(30), async || {}).await;
    let snap = shared.store.read().unwrap();
    assert!(snap
        .token
        .as_ref()
        .is_some_and(|t| t.expose().starts_with("tok-")));
    assert!(shared.readiness(&snap, shared.now()).is_ok());
}

fn is_revoked(provider: &FakeProvider, id: &str) -> bool {
    provider
        .tokens
        .lock()
        .unwrap()
        .values()
        .any(|t| t.id == id && t.revoked)
}

#[tokio::test(start_paused = true)]
async fn a_skewed_provider_clock_never_lets_the_token_die() {
    for skew_s in [-7200, -15, 15, 7200] {
        let dir = tempfile::tempdir().unwrap();
        let (shared, provider) = setup(
            dir.path(),
            &[("PAT_TOKEN_LIFETIME", "8"), ("PAT_ROTATION_INTERVAL", "4")],
        );
        *provider.skew.lock().unwrap() = TimeDelta::seconds(skew_s);
        run_for(&shared, &provider, Duration::from_secs(120), async || {}).await;
        let mints = provider.mints.load(Ordering::SeqCst);
        assert_eq!(
            provider.dead_auth.load(Ordering::SeqCst),
            0,
            "skew {skew_s}s: a dead token was used"
        );
        // Forced at 4 s left of 8: a rotation every ~4 s, not a mint-and-revoke storm.
        assert!((25..=35).contains(&mints), "skew {skew_s}s: {mints} mints");
        assert_eq!(
            counter(&shared, "pat_rotator_failures_total"),
            0,
            "skew {skew_s}s"
        );
        let snap = shared.store.read().unwrap();
        let left = snap.times().unwrap().expires_at - shared.now();
        assert!(
            left <= TimeDelta::seconds(8),
            "skew {skew_s}s: expiry after the truth"
        );
        let skew_metric = shared
            .metrics
            .encode()
            .lines()
            .find(|l| l.starts_with("pat_rotator_clock_skew_seconds "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap();
        assert!((skew_metric - skew_s as f64).abs() < 1.0, "{skew_metric}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_unwritable_state_mints_nothing_and_never_revokes_the_visible_token() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(
        dir.path(),
        &[
            ("PAT_TOKEN_LIFETIME", "60"),
            ("PAT_ROTATION_INTERVAL", "20"),
        ],
    );
    run_for(&shared, &provider, Duration::from_secs(1), async || {}).await;
    let visible = shared.store.read().unwrap().token.unwrap();
    let state = shared.store.paths().state.clone();
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir(&state).unwrap();
    let before = provider.mints.load(Ordering::SeqCst);
    run_for(&shared, &provider, Duration::from_secs(30), async || {}).await;
    assert_eq!(
        provider.mints.load(Ordering::SeqCst),
        before,
        "a token was minted that could not be written"
    );
    let snap = shared.store.read().unwrap();
    assert_eq!(snap.token.as_ref(), Some(&visible));
    let id = provider
        .tokens
        .lock()
        .unwrap()
        .get(visible.expose())
        .map(|t| t.id.clone())
        .unwrap();
    assert!(!is_revoked(&provider, &id), "the token on disk was revoked");
    assert!(shared.readiness(&snap, shared.now()).is_err());
    // The directory goes: rotation resumes within seconds.
    std::fs::remove_dir(&state).unwrap();
    run_for(&shared, &provider, Duration::from_secs(6), async || {}).await;
    assert!(provider.mints.load(Ordering::SeqCst) > before);
    let snap = shared.store.read().unwrap();
    assert!(shared.readiness(&snap, shared.now()).is_ok());
}

/// N2: a config file truncated to 0 bytes, then deleted, under a rotator that holds the
/// live token it minted seconds earlier: the token is written back (nothing minted, nothing
/// revoked) instead of "no token to authenticate with" for good (the bootstrap is dead).
#[tokio::test(start_paused = true)]
async fn a_config_file_that_lost_its_token_gets_the_live_one_back_without_a_mint() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(
        dir.path(),
        &[
            ("PAT_TOKEN_LIFETIME", "20"),
            ("PAT_ROTATION_INTERVAL", "8"),
            ("PAT_REVOKE_GRACE", "2"),
        ],
    );
    let config = shared.store.paths().config.clone();
    let live_in_file = || {
        let token = shared.store.read().unwrap().token.unwrap();
        (token.clone(), provider.check(&token).is_ok())
    };
    run_for(&shared, &provider, Duration::from_secs(60), async || {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Only the held token can save the file from now on.
        provider.revoke_out_of_band(&Token::new("boot"));
        let (minted, _) = live_in_file();
        let mints = provider.mints.load(Ordering::SeqCst);
        std::fs::write(&config, "").unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            live_in_file(),
            (minted.clone(), true),
            "truncated: written back"
        );
        std::fs::remove_file(&config).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(live_in_file(), (minted, true), "deleted: written back");
        assert_eq!(
            provider.mints.load(Ordering::SeqCst),
            mints,
            "nothing minted"
        );
    })
    .await;
    // And the rotation goes on from the restored token.
    let (_, live) = live_in_file();
    assert!(live);
    assert!(provider.mints.load(Ordering::SeqCst) >= 5);
    assert_eq!(provider.dead_auth.load(Ordering::SeqCst), 0);
    assert!(counter(&shared, "pat_rotator_restores_total") >= 2);
}

/// After a restart (nothing held), a deleted config file's recorded token is still revoked
/// once a token minted with the bootstrap replaces it.
#[tokio::test(start_paused = true)]
async fn a_deleted_config_file_still_gets_its_token_revoked_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("PAT_TOKEN_LIFETIME", "600"),
        ("PAT_ROTATION_INTERVAL", "300"),
        ("PAT_REVOKE_GRACE", "2"),
    ];
    let (shared, provider) = setup(dir.path(), &vars);
    run_for(&shared, &provider, Duration::from_secs(1), async || {}).await;
    let recorded = shared.store.read().unwrap().state.token_id.unwrap();
    std::fs::remove_file(&shared.store.paths().config).unwrap();
    let (mut restarted, _) = setup(dir.path(), &vars);
    restarted.clock = shared.clock.clone();
    run_for(&restarted, &provider, Duration::from_secs(30), async || {}).await;
    let snap = restarted.store.read().unwrap();
    assert_ne!(snap.state.token_id.as_deref(), Some(recorded.as_str()));
    assert!(
        is_revoked(&provider, &recorded),
        "the token of the deleted file lives on at the provider"
    );
}

/// N1: a token revoked out of band is detected by the periodic check (every threshold)
/// while nothing else calls, is no longer served, and is replaced with another live
/// credential (here the bootstrap) at once, not at the next forced window.
#[tokio::test(start_paused = true)]
async fn a_token_revoked_out_of_band_is_replaced_within_one_check_period() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(
        dir.path(),
        &[
            ("PAT_TOKEN_LIFETIME", "60"),
            ("PAT_ROTATION_INTERVAL", "30"),
        ],
    );
    run_for(&shared, &provider, Duration::from_secs(40), async || {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let revoked = shared.store.read().unwrap().token.unwrap();
        provider.revoke_out_of_band(&revoked);
        // Within one check period (the 30 s threshold) the file holds a live token again.
        tokio::time::sleep(Duration::from_secs(31)).await;
        let now_on_disk = shared.store.read().unwrap().token.unwrap();
        assert_ne!(now_on_disk, revoked, "the revoked token is still on disk");
        assert!(provider.check(&now_on_disk).is_ok());
        let view = shared.view().await.unwrap();
        assert!(shared.servable_until(&view, shared.now()).is_ok());
    })
    .await;
    assert_eq!(
        counter(&shared, "pat_rotator_rotations_total{reason=\"revoked\"}"),
        1
    );
    assert_eq!(counter(&shared, "pat_rotator_rejected_tokens_total"), 1);
}

/// A relayed 401/403 (the proxy) makes the loop check the current token at once; a dead
/// one is no longer served from that moment.
#[tokio::test(start_paused = true)]
async fn a_relayed_rejection_is_checked_at_once_and_a_dead_token_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(dir.path(), &[]);
    run_for(&shared, &provider, Duration::from_secs(5), async || {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let token = shared.store.read().unwrap().token.unwrap();
        assert!(provider.check(&token).is_ok());
        // No other credential: the dead token cannot be replaced, and must not be served.
        provider.revoke_out_of_band(&Token::new("boot"));
        provider.revoke_out_of_band(&token);
        provider.dead_auth.store(0, Ordering::SeqCst);
        shared.suspect_current().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let view = shared.view().await.unwrap();
        assert_eq!(
            shared.servable_until(&view, shared.now()),
            Err(crate::shared::NotServable::Rejected)
        );
        assert!(shared.readiness(&view.snap, shared.now()).is_err());
    })
    .await;
}

/// A token this instance minted, `lifetime_s` from expiry, on disk with its record.
async fn minted_on_disk(shared: &Shared, provider: &FakeProvider, lifetime_s: u64) {
    let lifetime = Duration::from_secs(lifetime_s);
    let minted = provider
        .mint(
            &Token::new("boot"),
            lifetime,
            &crate::provider::Owner::single("pat-rotator", "unit"),
        )
        .await
        .unwrap();
    let now = shared.now();
    let expires_at = now + TimeDelta::from_std(lifetime).unwrap();
    let r = crate::store::Rotation::new(minted.info.token_id.clone(), expires_at, "unit");
    shared
        .store
        .swap(
            None,
            &minted.token,
            None,
            Duration::from_secs(1),
            Some(&r),
            &|| now,
        )
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_rotation_due_at_start_goes_before_orphan_reaping() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(dir.path(), &[]);
    // Started inside the forced window (30 s left, threshold 60 s), with reaping due too: a
    // lease holder that just took over is in this position, and listing tokens first (slow
    // under provider latency) spends the window.
    minted_on_disk(&shared, &provider, 30).await;
    provider.calls.lock().unwrap().clear();
    run_for(&shared, &provider, Duration::from_secs(5), async || {}).await;
    let calls = provider.calls.lock().unwrap().clone();
    assert_eq!(calls.first(), Some(&"mint"), "{calls:?}");
    assert!(calls.contains(&"list"), "reaping never ran: {calls:?}");
}

#[tokio::test(start_paused = true)]
async fn a_token_expired_by_our_record_is_never_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(dir.path(), &[]);
    // As after a long SIGSTOP: the file's token expired a minute ago by our record.
    let now = shared.now();
    provider.tokens.lock().unwrap().insert(
        "stale".into(),
        FakeToken {
            id: "stale".into(),
            expires_at: Some(now - TimeDelta::seconds(60)),
            revoked: false,
            comment: "pat-rotator:unit".into(),
            created: now - TimeDelta::seconds(960),
        },
    );
    let stale = Token::new("stale");
    let seeded = now - TimeDelta::seconds(960);
    let r = crate::store::Rotation::new("stale", now - TimeDelta::seconds(60), "unit");
    shared
        .store
        .swap(
            None,
            &stale,
            None,
            Duration::from_secs(1),
            Some(&r),
            &|| seeded,
        )
        .unwrap();
    run_for(&shared, &provider, Duration::from_secs(5), async || {}).await;
    assert_eq!(
        provider.dead_auth.load(Ordering::SeqCst),
        0,
        "the expired token was sent"
    );
    let snap = shared.store.read().unwrap();
    assert!(shared.readiness(&snap, shared.now()).is_ok());
}

#[tokio::test(start_paused = true)]
async fn status_judges_readiness_with_the_services_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let (service, provider) = setup(
        dir.path(),
        &[
            ("PAT_TOKEN_LIFETIME", "50"),
            ("PAT_ROTATION_INTERVAL", "20"),
        ],
    );
    run_for(&service, &provider, Duration::from_secs(15), async || {}).await;
    // `status` with the caller's defaults: interval 600, threshold 60 > the 35 s left.
    let (status, _) = setup(dir.path(), &[]);
    let snap = status.store.read().unwrap();
    assert!(snap.times().unwrap().expires_at - service.now() < TimeDelta::seconds(60));
    assert_eq!(
        status.readiness(&snap, service.now()),
        service.readiness(&snap, service.now())
    );
    assert!(status.readiness(&snap, service.now()).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_pending_revocation_naming_a_foreign_token_never_revokes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(
        dir.path(),
        &[
            ("PAT_TOKEN_LIFETIME", "120"),
            ("PAT_ROTATION_INTERVAL", "60"),
        ],
    );
    let now = shared.now();
    let foreign = [
        // Another program's token.
        ("victim", "victim-app"),
        // One with no comment at all.
        ("uncommented", ""),
        // The same prefix, another instance: a neighbour's (or a sibling's) token.
        ("neighbour", "pat-rotator:other-host-1234abcd"),
    ];
    for (id, comment) in foreign {
        provider.tokens.lock().unwrap().insert(
            format!("{id}-value"),
            FakeToken {
                id: id.into(),
                expires_at: Some(now + TimeDelta::seconds(3600)),
                revoked: false,
                comment: comment.into(),
                created: now,
            },
        );
    }
    shared
        .store
        .update_state(Duration::from_secs(1), |st| {
            for (id, _) in foreign {
                st.queue_revocation(crate::store::PendingRevocation {
                    token_id: id.into(),
                    token_sha256: Token::new(id).sha256_hex(),
                    not_before: now,
                    expires_at: None,
                    pod_local: false,
                    seed: false,
                });
            }
        })
        .unwrap();
    run_for(&shared, &provider, Duration::from_secs(300), async || {}).await;
    let tokens = provider.tokens.lock().unwrap();
    for (id, _) in foreign {
        assert!(!tokens[&format!("{id}-value")].revoked, "{id} was revoked");
    }
    // Our own replaced tokens were revoked: the loop did revoke, just not those.
    let ours_revoked = tokens
        .values()
        .filter(|t| t.comment == "pat-rotator:unit" && t.revoked)
        .count();
    assert!(ours_revoked >= 2, "{ours_revoked} of our tokens revoked");
    drop(tokens);
    let pending: Vec<String> = shared
        .store
        .read()
        .unwrap()
        .state
        .pending_revocations
        .into_iter()
        .map(|p| p.token_id)
        .collect();
    assert!(
        !pending.contains(&"victim".to_string()) && !pending.contains(&"uncommented".to_string()),
        "entries naming tokens no rotator minted are dropped: {pending:?}"
    );
    assert!(
        pending.contains(&"neighbour".to_string()),
        "another rotator's entry is left pending for its owner: {pending:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn with_the_token_dead_the_first_retry_comes_within_seconds_of_the_provider_recovering() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(
        dir.path(),
        &[
            ("PAT_TOKEN_LIFETIME", "120"),
            ("PAT_ROTATION_INTERVAL", "60"),
        ],
    );
    let cancel = CancellationToken::new();
    let rotator = Rotator::new(shared.clone(), provider.clone());
    let stop = cancel.clone();
    let task = tokio::spawn(async move { rotator.run(stop).await });
    // Healthy long enough for both orphan reaps to be done (nothing else wakes the loop).
    tokio::time::sleep(Duration::from_secs(200)).await;
    // A long outage: the token on disk dies, and an uncapped backoff reaches minutes.
    provider.outage.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(30 * 60)).await;
    let before = provider.mints.load(Ordering::SeqCst);
    provider.outage.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mints = provider.mints.load(Ordering::SeqCst) - before;
    cancel.cancel();
    task.await.unwrap();
    assert!(mints >= 1, "no mint within 11 s of the provider's recovery");
}

/// libfaketime's step, in paused time: the provider keeps the true time, the rotator's wall
/// clock jumps.
async fn run_with_a_clock_step(step_s: i64) -> (Shared, Arc<FakeProvider>, Vec<bool>) {
    let dir = tempfile::tempdir().unwrap();
    let (mut shared, _) = setup(
        dir.path(),
        &[
            ("PAT_TOKEN_LIFETIME", "24"),
            ("PAT_ROTATION_INTERVAL", "12"),
        ],
    );
    let truth = paused_clock();
    let provider = Arc::new(FakeProvider::new(truth.clone()));
    let (clock, step) = crate::test_support::steppable_clock();
    shared.clock = clock;
    let cancel = CancellationToken::new();
    let rotator = Rotator::new(shared.clone(), provider.clone());
    let stop = cancel.clone();
    let task = tokio::spawn(async move { rotator.run(stop).await });
    // The first rotation, then the step 2 s later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(provider.mints.load(Ordering::SeqCst), 1);
    step.store(step_s * 1000, Ordering::SeqCst);
    // Every 500 ms for 60 s: is the token on disk live at the provider, and does the
    // metadata rule serve it?
    let mut served = Vec::new();
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let snap = shared.store.read().unwrap();
        let token = snap.token.clone().unwrap();
        let live = provider
            .tokens
            .lock()
            .unwrap()
            .get(token.expose())
            .is_some_and(|t| !t.revoked && t.expires_at.is_none_or(|e| e > truth()));
        assert!(live, "the token on disk is dead at the provider");
        served.push(shared.servable(&snap, shared.now()).is_ok());
    }
    cancel.cancel();
    task.await.unwrap();
    (shared, provider, served)
}

#[tokio::test(start_paused = true)]
async fn a_wall_clock_step_back_never_postpones_the_forced_rotation() {
    let (shared, provider, served) = run_with_a_clock_step(-30).await;
    assert_eq!(provider.dead_auth.load(Ordering::SeqCst), 0);
    // Forced at 12 s left of 24: one rotation every ~12 s, the step notwithstanding.
    let mints = provider.mints.load(Ordering::SeqCst);
    assert!(mints >= 5, "{mints} mints in 62 s");
    assert!(
        served.iter().all(|s| *s),
        "a live token was refused to readers"
    );
    assert!(counter(&shared, "pat_rotator_clock_steps_total") >= 1);
}

#[tokio::test(start_paused = true)]
async fn a_wall_clock_step_forward_never_declares_a_live_token_dead() {
    let (shared, provider, served) = run_with_a_clock_step(120).await;
    assert_eq!(provider.dead_auth.load(Ordering::SeqCst), 0);
    assert!(
        served.iter().all(|s| *s),
        "a token the provider accepts was refused to readers: {served:?}"
    );
    assert!(counter(&shared, "pat_rotator_clock_steps_total") >= 1);
    let status = shared.status();
    assert!(!status.terminal_failure, "{:?}", status.last_error);
}

proptest::proptest! {
    /// "Expiry on our clock, never later than the truth": whatever the provider's clock
    /// (skew either way) and however long the request took to reach it (the answer's way
    /// back does not enter: only the send time does), the expiry recorded from one create is no later than the moment the token
    /// really dies, on our clock, and early by at most the request's own latency.
    #[test]
    fn the_recorded_expiry_is_never_later_than_the_truth(
        skew_s in -600i64..600,
        to_provider_ms in 0i64..30_000,
        lifetime_s in 1i64..86_400,
        expires in proptest::bool::ANY,
    ) {
        let sent_at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        // When the provider created the token, on our clock, and on its own.
        let created_ours = sent_at + TimeDelta::milliseconds(to_provider_ms);
        let created_theirs = created_ours + TimeDelta::seconds(skew_s);
        let info = crate::provider::TokenInfo {
            token_id: "t".into(),
            creation_time: created_theirs,
            expires_at: expires.then(|| created_theirs + TimeDelta::seconds(lifetime_s)),
            comment: String::new(),
        };
        let recorded = rotation::local_expiry(sent_at, &info, Duration::from_secs(lifetime_s as u64));
        let truth = created_ours + TimeDelta::seconds(lifetime_s);
        proptest::prop_assert!(recorded <= truth, "recorded {recorded} after the truth {truth}");
        proptest::prop_assert!(truth - recorded <= TimeDelta::milliseconds(to_provider_ms));
    }
}

/// `/healthz` tells a stuck loop from a sleeping one: healthy while the loop waits for its
/// wake-up, unhealthy once it is stuck (a mint that never returns) well past it.
#[tokio::test(start_paused = true)]
async fn healthz_is_unhealthy_when_the_loop_is_stuck_past_its_wake_up() {
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(
        dir.path(),
        &[
            ("PAT_TOKEN_LIFETIME", "600"),
            ("PAT_ROTATION_INTERVAL", "60"),
        ],
    );
    let health = |shared: Shared| async move {
        let answer = crate::server::public_router(shared)
            .oneshot(
                axum::http::Request::get("/healthz")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        answer.status().as_u16()
    };
    let cancel = CancellationToken::new();
    let rotator = Rotator::new(shared.clone(), provider.clone());
    let stop = cancel.clone();
    let task = tokio::spawn(async move { rotator.run(stop).await });
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(provider.mints.load(Ordering::SeqCst), 1);
    assert_eq!(
        health(shared.clone()).await,
        200,
        "a sleeping loop is healthy"
    );
    // The forced rotation (at 540 s) hangs for good.
    provider.hang.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        health(shared.clone()).await,
        200,
        "not yet past the allowance"
    );
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(health(shared.clone()).await, 503, "a stuck loop is healthy");
    cancel.cancel();
    task.abort();
}

/// The file store, except that another writer puts `foreign` in the config file (once it is
/// a regular file) just before this rotator takes the rotation lock: the loop decided to
/// rotate on what it read, and finds another's token once it holds the lock.
struct AnotherWriterFirst {
    inner: crate::store::Store,
    foreign: std::sync::Mutex<Option<(Token, crate::store::Rotation)>>,
}

impl CredentialStore for AnotherWriterFirst {
    type Version = <crate::store::Store as CredentialStore>::Version;

    forward_to_inner!();
    fn try_rotation<'a, T: Send + 'a>(
        &'a self,
        work: futures_util::future::BoxFuture<'a, T>,
    ) -> futures_util::future::BoxFuture<'a, Result<Option<T>, StoreError>> {
        // Only once the config path is a regular file again.
        let regular = std::fs::symlink_metadata(&self.inner.paths().config)
            .is_ok_and(|m| m.file_type().is_file());
        let foreign = regular
            .then(|| self.foreign.lock().unwrap().take())
            .flatten();
        if let Some((token, rotation)) = foreign {
            self.inner
                .swap(
                    None,
                    &token,
                    None,
                    Duration::from_secs(1),
                    Some(&rotation),
                    &chrono::Utc::now,
                )
                .unwrap();
        }
        CredentialStore::try_rotation(&self.inner, work)
    }
    fn version(&self) -> Self::Version {
        CredentialStore::version(&self.inner)
    }
    async fn changed(&self) {
        CredentialStore::changed(&self.inner).await
    }
}

/// A FIFO at the config path fails the loop terminally (not ready); a regular file put
/// back, then completed by another writer while the loop was deciding to rotate, must make
/// it ready again at once, not at the next planned decision (the adopted token was good;
/// the hostile test saw readiness stuck at 503 for the rest of the interval).
#[tokio::test(start_paused = true)]
async fn a_token_adopted_after_a_terminal_failure_makes_the_loop_ready_again() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(dir.path(), &[]);
    let config = shared.store.paths().config.clone();
    let c = std::ffi::CString::new(config.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let expires_at = shared.now() + TimeDelta::hours(1);
    // A token the provider knows: a token it rejects is known dead and never served.
    provider.tokens.lock().unwrap().insert(
        "written-by-another".into(),
        FakeToken {
            id: "another".into(),
            expires_at: Some(expires_at),
            revoked: false,
            comment: String::new(),
            created: shared.now(),
        },
    );
    let store = AnotherWriterFirst {
        inner: shared.store.clone(),
        foreign: std::sync::Mutex::new(Some((
            Token::new("written-by-another"),
            crate::store::Rotation::new("another", expires_at, "another"),
        ))),
    };
    let rotator = Rotator::with_store(shared.clone(), provider.clone(), store);
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let task = tokio::spawn(async move { rotator.run(stop).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        shared.status().terminal_failure,
        "the FIFO fails terminally"
    );
    // A regular file back, without a token yet: the loop decides to rotate.
    std::fs::remove_file(&config).unwrap();
    std::fs::write(&config, "[DEFAULT]\n").unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let snap = shared.store.read().unwrap();
    assert_eq!(snap.token, Some(Token::new("written-by-another")));
    assert_eq!(
        provider.mints.load(Ordering::SeqCst),
        0,
        "adopted, not minted"
    );
    assert_eq!(shared.readiness(&snap, shared.now()), Ok(()));
    cancel.cancel();
    task.await.unwrap();
}

/// The file store as a replica that is not the cluster store's lease holder sees it: the
/// rotation lock is always elsewhere (`try_rotation` answers "busy", each call counted, as
/// each costs the cluster store a read of the Secret) and reaping is not its job, until
/// `holder` is set and the version changes.
struct Bystander {
    inner: crate::store::Store,
    holder: Arc<std::sync::atomic::AtomicBool>,
    became_holder: Arc<tokio::sync::Notify>,
    attempts: Arc<std::sync::atomic::AtomicUsize>,
}

impl CredentialStore for Bystander {
    type Version = (<crate::store::Store as CredentialStore>::Version, bool);

    forward_to_inner!();
    fn try_rotation<'a, T: Send + 'a>(
        &'a self,
        work: futures_util::future::BoxFuture<'a, T>,
    ) -> futures_util::future::BoxFuture<'a, Result<Option<T>, StoreError>> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.holder.load(Ordering::SeqCst) {
            CredentialStore::try_rotation(&self.inner, work)
        } else {
            Box::pin(async { Ok(None) })
        }
    }
    fn version(&self) -> Self::Version {
        (
            CredentialStore::version(&self.inner),
            self.holder.load(Ordering::SeqCst),
        )
    }
    async fn changed(&self) {
        tokio::select! {
            _ = CredentialStore::changed(&self.inner) => {}
            _ = self.became_holder.notified() => {}
        }
    }
    fn reaps_here(&self) -> bool {
        self.holder.load(Ordering::SeqCst)
    }
}

/// A replica that is not the lease holder asked for the rotation lock every 5 s to reap
/// orphans it may not reap (the holder does, for every replica): a read of the Secret each
/// time, about 12 a minute per replica, forever. It now reaps only once it holds the lease.
#[tokio::test(start_paused = true)]
async fn a_replica_that_does_not_reap_never_asks_to_and_reaps_once_it_may() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(dir.path(), &[]);
    // A token an hour from expiry: nothing to rotate in the ten minutes below.
    minted_on_disk(&shared, &provider, 3600).await;
    let store = Bystander {
        inner: shared.store.clone(),
        holder: Arc::default(),
        became_holder: Arc::default(),
        attempts: Arc::default(),
    };
    let (holder, became_holder, attempts) = (
        store.holder.clone(),
        store.became_holder.clone(),
        store.attempts.clone(),
    );
    provider.calls.lock().unwrap().clear();
    let rotator = Rotator::with_store(shared.clone(), provider.clone(), store);
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let task = tokio::spawn(async move { rotator.run(stop).await });
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        0,
        "a replica that may not reap asked for the rotation lock"
    );
    holder.store(true, Ordering::SeqCst);
    became_holder.notify_waiters();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = provider.calls.lock().unwrap().clone();
    assert!(
        calls.contains(&"list"),
        "the new holder did not reap: {calls:?}"
    );
    cancel.cancel();
    task.await.unwrap();
}

/// `PAT_REVOKE_SEED`: the seed in the file is revoked after the grace when it is the one
/// live token no pat-rotator minted (a sibling rotator's token does not make it ambiguous),
/// and left alone when the user holds another such token.
#[tokio::test(start_paused = true)]
async fn a_seed_is_revoked_after_the_grace_only_when_it_can_be_told_apart() {
    for users_own_token in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (shared, provider) = setup(dir.path(), &[("PAT_REVOKE_SEED", "true")]);
        let mut extra = vec![("sibling", "pat-rotator:other")];
        if users_own_token {
            extra.push(("laptop", "my laptop"));
        }
        for (id, comment) in extra {
            provider.tokens.lock().unwrap().insert(
                id.into(),
                FakeToken {
                    id: id.into(),
                    expires_at: None,
                    revoked: false,
                    comment: comment.into(),
                    created: shared.now(),
                },
            );
        }
        std::fs::write(&shared.store.paths().config, "[DEFAULT]\ntoken = boot\n").unwrap();
        run_for(&shared, &provider, Duration::from_secs(120), async || {}).await;
        assert!(provider.mints.load(Ordering::SeqCst) >= 1);
        assert_eq!(
            is_revoked(&provider, "boot"),
            !users_own_token,
            "users_own_token={users_own_token}"
        );
        assert!(!is_revoked(&provider, "sibling"));
        assert!(!is_revoked(&provider, "laptop"));
    }
}

/// The file store, except that under the rotation lock another writer's token is already in
/// the file and a swap of this rotator's own could not be written (a full disk, say).
struct AdoptableButFull {
    inner: crate::store::Store,
}

impl CredentialStore for AdoptableButFull {
    type Version = <crate::store::Store as CredentialStore>::Version;

    forward_to_inner!(except snapshot_for_swap);
    async fn snapshot_for_swap(&self) -> Result<crate::store::ForSwap, StoreError> {
        let expires_at = chrono::Utc::now() + TimeDelta::hours(1);
        let rotation = crate::store::Rotation::new("another", expires_at, "another");
        self.inner.swap(
            None,
            &Token::new("written-by-another"),
            None,
            Duration::from_secs(1),
            Some(&rotation),
            &chrono::Utc::now,
        )?;
        Ok(crate::store::ForSwap {
            snapshot: self.inner.read()?,
            writable: Err(StoreError::Io {
                action: "create a file in",
                path: self.inner.paths().config.clone(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            }),
        })
    }
    fn try_rotation<'a, T: Send + 'a>(
        &'a self,
        work: futures_util::future::BoxFuture<'a, T>,
    ) -> futures_util::future::BoxFuture<'a, Result<Option<T>, StoreError>> {
        CredentialStore::try_rotation(&self.inner, work)
    }
    fn version(&self) -> Self::Version {
        CredentialStore::version(&self.inner)
    }
    async fn changed(&self) {
        CredentialStore::changed(&self.inner).await
    }
}

/// A rotator that finds another's token under the rotation lock adopts it, even where its
/// own swap could not be written: the adoption is checked before the refusal, so a full
/// disk on this side never turns a good token written by a sibling into a failure.
#[tokio::test(start_paused = true)]
async fn another_writers_token_is_adopted_even_where_a_swap_would_be_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(dir.path(), &[]);
    let store = AdoptableButFull {
        inner: shared.store.clone(),
    };
    let rotator = Rotator::with_store(shared.clone(), provider.clone(), store);
    let outcome = rotator.once(true).await;
    assert!(
        matches!(outcome, Ok(Some(RotationOutcome::Adopted))),
        "{outcome:?}"
    );
    assert_eq!(provider.mints.load(Ordering::SeqCst), 0);
}

/// N4: a provider that grants 5 s of the 20 asked: each token is used and replaced at half
/// its grant (with a warning), instead of being revoked as too short while the current one
/// dies.
#[tokio::test(start_paused = true)]
async fn a_shorter_grant_than_asked_is_used_and_the_token_never_dies() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(
        dir.path(),
        &[("PAT_TOKEN_LIFETIME", "20"), ("PAT_ROTATION_INTERVAL", "8")],
    );
    provider.max_lifetime_s.store(5, Ordering::SeqCst);
    run_for(&shared, &provider, Duration::from_millis(100), async || {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for _ in 0..120 {
            let token = shared.store.read().unwrap().token;
            let live = token.as_ref().is_some_and(|t| provider.check(t).is_ok());
            assert!(live, "no live token in the file at {}", shared.now());
            let view = shared.view().await.unwrap();
            assert!(shared.servable_until(&view, shared.now()).is_ok());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    assert_eq!(counter(&shared, "pat_rotator_failures_total"), 0);
    assert_eq!(provider.dead_auth.load(Ordering::SeqCst), 0);
    // One token every 2.5 s for a minute, not a storm.
    let mints = provider.mints.load(Ordering::SeqCst);
    assert!((20..=30).contains(&mints), "{mints} mints");
}

/// N3: the wall clock steps back 30 s and the rotator restarts. The state's expiry was
/// written on the old clock, so on the new one it looks 30 s later than the truth; the
/// restarted rotator plans with the provider's own record instead (its time left), and
/// the token never dies. Before: expired from 17 s to 40 s after the restart.
#[tokio::test(start_paused = true)]
async fn a_restart_after_a_clock_step_back_plans_with_the_providers_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("PAT_TOKEN_LIFETIME", "60"),
        ("PAT_ROTATION_INTERVAL", "20"),
    ];
    let (shared, _) = setup(dir.path(), &vars);
    // The provider keeps true time; the rotators' wall clock is the one that steps.
    let provider = Arc::new(FakeProvider::new(paused_clock()));
    run_for(&shared, &provider, Duration::from_secs(5), async || {}).await;
    let (clock, step) = crate::test_support::steppable_clock();
    step.store(-30_000, Ordering::SeqCst);
    let (mut restarted, _) = setup(dir.path(), &vars);
    restarted.clock = clock;
    run_for(
        &restarted,
        &provider,
        Duration::from_millis(100),
        async || {
            for _ in 0..120 {
                let token = restarted.store.read().unwrap().token.unwrap();
                assert!(
                    provider.check(&token).is_ok(),
                    "the file holds a dead token"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        },
    )
    .await;
    assert_eq!(provider.dead_auth.load(Ordering::SeqCst), 0);
}

/// With `PAT_REVOKE_SEED` on, a state record flagged as the seed that names another
/// rotator's token (by its comment at the provider) never gets it revoked: the other-rotator
/// rule comes before the seed flag.
#[tokio::test(start_paused = true)]
async fn a_seed_flag_never_revokes_another_rotators_token() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, provider) = setup(dir.path(), &[("PAT_REVOKE_SEED", "true")]);
    run_for(&shared, &provider, Duration::from_secs(1), async || {}).await;
    let now = shared.now();
    provider.tokens.lock().unwrap().insert(
        "neighbours".into(),
        FakeToken {
            id: "neighbours-id".into(),
            expires_at: Some(now + TimeDelta::hours(1)),
            revoked: false,
            comment: "pat-rotator:another-instance".into(),
            created: now,
        },
    );
    let path = shared.store.paths().state.clone();
    let mut state: crate::store::State =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    state
        .pending_revocations
        .push(crate::store::PendingRevocation {
            token_id: "neighbours-id".into(),
            token_sha256: Token::new("neighbours").sha256_hex(),
            not_before: now - TimeDelta::seconds(60),
            expires_at: Some(now + TimeDelta::hours(1)),
            pod_local: false,
            seed: true,
        });
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    run_for(&shared, &provider, Duration::from_secs(30), async || {}).await;
    assert!(
        !is_revoked(&provider, "neighbours-id"),
        "another rotator's token was revoked as a seed"
    );
}

/// A slow provider is no clock skew: the provider stamped the token somewhere between our
/// send and our receipt, so half the round trip either way is explained.
#[test]
fn a_slow_round_trip_is_not_a_clock_skew() {
    let sent = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let received = sent + TimeDelta::seconds(12);
    // Stamped at once, answered 12 s later: -6 s from the midpoint, all of it the trip.
    let skew = TimeDelta::seconds(-6);
    assert_eq!(
        rotation::unexplained_skew(skew, sent, received),
        TimeDelta::zero()
    );
    // A real 10 s skew over a 1 s trip is still 9.5 s.
    assert_eq!(
        rotation::unexplained_skew(TimeDelta::seconds(10), sent, sent + TimeDelta::seconds(1)),
        TimeDelta::milliseconds(9_500)
    );
}
