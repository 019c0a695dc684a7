//! `pat-rotator login`: an OAuth U2M login (authorization code with PKCE S256, the CLI's
//! public client) whose refresh token the rotator keeps in its state, never in a reader's
//! file.
//!
//! Invariants: the URL to open is printed on a line of its own (a headless host copies it
//! to any browser); the redirect is accepted only on the loopback and only with the `state`
//! this login sent; a login that returns no refresh token never replaces one that has one
//! (the downgrade guard).

use super::{exit, runtime, CliError};
use crate::config::{Config, CredentialKind, StoreKind};
use crate::provider::{OAuth, OAuthClient, Pkce, RetryPolicy};
use crate::store::{CredentialStore, Login, StateEdit, Store};
use axum::extract::{Query, State};
use axum::response::Html;
use axum::routing::get;
use chrono::Utc;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(clap::Args)]
pub struct LoginArgs {
    /// Give up if the browser has not come back within this many seconds.
    #[arg(long, default_value_t = 300)]
    wait: u64,
}

pub(super) fn execute(cfg: Config, args: LoginArgs) -> Result<i32, CliError> {
    runtime()?.block_on(login(cfg, args)).map(|_| exit::OK)
}

/// What the browser's redirect brought back.
type Redirected = HashMap<String, String>;

async fn login(cfg: Config, args: LoginArgs) -> Result<(), CliError> {
    if cfg.credential != CredentialKind::OAuthU2m {
        eprintln!("note: PAT_CREDENTIAL is {}, so a running rotator will not use this login; set PAT_CREDENTIAL=oauth-u2m for it", cfg.credential.name());
    }
    let host = cfg.require_host()?;
    let oauth = OAuth::new(
        host,
        cfg.http_timeout,
        RetryPolicy::default(),
        OAuthClient::U2m,
    )?;
    let store = Store::open(&cfg.config_file, &cfg.profile)?.with_write_wait(cfg.write_lock_wait);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", cfg.login_port))
        .await
        .map_err(|e| CliError::new(exit::CONFIG, format!("cannot listen on 127.0.0.1:{} for the login's redirect: {e}; free the port or set PAT_LOGIN_PORT", cfg.login_port)))?;
    let redirect_uri = format!("http://localhost:{}", cfg.login_port);
    let pkce = Pkce::new();
    let state = format!("{:032x}", rand::random::<u128>());
    let url = oauth.authorize_url(&redirect_uri, &state, &pkce).await?;
    // A closed stdout (`login | head -1` to grab the URL) must not end the login.
    say(&format!("Open this URL in a browser to log in to {host}:\n{url}\nWaiting for the browser to come back to {redirect_uri} ..."));
    let back = wait_for_redirect(listener, Duration::from_secs(args.wait)).await?;
    if let Some(error) = back.get("error") {
        let why = back.get("error_description").cloned().unwrap_or_default();
        return Err(CliError::new(
            exit::FAILURE,
            format!("the workspace refused the login ({error}: {why})"),
        ));
    }
    let same_state = back
        .get("state")
        .is_some_and(|s| subtle::ConstantTimeEq::ct_eq(s.as_bytes(), state.as_bytes()).into());
    if !same_state {
        return Err(CliError::new(exit::FAILURE, "the redirect's state does not match this login's (a stale tab, or a forged redirect); run `pat-rotator login` again"));
    }
    let code = back.get("code").ok_or_else(|| {
        CliError::new(
            exit::FAILURE,
            "the redirect carried no authorization code; run `pat-rotator login` again",
        )
    })?;
    let granted = oauth
        .exchange_code(code, &pkce.verifier, &redirect_uri)
        .await?;
    let existing = match &cfg.store {
        StoreKind::File => store.read()?.state.login,
        // The Secret's login is kept by the same rule: this one has a refresh token.
        StoreKind::Kubernetes(_) => None,
    };
    let Some(refresh_token) = granted.refresh_token else {
        let kept = if existing.as_ref().is_some_and(|l| l.lost.is_none()) {
            "; the existing login is kept"
        } else {
            ""
        };
        return Err(CliError::new(exit::FAILURE, format!("the workspace returned no refresh token (is offline_access allowed for the databricks-cli app?), so nothing could refresh this login{kept}")));
    };
    let now = Utc::now();
    let refresh_expires_at = granted
        .refresh_expires_in
        .and_then(|d| chrono::TimeDelta::from_std(d).ok())
        .map(|d| now + d);
    let login = Login::new(refresh_token, now, refresh_expires_at);
    let kept_in = match &cfg.store {
        StoreKind::File => {
            CredentialStore::edit_state(&store, StateEdit::Login(login)).await?;
            format!("{} (mode 0600)", store.paths().state.display())
        }
        StoreKind::Kubernetes(target) => {
            let secret = crate::cluster::store_login(target, login)
                .await
                .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
            format!("the Secret {secret}; the replica that holds the Lease refreshes it")
        }
    };
    say(&format!(
        "Logged in. The refresh token is kept in {kept_in}; a rotator with PAT_CREDENTIAL=oauth-u2m refreshes from it."
    ));
    Ok(())
}

/// Prints `text` on stdout, whether or not anyone still reads it.
fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// Serves the loopback redirect until the browser comes back once, at most `wait`.
async fn wait_for_redirect(
    listener: tokio::net::TcpListener,
    wait: Duration,
) -> Result<Redirected, CliError> {
    let (tx, mut rx) = mpsc::channel::<Redirected>(1);
    let app = axum::Router::new()
        .route(
            "/",
            get(
                |State(tx): State<mpsc::Sender<Redirected>>, Query(q): Query<Redirected>| async move {
                    let _ = tx.try_send(q);
                    Html("<html><body><p>pat-rotator: login received. You can close this tab.</p></body></html>")
                },
            ),
        )
        .with_state(tx);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let back = tokio::time::timeout(wait, rx.recv()).await;
    server.abort();
    match back {
        Ok(Some(q)) => Ok(q),
        _ => Err(CliError::new(exit::FAILURE, format!("the browser did not come back within {}s; run `pat-rotator login` again (or pass --wait)", wait.as_secs()))),
    }
}
