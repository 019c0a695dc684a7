//! The token provider: mint, revoke, list and verify personal access tokens.
//!
//! [`Provider`] is what the rotation loop needs from any token service, so another one
//! (GitLab's rotate API, say) can be added without touching the loop. [`Databricks`] is the
//! REST 2.0 client. Invariants: every request has a timeout; retries (connection errors, 5xx,
//! 429 with `Retry-After`) back off with jitter and never retry 401/403, which is the
//! dead-token path the loop owns; bodies are size-capped and every field is checked, so a
//! bad response is an error, never a panic; a `create` that may have minted a token before
//! failing is reconciled (the orphan is found by its comment and revoked) so a flaky network
//! never leaks tokens toward the quota.

use crate::backoff::Backoff;
use crate::secret::Token;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::future::Future;
use std::time::Duration;
use tracing::{debug, warn};

/// Largest response body read from the provider.
pub const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub token_id: String,
    pub creation_time: DateTime<Utc>,
    /// `None` when the token does not expire (`expiry_time: -1`).
    pub expires_at: Option<DateTime<Utc>>,
    pub comment: String,
}

#[derive(Debug, Clone)]
pub struct MintedToken {
    pub token: Token,
    pub info: TokenInfo,
    /// When the request that produced it was sent (our clock): the one attempt whose
    /// round trip measures the skew, not the first of several retried ones.
    pub sent_at: DateTime<Utc>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("the token was rejected (HTTP {status}: {message})")]
    InvalidToken { status: u16, message: String },
    #[error("token quota exceeded ({message}); revoke unused tokens of this user")]
    QuotaExceeded { message: String },
    #[error("rate limited (HTTP 429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("not found ({message})")]
    NotFound { message: String },
    #[error("server error (HTTP {status}: {message})")]
    Server {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("cannot reach the provider: {0}")]
    Network(String),
    #[error("no answer within {0:?} (PAT_HTTP_TIMEOUT)")]
    Timeout(Duration),
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("unexpected answer (HTTP {status}: {message})")]
    Other { status: u16, message: String },
}

impl ProviderError {
    /// The metrics label.
    /// Every value [`ProviderError::kind`] takes, so its failure series exist from the start.
    pub(crate) const KINDS: &'static [&'static str] = &[
        "invalid_token",
        "quota_exceeded",
        "rate_limited",
        "not_found",
        "server_error",
        "network",
        "timeout",
        "malformed",
        "other",
    ];

    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::InvalidToken { .. } => "invalid_token",
            ProviderError::QuotaExceeded { .. } => "quota_exceeded",
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::NotFound { .. } => "not_found",
            ProviderError::Server { .. } => "server_error",
            ProviderError::Network(_) => "network",
            ProviderError::Timeout(_) => "timeout",
            ProviderError::Malformed(_) => "malformed",
            ProviderError::Other { .. } => "other",
        }
    }

    pub(crate) fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited { .. }
                | ProviderError::Server { .. }
                | ProviderError::Network(_)
                | ProviderError::Timeout(_)
        )
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after }
            | ProviderError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The request may have reached the server and minted a token before failing.
    fn may_have_minted(&self) -> bool {
        matches!(
            self,
            ProviderError::Timeout(_)
                | ProviderError::Network(_)
                | ProviderError::Server { .. }
                | ProviderError::Malformed(_)
        )
    }
}

/// What the rotation loop needs from a token service.
pub trait Provider: Send + Sync + 'static {
    fn mint(
        &self,
        auth: &Token,
        lifetime: Duration,
        comment: &str,
    ) -> impl Future<Output = Result<MintedToken, ProviderError>> + Send;
    fn revoke(
        &self,
        auth: &Token,
        token_id: &str,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
    fn list(
        &self,
        auth: &Token,
    ) -> impl Future<Output = Result<Vec<TokenInfo>, ProviderError>> + Send;
    /// Checks that `token` works; returns the user name it belongs to.
    fn verify(&self, token: &Token) -> impl Future<Output = Result<String, ProviderError>> + Send;
}

/// How many attempts one provider call makes, and how it waits between them.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub backoff: Backoff,
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            backoff: Backoff::vault_like(),
            max_attempts: 4,
        }
    }
}

impl RetryPolicy {
    /// The policy for a rotator with rotation threshold `threshold`: the in-call retries of
    /// a mint that starts as the forced window opens must end well inside the window's first
    /// half, before a provider that refuses expiring tokens (Azure: the last half of the
    /// default threshold) stops accepting the credential they authenticate with; the loop
    /// then has time for its own tries. The first delay is a 40th of the threshold (50 ms to
    /// 1 s) and no delay, a server's `Retry-After` included, exceeds a 20th: 1 s then at
    /// most 3 s at the production default (60 s); 150 ms then at most 300 ms for a
    /// compressed 6 s threshold, where 0.8 + 1.6 + 3.2 s of backoff (or three 1 s
    /// `Retry-After`s) once outlived the token. The loop's own retries still honour a longer
    /// `Retry-After`, as far as the token's remaining life allows.
    pub(crate) fn for_threshold(threshold: Duration) -> Self {
        let initial = (threshold / 40).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let cap = (threshold / 20).max(initial);
        RetryPolicy {
            backoff: Backoff::new(initial, cap),
            ..RetryPolicy::default()
        }
    }
}

/// Runs `op` until it succeeds, fails with a non-retryable error, or runs out of attempts.
pub(crate) async fn with_retries<T, F, Fut>(
    policy: &RetryPolicy,
    what: &str,
    mut op: F,
) -> Result<T, ProviderError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ProviderError>>,
{
    let mut backoff = policy.backoff.clone();
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if e.is_retryable() && attempt < policy.max_attempts => {
                let delay = backoff.next_delay(e.retry_after());
                warn!(what, attempt, error = %e, delay_ms = delay.as_millis() as u64, "provider request failed; retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The Databricks REST 2.0 token API.
#[derive(Debug, Clone)]
pub struct Databricks {
    http: reqwest::Client,
    host: String,
    timeout: Duration,
    retry: RetryPolicy,
}

impl Databricks {
    pub fn new(
        host: &str,
        timeout: Duration,
        retry: RetryPolicy,
    ) -> Result<Databricks, ProviderError> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("pat-rotator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Network(format!("cannot build the HTTP client: {e}")))?;
        Ok(Databricks {
            http,
            host: crate::config::normalize_host(host),
            timeout,
            retry,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: &Token,
        body: Option<Value>,
    ) -> Result<Value, ProviderError> {
        let url = format!("{}{}", self.host, path);
        // A token no HTTP header can carry (a control character, a line break) is a bad
        // credential, not a network failure: say so, so the caller falls back to another.
        let mut bearer = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", auth.expose()))
            .map_err(|_| ProviderError::InvalidToken {
                status: 0,
                message: "the token holds characters an HTTP header cannot carry (a control character or line break); it cannot be valid".into(),
            })?;
        bearer.set_sensitive(true);
        let mut req = self
            .http
            .request(method, &url)
            .header(reqwest::header::AUTHORIZATION, bearer);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let mut resp = req.send().await.map_err(|e| self.transport_error(e))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport_error(e))? {
            if bytes.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(ProviderError::Malformed(format!(
                    "{path}: response body larger than {MAX_BODY_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
        if (200..300).contains(&status) {
            return parsed.ok_or_else(|| {
                ProviderError::Malformed(format!(
                    "{path}: HTTP {status} with a body that is not JSON"
                ))
            });
        }
        Err(classify(status, parsed.as_ref(), retry_after))
    }

    fn transport_error(&self, e: reqwest::Error) -> ProviderError {
        if e.is_timeout() {
            ProviderError::Timeout(self.timeout)
        } else {
            // reqwest's message names the URL (host and path), never a header.
            ProviderError::Network(e.without_url().to_string())
        }
    }

    async fn mint_once(
        &self,
        auth: &Token,
        lifetime: Duration,
        comment: &str,
        started: DateTime<Utc>,
    ) -> Result<MintedToken, ProviderError> {
        let body = json!({ "lifetime_seconds": lifetime.as_secs(), "comment": comment });
        let sent_at = Utc::now();
        let result = self
            .call(
                reqwest::Method::POST,
                "/api/2.0/token/create",
                auth,
                Some(body),
            )
            .await
            .and_then(|v| parse_minted(&v, sent_at));
        if let Err(e) = &result {
            if e.may_have_minted() {
                self.reconcile_create(auth, comment, started).await;
            }
        }
        result
    }

    /// After a `create` that may have succeeded on the server: revoke any token carrying this
    /// rotation's comment created since the rotation started (its value was never received,
    /// so it can't be adopted). The caller holds the rotation lock, so no sibling rotator of
    /// this instance is minting at the same time.
    async fn reconcile_create(&self, auth: &Token, comment: &str, started: DateTime<Utc>) {
        let since = started - chrono::TimeDelta::seconds(2);
        match self.list_once(auth).await {
            Ok(infos) => {
                for info in infos
                    .into_iter()
                    .filter(|i| i.comment == comment && i.creation_time >= since)
                {
                    match self.revoke_once(auth, &info.token_id).await {
                        Ok(()) | Err(ProviderError::NotFound { .. }) => {
                            warn!(token_id = %info.token_id, "revoked a token minted by a create that failed in transit")
                        }
                        Err(e) => {
                            warn!(token_id = %info.token_id, error = %e, "could not revoke a token minted by a failed create; it will be reaped at the next start")
                        }
                    }
                }
            }
            Err(e) => debug!(error = %e, "could not list tokens to reconcile a failed create"),
        }
    }

    async fn revoke_once(&self, auth: &Token, token_id: &str) -> Result<(), ProviderError> {
        self.call(
            reqwest::Method::POST,
            "/api/2.0/token/delete",
            auth,
            Some(json!({ "token_id": token_id })),
        )
        .await
        .map(|_| ())
    }

    async fn list_once(&self, auth: &Token) -> Result<Vec<TokenInfo>, ProviderError> {
        let v = self
            .call(reqwest::Method::GET, "/api/2.0/token/list", auth, None)
            .await?;
        match v.get("token_infos") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(parse_info).collect(),
            Some(_) => Err(ProviderError::Malformed(
                "token/list: token_infos is not an array".into(),
            )),
        }
    }
}

impl Provider for Databricks {
    async fn mint(
        &self,
        auth: &Token,
        lifetime: Duration,
        comment: &str,
    ) -> Result<MintedToken, ProviderError> {
        let started = Utc::now();
        with_retries(&self.retry, "token/create", || {
            self.mint_once(auth, lifetime, comment, started)
        })
        .await
    }

    async fn revoke(&self, auth: &Token, token_id: &str) -> Result<(), ProviderError> {
        with_retries(&self.retry, "token/delete", || {
            self.revoke_once(auth, token_id)
        })
        .await
    }

    async fn list(&self, auth: &Token) -> Result<Vec<TokenInfo>, ProviderError> {
        with_retries(&self.retry, "token/list", || self.list_once(auth)).await
    }

    async fn verify(&self, token: &Token) -> Result<String, ProviderError> {
        let v = with_retries(&self.retry, "scim/Me", || {
            self.call(
                reqwest::Method::GET,
                "/api/2.0/preview/scim/v2/Me",
                token,
                None,
            )
        })
        .await?;
        v.get("userName")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ProviderError::Malformed("scim/Me: userName missing".into()))
    }
}

/// rustls needs a process-wide crypto provider before any client is built (see TOOLING.md).
pub fn install_crypto_provider() {
    // Err means one is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn classify(status: u16, body: Option<&Value>, retry_after: Option<Duration>) -> ProviderError {
    // Databricks sends error_code as a number for the invalid-token case and as a string elsewhere.
    let code = body.and_then(|b| b.get("error_code")).map(|c| match c {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    let mut message = body
        .and_then(|b| b.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    message.truncate(300);
    if code.as_deref() == Some("QUOTA_EXCEEDED") {
        return ProviderError::QuotaExceeded { message };
    }
    match status {
        401 | 403 => ProviderError::InvalidToken { status, message },
        404 => ProviderError::NotFound { message },
        429 => ProviderError::RateLimited { retry_after },
        500..=599 => ProviderError::Server {
            status,
            message,
            retry_after,
        },
        _ => ProviderError::Other {
            status,
            message: format!(
                "{}{message}",
                code.map(|c| format!("{c}: ")).unwrap_or_default()
            ),
        },
    }
}

fn millis(v: &Value, field: &str) -> Result<i64, ProviderError> {
    v.get(field).and_then(Value::as_i64).ok_or_else(|| {
        ProviderError::Malformed(format!("token_info.{field} missing or not a number"))
    })
}

fn parse_info(v: &Value) -> Result<TokenInfo, ProviderError> {
    let token_id = v
        .get("token_id")
        .and_then(Value::as_str)
        .ok_or_else(|| ProviderError::Malformed("token_info.token_id missing".into()))?;
    let creation_time = DateTime::from_timestamp_millis(millis(v, "creation_time")?)
        .ok_or_else(|| ProviderError::Malformed("token_info.creation_time out of range".into()))?;
    let expiry = millis(v, "expiry_time")?;
    let expires_at = if expiry < 0 {
        None
    } else {
        Some(DateTime::from_timestamp_millis(expiry).ok_or_else(|| {
            ProviderError::Malformed("token_info.expiry_time out of range".into())
        })?)
    };
    let comment = v
        .get("comment")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Ok(TokenInfo {
        token_id: token_id.to_string(),
        creation_time,
        expires_at,
        comment,
    })
}

fn parse_minted(v: &Value, sent_at: DateTime<Utc>) -> Result<MintedToken, ProviderError> {
    let value = v
        .get("token_value")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ProviderError::Malformed("token/create: token_value missing".into()))?;
    let info = v
        .get("token_info")
        .ok_or_else(|| ProviderError::Malformed("token/create: token_info missing".into()))?;
    Ok(MintedToken {
        token: Token::new(value),
        info: parse_info(info)?,
        sent_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn both_error_code_forms_are_understood() {
        let numeric = json!({"error_code": 403, "message": "Invalid access token."});
        assert!(matches!(
            classify(403, Some(&numeric), None),
            ProviderError::InvalidToken { status: 403, .. }
        ));
        let quota = json!({"error_code": "QUOTA_EXCEEDED", "message": "too many"});
        assert!(matches!(
            classify(400, Some(&quota), None),
            ProviderError::QuotaExceeded { .. }
        ));
        let missing = json!({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such token"});
        assert!(matches!(
            classify(404, Some(&missing), None),
            ProviderError::NotFound { .. }
        ));
        assert!(matches!(
            classify(503, None, Some(Duration::from_secs(3))),
            ProviderError::Server {
                retry_after: Some(_),
                ..
            }
        ));
        assert!(matches!(
            classify(429, None, None),
            ProviderError::RateLimited { .. }
        ));
        assert!(matches!(
            classify(418, None, None),
            ProviderError::Other { status: 418, .. }
        ));
    }

    #[test]
    fn malformed_fields_are_errors_not_panics() {
        assert!(parse_minted(&json!({}), Utc::now()).is_err());
        assert!(parse_minted(&json!({"token_value": "x"}), Utc::now()).is_err());
        assert!(parse_minted(
            &json!({"token_value": "x", "token_info": {"token_id": 5}}),
            Utc::now()
        )
        .is_err());
        assert!(parse_minted(&json!({"token_value": "x", "token_info": {"token_id": "a", "creation_time": "soon", "expiry_time": 1}}), Utc::now()).is_err());
        let ok = parse_minted(&json!({"token_value": "x", "token_info": {"token_id": "a", "creation_time": 1000, "expiry_time": -1, "comment": "c"}}), Utc::now()).unwrap();
        assert_eq!(ok.info.expires_at, None);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_and_honour_retry_after_without_sleeping() {
        let policy = RetryPolicy {
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
            max_attempts: 4,
        };
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let r: Result<(), _> = with_retries(&policy, "test", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => Err(ProviderError::RateLimited {
                        retry_after: Some(Duration::from_secs(7)),
                    }),
                    1 => Err(ProviderError::Network("refused".into())),
                    _ => Ok(()),
                }
            }
        })
        .await;
        assert!(r.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let waited = start.elapsed();
        // 7 s from Retry-After, then a jittered 1-2 s step.
        assert!(
            waited >= Duration::from_secs(8) && waited <= Duration::from_secs(9),
            "{waited:?}"
        );
    }

    /// The in-call retries of a forced rotation fit in the first quarter of the threshold
    /// (the soak's neighbour lost its token to 0.8 + 1.6 + 3.2 s of retries in a 6 s one).
    #[test]
    fn in_call_retries_fit_in_the_first_quarter_of_the_threshold() {
        for threshold_s in [2u64, 6, 10, 20, 40] {
            let threshold = Duration::from_secs(threshold_s);
            let policy = RetryPolicy::for_threshold(threshold);
            for _ in 0..50 {
                let mut backoff = policy.backoff.clone();
                let total: Duration = (1..policy.max_attempts)
                    .map(|_| backoff.next_delay(None))
                    .sum();
                let budget = (threshold / 4).max(Duration::from_millis(350));
                assert!(
                    total <= budget,
                    "{total:?} of retries in a {threshold:?} threshold"
                );
            }
        }
        // The production default (60 s) keeps the usual first step of 0.5-1 s.
        let first = RetryPolicy::for_threshold(Duration::from_secs(60))
            .backoff
            .next_delay(None);
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
        // A server's Retry-After counts too: three 1 s ones outlived a 6 s threshold's token.
        let mut compressed = RetryPolicy::for_threshold(Duration::from_secs(6)).backoff;
        let waited: Duration = (0..3)
            .map(|_| compressed.next_delay(Some(Duration::from_secs(1))))
            .sum();
        assert!(waited <= Duration::from_millis(900), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_token_is_never_retried_and_attempts_are_bounded() {
        let policy = RetryPolicy::default();
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = with_retries(&policy, "test", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err(ProviderError::InvalidToken {
                    status: 403,
                    message: String::new(),
                })
            }
        })
        .await;
        assert!(matches!(r, Err(ProviderError::InvalidToken { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        calls.store(0, Ordering::SeqCst);
        let r: Result<(), _> = with_retries(&policy, "test", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err(ProviderError::Server {
                    status: 503,
                    message: String::new(),
                    retry_after: None,
                })
            }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), policy.max_attempts);
    }
}
