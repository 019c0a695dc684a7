//! The loop with an OAuth U2M login in paused tokio time, against an in-memory workspace with
//! single-use refresh tokens whose replay revokes the whole login: the refresh token is sent
//! once, stored before its access token is published, and a login lost is lost quietly.

use super::*;
use crate::store::{Login, RefreshClaim, StateEdit};
use crate::test_support::{paused_clock, FakeOAuth};
use crate::Token;
use std::sync::atomic::Ordering;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(60);

fn setup_u2m(dir: &std::path::Path, instance: &str) -> Shared {
    let cfg = dir.join("databrickscfg").display().to_string();
    let vars = [
        ("DATABRICKS_HOST", "https://unit.example"),
        ("DATABRICKS_CONFIG_FILE", cfg.as_str()),
        ("PAT_INSTANCE", instance),
        ("PAT_CREDENTIAL", "oauth-u2m"),
        ("PAT_ROTATION_INTERVAL", "20"),
    ];
    let config =
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap();
    let mut shared = Shared::new(config).unwrap();
    shared.clock = paused_clock();
    shared
}

async fn log_in(shared: &Shared, provider: &FakeOAuth) -> Token {
    let refresh = provider.login();
    CredentialStore::edit_state(
        &shared.store,
        StateEdit::Login(Login::new(refresh.clone(), shared.now(), None)),
    )
    .await
    .unwrap();
    refresh
}

async fn login_of(shared: &Shared) -> Login {
    shared.read().await.unwrap().state.login.unwrap()
}

fn spawn<S: CredentialStore>(
    rotator: Rotator<FakeOAuth, S>,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let stop = cancel.clone();
    tokio::spawn(async move { rotator.run(stop).await })
}

/// Two rotators share one login for half an hour (about 45 refreshes): each access token is
/// bought with a refresh token sent once, and the file always holds a live one.
#[tokio::test(start_paused = true)]
async fn two_rotators_refresh_one_login_without_a_replay_and_the_file_stays_live() {
    let dir = tempfile::tempdir().unwrap();
    let a = setup_u2m(dir.path(), "a");
    let b = setup_u2m(dir.path(), "b");
    let provider = Arc::new(FakeOAuth::new(a.clock.clone(), TTL));
    log_in(&a, &provider).await;
    let cancel = CancellationToken::new();
    let tasks = [
        spawn(Rotator::new(a.clone(), provider.clone()), &cancel),
        spawn(Rotator::new(b.clone(), provider.clone()), &cancel),
    ];
    tokio::time::sleep(Duration::from_secs(5)).await;
    for _ in 0..(30 * 60) {
        let snap = a.read().await.unwrap();
        let token = snap.token.expect("a token in the file");
        assert!(provider.is_live(&token), "the file holds a dead token");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    cancel.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let s = provider.state.lock().unwrap();
    assert_eq!(s.replays, 0, "a refresh token was sent twice");
    assert!(!s.revoked);
    assert!(s.refreshes >= 40, "{} refreshes", s.refreshes);
    assert_eq!(s.refreshes, provider.calls.load(Ordering::SeqCst));
}

/// The file store, except that the first `failures` stores of a refreshed login fail (a
/// foreign lock holder, a full disk).
struct RefreshStoreFails {
    inner: crate::store::Store,
    failures: std::sync::atomic::AtomicU32,
}

impl CredentialStore for RefreshStoreFails {
    type Version = <crate::store::Store as CredentialStore>::Version;

    forward_to_inner!(except edit_state);
    async fn edit_state(&self, edit: StateEdit) -> Result<(), StoreError> {
        if matches!(edit, StateEdit::Refreshed { .. })
            && self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(StoreError::Busy {
                path: self.inner.paths().state.clone(),
                waited: Duration::from_secs(1),
            });
        }
        CredentialStore::edit_state(&self.inner, edit).await
    }
    fn try_rotation<'a, T: Send + 'a>(
        &'a self,
        work: futures_util::future::BoxFuture<'a, T>,
    ) -> futures_util::future::BoxFuture<'a, Result<Option<T>, StoreError>> {
        CredentialStore::try_rotation(&self.inner, work)
    }
    fn version(&self) -> Self::Version {
        CredentialStore::version(&self.inner)
    }
    async fn changed(&self) {
        CredentialStore::changed(&self.inner).await
    }
}

/// The answer's refresh token is durable before its access token reaches the file: while it
/// cannot be stored, the file keeps the old token and nothing is refreshed again; once it
/// can, the same refresh's access token is published.
#[tokio::test(start_paused = true)]
async fn a_refreshed_login_is_stored_before_its_access_token_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let shared = setup_u2m(dir.path(), "a");
    let provider = Arc::new(FakeOAuth::new(shared.clock.clone(), TTL));
    let first = log_in(&shared, &provider).await;
    let store = RefreshStoreFails {
        inner: shared.store.clone(),
        failures: 2.into(),
    };
    let cancel = CancellationToken::new();
    let task = spawn(
        Rotator::with_store(shared.clone(), provider.clone(), store),
        &cancel,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = shared.read().await.unwrap();
    assert!(
        before.token.is_none(),
        "published before its refresh token was stored"
    );
    assert_eq!(login_of(&shared).await.refresh_token, first);
    assert!(
        login_of(&shared).await.in_flight.is_some(),
        "the claim stays while the answer is unstored"
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    let after = shared.read().await.unwrap();
    let token = after.token.expect("published once stored");
    assert!(provider.is_live(&token));
    assert_eq!(
        provider.calls.load(Ordering::SeqCst),
        1,
        "refreshed again instead of storing the answer"
    );
    let login = login_of(&shared).await;
    assert_ne!(login.refresh_token, first);
    assert!(login.in_flight.is_none());
    assert_eq!(login.refreshes, 1);
    cancel.cancel();
    task.await.unwrap();
}

/// A refresh whose answer is lost may have spent the refresh token: it is never sent again,
/// the login is reported lost (not ready, the metric), and nothing more is sent for an hour.
#[tokio::test(start_paused = true)]
async fn a_lost_refresh_answer_loses_the_login_and_nothing_is_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let shared = setup_u2m(dir.path(), "a");
    let provider = Arc::new(FakeOAuth::new(shared.clock.clone(), TTL));
    log_in(&shared, &provider).await;
    provider.lose_next.store(true, Ordering::SeqCst);
    let cancel = CancellationToken::new();
    let task = spawn(Rotator::new(shared.clone(), provider.clone()), &cancel);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        provider.calls.load(Ordering::SeqCst),
        1,
        "a possibly spent refresh token was sent again"
    );
    assert_eq!(provider.state.lock().unwrap().replays, 0);
    let login = login_of(&shared).await;
    assert!(
        login.lost.as_deref().is_some_and(|w| w.contains("lost")),
        "{login:?}"
    );
    let snap = shared.read().await.unwrap();
    assert!(shared.readiness(&snap, shared.now()).is_err());
    assert!(shared.status().terminal_failure);
    assert_eq!(
        super::tests::counter(&shared, "pat_rotator_oauth_logins_lost_total"),
        1
    );
    // A new login is picked up at once.
    log_in(&shared, &provider).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let snap = shared.read().await.unwrap();
    assert!(snap.token.as_ref().is_some_and(|t| provider.is_live(t)));
    assert!(!shared.status().terminal_failure);
    cancel.cancel();
    task.await.unwrap();
}

/// An error answer (503) exchanged nothing: the same refresh token is sent once more.
#[tokio::test(start_paused = true)]
async fn an_error_answer_keeps_the_login() {
    let dir = tempfile::tempdir().unwrap();
    let shared = setup_u2m(dir.path(), "a");
    let provider = Arc::new(FakeOAuth::new(shared.clock.clone(), TTL));
    log_in(&shared, &provider).await;
    provider.refuse_next.store(true, Ordering::SeqCst);
    let cancel = CancellationToken::new();
    let task = spawn(Rotator::new(shared.clone(), provider.clone()), &cancel);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let snap = shared.read().await.unwrap();
    assert!(snap.token.as_ref().is_some_and(|t| provider.is_live(t)));
    assert_eq!(provider.state.lock().unwrap().replays, 0);
    assert!(login_of(&shared).await.lost.is_none());
    cancel.cancel();
    task.await.unwrap();
}

/// `invalid_grant` (the login revoked by an admin): one request, then none for an hour; not
/// ready with "log in again"; the metric counts it.
#[tokio::test(start_paused = true)]
async fn invalid_grant_is_terminal_and_sends_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let shared = setup_u2m(dir.path(), "a");
    let provider = Arc::new(FakeOAuth::new(shared.clock.clone(), TTL));
    log_in(&shared, &provider).await;
    let cancel = CancellationToken::new();
    let task = spawn(Rotator::new(shared.clone(), provider.clone()), &cancel);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
    provider.revoke_login();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        provider.calls.load(Ordering::SeqCst),
        2,
        "retried a refused refresh token"
    );
    let status = shared.status();
    assert!(status.terminal_failure);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("pat-rotator login")),
        "{:?}",
        status.last_error
    );
    assert_eq!(
        super::tests::counter(&shared, "pat_rotator_oauth_logins_lost_total"),
        1
    );
    cancel.cancel();
    task.await.unwrap();
}

/// A claim left by a process that died while its refresh was on the wire: the refresh token
/// may be spent, so it is never sent; the login is lost at once.
#[tokio::test(start_paused = true)]
async fn a_claim_of_a_dead_process_is_never_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let shared = setup_u2m(dir.path(), "a");
    let provider = Arc::new(FakeOAuth::new(shared.clock.clone(), TTL));
    let refresh = log_in(&shared, &provider).await;
    let dead_pid = {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    };
    CredentialStore::edit_state(
        &shared.store,
        StateEdit::ClaimRefresh(RefreshClaim {
            token_sha256: refresh.sha256_hex(),
            nonce: "n".into(),
            by: "killed".into(),
            host: None,
            pid: dead_pid,
            at: shared.now(),
        }),
    )
    .await
    .unwrap();
    let cancel = CancellationToken::new();
    let task = spawn(Rotator::new(shared.clone(), provider.clone()), &cancel);
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(provider.calls.load(Ordering::SeqCst), 0);
    assert!(login_of(&shared).await.lost.is_some());
    cancel.cancel();
    task.await.unwrap();
}
