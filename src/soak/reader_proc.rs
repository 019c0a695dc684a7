//! The soak's reader process: reads the token the way a user's program would and makes an
//! authenticated call with it, reporting each call as one JSON line on stdout.
//!
//! Modes: `file` uses the library [`Reader`] (stat-validated, never stale), `metadata`
//! asks the rotators' SDK endpoint, and `proxy` never sees a token: it calls the workspace
//! through the rotators' authenticating proxy with a dummy key, as an LLM client would. `--cache-for N` replaces both with a time-only cache,
//! the behaviour behind the stale-read incident, so a soak can prove its verdict catches it.

use crate::reader::Reader;
use crate::secret::Token;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ReadMode {
    File,
    Metadata,
    Proxy,
}

#[derive(Debug, Clone)]
pub(crate) struct ReaderArgs {
    pub index: usize,
    pub config: PathBuf,
    pub profile: String,
    pub host: String,
    pub mode: ReadMode,
    /// Control listeners of the rotators, tried in order (one may be down after a kill).
    pub metadata_urls: Vec<String>,
    /// Proxy base URLs of the rotators, tried in order.
    pub proxy_urls: Vec<String>,
    pub cache_for: Option<Duration>,
    pub every: Duration,
}

/// One line of the reader's output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ReaderLine {
    pub t: i64,
    pub reader: usize,
    #[serde(default)]
    pub fp: Option<String>,
    /// HTTP status of the authenticated call; 0 when there was no token to call with.
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub bench: Option<ReaderBench>,
    /// How this reader gets its token.
    #[serde(default)]
    pub mode: Option<ReadMode>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct ReaderBench {
    pub stat_ns: f64,
    pub cached_ns: f64,
}

/// A cached read against a bare `stat` of the same file, in this process. The two alternate
/// in short blocks, so that a busy moment of the soak (a kill, a rotation, the other
/// readers) falls on both alike instead of on whichever ran second.
fn bench(reader: &Reader, config: &PathBuf) -> ReaderBench {
    const BLOCKS: u32 = 40;
    const PER_BLOCK: u32 = 500;
    let _ = reader.token();
    let (mut stat, mut cached) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..BLOCKS {
        let start = Instant::now();
        for _ in 0..PER_BLOCK {
            let _ = std::hint::black_box(std::fs::metadata(config));
        }
        stat += start.elapsed();
        let start = Instant::now();
        for _ in 0..PER_BLOCK {
            let _ = std::hint::black_box(reader.token());
        }
        cached += start.elapsed();
    }
    let per_call = |total: Duration| total.as_nanos() as f64 / f64::from(BLOCKS * PER_BLOCK);
    ReaderBench {
        stat_ns: per_call(stat),
        cached_ns: per_call(cached),
    }
}

async fn from_metadata(http: &reqwest::Client, args: &ReaderArgs) -> Option<Token> {
    for url in &args.metadata_urls {
        let resp = http
            .get(url)
            .header("X-Databricks-Metadata-Version", "1")
            .header("X-Databricks-Host", &args.host)
            .send()
            .await;
        if let Ok(r) = resp {
            if r.status().is_success() {
                let body: serde_json::Value = r.json().await.ok()?;
                return body
                    .get("access_token")
                    .and_then(|v| v.as_str())
                    .map(Token::new);
            }
        }
    }
    None
}

/// One call through the first proxy that answers; the status the workspace gave (0: none
/// answered).
async fn through_proxy(http: &reqwest::Client, args: &ReaderArgs) -> u16 {
    for base in &args.proxy_urls {
        let resp = http
            .get(format!("{base}api/2.0/preview/scim/v2/Me"))
            .bearer_auth("dummy-key-replaced-by-the-proxy")
            .send()
            .await;
        match resp {
            Ok(r) if r.status() != reqwest::StatusCode::BAD_GATEWAY => return r.status().as_u16(),
            _ => continue,
        }
    }
    0
}

pub async fn run(args: ReaderArgs, cancel: CancellationToken) -> Result<(), String> {
    crate::provider::install_crypto_provider();
    let reader = Reader::new(&args.config, &args.profile).map_err(|e| e.to_string())?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .user_agent(format!("pat-rotator-soak-reader/{}", args.index))
        .build()
        .map_err(|e| e.to_string())?;
    let emit = |line: &ReaderLine| println!("{}", serde_json::to_string(line).unwrap_or_default());
    let b = bench(&reader, &args.config);
    emit(&ReaderLine {
        t: chrono::Utc::now().timestamp_millis(),
        reader: args.index,
        fp: None,
        status: 0,
        bench: Some(b),
        mode: Some(args.mode),
    });
    let mut cached: Option<(Instant, Token)> = None;
    let me = format!(
        "{}/api/2.0/preview/scim/v2/Me",
        args.host.trim_end_matches('/')
    );
    while !cancel.is_cancelled() {
        let (fp, status) = if args.mode == ReadMode::Proxy {
            // A proxy client never holds a token: nothing to fingerprint.
            (None, through_proxy(&http, &args).await)
        } else {
            let token = read_token(&args, &reader, &http, &mut cached).await;
            let status = match &token {
                Some(t) => http
                    .get(&me)
                    .bearer_auth(t.expose())
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0),
                None => 0,
            };
            (token.as_ref().map(Token::fingerprint), status)
        };
        emit(&ReaderLine {
            t: chrono::Utc::now().timestamp_millis(),
            reader: args.index,
            fp,
            status,
            bench: None,
            mode: Some(args.mode),
        });
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(args.every) => {}
        }
    }
    Ok(())
}

/// The token as this reader's mode gets it; with `--cache-for`, the deliberately broken
/// time-only cache.
async fn read_token(
    args: &ReaderArgs,
    reader: &Reader,
    http: &reqwest::Client,
    cached: &mut Option<(Instant, Token)>,
) -> Option<Token> {
    let fresh_cache = cached
        .as_ref()
        .filter(|(at, _)| args.cache_for.is_some_and(|ttl| at.elapsed() < ttl))
        .map(|(_, t)| t.clone());
    if fresh_cache.is_some() {
        return fresh_cache;
    }
    let t = match args.mode {
        ReadMode::File => reader.token().ok().flatten(),
        ReadMode::Metadata => from_metadata(http, args).await,
        ReadMode::Proxy => None,
    };
    if let Some(t) = &t {
        *cached = Some((Instant::now(), t.clone()));
    }
    t
}
