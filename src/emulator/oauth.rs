//! The emulator's OAuth, as a Databricks workspace speaks it: the discovery document,
//! `/oidc/v1/authorize` (authorization code with PKCE S256, consent given at once) and
//! `/oidc/v1/token` (`client_credentials`, `authorization_code`, `refresh_token`).
//!
//! Invariants: refresh tokens are single-use when the setting says so, and a used one
//! presented again is a replay, counted, refused with `invalid_grant` and, under the
//! strictest policy, the end of its whole family (every refresh and access token of that
//! login); a login ends at its absolute session lifetime whatever its refreshes; access
//! tokens are bearer tokens on every API the emulator serves (the same dead-token
//! accounting as a PAT's). Faults apply as on the token API: an injected error before any
//! grant is looked at (nothing is exchanged), the latency after it (an answer that may be
//! lost although the exchange happened).

use super::{issue_locked, new_secret, Emulator, Inner};
use crate::secret::{sha256_hex, Token};
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

/// The public client U2M logins use.
const CLI_CLIENT: &str = crate::provider::U2M_CLIENT_ID;
/// How long an authorization code may wait for its exchange.
const CODE_TTL: TimeDelta = TimeDelta::seconds(300);

/// What a replayed (already used) refresh token does.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ReplayPolicy {
    /// Refused with `invalid_grant`; the rest of the login lives on.
    Reject,
    /// Refused, and the whole login (every token of its family) revoked: the strictest.
    #[default]
    RevokeFamily,
}

/// The OAuth app's token access policy, changeable at run time (`POST /emulator/oauth`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OAuthSettings {
    #[serde(default = "default_access_ttl")]
    pub access_ttl_s: u64,
    #[serde(default = "default_refresh_ttl")]
    pub refresh_ttl_s: u64,
    /// A login's absolute lifetime: no refresh works past it.
    #[serde(default = "default_refresh_ttl")]
    pub session_lifetime_s: u64,
    #[serde(default = "default_true")]
    pub single_use: bool,
    #[serde(default)]
    pub replay: ReplayPolicy,
}

fn default_access_ttl() -> u64 {
    3600
}
fn default_refresh_ttl() -> u64 {
    90 * 24 * 3600
}
fn default_true() -> bool {
    true
}

impl Default for OAuthSettings {
    fn default() -> Self {
        OAuthSettings {
            access_ttl_s: default_access_ttl(),
            refresh_ttl_s: default_refresh_ttl(),
            session_lifetime_s: default_refresh_ttl(),
            single_use: true,
            replay: ReplayPolicy::RevokeFamily,
        }
    }
}

/// OAuth's counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OAuthCounters {
    pub token_requests: u64,
    pub client_credentials_grants: u64,
    pub logins: u64,
    pub refreshes: u64,
    /// Used refresh tokens presented again.
    pub replays: u64,
    pub family_revocations: u64,
    pub invalid_grants: u64,
}

#[derive(Debug)]
struct PendingCode {
    challenge: String,
    redirect_uri: String,
    offline: bool,
    expires_at: DateTime<Utc>,
}

#[derive(Debug)]
struct RefreshRecord {
    family: String,
    expires_at: DateTime<Utc>,
    used: bool,
}

#[derive(Debug)]
struct Family {
    session_ends_at: DateTime<Utc>,
    revoked: bool,
}

/// OAuth's part of the emulator's state.
#[derive(Debug, Default)]
pub(super) struct OAuthState {
    pub(super) settings: OAuthSettings,
    pub(super) counters: OAuthCounters,
    /// The service principal's client id and the SHA-256 of its secret.
    client: Option<(String, String)>,
    codes: HashMap<String, PendingCode>,
    refresh: HashMap<String, RefreshRecord>,
    families: HashMap<String, Family>,
}

impl Emulator {
    /// The service principal every M2M test uses: a fresh client id and secret.
    pub fn m2m_client(&self) -> (String, Token) {
        let mut inner = self.lock();
        let id = inner
            .oauth
            .client
            .as_ref()
            .map(|(id, _)| id.clone())
            .unwrap_or_else(|| format!("sp-{}", new_secret("", 12)));
        let secret = Token::new(new_secret("dose", 32));
        inner.oauth.client = Some((id.clone(), secret.sha256_hex()));
        (id, secret)
    }

    pub fn oauth_settings(&self) -> OAuthSettings {
        self.lock().oauth.settings.clone()
    }

    pub fn set_oauth_settings(&self, settings: OAuthSettings) {
        self.lock().oauth.settings = settings;
    }

    pub fn oauth_counters(&self) -> OAuthCounters {
        self.lock().oauth.counters.clone()
    }

    /// Revokes every login (an admin's "sign out everywhere"; tests of `invalid_grant`).
    pub fn revoke_logins(&self) {
        let now = self.now();
        let mut inner = self.lock();
        let families: Vec<String> = inner.oauth.families.keys().cloned().collect();
        for f in families {
            revoke_family(&mut inner, &f, now);
        }
    }
}

/// OAuth's routes.
pub(super) fn routes() -> Router<Emulator> {
    Router::new()
        .route(
            "/oidc/.well-known/oauth-authorization-server",
            get(discovery),
        )
        .route("/oidc/v1/authorize", get(authorize))
        .route("/oidc/v1/token", post(token))
        .route(
            "/emulator/oauth",
            get(|State(e): State<Emulator>| async move {
                Json(json!({"settings": e.oauth_settings(), "counters": e.oauth_counters()}))
            })
            .post(
                |State(e): State<Emulator>, Json(s): Json<OAuthSettings>| async move {
                    e.set_oauth_settings(s);
                    Json(e.oauth_settings())
                },
            ),
        )
}

async fn discovery(headers: HeaderMap) -> Response {
    let host = super::serving::request_host(&headers);
    let oidc = format!("http://{host}/oidc");
    Json(json!({
        "issuer": oidc,
        "authorization_endpoint": format!("{oidc}/v1/authorize"),
        "token_endpoint": format!("{oidc}/v1/token"),
        "jwks_uri": format!("{oidc}/jwks.json"),
        "response_types_supported": ["code"],
        "grant_types_supported": ["client_credentials", "authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "scopes_supported": ["all-apis", "offline_access", "openid", "email", "profile"],
    }))
    .into_response()
}

#[derive(Deserialize)]
struct AuthorizeQuery {
    response_type: Option<String>,
    client_id: Option<String>,
    redirect_uri: Option<String>,
    scope: Option<String>,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

/// Consent is given at once: the redirect carries the code and the caller's `state`.
async fn authorize(State(e): State<Emulator>, Query(q): Query<AuthorizeQuery>) -> Response {
    let bad = |d: &str| oauth_error(StatusCode::BAD_REQUEST, "invalid_request", d);
    if q.response_type.as_deref() != Some("code") {
        return bad("response_type must be code");
    }
    if q.client_id.as_deref() != Some(CLI_CLIENT) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            "unknown client_id",
        );
    }
    let Some(redirect) = q
        .redirect_uri
        .filter(|r| r.starts_with("http://localhost:") || r.starts_with("http://127.0.0.1:"))
    else {
        return bad("redirect_uri must be a loopback URL");
    };
    if q.code_challenge_method.as_deref() != Some("S256") {
        return bad("code_challenge_method must be S256");
    }
    let Some(challenge) = q.code_challenge.filter(|c| c.len() >= 43) else {
        return bad("code_challenge is required");
    };
    let Some(state) = q.state else {
        return bad("state is required");
    };
    let code = new_secret("", 40);
    let now = e.now();
    e.lock().oauth.codes.insert(
        code.clone(),
        PendingCode {
            challenge,
            redirect_uri: redirect.clone(),
            offline: q
                .scope
                .unwrap_or_default()
                .split_whitespace()
                .any(|s| s == "offline_access"),
            expires_at: now + CODE_TTL,
        },
    );
    let sep = if redirect.contains('?') { '&' } else { '?' };
    let location = format!(
        "{redirect}{sep}code={code}&state={}",
        form_urlencoded_byte_serialize(&state)
    );
    Redirect::to(&location).into_response()
}

/// `application/x-www-form-urlencoded` for one value (the `state` echoed back).
fn form_urlencoded_byte_serialize(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    code: Option<String>,
    code_verifier: Option<String>,
    redirect_uri: Option<String>,
    refresh_token: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

async fn token(
    State(e): State<Emulator>,
    headers: HeaderMap,
    Form(f): Form<TokenForm>,
) -> Response {
    e.lock().oauth.counters.token_requests += 1;
    if let Some(r) = e.fault() {
        return r;
    }
    let answer = match f.grant_type.as_deref() {
        Some("client_credentials") => client_credentials(&e, &headers, &f),
        Some("authorization_code") => authorization_code(&e, &f),
        Some("refresh_token") => refresh(&e, &f),
        _ => Err(("unsupported_grant_type", "grant_type is not supported")),
    };
    // The exchange is done: an answer delayed past the client's patience is lost to it.
    e.latency().await;
    match answer {
        Ok(body) => Json(body).into_response(),
        Err((error, description)) => {
            e.lock().oauth.counters.invalid_grants += 1;
            let status = if error == "invalid_client" {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::BAD_REQUEST
            };
            oauth_error(status, error, description)
        }
    }
}

type Answer = Result<serde_json::Value, (&'static str, &'static str)>;

/// The client id and secret of a request: HTTP Basic, else the form's fields.
fn client_of(headers: &HeaderMap, f: &TokenForm) -> Option<(String, String)> {
    use base64::Engine;
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(i, p)| (i.to_string(), p.to_string()))
        });
    basic.or_else(|| Some((f.client_id.clone()?, f.client_secret.clone()?)))
}

fn client_credentials(e: &Emulator, headers: &HeaderMap, f: &TokenForm) -> Answer {
    let (id, secret) =
        client_of(headers, f).ok_or(("invalid_client", "client authentication is required"))?;
    let now = e.now();
    let mut inner = e.lock();
    let known = inner
        .oauth
        .client
        .as_ref()
        .is_some_and(|(cid, sha)| *cid == id && *sha == sha256_hex(secret.as_bytes()));
    if !known {
        return Err(("invalid_client", "Client authentication failed"));
    }
    inner.oauth.counters.client_credentials_grants += 1;
    Ok(access_answer(&mut inner, now, None, None))
}

fn authorization_code(e: &Emulator, f: &TokenForm) -> Answer {
    let now = e.now();
    let mut inner = e.lock();
    let code = f
        .code
        .as_ref()
        .and_then(|c| inner.oauth.codes.remove(c))
        .filter(|c| c.expires_at > now)
        .ok_or(("invalid_grant", "Authorization code is invalid or expired"))?;
    if f.client_id.as_deref() != Some(CLI_CLIENT) {
        return Err(("invalid_client", "unknown client_id"));
    }
    if f.redirect_uri.as_deref() != Some(code.redirect_uri.as_str()) {
        return Err((
            "invalid_grant",
            "redirect_uri does not match the authorization request",
        ));
    }
    let verified = f
        .code_verifier
        .as_deref()
        .is_some_and(|v| crate::provider::Pkce::challenge_of(v) == code.challenge);
    if !verified {
        return Err(("invalid_grant", "PKCE verification failed"));
    }
    inner.oauth.counters.logins += 1;
    let family = new_secret("fam-", 12);
    let session_ends_at = now + secs(inner.oauth.settings.session_lifetime_s);
    inner.oauth.families.insert(
        family.clone(),
        Family {
            session_ends_at,
            revoked: false,
        },
    );
    let refresh = code
        .offline
        .then(|| new_refresh(&mut inner, &family, now, session_ends_at));
    Ok(access_answer(&mut inner, now, Some(&family), refresh))
}

fn refresh(e: &Emulator, f: &TokenForm) -> Answer {
    let now = e.now();
    let mut inner = e.lock();
    if f.client_id.as_deref() != Some(CLI_CLIENT) {
        return Err(("invalid_client", "unknown client_id"));
    }
    let sha = sha256_hex(f.refresh_token.as_deref().unwrap_or("").as_bytes());
    let Some(record) = inner.oauth.refresh.get(&sha) else {
        return Err(("invalid_grant", "Refresh token is invalid"));
    };
    let family_id = record.family.clone();
    let (used, expires_at) = (record.used, record.expires_at);
    let Some(family) = inner.oauth.families.get(&family_id) else {
        return Err(("invalid_grant", "Refresh token is invalid"));
    };
    let (revoked, session_ends_at) = (family.revoked, family.session_ends_at);
    if used {
        inner.oauth.counters.replays += 1;
        if inner.oauth.settings.replay == ReplayPolicy::RevokeFamily && !revoked {
            revoke_family(&mut inner, &family_id, now);
        }
        return Err(("invalid_grant", "Refresh token has already been used"));
    }
    if revoked {
        return Err(("invalid_grant", "Refresh token has been revoked"));
    }
    if session_ends_at <= now {
        return Err((
            "invalid_grant",
            "The session has reached its absolute lifetime; log in again",
        ));
    }
    if expires_at <= now {
        return Err(("invalid_grant", "Refresh token has expired"));
    }
    inner.oauth.counters.refreshes += 1;
    let next = if inner.oauth.settings.single_use {
        if let Some(r) = inner.oauth.refresh.get_mut(&sha) {
            r.used = true;
        }
        Some(new_refresh(&mut inner, &family_id, now, session_ends_at))
    } else {
        None
    };
    Ok(access_answer(&mut inner, now, Some(&family_id), next))
}

fn secs(s: u64) -> TimeDelta {
    TimeDelta::seconds(s.min(i64::MAX as u64 / 1000) as i64)
}

/// A new refresh token of `family`, with its remaining life in seconds.
fn new_refresh(
    inner: &mut Inner,
    family: &str,
    now: DateTime<Utc>,
    session_ends_at: DateTime<Utc>,
) -> (Token, i64) {
    let token = Token::new(new_secret("doser", 48));
    let expires_at = (now + secs(inner.oauth.settings.refresh_ttl_s)).min(session_ends_at);
    inner.oauth.refresh.insert(
        token.sha256_hex(),
        RefreshRecord {
            family: family.to_string(),
            expires_at,
            used: false,
        },
    );
    (token, (expires_at - now).num_seconds())
}

/// A token answer: a new access token (a bearer token everywhere), and a refresh token.
fn access_answer(
    inner: &mut Inner,
    now: DateTime<Utc>,
    family: Option<&str>,
    refresh: Option<(Token, i64)>,
) -> serde_json::Value {
    let ttl = inner.oauth.settings.access_ttl_s.max(1);
    let (access, _) = issue_locked(inner, now, Some(Duration::from_secs(ttl)), "oauth");
    if let Some(rec) = inner.tokens.get_mut(&access.sha256_hex()) {
        rec.oauth = true;
        rec.family = family.map(str::to_string);
    }
    let mut body = json!({
        "access_token": access.expose(),
        "token_type": "Bearer",
        "expires_in": ttl,
        "scope": "all-apis offline_access",
    });
    if let Some((r, left)) = refresh {
        body["refresh_token"] = json!(r.expose());
        body["refresh_token_expires_in"] = json!(left);
    }
    body
}

/// Ends a login: its refresh tokens stop working and its access tokens are revoked.
fn revoke_family(inner: &mut Inner, family: &str, now: DateTime<Utc>) {
    if let Some(f) = inner.oauth.families.get_mut(family) {
        if !f.revoked {
            f.revoked = true;
            inner.oauth.counters.family_revocations += 1;
        }
    }
    for t in inner
        .tokens
        .values_mut()
        .filter(|t| t.family.as_deref() == Some(family) && t.revoked_at.is_none())
    {
        t.revoked_at = Some(now);
    }
}
