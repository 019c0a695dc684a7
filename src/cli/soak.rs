//! `pat-rotator soak`: the compressed-cycle soak, and the hidden reader process it starts.

use super::run::cancel_on_signals;
use super::{exit, runtime, CliError};
use crate::soak::oauth::SoakCredential;
use crate::soak::reader_proc::{ReadMode, ReaderArgs};
use crate::soak::SoakOptions;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct SoakArgs {
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
    /// Reader processes (by turns: the file, the metadata endpoint, the proxy).
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Rotator processes sharing one config file.
    #[arg(long, default_value_t = 2)]
    rotators: usize,
    /// Inject no provider faults (nor, with --store kubernetes, the API-server cut).
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
    /// Where the rotators keep the credential: file (rotators sharing one config file) or
    /// kubernetes (replicas sharing a Secret and a Lease on the API server KUBECONFIG names,
    /// each with its own config file; the lease holder is killed and the API server cut off).
    #[arg(long, value_enum, default_value = "file")]
    store: SoakStore,
    /// What the rotators keep: pat, oauth-m2m (a service principal of the emulator), or
    /// oauth-u2m (a login made by the soak, refreshed under single-use refresh tokens whose
    /// replay revokes the login; kills are timed into refreshes).
    #[arg(long, value_enum, default_value = "pat")]
    credential: SoakCredentialArg,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SoakCredentialArg {
    Pat,
    OauthM2m,
    OauthU2m,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SoakStore {
    File,
    Kubernetes,
}

#[derive(clap::Args)]
pub struct SoakReaderArgs {
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
    /// The rotators' metadata URLs, space-separated (they carry the capability, so they come
    /// in the environment, not on the command line).
    #[arg(
        long,
        env = "PAT_SOAK_METADATA_URLS",
        value_delimiter = ' ',
        hide_env_values = true
    )]
    metadata_url: Vec<String>,
    /// The rotators' proxy URLs, space-separated, likewise.
    #[arg(
        long,
        env = "PAT_SOAK_PROXY_URLS",
        value_delimiter = ' ',
        hide_env_values = true
    )]
    proxy_url: Vec<String>,
    #[arg(long)]
    cache_for: Option<u64>,
    #[arg(long, default_value_t = 100)]
    every_ms: u64,
}

pub(super) fn execute(a: SoakArgs) -> Result<i32, CliError> {
    let opts = SoakOptions {
        duration: Duration::from_secs(a.duration),
        lifetime: a.lifetime,
        interval: a.interval,
        grace: a.grace,
        readers: a.readers,
        rotators: a.rotators,
        faults: !a.no_faults,
        kill_every: a.kill_every,
        phase: a.phase,
        out: a.out,
        host: a.host,
        reader_cache: a.reader_cache,
        kubernetes: a.store == SoakStore::Kubernetes,
        credential: match a.credential {
            SoakCredentialArg::Pat => SoakCredential::Pat,
            SoakCredentialArg::OauthM2m => SoakCredential::M2m,
            SoakCredentialArg::OauthU2m => SoakCredential::U2m,
        },
    };
    runtime()?.block_on(soak(opts))
}

pub(super) fn execute_reader(a: SoakReaderArgs) -> Result<i32, CliError> {
    let args = ReaderArgs {
        index: a.index,
        config: a.config,
        profile: a.profile,
        host: a.host,
        mode: a.mode,
        metadata_urls: a.metadata_url,
        proxy_urls: a.proxy_url,
        cache_for: a.cache_for.map(Duration::from_secs),
        every: Duration::from_millis(a.every_ms),
    };
    runtime()?.block_on(soak_reader(args)).map(|_| exit::OK)
}

/// `pat-rotator soak`: exit 0 on a clean verdict, 1 on any violation.
async fn soak(opts: SoakOptions) -> Result<i32, CliError> {
    let settings = opts.describe();
    if opts.interval >= opts.lifetime {
        return Err(CliError::new(
            exit::CONFIG,
            "--interval must be shorter than --lifetime",
        ));
    }
    if opts.credential != SoakCredential::Pat && opts.host.is_some() {
        return Err(CliError::new(
            exit::CONFIG,
            "--credential oauth-* runs on the embedded emulator only",
        ));
    }
    println!("soak: {settings}");
    let (report, out) = crate::soak::run(opts)
        .await
        .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    print!("{}", report.summary());
    println!(
        "report: {}/report.json, timeline: {}/timeline.svg",
        out.display(),
        out.display()
    );
    Ok(if report.violations.is_empty() {
        0
    } else {
        exit::FAILURE
    })
}

/// The soak's reader process (hidden command).
async fn soak_reader(args: ReaderArgs) -> Result<(), CliError> {
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    crate::soak::reader_proc::run(args, cancel)
        .await
        .map_err(|e| CliError::new(exit::FAILURE, e))
}
