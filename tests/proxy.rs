//! The authenticating proxy as a client that knows only a base URL uses it: the real binary
//! against the embedded emulator, across rotations, with streams.

mod common;

use common::{Fixture, Running};
use futures_util::StreamExt;
use pat_rotator::emulator::Options;
use std::time::{Duration, Instant};

/// A ready rotator with the proxy on, and the proxy's URL as a user finds it.
struct Proxied {
    r: Running,
    proxy_url: String,
}

async fn start(lifetime: u64, interval: u64, grace: u64) -> Proxied {
    let fixture = Fixture::new(Options::default()).await;
    let mut env = fixture.rotator(lifetime, interval, grace);
    env.set(
        "PAT_PROXY_LISTEN",
        &format!("127.0.0.1:{}", common::free_port()),
    );
    let r = fixture.start(env).await;
    let out = r.env.command(&["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let proxy_url = status["proxy_url"]
        .as_str()
        .expect("status --json shows proxy_url")
        .to_string();
    Proxied { r, proxy_url }
}

impl std::ops::Deref for Proxied {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.r
    }
}

/// Reads a server-sent-event stream, returning each event's data and when it arrived.
async fn read_events(resp: reqwest::Response) -> Vec<(String, Instant, i64)> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let (now, wall) = (Instant::now(), chrono::Utc::now().timestamp_millis());
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event
                .trim()
                .strip_prefix("data: ")
                .unwrap_or("")
                .to_string();
            out.push((data, now, wall));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_and_streams_through_the_proxy_survive_rotations() {
    let r = start(10, 5, 2).await;
    let http = reqwest::Client::new();
    let creates_before = r.emu.emulator.counters().creates;

    // A slow stream, one chunk every 2 s for 30 s, relayed chunk by chunk...
    let slow = {
        let (http, url) = (
            http.clone(),
            format!("{}serving-endpoints/chat/completions", r.proxy_url),
        );
        tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth("dummy-key-the-proxy-replaces")
                .json(&serde_json::json!({
                    "model": "databricks-claude",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": true,
                    "x_emulator_chunks": 15,
                    "x_emulator_interval_ms": 2000,
                }))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            read_events(resp).await
        })
    };
    // ...while curl-style calls go through every 100 ms across the rotations.
    let (mut calls, mut failures) = (0, Vec::new());
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(31) {
        let resp = http
            .get(format!(
                "{}api/2.0/preview/scim/v2/Me?attributes=userName",
                r.proxy_url
            ))
            .header("Authorization", "Bearer stale-key")
            .send()
            .await
            .unwrap();
        calls += 1;
        if resp.status().as_u16() != 200 {
            failures.push(format!(
                "{} {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = slow.await.unwrap();
    let rotations = r.emu.emulator.counters().creates - creates_before;
    println!(
        "proxy: {calls} calls across {rotations} rotations, {} stream events",
        events.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // The stream and the calls crossed rotations (a structural floor, not a rate).
    assert!(rotations >= 2, "only {rotations} rotations");
    assert_eq!(
        events.len(),
        17,
        "15 content chunks, the finish chunk and [DONE]"
    );
    assert_eq!(events.last().unwrap().0, "[DONE]");
    // Each chunk reached the client before the emulator sent the next one (2 s later): the
    // proxy relays chunk by chunk, whatever the load on the machine.
    let sent_at = |data: &str| {
        serde_json::from_str::<serde_json::Value>(data).unwrap()["x_emulator_sent_at_ms"]
            .as_i64()
            .unwrap()
    };
    for pair in events[..15].windows(2) {
        let (received_ms, next_sent) = (pair[0].2, sent_at(&pair[1].0));
        assert!(
            received_ms < next_sent,
            "a chunk reached the client only after the next one was sent: the proxy buffers"
        );
    }
    let first = events[0].1;
    assert!(
        events[14].1 - first >= Duration::from_secs(26),
        "chunks arrived together"
    );
    assert_eq!(r.emu.emulator.counters().dead_token_requests, 0);
    // The proxy's log holds neither a token nor the capability in its URL.
    let capability = r
        .proxy_url
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("");
    assert!(capability.len() >= 32, "{}", r.proxy_url);
    let log = std::fs::read_to_string(r.dir.path().join("run.log")).unwrap();
    common::assert_no_secrets("the proxy's log", &log, &[capability]);
    // The scan can fail: a line with a token value, or with the capability, is caught.
    for bad in [
        "token=dapi0123456789abcdef0123456789abcdef".to_string(),
        format!("GET /{capability}/api"),
    ] {
        let caught = std::panic::catch_unwind(|| {
            common::assert_no_secrets("a planted line", &bad, &[capability])
        });
        assert!(caught.is_err(), "the scan missed a planted secret");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn what_the_local_surface_refuses_is_never_forwarded() {
    let r = start(60, 30, 2).await;
    let before = r.emu.emulator.counters().serving_requests;
    let port: u16 = r
        .proxy_url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let path = r
        .proxy_url
        .trim_start_matches(&format!("http://127.0.0.1:{port}"))
        .to_string();
    let chat = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let http = reqwest::Client::new();
    let send = |url: String, headers: Vec<(&'static str, String)>| {
        let mut req = http.post(url).json(&chat);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send()
    };
    let base = format!("http://127.0.0.1:{port}");
    let wrong = format!(
        "{base}/{}/serving-endpoints/chat/completions",
        "0".repeat(64)
    );
    assert_eq!(send(wrong, vec![]).await.unwrap().status().as_u16(), 404);
    let no_secret = format!("{base}/serving-endpoints/chat/completions");
    assert_eq!(
        send(no_secret, vec![]).await.unwrap().status().as_u16(),
        404
    );
    let right = format!("{base}{path}serving-endpoints/chat/completions");
    let host = send(right.clone(), vec![("Host", "evil.example.com".into())])
        .await
        .unwrap();
    assert_eq!(host.status().as_u16(), 403);
    let origin = send(
        right.clone(),
        vec![("Origin", "http://evil.example.com".into())],
    )
    .await
    .unwrap();
    assert_eq!(origin.status().as_u16(), 403);
    assert!(origin
        .headers()
        .keys()
        .all(|k| !k.as_str().starts_with("access-control-")));
    assert_eq!(
        r.emu.emulator.counters().serving_requests,
        before,
        "a refused request reached the workspace"
    );
    // The right request goes through, with the client's own key replaced.
    let ok = send(
        right,
        vec![("Authorization", "Bearer not-a-databricks-token".into())],
    )
    .await
    .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(r.emu.emulator.counters().serving_requests, before + 1);
    let _ = &r.env;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_token_is_retried_once_then_relayed() {
    let r = start(60, 30, 2).await;
    // Revoke the token on disk behind the rotator's back: every use is now refused.
    let token = {
        let out = r.env.command(&["token"]).output().unwrap();
        pat_rotator::Token::new(String::from_utf8_lossy(&out.stdout).trim())
    };
    r.emu.emulator.revoke(&token);
    let resp = reqwest::Client::new()
        .get(format!("{}api/2.0/preview/scim/v2/Me", r.proxy_url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        403,
        "the workspace's answer is relayed"
    );
    let body = resp.text().await.unwrap();
    assert!(body.contains("Invalid access token"), "{body}");
    let metrics = r.env.metrics().await;
    assert!(
        metrics.contains("pat_rotator_proxy_retries_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("pat_rotator_proxy_requests_total{class=\"4xx\"} 1"));
    assert!(!metrics.contains(token.expose()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_too_big_to_keep_streams_through_whole() {
    let r = start(60, 30, 2).await;
    // 3 MiB: past the 1 MiB the proxy keeps for a retry, so it streams upstream.
    let inputs = "x".repeat(3 * 1024 * 1024);
    let resp = reqwest::Client::new()
        .post(format!("{}serving-endpoints/big/invocations", r.proxy_url))
        .json(&serde_json::json!({ "inputs": inputs }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        body["predictions"].as_str().map(str::len),
        Some(inputs.len())
    );
    assert_eq!(r.emu.emulator.counters().dead_token_requests, 0);
}
