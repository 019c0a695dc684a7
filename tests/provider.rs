//! The Databricks client against the embedded emulator: every error class, both
//! `error_code` forms, size caps, malformed answers, the timed-out-create reconcile path,
//! and the emulator's own expiry, revocation and quota rules.

mod common;

use axum::routing::{get, post};
use pat_rotator::backoff::Backoff;
use pat_rotator::emulator::{Faults, Options, TOKEN_QUOTA};
use pat_rotator::provider::{Databricks, Owner, Provider, ProviderError, RetryPolicy};
use pat_rotator::Token;
use std::time::Duration;

fn one_attempt() -> RetryPolicy {
    RetryPolicy {
        backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(50)),
        max_attempts: 1,
    }
}

use common::start_emulator as start;

#[tokio::test]
async fn mint_list_verify_revoke_round_trip() {
    let (emu, boot) = start(Options::default()).await;
    let client = Databricks::new(&emu.url(), Duration::from_secs(5), one_attempt()).unwrap();
    let minted = client
        .mint(
            &boot,
            Duration::from_secs(60),
            &Owner::single("pat-rotator", "test"),
        )
        .await
        .unwrap();
    assert_eq!(minted.info.comment, "pat-rotator:test");
    let left = minted.info.expires_at.unwrap() - minted.info.creation_time;
    assert_eq!(left.num_seconds(), 60);
    assert_eq!(
        client.verify(&minted.token).await.unwrap(),
        pat_rotator::emulator::USER_NAME
    );
    let ids: Vec<String> = client
        .list(&minted.token)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.token_id)
        .collect();
    assert!(ids.contains(&minted.info.token_id));
    client.retire(&boot, &minted.info.token_id).await.unwrap();
    // A revoked token is rejected with the numeric error_code body, and counted.
    match client.verify(&minted.token).await {
        Err(ProviderError::InvalidToken {
            status: 403,
            message,
        }) => assert_eq!(message, "Invalid access token."),
        other => panic!("expected 403, got {other:?}"),
    }
    assert_eq!(emu.emulator.counters().revoked_token_requests, 1);
    // Deleting it again: 404 RESOURCE_DOES_NOT_EXIST (string error_code).
    assert!(matches!(
        client.retire(&boot, &minted.info.token_id).await,
        Err(ProviderError::NotFound { .. })
    ));
    emu.stop().await;
}

#[tokio::test]
async fn raw_error_bodies_match_databricks() {
    let (emu, _boot) = start(Options::default()).await;
    let http = reqwest::Client::new();
    let none = http
        .get(format!("{}/api/2.0/token/list", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status().as_u16(), 401);
    let body: serde_json::Value = none.json().await.unwrap();
    assert_eq!(body["error_code"], 401);
    let bad = http
        .get(format!("{}/api/2.0/token/list", emu.url()))
        .bearer_auth("dapi-made-up")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 403);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error_code": 403, "message": "Invalid access token."})
    );
    emu.stop().await;
}

/// Only the emulator's clock moves: a token of 60 s leaves the test a minute of real time
/// between the mint and the first check (a 3 s token did not, on a loaded machine).
#[tokio::test]
async fn expired_and_expiring_tokens_are_rejected_and_counted() {
    let (emu, boot) = start(Options {
        reject_expiring_within: 2,
        ..Options::default()
    })
    .await;
    let client = Databricks::new(&emu.url(), Duration::from_secs(5), one_attempt()).unwrap();
    let minted = client
        .mint(
            &boot,
            Duration::from_secs(60),
            &Owner::single("pat-rotator", "c"),
        )
        .await
        .unwrap();
    assert!(client.verify(&minted.token).await.is_ok());
    // Into the last 2 s of the 60 s lifetime...
    emu.emulator.advance(Duration::from_millis(58_500));
    match client.verify(&minted.token).await {
        Err(ProviderError::InvalidToken { message, .. }) => {
            assert!(message.contains("expiring within"), "{message}")
        }
        other => panic!("expected the Azure-style expiring rejection, got {other:?}"),
    }
    // ...then past its end.
    emu.emulator.advance(Duration::from_millis(2000));
    assert!(matches!(
        client.verify(&minted.token).await,
        Err(ProviderError::InvalidToken { .. })
    ));
    let c = emu.emulator.counters();
    assert_eq!(
        (c.expiring_token_requests, c.expired_token_requests),
        (1, 1)
    );
    assert_eq!(emu.emulator.events().len(), 2);
    emu.stop().await;
}

#[tokio::test]
async fn quota_is_600_live_tokens() {
    let (emu, boot) = start(Options::default()).await;
    for _ in 0..TOKEN_QUOTA - 1 {
        emu.emulator.issue(Some(Duration::from_secs(600)), "filler");
    }
    let client = Databricks::new(&emu.url(), Duration::from_secs(5), one_attempt()).unwrap();
    assert!(matches!(
        client
            .mint(
                &boot,
                Duration::from_secs(60),
                &Owner::single("pat-rotator", "c")
            )
            .await,
        Err(ProviderError::QuotaExceeded { .. })
    ));
    emu.stop().await;
}

#[tokio::test]
async fn injected_faults_classify_and_retry_after_is_read() {
    let (emu, boot) = start(Options::default()).await;
    let client = Databricks::new(&emu.url(), Duration::from_secs(5), one_attempt()).unwrap();
    emu.emulator.set_faults(Faults {
        error_rate: 1.0,
        error_status: 429,
        retry_after: Some(7),
        ..Faults::default()
    });
    assert!(
        matches!(client.list(&boot).await, Err(ProviderError::RateLimited { retry_after: Some(d) }) if d == Duration::from_secs(7))
    );
    emu.emulator.set_faults(Faults {
        error_rate: 1.0,
        error_status: 500,
        ..Faults::default()
    });
    assert!(matches!(
        client.list(&boot).await,
        Err(ProviderError::Server { status: 500, .. })
    ));
    emu.emulator.set_faults(Faults {
        outage_seconds: Some(60),
        ..Faults::default()
    });
    assert!(matches!(
        client.list(&boot).await,
        Err(ProviderError::Server { status: 503, .. })
    ));
    emu.stop().await;
}

/// Retries get through a fault that clears: a workspace that answers 503 twice, then the
/// list; the client makes exactly three requests and returns the list.
#[tokio::test]
async fn two_failures_then_success_is_retried_through() {
    common::install_crypto();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let count = served.clone();
    let app = axum::Router::new().route(
        "/api/2.0/token/list",
        get(move || {
            let count = count.clone();
            async move {
                let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n < 2 {
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "{}".to_string(),
                    )
                } else {
                    (
                        axum::http::StatusCode::OK,
                        r#"{"token_infos": []}"#.to_string(),
                    )
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let retrying = Databricks::new(
        &format!("http://{addr}"),
        Duration::from_secs(5),
        RetryPolicy {
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(20)),
            max_attempts: 3,
        },
    )
    .unwrap();
    let listed = retrying.list(&Token::new("x")).await;
    assert!(listed.is_ok_and(|l| l.is_empty()));
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 3);
    // With one attempt fewer it gives up on the second 503.
    served.store(0, std::sync::atomic::Ordering::SeqCst);
    let two = Databricks::new(
        &format!("http://{addr}"),
        Duration::from_secs(5),
        RetryPolicy {
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(20)),
            max_attempts: 2,
        },
    )
    .unwrap();
    assert!(matches!(
        two.list(&Token::new("x")).await,
        Err(ProviderError::Server { status: 503, .. })
    ));
}

#[tokio::test]
async fn network_errors_and_timeouts_are_typed() {
    common::install_crypto();
    let port = common::free_port();
    let client = Databricks::new(
        &format!("http://127.0.0.1:{port}"),
        Duration::from_secs(2),
        one_attempt(),
    )
    .unwrap();
    assert!(matches!(
        client.list(&Token::new("x")).await,
        Err(ProviderError::Network(_))
    ));
    let (emu, boot) = start(Options::default()).await;
    emu.emulator.set_faults(Faults {
        latency_ms: 1500,
        ..Faults::default()
    });
    let impatient = Databricks::new(&emu.url(), Duration::from_millis(300), one_attempt()).unwrap();
    assert!(matches!(
        impatient.list(&boot).await,
        Err(ProviderError::Timeout(_))
    ));
    emu.stop().await;
}

#[tokio::test]
async fn a_create_that_timed_out_is_reconciled_so_nothing_leaks() {
    let (emu, boot) = start(Options::default()).await;
    // The first create is slow *after* minting: the client gives up, the server keeps the token.
    emu.emulator.set_faults(Faults {
        latency_ms: 1500,
        latency_requests: Some(1),
        ..Faults::default()
    });
    let client = Databricks::new(
        &emu.url(),
        Duration::from_millis(700),
        RetryPolicy {
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(20)),
            max_attempts: 3,
        },
    )
    .unwrap();
    let minted = client
        .mint(
            &boot,
            Duration::from_secs(60),
            &Owner::single("pat-rotator", "reconcile"),
        )
        .await
        .unwrap();
    let c = emu.emulator.counters();
    assert_eq!(c.creates, 2, "one timed-out create, one retry");
    let now = chrono::Utc::now();
    let live: Vec<_> = emu
        .emulator
        .tokens()
        .into_iter()
        .filter(|t| t.comment == "pat-rotator:reconcile" && t.is_live(now))
        .collect();
    assert_eq!(
        live.len(),
        1,
        "the orphan of the timed-out create must be revoked: {live:?}"
    );
    assert_eq!(live[0].token_id, minted.info.token_id);
    emu.stop().await;
}

#[tokio::test]
async fn oversized_and_malformed_answers_are_errors() {
    common::install_crypto();
    let huge = "x".repeat(pat_rotator::provider::MAX_BODY_BYTES + 10);
    let app = axum::Router::new()
        .route(
            "/api/2.0/token/list",
            get(move || async move { huge.clone() }),
        )
        .route(
            "/api/2.0/token/create",
            post(|| async {
                axum::Json(serde_json::json!({"token_value": "v", "token_info": {"token_id": "a"}}))
            }),
        )
        .route(
            "/api/2.0/preview/scim/v2/Me",
            get(|| async { "<html>not json</html>" }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = Databricks::new(
        &format!("http://{addr}"),
        Duration::from_secs(5),
        one_attempt(),
    )
    .unwrap();
    let t = Token::new("x");
    assert!(
        matches!(client.list(&t).await, Err(ProviderError::Malformed(m)) if m.contains("larger than"))
    );
    assert!(
        matches!(client.mint(&t, Duration::from_secs(60), &Owner::single("pat-rotator", "c")).await, Err(ProviderError::Malformed(m)) if m.contains("creation_time"))
    );
    assert!(matches!(
        client.verify(&t).await,
        Err(ProviderError::Malformed(_))
    ));
}

#[tokio::test]
async fn a_token_no_header_can_carry_is_an_invalid_credential_not_a_network_error() {
    let (emu, _) = start(Options::default()).await;
    let client = Databricks::new(&emu.url(), Duration::from_secs(2), one_attempt()).unwrap();
    for bad in ["dapi\nabc", "dapi\u{7}abc", "dapi\rX-Injected: 1"] {
        let err = client
            .mint(
                &Token::new(bad),
                Duration::from_secs(60),
                &Owner::single("pat-rotator", "c"),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProviderError::InvalidToken { .. }),
            "{bad:?}: {err:?}"
        );
        assert!(!err.to_string().contains("dapi"), "{err}");
    }
    emu.stop().await;
}

#[tokio::test]
async fn the_emulator_answers_the_sdk_discovery_probe() {
    let (emu, _) = start(Options::default()).await;
    let resp = reqwest::get(format!("{}/.well-known/databricks-config", emu.url()))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["oidc_endpoint"].as_str().unwrap().ends_with("/oidc"));
    assert_eq!(
        body["workspace_id"],
        pat_rotator::emulator::EMULATED_WORKSPACE_ID
    );
    emu.stop().await;
}

/// A create answered after the HTTP timeout is retried: the minted token reports the send
/// time of the request that produced it, so the skew measured from it is the clocks' (zero
/// here, one machine), not the first attempt's wait (a false skew of a whole timeout).
#[tokio::test]
async fn a_retried_create_reports_the_send_time_of_the_request_that_produced_it() {
    let (emu, boot) = start(Options::default()).await;
    emu.emulator.set_faults(Faults {
        latency_ms: 5_000,
        latency_requests: Some(1),
        ..Faults::default()
    });
    let retrying = RetryPolicy {
        backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(50)),
        max_attempts: 3,
    };
    let client = Databricks::new(&emu.url(), Duration::from_secs(2), retrying).unwrap();
    let first_sent = chrono::Utc::now();
    let minted = client
        .mint(
            &boot,
            Duration::from_secs(60),
            &Owner::single("pat-rotator", "skew"),
        )
        .await
        .unwrap();
    let received = chrono::Utc::now();
    // The first attempt timed out after 2 s; the token came from a later one.
    assert!(
        minted.sent_at - first_sent >= chrono::TimeDelta::milliseconds(1_900),
        "sent_at is the first attempt's: {} after the start",
        minted.sent_at - first_sent
    );
    // One clock (the emulator runs in this process): the token was created after the
    // request that produced it was sent and before its answer came back. From the first
    // attempt's send time, the skew would be off by a whole timeout however fast the machine.
    let (created, sent) = (minted.info.creation_time, minted.sent_at);
    let ms = chrono::TimeDelta::milliseconds(1);
    assert!(
        sent <= created + ms && created <= received + ms,
        "created at {created}, outside the successful attempt ({sent} to {received})"
    );
    emu.stop().await;
}

/// The seam's view of ownership against the real token API: each listed token's origin as
/// one rotator sees it, and a seed found by elimination only while it is the one token no
/// pat-rotator minted.
#[tokio::test]
async fn held_tokens_carry_their_origin_and_a_seed_is_identified_only_when_certain() {
    use pat_rotator::provider::{Identified, Origin};
    let (emu, boot) = start(Options::default()).await;
    let client = Databricks::new(&emu.url(), Duration::from_secs(5), one_attempt()).unwrap();
    let me = Owner {
        family: "pat-rotator".into(),
        instance: "ns/app".into(),
        owned: vec!["ns/app".into(), "ns/app/pod-0".into()],
    };
    let hour = Duration::from_secs(3600);
    let mine = client.mint(&boot, hour, &me).await.unwrap();
    let pod_local = Owner {
        instance: "ns/app/pod-0".into(),
        ..me.clone()
    };
    let pods = client.mint(&boot, hour, &pod_local).await.unwrap();
    let sibling = client
        .mint(&boot, hour, &Owner::single("pat-rotator", "other"))
        .await
        .unwrap();
    let held = client.held(&mine.token, &me).await.unwrap();
    let origin = |id: &str| {
        held.iter()
            .find(|h| h.info.token_id == id)
            .map(|h| h.origin)
    };
    assert_eq!(origin(&mine.info.token_id), Some(Origin::ThisInstance));
    assert_eq!(origin(&pods.info.token_id), Some(Origin::Owned));
    assert_eq!(origin(&sibling.info.token_id), Some(Origin::AnotherRotator));
    let boot_id = emu.emulator.lookup(&boot).unwrap().token_id;
    assert_eq!(origin(&boot_id), Some(Origin::Foreign));

    match client.identify(&boot, &mine, &me).await.unwrap() {
        Identified::Found(info) => assert_eq!(info.token_id, boot_id),
        other => panic!("the seed is the one foreign token: {other:?}"),
    }
    // A second token no rotator minted (the user's own): the seed can no longer be told.
    emu.emulator.issue(None, "my laptop");
    assert!(matches!(
        client.identify(&boot, &mine, &me).await.unwrap(),
        Identified::Ambiguous(2)
    ));
    emu.stop().await;
}

/// A token's time left by the provider's own record and clock (`token/list` against the
/// answer's `Date`): what a restart plans with. The emulator's clock moves, not the test's.
#[tokio::test]
async fn time_left_comes_from_the_providers_record_and_its_date() {
    let (emu, boot) = start(Options::default()).await;
    let client = Databricks::new(&emu.url(), Duration::from_secs(5), one_attempt()).unwrap();
    let minted = client
        .mint(
            &boot,
            Duration::from_secs(600),
            &Owner::single("pat-rotator", "c"),
        )
        .await
        .unwrap();
    emu.emulator.advance(Duration::from_secs(200));
    let left = client
        .time_left(&minted.token, &minted.info.token_id)
        .await
        .unwrap()
        .expect("a PAT with an expiry has time left");
    // 400 s by the provider's clock, less up to 2 s for `Date`'s whole seconds and the margin.
    assert!(
        (Duration::from_secs(397)..=Duration::from_secs(400)).contains(&left),
        "{left:?}"
    );
    assert_eq!(
        client.time_left(&minted.token, "no-such-id").await.unwrap(),
        None
    );
    emu.stop().await;
}
