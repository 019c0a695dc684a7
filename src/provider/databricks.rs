//! The Databricks REST 2.0 token API behind [`Provider`]: a token's owner is its comment
//! (`<PAT_TOKEN_COMMENT>:<instance>`), a credential is a personal access token.
//!
//! Invariants: every request has a timeout and goes through [`with_retries`]; bodies are
//! size-capped and every field is checked, so a bad response is an error, never a panic; a
//! `create` that may have minted a token before failing is reconciled (the orphan is found
//! by its comment and revoked) so a flaky network never leaks tokens toward the quota.

use super::{
    install_crypto_provider, with_retries, Answer, Held, MintedToken, Owner, Provider,
    ProviderError, RetryPolicy, TokenInfo,
};
use crate::secret::Token;
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{json, Value};
use std::time::Duration;
use tracing::{debug, warn};

/// The Databricks REST 2.0 token API.
/// How long a request past its deadline may still deliver an answer that already arrived.
const ANSWER_SETTLE: Duration = Duration::from_millis(200);

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
        // The request's whole timeout is applied around `call` (see there), not here.
        let http = reqwest::Client::builder()
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

    /// The HTTP client (a clone shares its connection pool).
    pub(super) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// One request with its whole timeout. `tokio::time::timeout` polls the request before
    /// its deadline: a process stopped (SIGSTOP, a frozen container) while its answer
    /// arrived finds both ready when it resumes, and uses the answer instead of calling it
    /// lost (a lost create answer would abandon a fresh token and mint again).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: &Token,
        body: Option<Value>,
    ) -> Result<Value, ProviderError> {
        self.call_dated(method, path, auth, body)
            .await
            .map(|(value, _)| value)
    }

    /// [`Databricks::call`], with the answer's `Date` (the provider's clock) when it has one.
    async fn call_dated(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: &Token,
        body: Option<Value>,
    ) -> Result<(Value, Option<DateTime<Utc>>), ProviderError> {
        let call = self.call_untimed(method, path, auth, body);
        tokio::pin!(call);
        if let Ok(answer) = tokio::time::timeout(self.timeout, &mut call).await {
            return answer;
        }
        // The deadline and an answer can be ready at the same instant (a process resumed
        // from a stop): the connection's own task may not have handed the answer over yet.
        tokio::time::timeout(ANSWER_SETTLE, call)
            .await
            .unwrap_or(Err(ProviderError::Timeout(self.timeout)))
    }

    async fn call_untimed(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: &Token,
        body: Option<Value>,
    ) -> Result<(Value, Option<DateTime<Utc>>), ProviderError> {
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
        let resp = req.send().await.map_err(|e| self.transport_error(e))?;
        let date = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| DateTime::parse_from_rfc2822(v).ok())
            .map(|d| d.with_timezone(&Utc));
        let answer = Answer::read(resp, path, |e| self.transport_error(e)).await?;
        if answer.succeeded() {
            return answer.into_json(path).map(|v| (v, date));
        }
        Err(classify(
            answer.status,
            answer.json.as_ref(),
            answer.retry_after,
        ))
    }

    fn transport_error(&self, e: reqwest::Error) -> ProviderError {
        if e.is_timeout() {
            ProviderError::Timeout(self.timeout)
        } else {
            ProviderError::Network(super::describe_transport(e, &self.host))
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

    /// Every live token of `auth`'s user (`token/list`), with retries.
    pub async fn list(&self, auth: &Token) -> Result<Vec<TokenInfo>, ProviderError> {
        with_retries(&self.retry, "token/list", || self.list_once(auth)).await
    }

    async fn list_once(&self, auth: &Token) -> Result<Vec<TokenInfo>, ProviderError> {
        let v = self
            .call(reqwest::Method::GET, "/api/2.0/token/list", auth, None)
            .await?;
        parse_infos(&v)
    }
}

impl Provider for Databricks {
    async fn mint(
        &self,
        auth: &Token,
        lifetime: Duration,
        owner: &Owner,
    ) -> Result<MintedToken, ProviderError> {
        let started = Utc::now();
        let comment = owner.tag();
        with_retries(&self.retry, "token/create", || {
            self.mint_once(auth, lifetime, &comment, started)
        })
        .await
    }

    async fn retire(&self, auth: &Token, token_id: &str) -> Result<(), ProviderError> {
        with_retries(&self.retry, "token/delete", || {
            self.revoke_once(auth, token_id)
        })
        .await
    }

    async fn held(&self, auth: &Token, owner: &Owner) -> Result<Vec<Held>, ProviderError> {
        Ok(owner.classify(self.list(auth).await?))
    }

    async fn time_left(
        &self,
        token: &Token,
        token_id: &str,
    ) -> Result<Option<Duration>, ProviderError> {
        let (v, date) = with_retries(&self.retry, "token/list", || {
            self.call_dated(reqwest::Method::GET, "/api/2.0/token/list", token, None)
        })
        .await?;
        let infos = parse_infos(&v)?;
        let Some(date) = date else {
            return Ok(None);
        };
        // `Date` has whole seconds: the provider's now may be up to a second later.
        Ok(infos
            .iter()
            .find(|i| i.token_id == token_id)
            .and_then(|i| i.expires_at)
            .map(|exp| {
                (exp - date - TimeDelta::seconds(1))
                    .to_std()
                    .unwrap_or_default()
            }))
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
    match code.as_deref() {
        Some("QUOTA_EXCEEDED") => return ProviderError::QuotaExceeded { message },
        Some("PERMISSION_DENIED") => return ProviderError::PermissionDenied { message },
        Some("INVALID_PARAMETER_VALUE") if message.to_ascii_lowercase().contains("lifetime") => {
            return ProviderError::LifetimeTooLong {
                max: lifetime_cap(&message),
                message,
            }
        }
        _ => {}
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

/// The cap a refusal names: the first number followed by "day(s)", "hour(s)" or
/// "second(s)" (Databricks' `maxTokenLifetimeDays` is in days).
fn lifetime_cap(message: &str) -> Option<Duration> {
    let words: Vec<&str> = message
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ',' || c == '.')
        .filter(|w| !w.is_empty())
        .collect();
    words.windows(2).find_map(|pair| {
        let n: u64 = pair[0].parse().ok()?;
        let unit = pair[1].to_ascii_lowercase();
        let secs = match unit.trim_end_matches('s') {
            "day" => n.checked_mul(86_400)?,
            "hour" => n.checked_mul(3_600)?,
            "second" => n,
            _ => return None,
        };
        (secs > 0).then(|| Duration::from_secs(secs))
    })
}

fn millis(v: &Value, field: &str) -> Result<i64, ProviderError> {
    v.get(field).and_then(Value::as_i64).ok_or_else(|| {
        ProviderError::Malformed(format!("token_info.{field} missing or not a number"))
    })
}

/// A `token/list` answer's `token_infos`.
fn parse_infos(v: &Value) -> Result<Vec<TokenInfo>, ProviderError> {
    match v.get("token_infos") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(parse_info).collect(),
        Some(_) => Err(ProviderError::Malformed(
            "token/list: token_infos is not an array".into(),
        )),
    }
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

    #[test]
    fn a_workspace_rule_is_told_from_a_bad_token() {
        let denied = json!({"error_code": "PERMISSION_DENIED", "message": "User does not have permission to use tokens."});
        assert!(matches!(
            classify(403, Some(&denied), None),
            ProviderError::PermissionDenied { .. }
        ));
        let capped = json!({"error_code": "INVALID_PARAMETER_VALUE", "message": "Token lifetime cannot exceed 2 days (maxTokenLifetimeDays)."});
        assert!(matches!(
            classify(400, Some(&capped), None),
            ProviderError::LifetimeTooLong { max: Some(d), .. } if d == Duration::from_secs(2 * 86_400)
        ));
        assert_eq!(
            lifetime_cap("at most 90 seconds"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(lifetime_cap("lifetime exceeds the maximum"), None);
        let other = json!({"error_code": "INVALID_PARAMETER_VALUE", "message": "comment too long"});
        assert!(matches!(
            classify(400, Some(&other), None),
            ProviderError::Other { .. }
        ));
    }

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
}
