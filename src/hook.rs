//! `PAT_ON_ROTATE`: the command run after each new token is on disk.
//!
//! Invariants: it gets the new token's fingerprint, id and expiry, never a token (its
//! environment loses every secret variable of `config::VARIABLES`: the bootstrap token, the
//! OAuth client secret, the capability); it runs as argv, without a shell, within one HTTP
//! timeout; when it fails, the old token is not revoked early: it lives out its lifetime,
//! because the consumer that was to be told may still hold it.

use crate::shared::Shared;
use crate::Token;
use chrono::{DateTime, Utc};
use tracing::{debug, warn};

/// Runs `PAT_ON_ROTATE`; `true` when it succeeded (or is not set). On failure the caller
/// keeps the old token until its natural expiry.
pub(crate) async fn run_on_rotate(
    shared: &Shared,
    token: &Token,
    token_id: &str,
    expires_at: DateTime<Utc>,
) -> bool {
    let Some(argv) = shared.config.on_rotate.clone() else {
        return true;
    };
    let mut cmd = tokio::process::Command::new(&argv[0]);
    for name in crate::config::secret_names() {
        cmd.env_remove(name);
    }
    cmd.args(&argv[1..])
        .env("PAT_TOKEN_FINGERPRINT", token.fingerprint())
        .env("PAT_TOKEN_ID", token_id)
        .env("PAT_TOKEN_EXPIRES_AT", expires_at.to_rfc3339())
        .env(
            "PAT_TOKEN_EXPIRES_AT_EPOCH",
            expires_at.timestamp().to_string(),
        )
        .env("DATABRICKS_CONFIG_FILE", &shared.config.config_file)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let result = tokio::time::timeout(shared.config.http_timeout, cmd.status()).await;
    let failure = match result {
        Ok(Ok(status)) if status.success() => None,
        Ok(Ok(status)) => Some(format!("exited with {status}")),
        Ok(Err(e)) => Some(format!("could not start {:?}: {e}", argv[0])),
        Err(_) => Some(format!(
            "did not finish within {:?}",
            shared.config.http_timeout
        )),
    };
    let Some(why) = failure else {
        debug!("PAT_ON_ROTATE succeeded");
        return true;
    };
    shared.metrics.hook_failures.inc();
    warn!(error = %why, "PAT_ON_ROTATE failed; the old token will not be revoked early and lives out its lifetime");
    false
}
