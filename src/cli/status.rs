//! `pat-rotator status`: what the token on disk is, whether the service would call itself
//! ready, and where its URLs are (never the token).

use super::{exit, provider_for, runtime, CliError};
use crate::config::Config;
use crate::local_surface::ControlFile;
use crate::provider::Provider;
use crate::service::Shared;
use crate::Token;
use chrono::Utc;
use serde_json::json;

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
    let report = json!({
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
        "rotator_running": served,
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
        println!(
            "profile:        [{}] in {}",
            cfg.profile,
            cfg.config_file.display()
        );
        println!(
            "host:           {}",
            report["host"].as_str().unwrap_or("(unset)")
        );
        println!(
            "token:          {}",
            snap.token
                .as_ref()
                .map(Token::fingerprint)
                .unwrap_or_else(|| "(none)".into())
        );
        println!(
            "token id:       {}",
            report["token_id"].as_str().unwrap_or("(unknown)")
        );
        match times {
            Some(t) => {
                let left = (t.expires_at - now).num_seconds();
                if t.expires_at <= now {
                    println!("expires at:     {} (expired {}s ago)", t.expires_at, -left);
                } else {
                    println!("expires at:     {} ({left}s left)", t.expires_at);
                }
                println!(
                    "last rotation:  {} by {}",
                    t.rotated_at,
                    snap.state.rotated_by.as_deref().unwrap_or("?")
                );
            }
            None => println!(
                "expires at:     unknown (no state for this token: the rotator rotates it at once)"
            ),
        }
        println!("pending revoke: {}", snap.state.pending_revocations.len());
        match &ready {
            Ok(()) => println!("ready:          yes"),
            Err(why) => println!("ready:          no ({why})"),
        }
        if let Some(v) = &verified {
            match v {
                Ok(user) => println!("verified:       accepted for {user}"),
                Err(e) => println!("verified:       REJECTED ({e})"),
            }
        }
        match &control {
            Some(c) => println!("rotator:        running (pid {}), serving this file", c.pid),
            None => println!(
                "rotator:        none serves this file (nothing will rotate the token; start `pat-rotator run`)"
            ),
        }
        if let Some(url) = control.as_ref().and_then(|c| c.metadata_url.as_deref()) {
            println!("metadata URL:   {url}");
        }
        if let Some(url) = control.as_ref().and_then(|c| c.proxy_url.as_deref()) {
            println!("proxy URL:      {url}");
        }
        for w in [&permission_warning, &directory_warning]
            .into_iter()
            .flatten()
        {
            println!("warning:        {w}");
        }
    }
    let token_ok = snap.token.is_some() && times.is_none_or(|t| t.expires_at > now);
    let verify_ok = verified.is_none_or(|v| v.is_ok());
    Ok(if token_ok && verify_ok {
        0
    } else {
        exit::FAILURE
    })
}
