//! The `pat-rotator` binary: parse the command line, read the configuration, call the library.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use pat_rotator::commands::{self, CliError, EmulateArgs};
use pat_rotator::config::{Config, VARIABLES};
use pat_rotator::emulator::Faults;
use pat_rotator::soak::reader_proc::{ReadMode, ReaderArgs};
use pat_rotator::soak::SoakOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Keeps a Databricks personal access token alive for the programs that use it.
#[derive(Parser)]
#[command(name = "pat-rotator", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the rotation service (the default).
    Run,
    /// Decide once and rotate if due. Exit 0 rotated, 3 not due, 1 failed.
    Once {
        /// Rotate even if not due.
        #[arg(long)]
        force: bool,
    },
    /// Show the token's fingerprint, expiry, pending revocations and readiness.
    Status {
        #[arg(long)]
        json: bool,
        /// Ask the provider whether the token works.
        #[arg(long)]
        verify: bool,
    },
    /// Print the current token (for scripts). Non-zero when absent or expired.
    Token,
    /// Write a token read from stdin (manual seeding), refusing a dead or empty one.
    Set {
        /// Write even if the provider rejects it or the existing file is unreadable.
        #[arg(long)]
        force: bool,
    },
    /// Print the effective configuration and where each value came from.
    Config,
    /// Serve an embedded Databricks-compatible token API.
    Emulate {
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
    },
    /// The compressed-cycle soak on the embedded emulator: real rotator and reader processes,
    /// idle and busy phases, faults, kill -9, a verdict and a timeline report.
    Soak {
        /// Seconds to run.
        #[arg(long, default_value_t = 120)]
        duration: u64,
        /// PAT_TOKEN_LIFETIME of the rotators, in seconds.
        #[arg(long, default_value_t = 20)]
        lifetime: u64,
        /// PAT_ROTATION_INTERVAL of the rotators, in seconds.
        #[arg(long, default_value_t = 6)]
        interval: u64,
        /// PAT_REVOKE_GRACE of the rotators, in seconds.
        #[arg(long, default_value_t = 3)]
        grace: u64,
        /// Reader processes (half read the file, half the metadata endpoint).
        #[arg(long, default_value_t = 4)]
        readers: usize,
        /// Rotator processes sharing one config file.
        #[arg(long, default_value_t = 2)]
        rotators: usize,
        /// Inject no provider faults.
        #[arg(long)]
        no_faults: bool,
        /// Seconds between kill -9 of a rotator (0: never).
        #[arg(long, default_value_t = 25)]
        kill_every: u64,
        /// Seconds per idle or busy phase.
        #[arg(long, default_value_t = 15)]
        phase: u64,
        /// Report folder (default: a new soak-<time> folder here).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Soak a real workspace instead (bootstrap token from DATABRICKS_TOKEN).
        #[arg(long)]
        host: Option<String>,
        /// Deliberately broken readers that cache the token for this many seconds.
        #[arg(long)]
        reader_cache: Option<u64>,
    },
    /// A soak reader process (internal).
    #[command(hide = true)]
    SoakReader {
        #[arg(long)]
        index: usize,
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "DEFAULT")]
        profile: String,
        #[arg(long)]
        host: String,
        #[arg(long, value_enum)]
        mode: ReadMode,
        #[arg(long)]
        metadata_url: Vec<String>,
        #[arg(long)]
        proxy_url: Vec<String>,
        #[arg(long)]
        cache_for: Option<u64>,
        #[arg(long, default_value_t = 100)]
        every_ms: u64,
    },
}

fn environment_help() -> String {
    let mut s = String::from("Environment (durations in whole seconds):\n");
    for v in VARIABLES {
        s.push_str(&format!(
            "  {:<27} default {:<17} {}\n",
            v.name, v.default, v.meaning
        ));
    }
    s.push_str("\nExit status: 0 ok, 1 failure, 2 usage, 3 `once` found nothing due, 75 credential busy, 78 invalid configuration.");
    s
}

fn main() {
    let matches = Cli::command().after_help(environment_help()).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let code = match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.code
        }
    };
    std::process::exit(code);
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::new(1, format!("cannot start the async runtime: {e}")))
}

fn real_main(cli: Cli) -> Result<i32, CliError> {
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Config = command {
        return Ok(commands::config(Config::from_env()));
    }
    if let Command::Emulate {
        listen,
        token_file,
        reject_expiring_within,
        latency_ms,
        error_rate,
        error_status,
        retry_after,
    } = command
    {
        commands::init_logging(pat_rotator::config::LogFormat::Text);
        let faults = Faults {
            latency_ms,
            error_rate,
            error_status,
            retry_after,
            ..Faults::default()
        };
        runtime()?.block_on(commands::emulate(EmulateArgs {
            listen,
            token_file,
            reject_expiring_within,
            faults,
        }))?;
        return Ok(0);
    }
    if let Command::Soak {
        duration,
        lifetime,
        interval,
        grace,
        readers,
        rotators,
        no_faults,
        kill_every,
        phase,
        out,
        host,
        reader_cache,
    } = command
    {
        let opts = SoakOptions {
            duration: Duration::from_secs(duration),
            lifetime,
            interval,
            grace,
            readers,
            rotators,
            faults: !no_faults,
            kill_every,
            phase,
            out,
            host,
            reader_cache,
        };
        return runtime()?.block_on(commands::soak(opts));
    }
    if let Command::SoakReader {
        index,
        config,
        profile,
        host,
        mode,
        metadata_url,
        proxy_url,
        cache_for,
        every_ms,
    } = command
    {
        let args = ReaderArgs {
            index,
            config,
            profile,
            host,
            mode,
            metadata_urls: metadata_url,
            proxy_urls: proxy_url,
            cache_for: cache_for.map(Duration::from_secs),
            every: Duration::from_millis(every_ms),
        };
        runtime()?.block_on(commands::soak_reader(args))?;
        return Ok(0);
    }
    let cfg = Config::from_env()?;
    commands::init_logging(cfg.log_format);
    let rt = runtime()?;
    match command {
        Command::Run => rt.block_on(commands::run(cfg)).map(|_| 0),
        Command::Once { force } => rt.block_on(commands::once(cfg, force)),
        Command::Status { json, verify } => rt.block_on(commands::status(cfg, json, verify)),
        Command::Token => commands::token(cfg).map(|_| 0),
        Command::Set { force } => rt.block_on(commands::set(cfg, force)).map(|_| 0),
        Command::Config
        | Command::Emulate { .. }
        | Command::Soak { .. }
        | Command::SoakReader { .. } => Ok(0),
    }
}
