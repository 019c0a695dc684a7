//! Test doubles shared by the unit tests: an in-memory provider with Databricks' token
//! semantics (a dead token cannot mint; revoked and expired tokens are refused and counted)
//! and a wall clock that follows tokio's paused time.

use crate::provider::{Held, MintedToken, Owner, Provider, ProviderError, TokenInfo};
use crate::shared::Clock;
use crate::Token;
use chrono::{DateTime, TimeDelta, Utc};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn secs(d: Duration) -> TimeDelta {
    TimeDelta::milliseconds(d.as_millis() as i64)
}

pub(crate) struct FakeToken {
    pub(crate) id: String,
    pub(crate) expires_at: Option<DateTime<Utc>>,
    pub(crate) revoked: bool,
    pub(crate) comment: String,
    pub(crate) created: DateTime<Utc>,
}

pub(crate) struct FakeProvider {
    pub(crate) clock: Clock,
    pub(crate) tokens: Mutex<HashMap<String, FakeToken>>,
    pub(crate) next: AtomicU64,
    pub(crate) mints: AtomicU64,
    pub(crate) dead_auth: AtomicU64,
    /// The provider's clock minus ours: shifts every time it reports, not when its
    /// tokens die (a skewed clock moves both ends of a lifetime alike).
    pub(crate) skew: Mutex<TimeDelta>,
    /// Every call in order: "mint", "revoke", "list".
    pub(crate) calls: Mutex<Vec<&'static str>>,
    /// While set, every call fails with a 503 (an outage).
    pub(crate) outage: std::sync::atomic::AtomicBool,
    /// While set, a mint never returns (a call that no timeout ends).
    pub(crate) hang: std::sync::atomic::AtomicBool,
    /// The longest lifetime granted, in seconds (0: whatever is asked): a workspace's
    /// maximum token lifetime, or a provider that grants less than asked.
    pub(crate) max_lifetime_s: AtomicU64,
    /// Added before every answer, in milliseconds (a slow provider).
    pub(crate) latency_ms: AtomicU64,
    /// While set, a mint creates its token and the answer is lost: the caller sees a timeout
    /// after [`LOST_ANSWER_TIMEOUT`].
    pub(crate) lose_answers: std::sync::atomic::AtomicBool,
    /// The most live tokens the user may hold (0: no quota); past it a mint is refused.
    pub(crate) quota: AtomicU64,
    /// When each revoked token (by value) was revoked, on the provider's clock.
    pub(crate) revoked_at: Mutex<HashMap<String, DateTime<Utc>>>,
}

/// How long a caller waits for an answer that is lost (an HTTP timeout).
pub(crate) const LOST_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

impl FakeProvider {
    pub(crate) fn new(clock: Clock) -> Self {
        let mut tokens = HashMap::new();
        tokens.insert(
            "boot".to_string(),
            FakeToken {
                id: "boot".into(),
                expires_at: None,
                revoked: false,
                comment: "bootstrap".into(),
                created: clock(),
            },
        );
        FakeProvider {
            clock,
            tokens: Mutex::new(tokens),
            next: AtomicU64::new(0),
            mints: AtomicU64::new(0),
            dead_auth: AtomicU64::new(0),
            skew: Mutex::new(TimeDelta::zero()),
            calls: Mutex::new(Vec::new()),
            outage: Default::default(),
            hang: Default::default(),
            max_lifetime_s: Default::default(),
            latency_ms: Default::default(),
            lose_answers: Default::default(),
            quota: Default::default(),
            revoked_at: Default::default(),
        }
    }

    async fn delay(&self) {
        let ms = self.latency_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// How many tokens are live now.
    pub(crate) fn live_count(&self) -> usize {
        let now = (self.clock)();
        self.tokens
            .lock()
            .unwrap()
            .values()
            .filter(|t| !t.revoked && t.expires_at.is_none_or(|e| e > now))
            .count()
    }

    /// Whether `token` is live now (the provider's truth, not counted as a request).
    pub(crate) fn is_live(&self, token: &Token) -> bool {
        let now = (self.clock)();
        self.tokens
            .lock()
            .unwrap()
            .get(token.expose())
            .is_some_and(|t| !t.revoked && t.expires_at.is_none_or(|e| e > now))
    }

    /// Revokes `token` out of band (an admin, a leak response).
    pub(crate) fn revoke_out_of_band(&self, token: &Token) {
        if let Some(t) = self.tokens.lock().unwrap().get_mut(token.expose()) {
            t.revoked = true;
        }
        self.revoked_at
            .lock()
            .unwrap()
            .insert(token.expose().to_string(), (self.clock)());
    }

    /// Every live token, as `token/list` answers.
    pub(crate) async fn list(&self, auth: &Token) -> Result<Vec<TokenInfo>, ProviderError> {
        self.calls.lock().unwrap().push("list");
        self.check(auth)?;
        let now = (self.clock)();
        Ok(self
            .tokens
            .lock()
            .unwrap()
            .values()
            .filter(|t| !t.revoked && t.expires_at.is_none_or(|e| e > now))
            .map(|t| TokenInfo {
                token_id: t.id.clone(),
                creation_time: t.created,
                expires_at: t.expires_at,
                comment: t.comment.clone(),
            })
            .collect())
    }

    pub(crate) fn check(&self, auth: &Token) -> Result<(), ProviderError> {
        if self.outage.load(Ordering::SeqCst) {
            return Err(ProviderError::Server {
                status: 503,
                message: "outage".into(),
                retry_after: None,
            });
        }
        let now = (self.clock)();
        let tokens = self.tokens.lock().unwrap();
        match tokens.get(auth.expose()) {
            Some(t) if !t.revoked && t.expires_at.is_none_or(|e| e > now) => Ok(()),
            Some(_) => {
                self.dead_auth.fetch_add(1, Ordering::SeqCst);
                Err(ProviderError::InvalidToken {
                    status: 403,
                    message: "Invalid access token.".into(),
                })
            }
            None => Err(ProviderError::InvalidToken {
                status: 403,
                message: "Invalid access token.".into(),
            }),
        }
    }
}

impl Provider for FakeProvider {
    async fn mint(
        &self,
        auth: &Token,
        lifetime: Duration,
        owner: &Owner,
    ) -> Result<MintedToken, ProviderError> {
        let comment = owner.tag();
        self.calls.lock().unwrap().push("mint");
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.delay().await;
        self.check(auth)?;
        let quota = self.quota.load(Ordering::SeqCst);
        if quota > 0 && self.live_count() as u64 >= quota {
            return Err(ProviderError::QuotaExceeded {
                message: "QUOTA_EXCEEDED".into(),
            });
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        self.mints.fetch_add(1, Ordering::SeqCst);
        let now = (self.clock)();
        let lifetime = match self.max_lifetime_s.load(Ordering::SeqCst) {
            0 => lifetime,
            max => lifetime.min(Duration::from_secs(max)),
        };
        let expires_at = now + secs(lifetime);
        let value = format!("tok-{n}");
        self.tokens.lock().unwrap().insert(
            value.clone(),
            FakeToken {
                id: format!("id-{n}"),
                expires_at: Some(expires_at),
                revoked: false,
                comment: comment.clone(),
                created: now,
            },
        );
        if self.lose_answers.load(Ordering::SeqCst) {
            tokio::time::sleep(LOST_ANSWER_TIMEOUT).await;
            return Err(ProviderError::Timeout(LOST_ANSWER_TIMEOUT));
        }
        let skew = *self.skew.lock().unwrap();
        Ok(MintedToken {
            token: Token::new(value),
            info: TokenInfo {
                token_id: format!("id-{n}"),
                creation_time: now + skew,
                expires_at: Some(expires_at + skew),
                comment,
            },
            sent_at: now,
        })
    }

    async fn retire(&self, auth: &Token, token_id: &str) -> Result<(), ProviderError> {
        self.calls.lock().unwrap().push("revoke");
        self.delay().await;
        self.check(auth)?;
        let mut tokens = self.tokens.lock().unwrap();
        match tokens
            .iter_mut()
            .find(|(_, t)| t.id == token_id && !t.revoked)
        {
            Some((value, t)) => {
                t.revoked = true;
                self.revoked_at
                    .lock()
                    .unwrap()
                    .insert(value.clone(), (self.clock)());
                Ok(())
            }
            None => Err(ProviderError::NotFound {
                message: token_id.into(),
            }),
        }
    }

    async fn held(&self, auth: &Token, owner: &Owner) -> Result<Vec<Held>, ProviderError> {
        Ok(owner.classify(self.list(auth).await?))
    }

    async fn time_left(
        &self,
        token: &Token,
        _token_id: &str,
    ) -> Result<Option<Duration>, ProviderError> {
        self.check(token)?;
        let now = (self.clock)();
        let tokens = self.tokens.lock().unwrap();
        Ok(tokens
            .get(token.expose())
            .and_then(|t| t.expires_at)
            .map(|e| (e - now).to_std().unwrap_or_default()))
    }

    async fn verify(&self, token: &Token) -> Result<String, ProviderError> {
        self.check(token).map(|_| "user".into())
    }
}

/// A [`paused_clock`] whose wall time can be stepped (libfaketime's step, in a unit test):
/// the returned cell holds the step in milliseconds.
pub(crate) fn steppable_clock() -> (Clock, Arc<std::sync::atomic::AtomicI64>) {
    let base = paused_clock();
    let step = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let cell = step.clone();
    (
        Arc::new(move || base() + TimeDelta::milliseconds(cell.load(Ordering::SeqCst))),
        step,
    )
}

/// A clock that follows tokio's (paused) time from the real wall clock at start.
pub(crate) fn paused_clock() -> Clock {
    let base = Utc::now();
    let start = tokio::time::Instant::now();
    Arc::new(move || {
        base + TimeDelta::from_std(tokio::time::Instant::now() - start).unwrap_or_default()
    })
}

/// An in-memory OAuth U2M workspace with single-use refresh tokens under the strictest
/// replay rule: a used refresh token presented again is counted and revokes the whole
/// login (every access token with it). Access tokens live `ttl`.
pub(crate) struct FakeOAuth {
    pub(crate) clock: Clock,
    pub(crate) ttl: Duration,
    pub(crate) state: Mutex<FakeLogin>,
    /// `mint_granted` calls, whatever their outcome.
    pub(crate) calls: AtomicU64,
    /// The next refresh is exchanged and its answer lost (the caller sees a timeout).
    pub(crate) lose_next: std::sync::atomic::AtomicBool,
    /// The next refresh is answered 503 before anything is exchanged.
    pub(crate) refuse_next: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
pub(crate) struct FakeLogin {
    /// Refresh tokens by SHA-256: `true` once used.
    pub(crate) refresh: HashMap<String, bool>,
    pub(crate) access: HashMap<String, DateTime<Utc>>,
    pub(crate) revoked: bool,
    pub(crate) refreshes: u64,
    pub(crate) replays: u64,
}

impl FakeOAuth {
    pub(crate) fn new(clock: Clock, ttl: Duration) -> Self {
        FakeOAuth {
            clock,
            ttl,
            state: Mutex::default(),
            calls: AtomicU64::new(0),
            lose_next: Default::default(),
            refuse_next: Default::default(),
        }
    }

    /// A fresh login's refresh token.
    pub(crate) fn login(&self) -> Token {
        let t = Token::new(format!("refresh-{}", rand::random::<u64>()));
        let mut s = self.state.lock().unwrap();
        s.refresh.insert(t.sha256_hex(), false);
        s.revoked = false;
        t
    }

    pub(crate) fn is_live(&self, token: &Token) -> bool {
        let s = self.state.lock().unwrap();
        !s.revoked
            && s.access
                .get(&token.sha256_hex())
                .is_some_and(|e| *e > (self.clock)())
    }

    /// An admin ends the login (every token of it stops working).
    pub(crate) fn revoke_login(&self) {
        self.state.lock().unwrap().revoked = true;
    }
}

impl Provider for FakeOAuth {
    fn capabilities(&self) -> crate::provider::Capabilities {
        crate::provider::Capabilities {
            grant: crate::provider::Grant::RefreshToken,
            retires: false,
            lifetime_asked: false,
        }
    }

    async fn mint_granted(
        &self,
        refresh: Option<&Token>,
    ) -> Result<crate::provider::Granted, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.refuse_next.swap(false, Ordering::SeqCst) {
            return Err(ProviderError::Server {
                status: 503,
                message: "unavailable".into(),
                retry_after: None,
            });
        }
        let invalid = |m: &str| ProviderError::InvalidGrant {
            error: "invalid_grant".into(),
            message: m.into(),
        };
        let sha = refresh
            .ok_or_else(|| invalid("no refresh token"))?
            .sha256_hex();
        let now = (self.clock)();
        let granted = {
            let mut s = self.state.lock().unwrap();
            match s.refresh.get(&sha).copied() {
                None => return Err(invalid("unknown")),
                Some(true) => {
                    s.replays += 1;
                    s.revoked = true;
                    return Err(invalid("already used"));
                }
                Some(false) if s.revoked => return Err(invalid("revoked")),
                Some(false) => {}
            }
            s.refresh.insert(sha, true);
            s.refreshes += 1;
            let access = Token::new(format!("access-{}", rand::random::<u64>()));
            let next = Token::new(format!("refresh-{}", rand::random::<u64>()));
            s.access.insert(access.sha256_hex(), now + secs(self.ttl));
            s.refresh.insert(next.sha256_hex(), false);
            crate::provider::Granted {
                minted: MintedToken {
                    info: TokenInfo {
                        token_id: format!("oauth-{}", &access.sha256_hex()[..8]),
                        creation_time: now,
                        expires_at: Some(now + secs(self.ttl)),
                        comment: String::new(),
                    },
                    token: access,
                    sent_at: now,
                },
                refresh_token: Some(next),
                refresh_expires_in: None,
            }
        };
        if self.lose_next.swap(false, Ordering::SeqCst) {
            tokio::time::sleep(LOST_ANSWER_TIMEOUT).await;
            return Err(ProviderError::Timeout(LOST_ANSWER_TIMEOUT));
        }
        Ok(granted)
    }

    async fn mint(&self, _: &Token, _: Duration, _: &Owner) -> Result<MintedToken, ProviderError> {
        Err(ProviderError::Other {
            status: 0,
            message: "OAuth mints with its grant".into(),
        })
    }

    async fn retire(&self, _: &Token, _: &str) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn held(&self, _: &Token, _: &Owner) -> Result<Vec<Held>, ProviderError> {
        Ok(Vec::new())
    }

    async fn verify(&self, token: &Token) -> Result<String, ProviderError> {
        if self.is_live(token) {
            Ok("user".into())
        } else {
            Err(ProviderError::InvalidToken {
                status: 403,
                message: "Invalid access token.".into(),
            })
        }
    }
}
