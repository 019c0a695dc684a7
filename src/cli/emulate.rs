//! `pat-rotator emulate`: the embedded Databricks-compatible workspace, for trying the
//! product by hand and for tests.

use super::run::{bind, cancel_on_signals};
use super::{exit, init_logging, runtime, CliError};
use crate::config::LogFormat;
use crate::emulator::{Emulator, Faults, Options};
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
    });
    let listener = bind(args.listen, "--listen").await?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    if let Some(path) = &args.token_file {
        crate::store::atomic_write(path, format!("{}\n", bootstrap.expose()).as_bytes())?;
    }
    println!("emulator listening on http://{addr}");
    // The emulator's own bootstrap token: printing it is the point of this command.
    println!("bootstrap token: {}", bootstrap.expose());
    println!(
        "counters: http://{addr}/emulator/counters  faults: POST http://{addr}/emulator/faults"
    );
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    emulator
        .serve(listener, cancel)
        .await
        .map_err(|e| CliError::new(exit::FAILURE, format!("emulator stopped: {e}")))
}
