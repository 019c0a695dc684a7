//! What each CLI command does, behind `main.rs`'s argument parsing.
//!
//! Invariant: every failure reaches the user as a [`CliError`] that says what happened and
//! what to do, with a documented exit status: 0 success, 1 failure, 2 usage, 3 `once`
//! found nothing due, 75 credential busy (try again), 78 invalid configuration. Only
//! `token`, the metadata endpoint and `emulate` (its own bootstrap token) ever print a token.

use crate::config::{Config, ConfigError, LogFormat, Source, EXIT_CONFIG};
use crate::emulator::{Emulator, Faults, Options};
use crate::local_surface::ControlFile;
use crate::provider::{Databricks, Provider, ProviderError, RetryPolicy};
use crate::rotator::{RotateError, RotationOutcome, Rotator};
use crate::server::{control_router, metadata_url, public_router};
use crate::service::Shared;
use crate::store::{Store, StoreError};
use crate::Token;
use chrono::Utc;
use serde_json::json;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_NOT_DUE: i32 = 3;
pub const EXIT_BUSY: i32 = 75;

#[derive(Debug)]
pub struct CliError {
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
        CliError::new(EXIT_CONFIG, format!("invalid configuration: {e}\n(run `pat-rotator config` to see every variable and where its value came from)"))
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        let code = if matches!(e, StoreError::Busy { .. }) {
            EXIT_BUSY
        } else {
            EXIT_FAILURE
        };
        CliError::new(code, e.to_string())
    }
}

impl From<RotateError> for CliError {
    fn from(e: RotateError) -> Self {
        match e {
            RotateError::Store(s) => s.into(),
            other => CliError::new(EXIT_FAILURE, other.to_string()),
        }
    }
}

impl From<ProviderError> for CliError {
    fn from(e: ProviderError) -> Self {
        CliError::new(EXIT_FAILURE, format!("provider: {e}"))
    }
}

/// `tracing` to stderr, text or JSON, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn provider_for(cfg: &Config) -> Result<Databricks, CliError> {
    let host = cfg.require_host()?;
    Ok(Databricks::new(
        host,
        cfg.http_timeout,
        RetryPolicy::default(),
    )?)
}

async fn bind(addr: SocketAddr, var: &str) -> Result<TcpListener, CliError> {
    TcpListener::bind(addr).await.map_err(|e| {
        CliError::new(
            EXIT_FAILURE,
            format!("cannot listen on {var}={addr}: {e}; pick a free address"),
        )
    })
}

/// Cancels `cancel` on SIGTERM or SIGINT.
pub fn cancel_on_signals(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot install the SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
        }
        cancel.cancel();
    });
}

/// `pat-rotator run`: the service.
pub async fn run(cfg: Config) -> Result<(), CliError> {
    for w in &cfg.warnings {
        warn!("{w}");
    }
    let provider = Arc::new(provider_for(&cfg)?);
    let shared = Shared::new(cfg)?;
    let cfg = shared.config.clone();
    let public = bind(cfg.listen, "PAT_LISTEN").await?;
    let control = bind(cfg.control_listen, "PAT_CONTROL_LISTEN").await?;
    let control_addr = control.local_addr().map_err(|e| {
        CliError::new(
            EXIT_FAILURE,
            format!("cannot read the address of PAT_CONTROL_LISTEN: {e}"),
        )
    })?;
    if let Some(w) = shared.store.permission_warning() {
        warn!("{w}");
    }
    let proxy = match cfg.proxy_listen {
        Some(addr) => {
            let listener = bind(addr, "PAT_PROXY_LISTEN").await?;
            let bound = listener.local_addr().map_err(|e| {
                CliError::new(
                    EXIT_FAILURE,
                    format!("cannot read the address of PAT_PROXY_LISTEN: {e}"),
                )
            })?;
            let app = crate::proxy::router(shared.clone(), bound.port()).map_err(|e| {
                CliError::new(
                    EXIT_FAILURE,
                    format!("cannot build the proxy's HTTP client: {e}"),
                )
            })?;
            Some((listener, bound, app))
        }
        None => None,
    };
    // Published before anything is served, so whoever can read the config file's directory
    // finds the URLs as soon as they answer.
    let control_file = ControlFile {
        metadata_url: Some(metadata_url(control_addr, &cfg.control_secret)),
        proxy_url: proxy
            .as_ref()
            .map(|(_, bound, _)| crate::proxy::proxy_url(*bound, &cfg.control_secret)),
        pid: std::process::id(),
        written_at: Utc::now(),
    };
    control_file.write(&shared.store.paths().control)?;
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    let control_app = control_router(shared.clone(), control_addr.port());
    let sessions = shared.sessions.clone();
    let summaries = tokio::spawn(async move {
        sessions
            .log_summaries(std::time::Duration::from_secs(60))
            .await
    });
    let stop = cancel.clone();
    let public_task = tokio::spawn(crate::server::serve(
        public,
        public_router(shared.clone()),
        async move { stop.cancelled().await },
    ));
    let stop = cancel.clone();
    let control_task = tokio::spawn(crate::server::serve(control, control_app, async move {
        stop.cancelled().await
    }));
    let proxy_task = proxy.map(|(listener, bound, app)| {
        info!(proxy = %bound, upstream = %cfg.host.as_deref().unwrap_or(""), "serving the authenticating proxy (its URL is in the control file)");
        let stop = cancel.clone();
        tokio::spawn(crate::server::serve(listener, app, async move {
            stop.cancelled().await
        }))
    });
    info!(listen = %cfg.listen, control = %control_addr, urls = %shared.store.paths().control.display(), "serving health, metrics, sessions and the SDK token endpoint (its URL is in the control file)");
    Rotator::new(shared, provider).run(cancel.clone()).await;
    cancel.cancel();
    summaries.abort();
    if let Some(t) = proxy_task {
        // Open streams are not waited for: the process is stopping.
        t.abort();
    }
    let _ = public_task.await;
    let _ = control_task.await;
    Ok(())
}

/// `pat-rotator once`: exit 0 rotated, 3 nothing due.
pub async fn once(cfg: Config, force: bool) -> Result<i32, CliError> {
    let provider = Arc::new(provider_for(&cfg)?);
    let shared = Shared::new(cfg)?;
    match Rotator::new(shared, provider).once(force).await? {
        Some(RotationOutcome::Rotated {
            token_id,
            fingerprint,
            expires_at,
        }) => {
            println!("rotated: new token {fingerprint} (id {token_id}) expires at {expires_at}");
            Ok(0)
        }
        Some(RotationOutcome::Adopted) => {
            println!("another writer changed the token meanwhile; using theirs");
            Ok(0)
        }
        None => {
            println!("not due: the token on disk is fresh");
            Ok(EXIT_NOT_DUE)
        }
    }
}

/// `pat-rotator status`: exit 0 when the token is fresh (and, with --verify, accepted).
pub async fn status(cfg: Config, as_json: bool, verify: bool) -> Result<i32, CliError> {
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
    let control = ControlFile::read(&shared.store.paths().control);
    let permission_warning = shared.store.permission_warning();
    let pending: Vec<_> = snap.state.pending_revocations.iter().map(|p| json!({"token_id": p.token_id, "not_before": p.not_before, "expires_at": p.expires_at})).collect();
    let report = json!({
        "profile": cfg.profile,
        "config_file": cfg.config_file,
        "host": cfg.host.clone().or(snap.host.clone()),
        "token_fingerprint": snap.token.as_ref().map(Token::fingerprint),
        "token_id": snap.token.as_ref().and_then(|t| snap.state.token_id_for(t)),
        "expires_at": times.map(|t| t.expires_at),
        "seconds_remaining": times.map(|t| (t.expires_at - now).num_seconds()),
        "rotated_at": times.map(|t| t.rotated_at),
        "rotated_by": snap.state.rotated_by,
        "pending_revocations": pending,
        "ready": ready.is_ok(),
        "not_ready_reason": ready.as_ref().err(),
        "verified_user": verified.as_ref().and_then(|v| v.as_ref().ok()),
        "verify_error": verified.as_ref().and_then(|v| v.as_ref().err()),
        "metadata_url": control.as_ref().and_then(|c| c.metadata_url.clone()),
        "proxy_url": control.as_ref().and_then(|c| c.proxy_url.clone()),
        "permission_warning": permission_warning,
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
                println!(
                    "expires at:     {} ({}s left)",
                    t.expires_at,
                    (t.expires_at - now).num_seconds()
                );
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
        match control.as_ref().and_then(|c| c.metadata_url.as_deref()) {
            Some(url) => println!("metadata URL:   {url}"),
            None => println!(
                "metadata URL:   (none published in {}; is `pat-rotator run` running?)",
                shared.store.paths().control.display()
            ),
        }
        if let Some(url) = control.as_ref().and_then(|c| c.proxy_url.as_deref()) {
            println!("proxy URL:      {url}");
        }
        if let Some(w) = &permission_warning {
            println!("warning:        {w}");
        }
    }
    let token_ok = snap.token.is_some() && times.is_none_or(|t| t.expires_at > now);
    let verify_ok = verified.is_none_or(|v| v.is_ok());
    Ok(if token_ok && verify_ok {
        0
    } else {
        EXIT_FAILURE
    })
}

/// `pat-rotator token`: prints the current token for scripts.
pub fn token(cfg: Config) -> Result<(), CliError> {
    let shared = Shared::new(cfg)?;
    let now = Utc::now();
    // Token and expiry from one snapshot: a rotation in between cannot pair them wrongly.
    let snap = shared.store.read()?;
    match shared.servable(&snap, now) {
        Ok(servable) => {
            println!("{}", servable.token.expose());
            Ok(())
        }
        Err(why) => Err(CliError::new(
            EXIT_FAILURE,
            format!(
                "no usable token for profile [{}] in {}: {why}; check the rotator (`pat-rotator status`)",
                shared.config.profile,
                shared.config.config_file.display()
            ),
        )),
    }
}

/// `pat-rotator set`: manual seeding from stdin, with the downgrade guard.
pub async fn set(cfg: Config, force: bool) -> Result<(), CliError> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).map_err(|e| {
        CliError::new(
            EXIT_FAILURE,
            format!("cannot read the token from stdin: {e}"),
        )
    })?;
    let new = Token::new(input.trim());
    if new.is_empty() {
        return Err(CliError::new(EXIT_FAILURE, "refusing to write an empty token: pipe the token on stdin, e.g. `pat-rotator set < token.txt`"));
    }
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
    let mut verified_at = None;
    if !force {
        match &host {
            Some(h) => {
                let provider = Databricks::new(
                    h,
                    cfg.http_timeout,
                    RetryPolicy {
                        max_attempts: 2,
                        ..RetryPolicy::default()
                    },
                )?;
                match provider.verify(&new).await {
                    Ok(user) => {
                        info!(user = %user, token = %new, "the provider accepts the new token");
                        verified_at = Some(Utc::now());
                    }
                    Err(ProviderError::InvalidToken { .. }) => {
                        return Err(CliError::new(EXIT_FAILURE, format!("refusing to write {new}: the provider rejects it; pass --force to write it anyway")));
                    }
                    Err(e) => {
                        return Err(CliError::new(EXIT_FAILURE, format!("cannot check the new token with the provider ({e}); refusing to write it unchecked; pass --force to write it anyway")));
                    }
                }
            }
            None => warn!(
                "no DATABRICKS_HOST and no host in the file: the new token cannot be verified"
            ),
        }
    }
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
    .map_err(|e| CliError::new(EXIT_FAILURE, e.to_string()))??;
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
            EXIT_FAILURE,
            format!("refusing to replace the current token: {why}; pass --force to override"),
        )),
    }
}

/// `pat-rotator config`: the effective configuration; exit 78 when invalid.
pub fn config(result: Result<Config, ConfigError>) -> i32 {
    match result {
        Ok(cfg) => {
            for (name, value, source) in cfg.describe() {
                let from = match source {
                    Source::Environment => "environment",
                    Source::Default => "default",
                };
                println!("{name:<27} {value:<40} ({from})");
            }
            println!(
                "{:<27} {}s (min(PAT_ROTATION_INTERVAL, 60s))",
                "threshold",
                cfg.threshold().as_secs()
            );
            println!(
                "{:<27} http://{}/<PAT_CONTROL_SECRET>{} (the full URL is in {}.control.json while `run` runs)",
                "metadata service URL",
                cfg.control_listen,
                crate::server::METADATA_PATH,
                cfg.config_file.display()
            );
            for w in &cfg.warnings {
                println!("warning: {w}");
            }
            0
        }
        Err(e) => {
            let e: CliError = e.into();
            eprintln!("error: {e}");
            e.code
        }
    }
}

pub struct EmulateArgs {
    pub listen: SocketAddr,
    pub token_file: Option<PathBuf>,
    pub reject_expiring_within: u64,
    pub faults: Faults,
}

/// `pat-rotator emulate`: prints its address and bootstrap token, serves until a signal.
pub async fn emulate(args: EmulateArgs) -> Result<(), CliError> {
    let (emulator, bootstrap) = Emulator::new(Options {
        reject_expiring_within: args.reject_expiring_within,
        faults: args.faults,
    });
    let listener = bind(args.listen, "--listen").await?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::new(EXIT_FAILURE, e.to_string()))?;
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
        .map_err(|e| CliError::new(EXIT_FAILURE, format!("emulator stopped: {e}")))
}

/// `pat-rotator soak`: exit 0 on a clean verdict, 1 on any violation.
pub async fn soak(opts: crate::soak::SoakOptions) -> Result<i32, CliError> {
    let settings = format!(
        "{} s, lifetime {} s, interval {} s, grace {} s, {} rotators, {} readers, faults {}, kill -9 every {} s",
        opts.duration.as_secs(),
        opts.lifetime,
        opts.interval,
        opts.grace,
        opts.rotators,
        opts.readers,
        if opts.faults { "on" } else { "off" },
        opts.kill_every
    );
    if opts.interval >= opts.lifetime {
        return Err(CliError::new(
            EXIT_CONFIG,
            "--interval must be shorter than --lifetime",
        ));
    }
    println!("soak: {settings}");
    let (report, out) = crate::soak::run(opts)
        .await
        .map_err(|e| CliError::new(EXIT_FAILURE, e.to_string()))?;
    print!("{}", report.summary());
    println!(
        "report: {}/report.json, timeline: {}/timeline.svg",
        out.display(),
        out.display()
    );
    Ok(if report.violations.is_empty() {
        0
    } else {
        EXIT_FAILURE
    })
}

/// The soak's reader process (hidden command).
pub async fn soak_reader(args: crate::soak::reader_proc::ReaderArgs) -> Result<(), CliError> {
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    crate::soak::reader_proc::run(args, cancel)
        .await
        .map_err(|e| CliError::new(EXIT_FAILURE, e))
}
