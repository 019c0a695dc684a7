//! How every HTTP listener of the product accepts and keeps connections (health, control,
//! proxy, emulator), and the process's descriptor budget.
//!
//! The incident: with the default soft limit of 1,024 descriptors, 1,100 silent connections
//! to `PAT_LISTEN` used them all; the forced rotation then failed with "Too many open files",
//! the token expired, and the service stayed on `dead_token` after the flood ended.
//!
//! Invariants: the soft open-file limit is raised to the hard limit at start (as nginx and
//! Go's runtime do); each listener holds at most [`connection_cap`] connections, so that all
//! of them together leave [`RESERVED_FOR_ROTATION`] descriptors to the rotation (files,
//! locks, the provider's connection) whatever the flood; a connection past the cap waits in
//! the kernel's backlog (or is refused there) and costs no descriptor; a request head must
//! arrive within [`HEAD_TIMEOUT`], which also ends an idle keep-alive connection.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// How long a client has to send a whole request head, and how long a keep-alive
/// connection may sit idle before the next one.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Descriptors no listener may take: the rotation's files, locks and temp files, the
/// provider's connections, the directory watch, the runtime's own.
pub(crate) const RESERVED_FOR_ROTATION: u64 = 128;

/// How many listeners share the budget (health, control, proxy, and one spare).
const LISTENERS: u64 = 4;

/// The most connections one listener holds, from the current soft open-file limit.
pub(crate) fn connection_cap() -> usize {
    let soft = open_file_limit().map(|(soft, _)| soft).unwrap_or(1024);
    cap_for(soft)
}

fn cap_for(soft_limit: u64) -> usize {
    let budget = soft_limit.saturating_sub(RESERVED_FOR_ROTATION) / LISTENERS;
    budget.clamp(8, 4096) as usize
}

/// The soft and hard `RLIMIT_NOFILE`.
pub(crate) fn open_file_limit() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0).then_some((lim.rlim_cur, lim.rlim_max))
}

/// Raises the soft open-file limit to the hard limit; returns the limit now in force.
pub(crate) fn raise_open_file_limit() -> Option<u64> {
    let (soft, hard) = open_file_limit()?;
    if soft >= hard {
        return Some(soft);
    }
    let lim = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we own.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    if rc == 0 {
        Some(hard)
    } else {
        warn!(soft, hard, error = %std::io::Error::last_os_error(), "cannot raise the open-file limit");
        Some(soft)
    }
}

/// How long a stopping listener lets open connections finish (a stream through the proxy
/// is cut after this): SIGTERM must end the process within Kubernetes' grace.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `shutdown` resolves. Replies go out without Nagle's
/// delay: a streamed answer is many small writes, and on a reused connection each would
/// otherwise wait for the peer's delayed ACK (40 ms per chunk on Linux).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cap = connection_cap();
    let permits = Arc::new(Semaphore::new(cap));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .keep_alive(true);
    tokio::pin!(shutdown);
    let mut warned_full = false;
    loop {
        // A permit first: past the cap the next connection stays in the kernel's backlog
        // and costs this process no descriptor.
        if permits.available_permits() == 0 && !warned_full {
            warned_full = true;
            warn!(cap, "a listener holds its maximum of open connections; new ones wait in the backlog (a flood?)");
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // EMFILE and its kin: back off instead of spinning; the connection
                    // stays queued and is taken once a descriptor is free.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        if permits.available_permits() > cap / 2 {
            warned_full = false;
        }
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("connections still open after the drain; closing them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listener_at_its_cap_leaves_the_rotation_its_reserve() {
        for soft in [256u64, 1024, 4096, 65_536, 1_048_576] {
            let cap = cap_for(soft) as u64;
            if soft >= 256 {
                assert!(
                    cap * LISTENERS + RESERVED_FOR_ROTATION <= soft,
                    "soft {soft}: cap {cap}"
                );
            }
            assert!(cap >= 8);
        }
    }
}
