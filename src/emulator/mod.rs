//! An embedded Databricks-compatible token API: the provider every test, the soak and a new
//! user's first run talk to.
//!
//! It is not a mock: tokens really expire and stay revoked, the status codes and error bodies
//! are Databricks' own (403 with a numeric `error_code` for a bad token, 404
//! `RESOURCE_DOES_NOT_EXIST`, `QUOTA_EXCEEDED` past 600 live tokens), and it can reject
//! tokens in their last seconds as Azure Databricks does. Invariant: every request made with
//! a revoked or expired token is counted and recorded, because that count is the soak's and
//! the tests' main signal. Faults (latency, error rate, `Retry-After`, outages) apply to the
//! token endpoints only, so readers measure the rotator, not the fault injector.

use crate::secret::{sha256_hex, Token};
use axum::extract::{Json, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, TimeDelta, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod oauth;
mod rules;
mod serving;
mod token_api;

pub use oauth::{OAuthCounters, OAuthSettings, ReplayPolicy};
pub use rules::Rules;

/// Live tokens per user, as in Databricks.
pub const TOKEN_QUOTA: usize = 600;
const MAX_EVENTS: usize = 10_000;
pub const USER_NAME: &str = "emulated-user@example.com";

/// The largest request body the emulator accepts.
const SERVING_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// The workspace id the emulator reports.
pub const EMULATED_WORKSPACE_ID: &str = "1234567890123456";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Faults {
    /// Added to every token API request (for `create`, after the token is minted: the
    /// dangerous case, where a client that times out never learns of the token).
    #[serde(default)]
    pub latency_ms: u64,
    /// Apply the latency to this many more requests only (then it switches itself off).
    #[serde(default)]
    pub latency_requests: Option<u64>,
    /// Fraction (0..=1) of token API requests answered with `error_status`.
    #[serde(default)]
    pub error_rate: f64,
    #[serde(default = "default_error_status")]
    pub error_status: u16,
    /// `Retry-After` seconds sent with injected errors.
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// When set on a request, an outage of this many seconds starts now (503 to everything).
    #[serde(default, skip_serializing)]
    pub outage_seconds: Option<u64>,
    #[serde(default)]
    pub outage_until: Option<DateTime<Utc>>,
}

fn default_error_status() -> u16 {
    503
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub requests: u64,
    pub creates: u64,
    /// Creates whose answer was sent (after any injected latency): below `creates` while a
    /// minted token's answer is still on its way.
    pub creates_answered: u64,
    pub deletes: u64,
    pub lists: u64,
    pub verifies: u64,
    pub live_tokens: u64,
    pub faults_injected: u64,
    pub unauthenticated_requests: u64,
    pub unknown_token_requests: u64,
    pub revoked_token_requests: u64,
    pub expired_token_requests: u64,
    /// Rejected because the token was in its last `reject_expiring_within` seconds.
    pub expiring_token_requests: u64,
    /// Revoked + expired + expiring: requests made with a token that had been valid and no
    /// longer was. The number a soak or test wants to be zero.
    pub dead_token_requests: u64,
    /// Model-serving requests answered (chat completions and invocations).
    #[serde(default)]
    pub serving_requests: u64,
    /// Server-sent-event streams that sent their final `[DONE]`.
    #[serde(default)]
    pub streams_completed: u64,
    /// The OAuth endpoints' counters (refreshes, replays, family revocations).
    #[serde(default)]
    pub oauth: OAuthCounters,
}

/// One request made with a dead token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadTokenEvent {
    pub at: DateTime<Utc>,
    pub kind: String,
    pub token_id: String,
    pub path: String,
    pub user_agent: String,
}

/// A token as the emulator sees it (no value).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub token_id: String,
    pub comment: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// An OAuth access token (not a PAT: never listed, not in the quota).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oauth: bool,
    /// The U2M login it belongs to (revoked with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
}

impl TokenRecord {
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// By SHA-256 of the value: the emulator never keeps values either.
    tokens: HashMap<String, TokenRecord>,
    faults: Faults,
    counters: Counters,
    events: Vec<DeadTokenEvent>,
    oauth: oauth::OAuthState,
    rules: Rules,
}

/// Options fixed at start.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Reject tokens in their last N seconds (Azure Databricks: 30).
    pub reject_expiring_within: u64,
    pub faults: Faults,
    /// The OAuth app's token access policy (TTLs, single-use refresh tokens, replays).
    pub oauth: OAuthSettings,
    /// The workspace's token rules at start.
    pub rules: Rules,
}

/// The shared emulator state; cheap to clone.
#[derive(Debug, Clone)]
pub struct Emulator {
    inner: Arc<Mutex<Inner>>,
    options: Arc<Options>,
    /// How far the emulator's clock is ahead of the wall clock ([`Emulator::advance`]): its
    /// one clock, for expiry, revocation, outages and listings, so tests move time instead
    /// of sleeping.
    ahead_ms: Arc<std::sync::atomic::AtomicI64>,
}

fn new_secret(prefix: &str, hex_len: usize) -> String {
    let mut rng = rand::rng();
    let hex: String = (0..hex_len)
        .map(|_| format!("{:x}", rng.random_range(0..16u8)))
        .collect();
    format!("{prefix}{hex}")
}

impl Emulator {
    /// A new emulator and its bootstrap token (no expiry, comment "bootstrap").
    pub fn new(options: Options) -> (Emulator, Token) {
        let mut inner = Inner {
            faults: options.faults.clone(),
            ..Inner::default()
        };
        inner.oauth.settings = options.oauth.clone();
        inner.rules = options.rules.clone();
        let bootstrap = Token::new(new_secret("dapi", 32));
        inner.tokens.insert(
            bootstrap.sha256_hex(),
            TokenRecord {
                token_id: new_secret("", 16),
                comment: "bootstrap".into(),
                created_at: Utc::now(),
                expires_at: None,
                revoked_at: None,
                oauth: false,
                family: None,
            },
        );
        (
            Emulator {
                inner: Arc::new(Mutex::new(inner)),
                options: Arc::new(options),
                ahead_ms: Arc::default(),
            },
            bootstrap,
        )
    }

    /// The emulator's clock: the wall clock plus whatever [`Emulator::advance`] added.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now()
            + TimeDelta::milliseconds(self.ahead_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Moves the emulator's clock forward by `by` (tests: a token's expiry without the wait).
    pub fn advance(&self, by: Duration) {
        self.ahead_ms
            .fetch_add(by.as_millis() as i64, std::sync::atomic::Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn counters(&self) -> Counters {
        let now = self.now();
        let inner = self.lock();
        let mut c = inner.counters.clone();
        c.oauth = inner.oauth.counters.clone();
        c.dead_token_requests =
            c.revoked_token_requests + c.expired_token_requests + c.expiring_token_requests;
        c.live_tokens = inner
            .tokens
            .values()
            .filter(|t| !t.oauth && t.is_live(now))
            .count() as u64;
        c
    }

    /// The record of a token, by value.
    pub fn lookup(&self, token: &Token) -> Option<TokenRecord> {
        self.lock().tokens.get(&token.sha256_hex()).cloned()
    }

    /// Revokes a token directly (tests: "a dead token").
    pub fn revoke(&self, token: &Token) {
        let now = self.now();
        if let Some(t) = self.lock().tokens.get_mut(&token.sha256_hex()) {
            t.revoked_at = Some(now);
        }
    }

    pub fn events(&self) -> Vec<DeadTokenEvent> {
        self.lock().events.clone()
    }

    pub fn tokens(&self) -> Vec<TokenRecord> {
        let mut v: Vec<_> = self.lock().tokens.values().cloned().collect();
        v.sort_by_key(|t| t.created_at);
        v
    }

    pub fn set_faults(&self, mut faults: Faults) {
        if let Some(secs) = faults.outage_seconds.take() {
            faults.outage_until = Some(self.now() + TimeDelta::seconds(secs as i64));
        }
        self.lock().faults = faults;
    }

    /// Issues a token directly (tests: a "valid token from elsewhere").
    pub fn issue(&self, lifetime: Option<Duration>, comment: &str) -> (Token, TokenRecord) {
        let now = self.now();
        let mut inner = self.lock();
        issue_locked(&mut inner, now, lifetime, comment)
    }

    pub fn router(&self) -> Router {
        token_api::routes()
            .merge(oauth::routes())
            .route(
                "/.well-known/databricks-config",
                get(serving::host_metadata),
            )
            .route(
                "/serving-endpoints/chat/completions",
                post(serving::chat_completions),
            )
            .route(
                "/serving-endpoints/{name}/invocations",
                post(serving::invocations),
            )
            .route(
                "/emulator/counters",
                get(|State(e): State<Emulator>| async move { Json(e.counters()) }),
            )
            .route(
                "/emulator/events",
                get(|State(e): State<Emulator>| async move { Json(e.events()) }),
            )
            .route(
                "/emulator/tokens",
                get(|State(e): State<Emulator>| async move { Json(e.tokens()) }),
            )
            .route(
                "/emulator/rules",
                get(|State(e): State<Emulator>| async move { Json(e.rules()) }).post(
                    |State(e): State<Emulator>, Json(r): Json<Rules>| async move {
                        e.set_rules(r);
                        Json(e.rules())
                    },
                ),
            )
            .route(
                "/emulator/faults",
                get(|State(e): State<Emulator>| async move { Json(e.lock().faults.clone()) }).post(
                    |State(e): State<Emulator>, Json(f): Json<Faults>| async move {
                        e.set_faults(f);
                        Json(e.lock().faults.clone())
                    },
                ),
            )
            .with_state(self.clone())
            // Model-serving payloads can be large (axum's default cap is 2 MB).
            .layer(axum::extract::DefaultBodyLimit::max(SERVING_BODY_LIMIT))
            // `Date` on the workspace's own clock (moved by `advance`), as a server's is.
            .layer(axum::middleware::map_response_with_state(
                self.clone(),
                |State(e): State<Emulator>, mut response: axum::response::Response| async move {
                    let date = e.now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
                    if let Ok(value) = axum::http::HeaderValue::from_str(&date) {
                        response
                            .headers_mut()
                            .insert(axum::http::header::DATE, value);
                    }
                    response
                },
            ))
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let app = self.router();
        crate::listener::serve(listener, app, async move { shutdown.cancelled().await }).await
    }

    /// Binds `addr` and serves in the background; for tests and the soak.
    pub async fn spawn(self, addr: SocketAddr) -> std::io::Result<RunningEmulator> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(self.clone().serve(listener, shutdown.clone()));
        Ok(RunningEmulator {
            addr,
            emulator: self,
            shutdown,
            task,
        })
    }
}

pub struct RunningEmulator {
    pub addr: SocketAddr,
    pub emulator: Emulator,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningEmulator {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

fn issue_locked(
    inner: &mut Inner,
    now: DateTime<Utc>,
    lifetime: Option<Duration>,
    comment: &str,
) -> (Token, TokenRecord) {
    let token = Token::new(new_secret("dapi", 32));
    let record = TokenRecord {
        token_id: new_secret("", 16),
        comment: comment.to_string(),
        created_at: now,
        expires_at: lifetime.map(|l| now + TimeDelta::milliseconds(l.as_millis() as i64)),
        revoked_at: None,
        oauth: false,
        family: None,
    };
    inner.tokens.insert(token.sha256_hex(), record.clone());
    (token, record)
}

fn error(status: StatusCode, code: Value, message: &str) -> Response {
    (
        status,
        Json(json!({ "error_code": code, "message": message })),
    )
        .into_response()
}

fn invalid_token(message: &str) -> Response {
    // Databricks sends the numeric form for this case.
    error(StatusCode::FORBIDDEN, json!(403), message)
}

fn info_json(r: &TokenRecord) -> Value {
    json!({
        "token_id": r.token_id,
        "creation_time": r.created_at.timestamp_millis(),
        "expiry_time": r.expires_at.map(|e| e.timestamp_millis()).unwrap_or(-1),
        "comment": r.comment,
    })
}

impl Emulator {
    /// Authenticates a request: `Some` is the refusal to send. Counts and records dead-token use.
    fn authenticate(&self, headers: &HeaderMap, path: &str) -> Option<Response> {
        let mut inner = self.lock();
        inner.counters.requests += 1;
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(value) = bearer.filter(|v| !v.is_empty()) else {
            inner.counters.unauthenticated_requests += 1;
            return Some(error(
                StatusCode::UNAUTHORIZED,
                json!(401),
                "Credential was not sent or was of an unsupported type for this API.",
            ));
        };
        let sha = sha256_hex(value.as_bytes());
        let now = self.now();
        let user_agent = headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .chars()
            .take(120)
            .collect::<String>();
        let Some(rec) = inner.tokens.get(&sha).cloned() else {
            inner.counters.unknown_token_requests += 1;
            return Some(invalid_token("Invalid access token."));
        };
        let within = TimeDelta::seconds(self.options.reject_expiring_within as i64);
        let dead = if rec.revoked_at.is_some() {
            inner.counters.revoked_token_requests += 1;
            Some(("revoked", "Invalid access token."))
        } else if rec.expires_at.is_some_and(|e| e <= now) {
            inner.counters.expired_token_requests += 1;
            Some(("expired", "Invalid access token."))
        } else if self.options.reject_expiring_within > 0
            && rec.expires_at.is_some_and(|e| e - within <= now)
        {
            inner.counters.expiring_token_requests += 1;
            Some((
                "expiring",
                "Token is expiring within 30 seconds. (token expired)",
            ))
        } else {
            None
        };
        if let Some((kind, message)) = dead {
            if inner.events.len() < MAX_EVENTS {
                inner.events.push(DeadTokenEvent {
                    at: now,
                    kind: kind.into(),
                    token_id: rec.token_id.clone(),
                    path: path.into(),
                    user_agent,
                });
            }
            return Some(invalid_token(message));
        }
        None
    }

    /// The configured latency, counting down `latency_requests`.
    async fn latency(&self) {
        let delay = {
            let mut inner = self.lock();
            let f = &mut inner.faults;
            match f.latency_requests {
                _ if f.latency_ms == 0 => 0,
                Some(0) => 0,
                Some(n) => {
                    f.latency_requests = Some(n - 1);
                    f.latency_ms
                }
                None => f.latency_ms,
            }
        };
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }

    /// Injected errors for the token API: an outage or the random error rate.
    fn fault(&self) -> Option<Response> {
        let faults = self.lock().faults.clone();
        let outage = faults.outage_until.is_some_and(|u| self.now() < u);
        let injected = outage
            || (faults.error_rate > 0.0
                && rand::rng().random_bool(faults.error_rate.clamp(0.0, 1.0)));
        if !injected {
            return None;
        }
        self.lock().counters.faults_injected += 1;
        let status = if outage {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::from_u16(faults.error_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
        };
        let code = if status == StatusCode::TOO_MANY_REQUESTS {
            "REQUEST_LIMIT_EXCEEDED"
        } else {
            "TEMPORARILY_UNAVAILABLE"
        };
        let mut resp = error(status, json!(code), "injected fault");
        if let Some(ra) = faults.retry_after {
            if let Ok(v) = ra.to_string().parse() {
                resp.headers_mut().insert("retry-after", v);
            }
        }
        Some(resp)
    }
}

impl Emulator {
    /// What every token API request goes through: injected faults, then authentication.
    fn admit(&self, headers: &HeaderMap, path: &str) -> Option<Response> {
        self.fault().or_else(|| self.authenticate(headers, path))
    }
}
