//! The seam between the rotation loop and wherever the credential lives: read the current
//! token and its state, compare-and-swap a new one, edit the state, take the single-flight
//! rotation lock, and hear about changes made by others. The file store (the config file,
//! `<config>.rotate.lock`, the state file, inotify) implements it here; another store (a
//! Kubernetes Secret and Lease) implements the same contract and the loop does not change.
//!
//! Contract every implementation keeps: `swap` writes only over the `expected` token and
//! records the rotation atomically with it (or not at all); `try_rotation` runs its work
//! only while no other rotator of the same credential can; `changed` may wake spuriously
//! (callers compare [`CredentialStore::version`]) but never misses a change for long.

use super::{FileVersion, Rotation, RotationWait, Snapshot, State, Store, StoreError, SwapOutcome};
use crate::Token;
use chrono::{DateTime, Utc};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// A boxed, sendable future.
pub(crate) type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where "now" comes from (tests inject one that follows tokio's paused time).
pub(crate) type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// A change to the state alone, as a value (the store applies it under its own lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StateEdit {
    /// These pending revocations are done (revoked, or gone at the provider).
    Revoked(Vec<String>),
    /// Keep this pending token until its natural expiry instead of revoking it after the
    /// grace (a consumer that was to be told of its replacement may still hold it).
    KeepUntilExpiry(String),
    /// The provider rejected the token with this SHA-256: no rotator serves it again.
    Rejected(String),
    /// The workspace caps token lifetime at this many seconds.
    LifetimeCap(u64),
    /// `pat-rotator login`: a new login replaces the old one.
    Login(super::Login),
    /// Takes the claim to send the login's refresh token, if it is that token and nobody
    /// holds a claim (the caller reads back whether it got it).
    ClaimRefresh(super::RefreshClaim),
    /// The claimed refresh answered: its refresh token replaces the claimed one.
    Refreshed {
        nonce: String,
        refresh_token: Token,
        refresh_expires_at: Option<DateTime<Utc>>,
    },
    /// The claimed refresh was certainly never sent: the claim ends, the token stays.
    RefreshUnsent { nonce: String },
    /// The login with this refresh token (SHA-256) no longer works, for this reason.
    LoginLost { token_sha256: String, why: String },
}

impl StateEdit {
    /// Applies the edit to a state (whichever store keeps it).
    pub fn apply(&self, state: &mut State) {
        match self {
            StateEdit::Revoked(ids) => state
                .pending_revocations
                .retain(|p| !ids.contains(&p.token_id)),
            StateEdit::Rejected(sha) => state.note_rejected(sha),
            StateEdit::Login(login) => state.login = Some(login.clone()),
            StateEdit::LifetimeCap(secs) => state.max_lifetime_s = Some(*secs),
            StateEdit::ClaimRefresh(claim) => {
                if let Some(l) = state.login.as_mut().filter(|l| {
                    l.in_flight.is_none()
                        && l.lost.is_none()
                        && l.refresh_token.sha256_hex() == claim.token_sha256
                }) {
                    l.in_flight = Some(claim.clone());
                }
            }
            StateEdit::Refreshed {
                nonce,
                refresh_token,
                refresh_expires_at,
            } => {
                if let Some(l) = state
                    .login
                    .as_mut()
                    .filter(|l| l.in_flight.as_ref().is_some_and(|c| &c.nonce == nonce))
                {
                    l.refresh_token = refresh_token.clone();
                    l.refresh_expires_at = *refresh_expires_at;
                    l.refreshes += 1;
                    l.in_flight = None;
                }
            }
            StateEdit::RefreshUnsent { nonce } => {
                if let Some(l) = state
                    .login
                    .as_mut()
                    .filter(|l| l.in_flight.as_ref().is_some_and(|c| &c.nonce == nonce))
                {
                    l.in_flight = None;
                }
            }
            StateEdit::LoginLost { token_sha256, why } => {
                if let Some(l) = state
                    .login
                    .as_mut()
                    .filter(|l| &l.refresh_token.sha256_hex() == token_sha256)
                {
                    l.lost.get_or_insert_with(|| why.clone());
                }
            }
            StateEdit::KeepUntilExpiry(id) => {
                for p in state
                    .pending_revocations
                    .iter_mut()
                    .filter(|p| &p.token_id == id)
                {
                    if let Some(exp) = p.expires_at {
                        p.not_before = p.not_before.max(exp);
                    }
                }
            }
        }
    }
}

/// What a rotation reads before it mints: the credential, and whether a swap could be
/// written. Apart, so that a rotation that finds another's token adopts it even where it
/// could not write its own.
pub(crate) struct ForSwap {
    pub snapshot: Snapshot,
    pub writable: Result<(), StoreError>,
}

/// See the module documentation.
pub(crate) trait CredentialStore: Send + Sync + 'static {
    /// An identity of the credential's current version, cheap to take: equal values mean
    /// nothing changed.
    type Version: PartialEq + Send + Sync + std::fmt::Debug;

    /// The current token and its state, from one consistent read.
    fn snapshot(&self) -> impl Future<Output = Result<Snapshot, StoreError>> + Send;

    /// The credential as [`CredentialStore::snapshot`] reads it, and whether a swap could be
    /// written now (checked before minting, so that nothing is minted that would have to be
    /// revoked unwritten). One call, because a rotation asks both at once under the
    /// rotation lock: the file store answers them in one hand-off to its file thread.
    fn snapshot_for_swap(&self) -> impl Future<Output = Result<ForSwap, StoreError>> + Send;

    /// Compare-and-swap: writes `new` (with `host` where the store keeps one) and records
    /// `rotation`, only if the credential still holds `expected`. `clock` is read at the
    /// moment of the write: it starts the grace of the replaced token.
    fn swap(
        &self,
        expected: Option<Token>,
        new: Token,
        host: Option<String>,
        rotation: Rotation,
        clock: Clock,
    ) -> impl Future<Output = Result<SwapOutcome, StoreError>> + Send;

    /// Changes the state alone.
    fn edit_state(&self, edit: StateEdit) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Runs `work` holding the rotation lock, taken without waiting; `Ok(None)` (and `work`
    /// never polled) when another rotator holds it. Boxed both ways: a `Send` future that
    /// borrows the caller, passed through a generic trait method, defeats rustc's
    /// higher-ranked `Send` inference when the loop is spawned.
    fn try_rotation<'a, T: Send + 'a>(
        &'a self,
        work: BoxFuture<'a, T>,
    ) -> BoxFuture<'a, Result<Option<T>, StoreError>>;

    /// Waits until no rotator holds the rotation lock, at most `limit`; `Ok(false)` when it
    /// was still held then.
    fn wait_rotation_free(
        &self,
        limit: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// [`CredentialStore::wait_rotation_free`], ending early with
    /// [`RotationWait::Stalled`] when the store can tell that the holder has made no
    /// progress for `stall` (the file store: its heartbeat). A store whose lock expires by
    /// itself (the cluster store's Lease) need not tell.
    fn wait_rotation(
        &self,
        limit: Duration,
        stall: Duration,
    ) -> impl Future<Output = Result<RotationWait, StoreError>> + Send {
        let _ = stall;
        async move {
            Ok(match self.wait_rotation_free(limit).await? {
                true => RotationWait::Free,
                false => RotationWait::StillHeld,
            })
        }
    }

    /// The current version (see [`CredentialStore::Version`]).
    fn version(&self) -> Self::Version;

    /// Resolves when the credential may have changed.
    fn changed(&self) -> impl Future<Output = ()> + Send;

    /// The instance named in the comment of a token minted now (`<prefix>:<instance>`);
    /// reaping matches it exactly. `None`: `PAT_INSTANCE`.
    fn token_instance(&self) -> Option<String> {
        None
    }

    /// Whether this rotator reaps orphans now. The cluster store: only the lease holder
    /// (it reaps for every replica); a replica that becomes it sees a change of
    /// [`CredentialStore::version`], which ends the loop's wait, and reaps then instead of
    /// asking every few seconds.
    fn reaps_here(&self) -> bool {
        true
    }

    /// Every instance whose tokens this store may revoke (the cluster store: the shared
    /// identity and this pod's own); empty: `PAT_INSTANCE` alone.
    fn owned_instances(&self) -> Vec<String> {
        Vec::new()
    }

    /// A credential to mint with when the current token and the bootstrap are rejected
    /// (the cluster store: this pod's own live token after an outage).
    fn fallback_credential(&self) -> impl Future<Output = Option<Token>> + Send {
        async { None }
    }
}

/// How often the file store looks for a change when the directory cannot be watched.
const POLL_WITHOUT_WATCH: Duration = Duration::from_secs(1);

impl CredentialStore for Store {
    type Version = Option<FileVersion>;

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        if let Some(read) = self.read_in_place() {
            return read;
        }
        let store = self.clone();
        blocking(move || store.read()).await
    }

    async fn snapshot_for_swap(&self) -> Result<ForSwap, StoreError> {
        let store = self.clone();
        blocking(move || {
            Ok(ForSwap {
                snapshot: store.read()?,
                writable: store.check_writable(),
            })
        })
        .await
    }

    async fn swap(
        &self,
        expected: Option<Token>,
        new: Token,
        host: Option<String>,
        rotation: Rotation,
        clock: Clock,
    ) -> Result<SwapOutcome, StoreError> {
        let store = self.clone();
        let wait = self.write_wait;
        blocking(move || {
            Store::swap(
                &store,
                expected.as_ref(),
                &new,
                host.as_deref(),
                wait,
                Some(&rotation),
                &*clock,
            )
        })
        .await
    }

    async fn edit_state(&self, edit: StateEdit) -> Result<(), StoreError> {
        let store = self.clone();
        let wait = self.write_wait;
        blocking(move || store.update_state(wait, |st| edit.apply(st))).await
    }

    fn try_rotation<'a, T: Send + 'a>(
        &'a self,
        work: BoxFuture<'a, T>,
    ) -> BoxFuture<'a, Result<Option<T>, StoreError>> {
        Box::pin(Store::try_rotation(self, || work))
    }

    async fn wait_rotation_free(&self, limit: Duration) -> Result<bool, StoreError> {
        Store::wait_rotation_free(self, limit).await
    }

    async fn wait_rotation(
        &self,
        limit: Duration,
        stall: Duration,
    ) -> Result<RotationWait, StoreError> {
        Store::wait_rotation(self, limit, Some(stall)).await
    }

    fn version(&self) -> Option<FileVersion> {
        FileVersion::current(&self.paths().config)
    }

    async fn changed(&self) {
        let watch = self.watch();
        if watch.is_active() {
            watch.changed().await
        } else {
            tokio::time::sleep(POLL_WITHOUT_WATCH).await
        }
    }
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StoreError::Io {
            action: "run a file operation for",
            path: std::path::PathBuf::from("the credential store"),
            source: std::io::Error::other(e.to_string()),
        })
    })
}
