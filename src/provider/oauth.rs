//! Databricks OAuth behind [`Provider`]: access tokens from a service principal's secret
//! (M2M, `client_credentials`) or from a user's login (U2M, `refresh_token` with the CLI's
//! public client), the token endpoint found through the workspace's discovery document.
//!
//! Invariants: a refresh token is sent at most once per call and never retried here (a
//! single-use token sent twice may get the whole login revoked; the loop's claim decides
//! whether it may be sent at all); an error says whether the request certainly never left
//! this host ([`ProviderError::NotSent`]), the one case in which the token is still unspent;
//! the client secret and every token travel only in request bodies and headers marked
//! sensitive, never in an error or a log line. An access token is never revoked and nothing
//! is listed: [`Capabilities::retires`] is false.
//!
//! Written on reqwest rather than the `oauth2` crate: the loop needs to know, per request,
//! whether it may have reached the server, and to send a refresh exactly once; `oauth2`'s
//! request plumbing hides the first and its helpers invite the second. PKCE is two lines.

use super::{
    with_retries, Answer, Capabilities, Databricks, Grant, Granted, Held, MintedToken, Owner,
    Provider, ProviderError, RetryPolicy, TokenInfo,
};
use crate::secret::Token;
use base64::Engine;
use chrono::{TimeDelta, Utc};
use serde_json::Value;
use std::time::Duration;

/// The Databricks CLI's public OAuth client, which U2M logins use.
pub const U2M_CLIENT_ID: &str = "databricks-cli";
/// The scopes a U2M login asks for: every API, and a refresh token.
pub const AUTHORIZE_SCOPES: &str = "all-apis offline_access";
/// The scope an M2M token asks for.
const M2M_SCOPE: &str = "all-apis";
/// The discovery document, relative to the workspace URL.
const DISCOVERY_PATH: &str = "/oidc/.well-known/oauth-authorization-server";
/// The least time a refresh waits for its answer, whatever `PAT_HTTP_TIMEOUT` says: the
/// answer carries the only copy of the next refresh token, and giving up on it early loses
/// the login.
const REFRESH_MIN_WAIT: Duration = Duration::from_secs(30);
/// How long a request past its deadline may still deliver an answer that already arrived.
const ANSWER_SETTLE: Duration = Duration::from_millis(200);

/// Whose OAuth client the rotator is.
#[derive(Debug, Clone)]
pub enum OAuthClient {
    /// A service principal: its client id and secret.
    M2m {
        client_id: String,
        client_secret: Token,
    },
    /// A user's login through the CLI's public client; the refresh token is the loop's.
    U2m,
}

/// The workspace's OAuth endpoints, from its discovery document.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub authorization_endpoint: String,
    pub token_endpoint: String,
}

/// The Databricks OAuth client.
#[derive(Debug)]
pub struct OAuth {
    http: reqwest::Client,
    host: String,
    timeout: Duration,
    retry: RetryPolicy,
    client: OAuthClient,
    endpoints: tokio::sync::OnceCell<Endpoints>,
    /// The workspace's REST API, to check a token (SCIM `Me`).
    api: Databricks,
}

/// A PKCE pair (RFC 7636, S256).
pub struct Pkce {
    pub verifier: Token,
    pub challenge: String,
}

impl Pkce {
    /// A fresh verifier (256 random bits) and its challenge.
    pub fn new() -> Pkce {
        let bytes: [u8; 32] = rand::random();
        let verifier = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        Pkce {
            challenge: Pkce::challenge_of(&verifier),
            verifier: Token::new(verifier),
        }
    }

    /// `BASE64URL(SHA-256(verifier))`, the S256 challenge.
    pub fn challenge_of(verifier: &str) -> String {
        use sha2::Digest;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(verifier.as_bytes()))
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Pkce::new()
    }
}

impl OAuth {
    pub fn new(
        host: &str,
        timeout: Duration,
        retry: RetryPolicy,
        client: OAuthClient,
    ) -> Result<OAuth, ProviderError> {
        let api = Databricks::new(host, timeout, retry.clone())?;
        Ok(OAuth {
            // One connection pool for the token endpoint and the REST API.
            http: api.http().clone(),
            api,
            host: crate::config::normalize_host(host),
            timeout,
            retry,
            client,
            endpoints: tokio::sync::OnceCell::new(),
        })
    }

    /// The workspace's endpoints, read once from its discovery document.
    pub async fn endpoints(&self) -> Result<&Endpoints, ProviderError> {
        self.endpoints
            .get_or_try_init(|| async {
                let url = format!("{}{DISCOVERY_PATH}", self.host);
                let doc = with_retries(&self.retry, "oauth discovery", || async {
                    let resp = self.http.get(&url).send();
                    let resp = tokio::time::timeout(self.timeout, resp)
                        .await
                        .map_err(|_| ProviderError::Timeout(self.timeout))?
                        .map_err(transport_error)?;
                    answer(resp, "oauth discovery").await
                })
                .await?;
                let field = |name: &str| {
                    doc.get(name)
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .ok_or_else(|| {
                            ProviderError::Malformed(format!(
                                "{DISCOVERY_PATH}: {name} missing (is OAuth enabled on this workspace?)"
                            ))
                        })
                };
                Ok(Endpoints {
                    authorization_endpoint: field("authorization_endpoint")?,
                    token_endpoint: field("token_endpoint")?,
                })
            })
            .await
    }

    /// The URL a user opens to log in (authorization code with PKCE).
    pub async fn authorize_url(
        &self,
        redirect_uri: &str,
        state: &str,
        pkce: &Pkce,
    ) -> Result<String, ProviderError> {
        let endpoint = &self.endpoints().await?.authorization_endpoint;
        let url = reqwest::Url::parse_with_params(
            endpoint,
            &[
                ("response_type", "code"),
                ("client_id", U2M_CLIENT_ID),
                ("redirect_uri", redirect_uri),
                ("scope", AUTHORIZE_SCOPES),
                ("state", state),
                ("code_challenge", pkce.challenge.as_str()),
                ("code_challenge_method", "S256"),
            ],
        )
        .map_err(|e| ProviderError::Malformed(format!("authorization_endpoint: {e}")))?;
        Ok(url.to_string())
    }

    /// Exchanges a login's authorization code (sent once).
    pub async fn exchange_code(
        &self,
        code: &str,
        verifier: &Token,
        redirect_uri: &str,
    ) -> Result<Granted, ProviderError> {
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("code_verifier", verifier.expose()),
            ("redirect_uri", redirect_uri),
            ("client_id", U2M_CLIENT_ID),
        ];
        self.token_request(&form, None, self.timeout).await
    }

    /// One request to the token endpoint, never retried: `wait` for its answer.
    async fn token_request(
        &self,
        form: &[(&str, &str)],
        basic: Option<(&str, &Token)>,
        wait: Duration,
    ) -> Result<Granted, ProviderError> {
        let endpoint = self.endpoints().await?.token_endpoint.clone();
        let mut req = self.http.post(&endpoint).form(form);
        if let Some((id, secret)) = basic {
            req = req.basic_auth(id, Some(secret.expose()));
        }
        let sent_at = Utc::now();
        let call = async move {
            let resp = req.send().await.map_err(transport_error)?;
            answer(resp, "oauth token").await
        };
        tokio::pin!(call);
        let body = match tokio::time::timeout(wait, &mut call).await {
            Ok(answer) => answer?,
            // An answer ready at the deadline (a process resumed from a stop) is used.
            Err(_) => tokio::time::timeout(ANSWER_SETTLE, call)
                .await
                .unwrap_or(Err(ProviderError::Timeout(wait)))?,
        };
        parse_granted(&body, sent_at)
    }
}

/// A transport failure: [`ProviderError::NotSent`] only when no connection was made (a
/// TLS handshake the certificate failed included: nothing was sent).
fn transport_error(e: reqwest::Error) -> ProviderError {
    let host = e
        .url()
        .map(|u| format!("{}://{}", u.scheme(), u.authority()))
        .unwrap_or_default();
    if e.is_connect() {
        ProviderError::NotSent(super::describe_transport(e, &host))
    } else if e.is_timeout() {
        ProviderError::Timeout(Duration::ZERO)
    } else {
        ProviderError::Network(super::describe_transport(e, &host))
    }
}

/// A JSON answer, or the error its status and body say.
async fn answer(resp: reqwest::Response, what: &str) -> Result<Value, ProviderError> {
    // The request was sent: whatever fails mid-answer, the server may have acted on it.
    let answer = Answer::read(resp, what, |e| {
        ProviderError::Network(e.without_url().to_string())
    })
    .await?;
    if answer.succeeded() {
        return answer.into_json(what);
    }
    let Answer {
        status,
        retry_after,
        json: parsed,
    } = answer;
    let text = |name: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(|s| s.chars().take(300).collect::<String>())
    };
    Err(match (status, text("error")) {
        (400 | 401, Some(error))
            if error.starts_with("invalid_") || error == "unauthorized_client" =>
        {
            ProviderError::InvalidGrant {
                message: text("error_description").unwrap_or_default(),
                error,
            }
        }
        (429, _) => ProviderError::RateLimited { retry_after },
        (500..=599, _) => ProviderError::Server {
            status,
            message: text("error_description")
                .or_else(|| text("message"))
                .unwrap_or_default(),
            retry_after,
        },
        _ => ProviderError::Other {
            status,
            message: text("error_description")
                .or_else(|| text("message"))
                .or_else(|| text("error"))
                .unwrap_or_default(),
        },
    })
}

/// A token endpoint's answer: `{access_token, token_type, expires_in[, refresh_token]}`.
fn parse_granted(v: &Value, sent_at: chrono::DateTime<Utc>) -> Result<Granted, ProviderError> {
    let access = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ProviderError::Malformed("oauth token: access_token missing".into()))?;
    let expires_in = v
        .get("expires_in")
        .and_then(Value::as_i64)
        .filter(|s| *s > 0)
        .ok_or_else(|| ProviderError::Malformed("oauth token: expires_in missing".into()))?;
    let token = Token::new(access);
    let now = Utc::now();
    let refresh_token = v
        .get("refresh_token")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(Token::new);
    let refresh_expires_in = v
        .get("refresh_token_expires_in")
        .and_then(Value::as_u64)
        .map(Duration::from_secs);
    Ok(Granted {
        minted: MintedToken {
            info: TokenInfo {
                // An access token has no id: its fingerprint names it in logs and state.
                token_id: format!("oauth-{}", &token.sha256_hex()[..16]),
                creation_time: now,
                expires_at: Some(now + TimeDelta::seconds(expires_in)),
                comment: String::new(),
            },
            token,
            sent_at,
        },
        refresh_token,
        refresh_expires_in,
    })
}

impl Provider for OAuth {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            grant: match self.client {
                OAuthClient::M2m { .. } => Grant::OwnSecret,
                OAuthClient::U2m => Grant::RefreshToken,
            },
            retires: false,
            lifetime_asked: false,
        }
    }

    async fn mint_granted(&self, refresh: Option<&Token>) -> Result<Granted, ProviderError> {
        match (&self.client, refresh) {
            (
                OAuthClient::M2m {
                    client_id,
                    client_secret,
                },
                _,
            ) => {
                let form = [("grant_type", "client_credentials"), ("scope", M2M_SCOPE)];
                with_retries(&self.retry, "oauth client_credentials", || {
                    self.token_request(&form, Some((client_id, client_secret)), self.timeout)
                })
                .await
            }
            (OAuthClient::U2m, Some(refresh)) => {
                let form = [
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh.expose()),
                    ("client_id", U2M_CLIENT_ID),
                ];
                let wait = self.timeout.max(REFRESH_MIN_WAIT);
                self.token_request(&form, None, wait)
                    .await
                    .map_err(|e| match e {
                        ProviderError::Timeout(_) => ProviderError::Timeout(wait),
                        other => other,
                    })
            }
            (OAuthClient::U2m, None) => Err(ProviderError::InvalidGrant {
                error: "login_required".into(),
                message: "no refresh token: run `pat-rotator login`".into(),
            }),
        }
    }

    async fn mint(
        &self,
        _auth: &Token,
        _lifetime: Duration,
        _owner: &Owner,
    ) -> Result<MintedToken, ProviderError> {
        self.mint_granted(None).await.map(|g| g.minted)
    }

    /// An OAuth access token is never revoked: it lives out its (short) lifetime.
    async fn retire(&self, _auth: &Token, _token_id: &str) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Nothing to list: access tokens are not kept anywhere a client can see.
    async fn held(&self, _auth: &Token, _owner: &Owner) -> Result<Vec<Held>, ProviderError> {
        Ok(Vec::new())
    }

    async fn verify(&self, token: &Token) -> Result<String, ProviderError> {
        self.api.verify(token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pkce_challenge_is_the_s256_of_its_verifier() {
        // RFC 7636, appendix B.
        assert_eq!(
            Pkce::challenge_of("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let p = Pkce::new();
        assert_eq!(p.verifier.expose().len(), 43);
        assert_eq!(Pkce::challenge_of(p.verifier.expose()), p.challenge);
    }

    #[test]
    fn an_answer_gives_the_access_token_its_lifetime_and_the_next_refresh_token() {
        let sent = Utc::now();
        let g = parse_granted(
            &json!({"access_token": "a", "token_type": "Bearer", "expires_in": 3600, "refresh_token": "r", "scope": "all-apis"}),
            sent,
        )
        .unwrap();
        let info = &g.minted.info;
        assert_eq!(
            (info.expires_at.unwrap() - info.creation_time).num_seconds(),
            3600
        );
        assert_eq!(g.refresh_token, Some(Token::new("r")));
        assert!(parse_granted(&json!({"access_token": "a"}), sent).is_err());
        assert!(parse_granted(&json!({"expires_in": 5}), sent).is_err());
    }
}
