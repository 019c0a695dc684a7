//! `pat-rotator status`: what the token on disk is, whether the service would call itself
//! ready, and where its URLs are (never the token).

use super::{exit, provider_for, runtime, CliError};
use crate::config::Config;
use crate::local_surface::ControlFile;
use crate::provider::Provider;
use crate::shared::Shared;
use crate::Token;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Print one JSON object (with `metadata_url` and `proxy_url`) instead of text.
    #[arg(long)]
    json: bool,
    /// Ask the provider whether the token works.
    #[arg(long)]
    verify: bool,
}

pub(super) fn execute(cfg: Config, args: StatusArgs) -> Result<i32, CliError> {
    runtime()?.block_on(status(cfg, args.json, args.verify))
}

/// `pat-rotator status`: exit 0 when the token is fresh (and, with --verify, accepted).
async fn status(cfg: Config, as_json: bool, verify: bool) -> Result<i32, CliError> {
    let shared = Shared::new(cfg)?;
    let cfg = shared.config.clone();
    let snap = shared.read().await?;
    let now = Utc::now();
    let times = snap.times();
    let ready = shared.readiness(&snap, now);
    let verified = if verify {
        let provider = provider_for(&cfg)?;
        Some(match &snap.token {
            Some(t) => provider.verify(t).await.map_err(|e| e.to_string()),
            None => Err("no token on disk".to_string()),
        })
    } else {
        None
    };
    let published = ControlFile::read(&shared.store.paths().control);
    let served = published.as_ref().is_some_and(ControlFile::served);
    // URLs nobody answers on any more are no URLs.
    let control = published.filter(|_| served);
    let permission_warning = shared.store.permission_warning();
    let directory_warning = shared.store.directory_warning();
    let pending: Vec<_> = snap.state.pending_revocations.iter().map(|p| json!({"token_id": p.token_id, "not_before": p.not_before, "expires_at": p.expires_at})).collect();
    let login = snap.state.login.as_ref().map(|l| {
        json!({
            "logged_in_at": l.logged_in_at,
            "refreshes": l.refreshes,
            "ends_at": l.refresh_expires_at,
            "refresh_in_flight": l.in_flight.is_some(),
            "lost": l.lost,
        })
    });
    let report = json!({
        "credential": cfg.credential.name(),
        "max_token_lifetime_s": snap.state.max_lifetime_s,
        "login": login,
        "profile": cfg.profile,
        "config_file": cfg.config_file,
        "host": cfg.host.clone().or(snap.host.clone()),
        "token_fingerprint": snap.token.as_ref().map(Token::fingerprint),
        "token_id": snap.token.as_ref().and_then(|t| snap.state.token_id_for(t)),
        "expires_at": times.map(|t| t.expires_at),
        "seconds_remaining": times.map(|t| (t.expires_at - now).num_seconds()),
        "expired": times.map(|t| t.expires_at <= now),
        "rotated_at": times.map(|t| t.rotated_at),
        "rotated_by": snap.state.rotated_by,
        "pending_revocations": pending,
        "ready": ready.is_ok(),
        // In a directory others may write, a rotator publishes no control file (it could be
        // forged there): whether one runs cannot be told from the files, so say nothing.
        "rotator_running": (served || directory_warning.is_none()).then_some(served),
        "rotator_pid": control.as_ref().map(|c| c.pid),
        "not_ready_reason": ready.as_ref().err(),
        "verified_user": verified.as_ref().and_then(|v| v.as_ref().ok()),
        "verify_error": verified.as_ref().and_then(|v| v.as_ref().err()),
        "metadata_url": control.as_ref().and_then(|c| c.metadata_url.clone()),
        "proxy_url": control.as_ref().and_then(|c| c.proxy_url.clone()),
        "permission_warning": permission_warning,
        "directory_warning": directory_warning,
        "state_error": snap.state_error,
    });
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print_human(&report);
    }
    let login_ok = snap.state.login.as_ref().is_none_or(|l| l.lost.is_none());
    let token_ok = login_ok && snap.token.is_some() && times.is_none_or(|t| t.expires_at > now);
    let verify_ok = verified.is_none_or(|v| v.is_ok());
    Ok(if token_ok && verify_ok {
        0
    } else {
        exit::FAILURE
    })
}

/// The OAuth U2M login's lines, when there is one.
fn print_login(report: &Value) {
    let login = &report["login"];
    if login.is_null() {
        if report["credential"].as_str() == Some("oauth-u2m") {
            println!("login:          none (run `pat-rotator login`)");
        }
        return;
    }
    let when = |key: &str| login[key].as_str().unwrap_or("?").to_string();
    println!(
        "login:          at {}, refreshed {} times",
        when("logged_in_at"),
        login["refreshes"].as_u64().unwrap_or(0)
    );
    match login["ends_at"].as_str() {
        Some(t) => println!("login ends:     {t} (the refresh token's end, capped by the session's absolute lifetime; log in again before)"),
        None => println!("login ends:     not said by the workspace"),
    }
    if let Some(why) = login["lost"].as_str() {
        println!("login LOST:     {why}; log in again: `pat-rotator login`");
    }
}

/// The human view of the report: rendered from the JSON itself, so the two never disagree.
fn print_human(report: &Value) {
    let text = |key: &str| report[key].as_str();
    let time = |key: &str| {
        text(key)
            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
            .map(|t| t.to_string())
    };
    println!(
        "profile:        [{}] in {}",
        text("profile").unwrap_or("?"),
        text("config_file").unwrap_or("?")
    );
    println!("host:           {}", text("host").unwrap_or("(unset)"));
    println!(
        "token:          {}",
        text("token_fingerprint").unwrap_or("(none)")
    );
    println!(
        "token id:       {}",
        text("token_id").unwrap_or("(unknown)")
    );
    match (time("expires_at"), report["seconds_remaining"].as_i64()) {
        (Some(expires_at), Some(left)) => {
            if report["expired"].as_bool().unwrap_or(false) {
                println!("expires at:     {expires_at} (expired {}s ago)", -left);
            } else {
                println!("expires at:     {expires_at} ({left}s left)");
            }
            println!(
                "last rotation:  {} by {}",
                time("rotated_at").unwrap_or_else(|| "?".into()),
                text("rotated_by").unwrap_or("?")
            );
        }
        _ => println!(
            "expires at:     unknown (no state for this token: the rotator rotates it at once)"
        ),
    }
    if let Some(max) = report["max_token_lifetime_s"].as_u64() {
        println!("lifetime:       the workspace allows at most {max}s; rotations ask for that (PAT_TOKEN_LIFETIME is longer)");
    }
    print_login(report);
    println!(
        "pending revoke: {}",
        report["pending_revocations"].as_array().map_or(0, Vec::len)
    );
    // Judged here from the files, by the rule the service serves by (`Shared::readiness`).
    match text("not_ready_reason") {
        None => println!("ready:          yes (by the files)"),
        Some(why) => println!("ready:          no ({why})"),
    }
    if let Some(user) = text("verified_user") {
        println!("verified:       accepted for {user}");
    }
    if let Some(e) = text("verify_error") {
        println!("verified:       REJECTED ({e})");
    }
    match (report["rotator_pid"].as_u64(), report["rotator_running"].as_bool()) {
        (Some(pid), _) => println!("rotator:        running (pid {pid}), serving this file"),
        (None, Some(false)) => println!(
            "rotator:        none serves this file (nothing will rotate the token; start `pat-rotator run`)"
        ),
        _ => println!(
            "rotator:        cannot be told here (a rotator publishes no control file in a directory others may write; see the warning)"
        ),
    }
    if let Some(url) = text("metadata_url") {
        println!("metadata URL:   {url}");
    }
    if let Some(url) = text("proxy_url") {
        println!("proxy URL:      {url}");
    }
    for key in ["permission_warning", "directory_warning"] {
        if let Some(w) = text(key) {
            println!("warning:        {w}");
        }
    }
}
