//! The provider seam: what the rotation loop needs from whatever issues its credentials.
//!
//! [`Provider`] speaks the loop's terms: mint a replacement for an [`Owner`], retire an
//! old credential, list what the source holds with whose each is ([`Origin`]), and identify
//! a credential known only by its value (a seed). How a credential carries its owner (a
//! PAT's comment, a label) and how a seed is found are the provider's rules, so another
//! source (GitLab's rotate API, a cloud's key service) is one module here and the line that
//! builds it (`cli::provider_for`). [`Databricks`] is the PAT client, [`OAuth`] the OAuth
//! one (M2M and U2M), and [`Source`] the one the configuration picks.
//!
//! What a source can do is asked, not assumed ([`Capabilities`]): what it mints with (a live
//! credential of its own kind, a secret of its own, or a single-use refresh token the loop
//! claims before each use), whether it can list and take back what it issued, and whether
//! it grants the lifetime asked for or picks its own.
//!
//! Invariants: retries (connection errors, 5xx, 429 with `Retry-After`) back off with
//! jitter and never retry 401/403, which is the dead-token path the loop owns; the failure
//! kinds a metric can carry are [`ProviderError::KINDS`], one per variant.

use crate::backoff::Backoff;
use crate::secret::Token;
use chrono::{DateTime, Utc};
use std::future::Future;
use std::time::Duration;
use tracing::warn;

mod databricks;
mod oauth;
mod source;

pub use databricks::Databricks;
pub use oauth::{OAuth, OAuthClient, Pkce, AUTHORIZE_SCOPES, U2M_CLIENT_ID};
pub use source::Source;

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

/// A token minted with the provider's own grant ([`Provider::mint_granted`]), and the
/// refresh token that replaces the one used, if the grant rotates.
#[derive(Debug, Clone)]
pub struct Granted {
    pub minted: MintedToken,
    pub refresh_token: Option<Token>,
    /// How long the new refresh token works, when the provider says.
    pub refresh_expires_in: Option<Duration>,
}

/// What a provider mints with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// A live credential of the kind it mints (a PAT mints a PAT): the loop picks one from
    /// its fallback chain and calls [`Provider::mint`].
    LiveCredential,
    /// A secret of its own (an OAuth client secret): [`Provider::mint_granted`] with `None`.
    OwnSecret,
    /// A single-use refresh token kept in the store's state: the loop claims it durably,
    /// calls [`Provider::mint_granted`] once with it, and stores its successor before the
    /// new token is published.
    RefreshToken,
}

/// What a provider can do (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub grant: Grant,
    /// It can list what it issued and revoke it: replaced tokens are revoked after the
    /// grace, orphans are reaped. Without it nothing is revoked and nothing is reaped.
    pub retires: bool,
    /// It grants the lifetime asked for (`PAT_TOKEN_LIFETIME`); without it the provider
    /// picks the lifetime, and a short one is no reason for a warning.
    pub lifetime_asked: bool,
}

impl Capabilities {
    /// A personal access token's: minted with a live one, listed and revoked, lifetime asked.
    pub const PAT: Capabilities = Capabilities {
        grant: Grant::LiveCredential,
        retires: true,
        lifetime_asked: true,
    };
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
    /// OAuth: the grant itself was refused (`invalid_grant`: a refresh token used, expired
    /// or revoked, the session's lifetime over; `invalid_client`: a wrong client secret).
    #[error("the workspace refused the OAuth grant ({error}: {message})")]
    InvalidGrant { error: String, message: String },
    /// The workspace refuses tokens to this user (an admin took the permission away; the
    /// user's tokens were revoked with it).
    #[error("the user may not use tokens ({message}): a workspace admin must grant the token permission back (Settings > Advanced > Personal access tokens > Permissions), or keep an OAuth token instead (PAT_CREDENTIAL=oauth-m2m with a service principal)")]
    PermissionDenied { message: String },
    /// The workspace caps a token's lifetime below the one asked (`maxTokenLifetimeDays`);
    /// `max` when its answer says the cap.
    #[error(
        "the workspace's maximum token lifetime is shorter than PAT_TOKEN_LIFETIME ({message})"
    )]
    LifetimeTooLong {
        max: Option<Duration>,
        message: String,
    },
    /// The request never left this host (no connection could be made): whatever it
    /// carried was not received, so a single-use refresh token is still unspent.
    #[error("cannot connect to the provider: {0}")]
    NotSent(String),
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
        "invalid_grant",
        "not_sent",
        "permission_denied",
        "lifetime_too_long",
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
            ProviderError::InvalidGrant { .. } => "invalid_grant",
            ProviderError::NotSent(_) => "not_sent",
            ProviderError::PermissionDenied { .. } => "permission_denied",
            ProviderError::LifetimeTooLong { .. } => "lifetime_too_long",
        }
    }

    pub(crate) fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited { .. }
                | ProviderError::Server { .. }
                | ProviderError::Network(_)
                | ProviderError::NotSent(_)
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
    pub(crate) fn may_have_minted(&self) -> bool {
        matches!(
            self,
            ProviderError::Timeout(_)
                | ProviderError::Network(_)
                | ProviderError::Server { .. }
                | ProviderError::Malformed(_)
        )
    }
}

/// Who mints, and whose credentials a rotator may retire. A credential is tagged with
/// `<family>:<instance>` of the rotator that minted it (a PAT's comment); rotators sharing
/// a config file or a Secret share the family and differ by instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// `PAT_TOKEN_COMMENT`: what every pat-rotator of this deployment tags with.
    pub family: String,
    /// The instance a credential minted now carries; reaping matches it exactly.
    pub instance: String,
    /// Every instance whose credentials this rotator may retire (`instance` among them).
    pub owned: Vec<String>,
}

/// Whose a credential the provider holds is, as an [`Owner`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Minted as this rotator's [`Owner::instance`] now is: reaped when orphaned.
    ThisInstance,
    /// Minted by another of the instances this rotator owns (the cluster store's pod-local
    /// tokens): retired by this rotator, never reaped.
    Owned,
    /// Minted by another pat-rotator of the same family: left to it.
    AnotherRotator,
    /// Not minted by any pat-rotator (a seed, the user's own tokens).
    Foreign,
}

impl Owner {
    /// The owner of a rotator whose instance alone it may retire.
    pub fn single(family: &str, instance: &str) -> Owner {
        Owner {
            family: family.into(),
            instance: instance.into(),
            owned: vec![instance.into()],
        }
    }

    /// The tag a credential minted now carries.
    pub fn tag(&self) -> String {
        format!("{}:{}", self.family, self.instance)
    }

    /// The credentials a provider listed (each with its tag in `comment`), with whose each is.
    pub fn classify(&self, listed: Vec<TokenInfo>) -> Vec<Held> {
        listed
            .into_iter()
            .map(|info| Held {
                origin: self.origin_of(&info.comment),
                info,
            })
            .collect()
    }

    /// Whose a credential carrying `tag` is.
    pub fn origin_of(&self, tag: &str) -> Origin {
        let instance = tag
            .strip_prefix(self.family.as_str())
            .and_then(|rest| rest.strip_prefix(':'));
        match instance {
            Some(i) if i == self.instance => Origin::ThisInstance,
            Some(i) if self.owned.iter().any(|o| o == i) => Origin::Owned,
            Some(i) if !i.is_empty() => Origin::AnotherRotator,
            _ => Origin::Foreign,
        }
    }
}

/// A live credential the provider holds for the authenticating user.
#[derive(Debug, Clone)]
pub struct Held {
    pub info: TokenInfo,
    pub origin: Origin,
}

/// What [`Provider::identify`] found for a credential known only by its value.
#[derive(Debug, Clone)]
pub enum Identified {
    Found(TokenInfo),
    /// No certain answer: this many credentials could be it.
    Ambiguous(usize),
}

/// What the rotation loop needs from a credential source. Which credential authenticates a
/// call is the loop's choice (the dead-token recovery of DESIGN.md: the file's token, then
/// another live one, then the bootstrap), so every call takes it.
pub trait Provider: Send + Sync + 'static {
    /// What it mints with and whether it can take back what it issued.
    fn capabilities(&self) -> Capabilities {
        Capabilities::PAT
    }

    /// Mints with the provider's own grant, for a provider whose [`Grant`] is not
    /// [`Grant::LiveCredential`]: `refresh` is the single-use refresh token for
    /// [`Grant::RefreshToken`] (sent once: never retried here), `None` for
    /// [`Grant::OwnSecret`].
    fn mint_granted(
        &self,
        refresh: Option<&Token>,
    ) -> impl Future<Output = Result<Granted, ProviderError>> + Send {
        let _ = refresh;
        async {
            Err(ProviderError::Other {
                status: 0,
                message: "this provider mints with a live credential only".into(),
            })
        }
    }

    /// Mints a replacement that lives `lifetime`, tagged as `owner`'s.
    fn mint(
        &self,
        auth: &Token,
        lifetime: Duration,
        owner: &Owner,
    ) -> impl Future<Output = Result<MintedToken, ProviderError>> + Send;

    /// Retires (revokes) the credential `token_id`. One already gone is `NotFound`.
    fn retire(
        &self,
        auth: &Token,
        token_id: &str,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;

    /// Every live credential of the authenticating user, with whose each is.
    fn held(
        &self,
        auth: &Token,
        owner: &Owner,
    ) -> impl Future<Output = Result<Vec<Held>, ProviderError>> + Send;

    /// The provider's record of `seed`, a live credential no pat-rotator minted, known only
    /// by its value; `minted_id` is the replacement it just authenticated. A source that can
    /// look a value up does so; the default finds it by elimination, as a PAT must (the
    /// token API cannot map a value to its id): the seed is live, so it is among the
    /// user's credentials, and it is the one there no pat-rotator minted. Anything less
    /// certain is [`Identified::Ambiguous`]: retiring the wrong one would cut off some
    /// other program.
    fn identify(
        &self,
        seed: &Token,
        minted: &MintedToken,
        owner: &Owner,
    ) -> impl Future<Output = Result<Identified, ProviderError>> + Send {
        let _ = seed;
        async move {
            let held = self.held(&minted.token, owner).await?;
            let mut candidates = held
                .into_iter()
                .filter(|h| h.origin == Origin::Foreign && h.info.token_id != minted.info.token_id);
            Ok(match (candidates.next(), candidates.count()) {
                (Some(only), 0) => Identified::Found(only.info),
                (None, _) => Identified::Ambiguous(0),
                (Some(_), more) => Identified::Ambiguous(more + 1),
            })
        }
    }

    /// How long `token` (the credential `token_id`) has left by the provider's own record
    /// and clock (for a PAT: `token/list`'s expiry against the answer's `Date`), or `None`
    /// when it cannot say. A restart plans with it: the expiry in the state was written on
    /// a wall clock that may have stepped since.
    fn time_left(
        &self,
        token: &Token,
        token_id: &str,
    ) -> impl Future<Output = Result<Option<Duration>, ProviderError>> + Send {
        let _ = (token, token_id);
        async { Ok(None) }
    }

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
    // A process stopped during the call resumes with a token another rotator may have
    // replaced and revoked since: no retry then, the caller reads again first.
    let epoch = crate::freeze::epoch();
    loop {
        match op().await {
            Err(e)
                if e.is_retryable()
                    && attempt < policy.max_attempts
                    && !crate::freeze::resumed_since(epoch) =>
            {
                let delay = backoff.next_delay(e.retry_after());
                warn!(what, attempt, error = %e, delay_ms = delay.as_millis() as u64, "provider request failed; retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A provider's answer as both clients read it: its status, its `Retry-After`, and its body
/// (at most [`MAX_BODY_BYTES`]) as JSON when it is JSON.
pub(crate) struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub json: Option<serde_json::Value>,
}

impl Answer {
    /// Reads `resp` whole; `broken` says what a failure mid-body is.
    pub(crate) async fn read(
        mut resp: reqwest::Response,
        what: &str,
        broken: impl Fn(reqwest::Error) -> ProviderError,
    ) -> Result<Answer, ProviderError> {
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(&broken)? {
            if bytes.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(ProviderError::Malformed(format!(
                    "{what}: response body larger than {MAX_BODY_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            retry_after,
            json: serde_json::from_slice(&bytes).ok(),
        })
    }

    /// Whether the status is a success.
    pub(crate) fn succeeded(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// A success's JSON body.
    pub(crate) fn into_json(self, what: &str) -> Result<serde_json::Value, ProviderError> {
        let status = self.status;
        self.json.ok_or_else(|| {
            ProviderError::Malformed(format!(
                "{what}: HTTP {status} with a body that is not JSON"
            ))
        })
    }
}

/// A transport failure in words a user can act on: a TLS certificate the host refused names
/// the workspace, the cause and the fix (rustls' reason otherwise shows only in a library's
/// log line, behind "error sending request"); anything else is reqwest's own message.
pub(crate) fn describe_transport(e: reqwest::Error, host: &str) -> String {
    // The chain's Debug form carries rustls' error (`InvalidCertificate(UnknownIssuer)`);
    // no level of it holds a header, so no token.
    let chain = format!("{e:?}");
    let cause = [
        ("UnknownIssuer", "is signed by a certificate authority this host does not trust (UnknownIssuer): add that CA to the system's trust store, or point SSL_CERT_FILE at a PEM bundle that holds it"),
        ("NotValidForName", "is not valid for this name (NotValidForName): set DATABRICKS_HOST to a name the certificate lists, the workspace's own URL"),
        ("Expired", "has expired (Expired), or this host's clock is wrong: check the certificate's dates and NTP"),
        ("NotValidYet", "is not valid yet (NotValidYet): check this host's clock (NTP)"),
        ("Revoked", "has been revoked (Revoked)"),
        ("BadSignature", "does not verify (BadSignature)"),
    ]
    .into_iter()
    .find(|(needle, _)| chain.contains(needle));
    match cause {
        Some((_, why)) => format!("TLS: the certificate of {host} {why}"),
        None if chain.contains("InvalidCertificate") || chain.contains("certificate") => {
            format!("TLS: the certificate of {host} was refused ({}); check SSL_CERT_FILE or the system's trust store", e.without_url())
        }
        None => e.without_url().to_string(),
    }
}

/// rustls needs a process-wide crypto provider before any client is built (see TOOLING.md).
pub fn install_crypto_provider() {
    // Err means one is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn a_tag_says_whose_a_token_is() {
        let me = Owner {
            family: "pat-rotator".into(),
            instance: "ns/app".into(),
            owned: vec!["ns/app".into(), "ns/app/pod-0".into()],
        };
        assert_eq!(me.tag(), "pat-rotator:ns/app");
        assert_eq!(me.origin_of("pat-rotator:ns/app"), Origin::ThisInstance);
        assert_eq!(me.origin_of("pat-rotator:ns/app/pod-0"), Origin::Owned);
        assert_eq!(
            me.origin_of("pat-rotator:ns/app/pod-1"),
            Origin::AnotherRotator
        );
        for foreign in [
            "bootstrap",
            "",
            "pat-rotator",
            "pat-rotator:",
            "pat-rotatorx:ns/app",
            "x:ns/app",
        ] {
            assert_eq!(me.origin_of(foreign), Origin::Foreign, "{foreign:?}");
        }
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
