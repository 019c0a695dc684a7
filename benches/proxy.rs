//! The authenticating proxy against going direct to the same emulator, in the same run:
//! latency (p50, p99) and requests per second at 1, 16 and 64 concurrent clients, and the
//! time to the first byte of a streamed answer. A bench binary rather than criterion
//! because the figures are percentiles and throughput under concurrency, which criterion's
//! per-iteration timing does not give.
//!
//! `cargo bench --bench proxy` prints the table; under `cargo test` it makes a short smoke
//! run so the bench cannot rot.

use futures_util::StreamExt;
use pat_rotator::config::Config;
use pat_rotator::emulator::{Emulator, Options};
use pat_rotator::shared::Shared;
use std::time::{Duration, Instant};

struct Setup {
    direct: String,
    proxied: String,
    token: pat_rotator::Token,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    pat_rotator::provider::install_crypto_provider();
    let (emu, _) = Emulator::new(Options::default());
    let (token, record) = emu.issue(Some(Duration::from_secs(3600)), "bench");
    let running = emu
        .spawn("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("emulator");
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("databrickscfg");
    let config = Config::from_vars([
        ("DATABRICKS_HOST".to_string(), running.url()),
        (
            "DATABRICKS_CONFIG_FILE".to_string(),
            cfg.display().to_string(),
        ),
    ])
    .expect("config");
    let shared = Shared::new(config).expect("shared");
    let now = chrono::Utc::now();
    let expires = record.expires_at.expect("expiry");
    let rotation = pat_rotator::store::Rotation::new(record.token_id.clone(), expires, "bench");
    shared
        .store
        .swap(
            None,
            &token,
            None,
            Duration::from_secs(5),
            Some(&rotation),
            &|| now,
        )
        .expect("seed the file");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = pat_rotator::proxy::router(shared.clone(), addr).expect("proxy");
    tokio::spawn(pat_rotator::listener::serve(
        listener,
        app,
        std::future::pending(),
    ));
    std::mem::forget(running);
    Setup {
        direct: format!("{}/", emu_base(&shared)),
        proxied: pat_rotator::proxy::proxy_url(addr, &shared.config.control_secret),
        token,
        _dir: dir,
    }
}

fn emu_base(shared: &Shared) -> String {
    shared.config.host.clone().expect("host")
}

struct Run {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

async fn load(base: &str, token: &pat_rotator::Token, clients: usize, per_client: usize) -> Run {
    let http = reqwest::Client::new();
    let url = format!("{base}api/2.0/preview/scim/v2/Me");
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let t = Instant::now();
                    let resp = http.get(&url).bearer_auth(token.expose()).send().await;
                    let ok = match resp {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    assert!(ok, "a benchmark request failed");
                    out.push(t.elapsed());
                }
                out
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("client task"));
    }
    latencies.sort();
    Run {
        latencies,
        elapsed: started.elapsed(),
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn first_byte(base: &str, token: &pat_rotator::Token) -> Duration {
    let http = reqwest::Client::new();
    let t = Instant::now();
    let resp = http
        .post(format!("{base}serving-endpoints/chat/completions"))
        .bearer_auth(token.expose())
        .json(&serde_json::json!({
            "model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}],
            "x_emulator_chunks": 3, "x_emulator_interval_ms": 0,
        }))
        .send()
        .await
        .expect("stream");
    let mut body = resp.bytes_stream();
    let _ = body.next().await;
    let ttfb = t.elapsed();
    while body.next().await.is_some() {}
    ttfb
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let s = setup().await;
        let per_client_total = if full { 4000 } else { 64 };
        println!(
            "proxy vs direct to the same emulator, same run ({} requests per level)",
            per_client_total
        );
        println!(
            "{:>8} {:>12} {:>12} {:>12} {:>12} {:>10}",
            "clients", "p50 ratio", "p99 ratio", "rps direct", "rps proxy", "rps ratio"
        );
        for clients in [1usize, 16, 64] {
            let per_client = (per_client_total / clients).max(1);
            // Warm both paths (connections, pools) before measuring.
            let _ = load(&s.direct, &s.token, clients, 2).await;
            let _ = load(&s.proxied, &s.token, clients, 2).await;
            let d = load(&s.direct, &s.token, clients, per_client).await;
            let p = load(&s.proxied, &s.token, clients, per_client).await;
            let rps = |r: &Run| r.latencies.len() as f64 / r.elapsed.as_secs_f64();
            println!(
                "{clients:>8} {:>12.2} {:>12.2} {:>12.0} {:>12.0} {:>10.2}",
                pct(&p.latencies, 50.0).as_secs_f64() / pct(&d.latencies, 50.0).as_secs_f64(),
                pct(&p.latencies, 99.0).as_secs_f64() / pct(&d.latencies, 99.0).as_secs_f64(),
                rps(&d),
                rps(&p),
                rps(&p) / rps(&d),
            );
        }
        let rounds = if full { 200 } else { 5 };
        let mut direct = Vec::new();
        let mut proxied = Vec::new();
        for _ in 0..rounds {
            direct.push(first_byte(&s.direct, &s.token).await);
            proxied.push(first_byte(&s.proxied, &s.token).await);
        }
        direct.sort();
        proxied.sort();
        println!(
            "stream time to first byte, p50: direct {:?}, proxy {:?} (ratio {:.2})",
            pct(&direct, 50.0),
            pct(&proxied, 50.0),
            pct(&proxied, 50.0).as_secs_f64() / pct(&direct, 50.0).as_secs_f64()
        );
    });
}
