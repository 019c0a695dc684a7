//! `pat-rotator emulate`: the embedded Databricks-compatible workspace, for trying the
//! product by hand and for tests.

use super::run::{bind, cancel_on_signals};
use super::{exit, init_logging, runtime, CliError};
use crate::config::LogFormat;
use crate::emulator::{Emulator, Faults, OAuthSettings, Options, ReplayPolicy, Rules};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct EmulateArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Also write the bootstrap token (alone, mode 0600) to this file.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Reject tokens in their last N seconds, as Azure Databricks does with 30.
    #[arg(long, default_value_t = 0)]
    reject_expiring_within: u64,
    /// Added latency per token API request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Fraction (0..1) of token API requests that fail with --error-status.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    #[arg(long, default_value_t = 503)]
    error_status: u16,
    /// Retry-After seconds sent with injected errors.
    #[arg(long)]
    retry_after: Option<u64>,
    /// Live tokens per user (a workspace's quota: 600).
    #[arg(long, default_value_t = crate::emulator::TOKEN_QUOTA)]
    token_quota: usize,
    /// The admin's maximum token lifetime, in seconds (`maxTokenLifetimeDays`): a create
    /// asking for longer is refused with INVALID_PARAMETER_VALUE.
    #[arg(long)]
    max_token_lifetime: Option<u64>,
    /// The user may not use tokens: creates answer 403 PERMISSION_DENIED (at run time,
    /// `POST /emulator/rules` with `tokens_permitted: false` also revokes the user's tokens).
    #[arg(long)]
    tokens_forbidden: bool,
    /// OAuth M2M: write a service principal's client secret (alone, mode 0600) to this file;
    /// its client id is printed.
    #[arg(long)]
    oauth_client_secret_file: Option<PathBuf>,
    /// OAuth: seconds an access token lives.
    #[arg(long, default_value_t = 3600)]
    access_ttl: u64,
    /// OAuth U2M: seconds a refresh token lives.
    #[arg(long, default_value_t = 7_776_000)]
    refresh_ttl: u64,
    /// OAuth U2M: a login's absolute lifetime in seconds.
    #[arg(long, default_value_t = 7_776_000)]
    session_lifetime: u64,
    /// OAuth U2M: refresh tokens may be used more than once (single-use is the default).
    #[arg(long)]
    multi_use_refresh: bool,
    /// OAuth U2M: what a replayed refresh token does: reject, or revoke-family (the whole
    /// login; the strictest, and the default).
    #[arg(long, default_value = "revoke-family", value_parser = ["reject", "revoke-family"])]
    replay: String,
}

pub(super) fn execute(args: EmulateArgs) -> Result<i32, CliError> {
    init_logging(LogFormat::Text);
    runtime()?.block_on(emulate(args)).map(|_| exit::OK)
}

/// `pat-rotator emulate`: prints its address and bootstrap token, serves until a signal.
async fn emulate(args: EmulateArgs) -> Result<(), CliError> {
    let (emulator, bootstrap) = Emulator::new(Options {
        reject_expiring_within: args.reject_expiring_within,
        faults: Faults {
            latency_ms: args.latency_ms,
            error_rate: args.error_rate,
            error_status: args.error_status,
            retry_after: args.retry_after,
            ..Faults::default()
        },
        rules: Rules {
            token_quota: args.token_quota,
            max_lifetime_s: args.max_token_lifetime,
            tokens_permitted: !args.tokens_forbidden,
        },
        oauth: OAuthSettings {
            access_ttl_s: args.access_ttl,
            refresh_ttl_s: args.refresh_ttl,
            session_lifetime_s: args.session_lifetime,
            single_use: !args.multi_use_refresh,
            replay: if args.replay == "reject" {
                ReplayPolicy::Reject
            } else {
                ReplayPolicy::RevokeFamily
            },
        },
    });
    let listener = bind(args.listen, "--listen").await?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    if let Some(path) = &args.token_file {
        crate::store::atomic_write(path, format!("{}\n", bootstrap.expose()).as_bytes())?;
    }
    println!("emulator listening on http://{addr}");
    if let Some(path) = &args.oauth_client_secret_file {
        let (client_id, secret) = emulator.m2m_client();
        crate::store::atomic_write(path, format!("{}\n", secret.expose()).as_bytes())?;
        println!(
            "oauth-m2m client id: {client_id} (its secret is in {})",
            path.display()
        );
    }
    // The emulator's own bootstrap token: printing it is the point of this command.
    println!("bootstrap token: {}", bootstrap.expose());
    println!(
        "counters: http://{addr}/emulator/counters  faults: POST http://{addr}/emulator/faults  oauth: http://{addr}/emulator/oauth  rules: POST http://{addr}/emulator/rules"
    );
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    emulator
        .serve(listener, cancel)
        .await
        .map_err(|e| CliError::new(exit::FAILURE, format!("emulator stopped: {e}")))
}
