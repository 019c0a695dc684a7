//! `pat-rotator run`: the service. Binds the listeners, publishes the capability URLs,
//! runs the rotation loop, and stops cleanly on SIGTERM or SIGINT.
//!
//! What happens on SIGTERM: the signal cancels one token; the listeners stop accepting, a
//! rotation in flight may finish within one HTTP timeout (so a minted token is written and
//! recorded, or revoked), and the process exits 0.

use super::store::{with_store, StoreWork};
use super::{exit, provider_for, runtime, CliError};
use crate::config::Config;
use crate::local_surface::ControlFile;
use crate::provider::Provider;
use crate::rotator::Rotator;
use crate::server::{control_router, metadata_url, public_router};
use crate::shared::Shared;
use crate::store::CredentialStore;
use chrono::Utc;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub(super) fn execute(cfg: Config) -> Result<i32, CliError> {
    runtime()?.block_on(run(cfg)).map(|_| exit::OK)
}

pub(super) async fn bind(addr: SocketAddr, var: &str) -> Result<TcpListener, CliError> {
    TcpListener::bind(addr).await.map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot listen on {var}={addr}: {e}; pick a free address"),
        )
    })
}

/// Cancels `cancel` on SIGTERM or SIGINT, and from then on holds the whole stop to
/// [`STOP_DEADLINE`] (the rotation's drain, the listeners', the runtime's shutdown: a thread
/// outside the runtime ends the process if they run past it, as the kubelet's SIGKILL would
/// a few seconds later, but with a line that says so). SIGHUP is logged and ignored: the
/// service re-reads its files on every change, and a closed terminal must not stop it.
pub(super) fn cancel_on_signals(cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot install the SIGTERM handler");
                return;
            }
        };
        let mut hangup = signal(SignalKind::hangup()).ok();
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term.recv() => {
                    info!("SIGTERM: stopping");
                    break;
                }
                _ = tokio::signal::ctrl_c() => {
                    info!("SIGINT: stopping");
                    break;
                }
                _ = hup => info!("SIGHUP: ignored (the service re-reads its files on every change; restart it to change its settings)"),
            }
        }
        cancel.cancel();
        std::thread::spawn(|| {
            std::thread::sleep(STOP_DEADLINE);
            eprintln!(
                "pat-rotator: the stop took longer than {}s; exiting now (anything minted and not written is reaped at the next start)",
                STOP_DEADLINE.as_secs()
            );
            std::process::exit(0);
        });
    });
}

/// The longest a stop may take from SIGTERM to the end of the process: inside Kubernetes'
/// default 30 s grace with room to spare.
pub(crate) const STOP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(24);

/// The rotation loop, on whichever store `PAT_STORE` names.
struct Loop<P> {
    provider: Arc<P>,
    cancel: CancellationToken,
}

impl<P: Provider> StoreWork for Loop<P> {
    type Output = ();
    async fn run<S: CredentialStore>(self, shared: Shared, store: S) {
        Rotator::with_store(shared, self.provider, store)
            .run(self.cancel)
            .await
    }
}

/// Serves `app` on `listener` until `cancel` fires.
fn serve_until(
    listener: TcpListener,
    app: axum::Router,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let stop = cancel.clone();
    tokio::spawn(crate::listener::serve(listener, app, async move {
        stop.cancelled().await
    }))
}

/// The proxy's listener, its bound address and its routes, when `PAT_PROXY_LISTEN` is set.
async fn bind_proxy(
    shared: &Shared,
) -> Result<Option<(TcpListener, SocketAddr, axum::Router)>, CliError> {
    let Some(addr) = shared.config.proxy_listen else {
        return Ok(None);
    };
    let listener = bind(addr, "PAT_PROXY_LISTEN").await?;
    let bound = listener.local_addr().map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot read the address of PAT_PROXY_LISTEN: {e}"),
        )
    })?;
    let app = crate::proxy::router(shared.clone(), bound).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot build the proxy's HTTP client: {e}"),
        )
    })?;
    Ok(Some((listener, bound, app)))
}

/// `pat-rotator run`: the service.
async fn run(cfg: Config) -> Result<(), CliError> {
    for w in &cfg.warnings {
        warn!("{w}");
    }
    if let Some(limit) = crate::listener::raise_open_file_limit() {
        info!(
            open_files = limit,
            per_listener = crate::listener::connection_cap(),
            "descriptor budget"
        );
    }
    let provider = Arc::new(provider_for(&cfg)?);
    let shared = Shared::new(cfg)?;
    let cfg = shared.config.clone();
    let public = bind(cfg.listen, "PAT_LISTEN").await?;
    let control = bind(cfg.control_listen, "PAT_CONTROL_LISTEN").await?;
    let control_addr = control.local_addr().map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot read the address of PAT_CONTROL_LISTEN: {e}"),
        )
    })?;
    if let Some(w) = shared.store.permission_warning() {
        warn!("{w}");
    }
    if let Some(w) = shared.store.tighten_state() {
        warn!("{w}");
    }
    let directory_warning = shared.store.directory_warning();
    if let Some(w) = &directory_warning {
        warn!("{w}");
    }
    let proxy = bind_proxy(&shared).await?;
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
    // Where others may write, a file of theirs could stand in for ours: publish nothing.
    let control_path = shared.store.paths().control.clone();
    let published = directory_warning.is_none();
    if published {
        control_file.write(&control_path)?;
    }
    let control_file = published.then_some(control_file);
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    let freeze_watch = tokio::spawn(crate::freeze::watch());
    let republish = tokio::spawn(keep_published(control_file, shared.store.clone()));
    let control_app = control_router(shared.clone(), control_addr);
    let sessions = shared.sessions.clone();
    let summaries = tokio::spawn(async move {
        sessions
            .log_summaries(std::time::Duration::from_secs(60))
            .await
    });
    let public_task = serve_until(public, public_router(shared.clone()), &cancel);
    let control_task = serve_until(control, control_app, &cancel);
    let proxy_task = proxy.map(|(listener, bound, app)| {
        info!(proxy = %bound, upstream = %cfg.host.as_deref().unwrap_or(""), "serving the authenticating proxy (its URL is in the control file)");
        serve_until(listener, app, &cancel)
    });
    info!(listen = %cfg.listen, control = %control_addr, urls = %shared.store.paths().control.display(), "serving health, metrics, sessions and the SDK token endpoint (its URL is in the control file)");
    let looped = with_store(
        shared,
        Loop {
            provider,
            cancel: cancel.clone(),
        },
    )
    .await;
    cancel.cancel();
    summaries.abort();
    freeze_watch.abort();
    republish.abort();
    if let Some(t) = proxy_task {
        // Open streams are not waited for: the process is stopping.
        t.abort();
    }
    let _ = public_task.await;
    let _ = control_task.await;
    // Nothing serves these URLs any more: `status` must not offer them.
    if published && ControlFile::read(&control_path).is_some_and(|c| c.pid == std::process::id()) {
        let _ = std::fs::remove_file(&control_path);
    }
    looped
}

/// How often the control file's presence is checked (one `stat`; rare, so an idle rotator
/// stays asleep).
const REPUBLISH_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Publishes the control file again when it is gone (its directory deleted and recreated,
/// the file removed), unless the directory has become writable by others meanwhile; another
/// rotator's file of the same config is left as it is.
async fn keep_published(control_file: Option<ControlFile>, store: crate::store::Store) {
    let Some(control_file) = control_file else {
        return;
    };
    let path = store.paths().control.clone();
    loop {
        tokio::time::sleep(REPUBLISH_EVERY).await;
        let gone = std::fs::symlink_metadata(&path).is_err();
        let dir_exists = path.parent().is_some_and(std::path::Path::exists);
        if gone && dir_exists && store.directory_warning().is_none() {
            match control_file.write(&path) {
                Ok(()) => {
                    info!(urls = %path.display(), "the control file was gone; published it again")
                }
                Err(e) => warn!(error = %e, "could not publish the control file again"),
            }
        }
    }
}
