//! `pat-rotator set`: manual seeding (the analog of a login), with the downgrade guard.

use super::{exit, runtime, CliError};
use crate::config::Config;
use crate::provider::{Provider, ProviderError, RetryPolicy};
use crate::store::Store;
use crate::Token;
use chrono::{DateTime, Utc};
use std::io::Read;
use tracing::{info, warn};

#[derive(clap::Args)]
pub struct SetArgs {
    /// Write even if the provider rejects the token (never over a file that is not a valid
    /// Databricks config file).
    #[arg(long)]
    force: bool,
}

pub(super) fn execute(cfg: Config, args: SetArgs) -> Result<i32, CliError> {
    runtime()?.block_on(set(cfg, args.force)).map(|_| exit::OK)
}

/// `pat-rotator set`: manual seeding from stdin, with the downgrade guard.
async fn set(cfg: Config, force: bool) -> Result<(), CliError> {
    if let Some(elsewhere) = super::store::kept_elsewhere(&cfg) {
        // A token set in one pod's file would be replaced by the store's at the next sync.
        return Err(CliError::new(exit::CONFIG, elsewhere));
    }
    let new = token_from_stdin()?;
    let store = Store::open(&cfg.config_file, &cfg.profile)?.with_read_wait(cfg.write_lock_wait);
    // Fails closed on an unreadable or unparsable file, --force or not: --force overrides the
    // downgrade guard, not the check that this is a config file we may edit. A busy lock
    // fails here once, after PAT_WRITE_LOCK_WAIT, not twice.
    let snap = store.read()?;
    if let Some(w) = snap.host_mismatch(cfg.host.as_deref()) {
        warn!("{w}");
    }
    let file_host = snap.host;
    let host = cfg.host.clone().or(file_host);
    let verified_at = if force {
        None
    } else {
        verify_before_writing(&cfg, host.as_deref(), &new).await?
    };
    let grace_until = crate::store::revoke_not_before(Utc::now(), cfg.revoke_grace);
    let new_sha = new.sha256_hex();
    let wait = cfg.write_lock_wait;
    let host_for_file = cfg.host.clone();
    let verdict = tokio::task::spawn_blocking(move || {
        store.set_manual(
            &new,
            host_for_file.as_deref(),
            force,
            verified_at,
            wait,
            grace_until,
            |current, state| {
                if current.is_some_and(|c| c.sha256_hex() == new_sha) {
                    return Ok(());
                }
                if state
                    .pending_revocations
                    .iter()
                    .any(|p| p.token_sha256 == new_sha)
                {
                    return Err("that token was rotated out and is being revoked".to_string());
                }
                Ok(())
            },
        )
    })
    .await
    .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))??;
    match verdict {
        Ok(()) => {
            println!(
                "written to [{}] in {}; the rotator will replace it with a minted token",
                cfg.profile,
                cfg.config_file.display()
            );
            Ok(())
        }
        Err(why) => Err(CliError::new(
            exit::FAILURE,
            format!("refusing to replace the current token: {why}; pass --force to override"),
        )),
    }
}

/// The token piped on stdin, trimmed; an empty one is refused.
fn token_from_stdin() -> Result<Token, CliError> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot read the token from stdin: {e}"),
        )
    })?;
    let new = Token::new(input.trim());
    if new.is_empty() {
        return Err(CliError::new(exit::FAILURE, "refusing to write an empty token: pipe the token on stdin, e.g. `pat-rotator set < token.txt`"));
    }
    Ok(new)
}

/// Asks the workspace at `host` whether it accepts `new` (two attempts): when it did, the
/// time it did; a rejected token, or one that could not be checked, is refused unless
/// `--force`. With no host known there is nothing to ask: a warning, and no time.
async fn verify_before_writing(
    cfg: &Config,
    host: Option<&str>,
    new: &Token,
) -> Result<Option<DateTime<Utc>>, CliError> {
    let Some(h) = host else {
        warn!("no DATABRICKS_HOST and no host in the file: the new token cannot be verified");
        return Ok(None);
    };
    // Two attempts: a person is waiting at the terminal.
    let retry = RetryPolicy {
        max_attempts: 2,
        ..RetryPolicy::default()
    };
    let provider = super::provider_at(cfg, h, retry)?;
    match provider.verify(new).await {
        Ok(user) => {
            info!(user = %user, token = %new, "the provider accepts the new token");
            Ok(Some(Utc::now()))
        }
        Err(ProviderError::InvalidToken { .. }) => Err(CliError::new(exit::FAILURE, format!("refusing to write {new}: the provider rejects it; pass --force to write it anyway"))),
        Err(e) => Err(CliError::new(exit::FAILURE, format!("cannot check the new token with the provider ({e}); refusing to write it unchecked; pass --force to write it anyway"))),
    }
}
