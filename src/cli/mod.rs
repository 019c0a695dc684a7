//! The command line: one file per command (its `clap::Args` and what it does), and here what
//! they share: the subcommand table, the exit statuses (defined once), error reporting,
//! logging set-up and the async runtime.
//!
//! Invariant: every failure reaches the user as a [`CliError`] that says what happened and
//! what to do, with a documented exit status ([`exit`]). Only `token`, the metadata endpoint,
//! the proxy and `emulate` (its own bootstrap token) ever send a token anywhere.

mod config;
mod docs;
mod emulate;
mod login;
mod once;
mod run;
mod set;
mod soak;
mod status;
mod store;
mod token;

use crate::config::CredentialKind;
use crate::config::{Config, ConfigError, LogFormat, VARIABLES};
use crate::provider::{Databricks, OAuth, OAuthClient, ProviderError, RetryPolicy, Source};
use crate::rotator::RotateError;
use crate::store::StoreError;
use clap::{Parser, Subcommand};

/// Exit statuses, the same for every command.
pub mod exit {
    pub const OK: i32 = 0;
    pub(crate) const FAILURE: i32 = 1;
    /// `once` found nothing due.
    pub(crate) const NOT_DUE: i32 = 3;
    /// The credential is busy (another writer holds the lock): try again.
    pub(crate) const BUSY: i32 = 75;
    /// Invalid configuration (`EX_CONFIG` from sysexits.h).
    pub(crate) const CONFIG: i32 = 78;
}

/// Keeps a Databricks personal access token alive for the programs that use it.
#[derive(Parser)]
#[command(name = "pat-rotator", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the rotation service (the default): rotate, serve health, metrics, sessions, the
    /// SDK token endpoint and (with PAT_PROXY_LISTEN) the authenticating proxy. Configured
    /// by the environment variables listed below.
    #[command(after_help = environment_help())]
    Run,
    /// Decide once and rotate if due. Exit 0 rotated, 3 not due, 1 failed.
    Once(once::OnceArgs),
    /// Show the token's fingerprint, expiry, pending revocations, readiness and the URLs of
    /// the running service (never the token).
    Status(status::StatusArgs),
    /// Print the current token (for scripts). Non-zero unless it is live by our record.
    Token,
    /// Write a token read from stdin (manual seeding), refusing a dead or empty one. The token
    /// is checked against DATABRICKS_HOST, or the profile's host when that is unset.
    Set(set::SetArgs),
    /// OAuth U2M (PAT_CREDENTIAL=oauth-u2m): log in with a browser (the URL is printed, so a
    /// headless host works) and keep the refresh token in the state for the rotator.
    Login(login::LoginArgs),
    /// Print the effective configuration and where each value came from.
    Config,
    /// Serve an embedded Databricks-compatible workspace (token API, model serving).
    Emulate(emulate::EmulateArgs),
    /// The compressed-cycle soak on the embedded emulator: real rotator and reader processes,
    /// idle and busy phases, faults, kill -9, a verdict and a timeline report.
    Soak(soak::SoakArgs),
    /// Print shell completions for SHELL (bash, zsh, fish, elvish, powershell) to stdout.
    Completions(docs::CompletionsArgs),
    /// Print the manual page (troff) to stdout, or write every page with --out-dir.
    Man(docs::ManArgs),
    /// A soak reader process (internal).
    #[command(hide = true)]
    SoakReader(soak::SoakReaderArgs),
}

/// The whole command line as `--help`, the completions and the manual pages show it.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command().after_help(environment_help())
}

/// The environment variables and exit statuses, for `--help`.
pub(crate) fn environment_help() -> String {
    let mut s = String::from("Environment (durations in whole seconds):\n");
    for v in VARIABLES {
        s.push_str(&format!(
            "  {:<27} default {:<22} {}\n",
            v.name, v.default, v.meaning
        ));
    }
    s.push_str("\nExit status: ");
    s.push_str(EXIT_STATUS_HELP);
    s
}

/// The exit statuses ([`exit`]) in words, for `--help` and the manual page.
pub(crate) const EXIT_STATUS_HELP: &str = "0 ok, 1 failure, 2 usage, 3 `once` found nothing due, 75 credential busy, 78 invalid configuration.";

/// Runs the command and returns the process exit status; errors are printed here.
pub fn execute(cli: Cli) -> i32 {
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Config => Ok(config::execute(Config::from_env())),
        Command::Emulate(args) => emulate::execute(args),
        Command::Soak(args) => soak::execute(args),
        Command::SoakReader(args) => soak::execute_reader(args),
        Command::Completions(args) => docs::completions(args),
        Command::Man(args) => docs::man(args),
        Command::Run => with_config(run::execute),
        Command::Once(args) => with_config(|cfg| once::execute(cfg, args)),
        Command::Status(args) => with_config(|cfg| status::execute(cfg, args)),
        Command::Token => with_config(token::execute),
        Command::Set(args) => with_config(|cfg| set::execute(cfg, args)),
        Command::Login(args) => with_config(|cfg| login::execute(cfg, args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.code
        }
    }
}

/// Reads and validates the environment, sets up logging, then runs `f`.
fn with_config(f: impl FnOnce(Config) -> Result<i32, CliError>) -> Result<i32, CliError> {
    let cfg = Config::from_env()?;
    init_logging(cfg.log_format);
    f(cfg)
}

/// The async runtime: one thread runs every task (the loop, the listeners, the proxy), and
/// tokio's blocking pool takes the file work. A sidecar shares its pod's cores with the
/// program it serves; one event-loop thread has no cross-thread wake-ups or work stealing
/// (linkerd2-proxy runs on one core by default for the same reason). Measured on two cores
/// (`scripts/bench.sh`, same run): the proxy's requests/s went from 0.66-0.82x nginx's with
/// a worker per core to 0.86-0.90x with one.
fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("cannot start the async runtime: {e}"),
            )
        })
}

#[derive(Debug)]
pub(crate) struct CliError {
    pub code: i32,
    pub message: String,
}

impl CliError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        CliError::new(exit::CONFIG, format!("invalid configuration: {e}\n(run `pat-rotator config` to see every variable and where its value came from)"))
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        let code = if matches!(e, StoreError::Busy { .. }) {
            exit::BUSY
        } else {
            exit::FAILURE
        };
        CliError::new(code, e.to_string())
    }
}

impl From<RotateError> for CliError {
    fn from(e: RotateError) -> Self {
        match e {
            RotateError::Store(s) => s.into(),
            other => CliError::new(exit::FAILURE, other.to_string()),
        }
    }
}

impl From<ProviderError> for CliError {
    fn from(e: ProviderError) -> Self {
        CliError::new(exit::FAILURE, format!("provider: {e}"))
    }
}

/// `tracing` to stderr, text or JSON, filtered by `RUST_LOG` (default `info`, kube-rs's own request logs off).
pub(crate) fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // kube-rs logs every failed request at error level; the cluster store reports each
        // failure itself, once, with what to do.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The provider of the configured workspace and credential kind (`PAT_CREDENTIAL`),
/// retrying as the rotation threshold allows: the one line that picks it.
fn provider_for(cfg: &Config) -> Result<Source, CliError> {
    let host = cfg.require_host()?;
    let retry = RetryPolicy::for_threshold(cfg.threshold());
    Ok(match &cfg.credential {
        CredentialKind::Pat => Source::Pat(provider_at(cfg, host, retry)?),
        CredentialKind::OAuthM2m {
            client_id,
            client_secret,
        } => Source::OAuth(Box::new(OAuth::new(
            host,
            cfg.http_timeout,
            retry,
            OAuthClient::M2m {
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
            },
        )?)),
        CredentialKind::OAuthU2m => Source::OAuth(Box::new(OAuth::new(
            host,
            cfg.http_timeout,
            retry,
            OAuthClient::U2m,
        )?)),
    })
}

/// The one place a command builds the provider's client: the workspace at `host` (the
/// configured one, or the file's for `set`), with `PAT_HTTP_TIMEOUT` and `retry`.
fn provider_at(cfg: &Config, host: &str, retry: RetryPolicy) -> Result<Databricks, CliError> {
    Ok(Databricks::new(host, cfg.http_timeout, retry)?)
}
