//! The soak with an OAuth credential (`soak --credential oauth-m2m|oauth-u2m`): the
//! emulator's OAuth under the strictest replay rule (a replayed refresh token revokes the
//! whole login), the rotators' OAuth environment, `pat-rotator login` driven with this
//! process as the browser, and what the verdict reads: the login in the state, and the
//! emulator's counts of replays and revoked logins.

use super::setup::setup;
use super::SoakError;
use crate::config::ChildOAuth;
use crate::emulator::{Emulator, OAuthSettings, ReplayPolicy};
use std::path::Path;
use std::time::Duration;

/// Which credential the soak's rotators keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SoakCredential {
    Pat,
    M2m,
    U2m,
}

impl SoakCredential {
    pub(crate) fn name(self) -> &'static str {
        match self {
            SoakCredential::Pat => "pat",
            SoakCredential::M2m => "oauth-m2m",
            SoakCredential::U2m => "oauth-u2m",
        }
    }
}

/// The emulator's OAuth for a soak whose tokens live `lifetime` seconds: access tokens that
/// long, single-use refresh tokens, and a replay that ends the login.
pub(super) fn settings(lifetime: u64) -> OAuthSettings {
    OAuthSettings {
        access_ttl_s: lifetime,
        single_use: true,
        replay: ReplayPolicy::RevokeFamily,
        ..OAuthSettings::default()
    }
}

/// The rotators' OAuth credential (M2M: a service principal of the emulator).
pub(super) fn child_oauth(kind: SoakCredential, emulator: Option<&Emulator>) -> Option<ChildOAuth> {
    match kind {
        SoakCredential::Pat => None,
        SoakCredential::M2m => emulator.map(|e| {
            let (client_id, client_secret) = e.m2m_client();
            ChildOAuth::M2m {
                client_id,
                client_secret,
            }
        }),
        SoakCredential::U2m => Some(ChildOAuth::U2m),
    }
}

/// `pat-rotator login` with a rotator's environment, this process opening the printed URL
/// (the emulator consents at once and redirects to the login's loopback port).
pub(super) async fn log_in(exe: &Path, env: &[(String, String)]) -> Result<(), SoakError> {
    use tokio::io::AsyncBufReadExt;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(setup("cannot find a free port"))?;
    let mut child = tokio::process::Command::new(exe)
        .args(["login", "--wait", "20"])
        .env_clear()
        .envs(env.iter().cloned())
        .env("PAT_LOGIN_PORT", port.to_string())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(setup("cannot start `pat-rotator login`"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| SoakError::Setup("login: no stdout".into()))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut url = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if line.starts_with("http") {
            url = Some(line);
            break;
        }
    }
    let url = url.ok_or_else(|| SoakError::Setup("login printed no URL".into()))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(setup("http client"))?;
    http.get(&url)
        .send()
        .await
        .map_err(setup("login: the redirect failed"))?;
    // Drain stdout so the login can say it is done.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .map_err(setup("login did not finish"))?
        .map_err(setup("login"))?;
    if !status.success() {
        return Err(SoakError::Setup(format!("login failed: {status}")));
    }
    Ok(())
}

/// The U2M login in `config`'s state: the pid of a refresh claim on it, and why it was lost.
pub(super) fn login_state(config: &Path) -> (Option<u32>, Option<String>) {
    let login = crate::store::Store::open(config, "DEFAULT")
        .and_then(|s| s.read())
        .ok()
        .and_then(|s| s.state.login);
    match login {
        Some(l) => (l.in_flight.map(|c| c.pid), l.lost),
        None => (None, None),
    }
}
