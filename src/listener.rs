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
//! locks, the provider's connection) whatever the flood; at the cap a new connection closes
//! the oldest one that has sent no request head (a flood displaces itself, legitimate
//! clients get through), and waits in the kernel's backlog when there is none; a request
//! head must arrive within [`HEAD_TIMEOUT`], which also ends an idle keep-alive connection.

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
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
    serve_capped(listener, app, shutdown, connection_cap()).await
}

/// [`serve`] with at most `cap` connections. At the cap, a new connection is taken when a
/// connection that has not sent a request head yet can make room (the oldest of them is
/// closed: a flood of silent connections then only displaces itself, and a legitimate
/// client, which sends its head at once, gets through); otherwise it waits in the kernel's
/// backlog, costing no descriptor.
async fn serve_capped(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    cap: usize,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(cap));
    let silent = Silent::default();
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(HeadClock::default())
        .header_read_timeout(HEAD_TIMEOUT)
        .keep_alive(true);
    tokio::pin!(shutdown);
    let mut warned_full = false;
    loop {
        // A permit first, unless a silent connection can make room: past the cap the next
        // connection stays in the kernel's backlog and costs this process no descriptor.
        let ready = permits.clone().try_acquire_owned().ok();
        if ready.is_none() && !warned_full {
            warned_full = true;
            warn!(cap, "a listener holds its maximum of open connections; new ones displace the oldest that sent nothing, or wait in the backlog (a flood?)");
        }
        let ready = match ready {
            Some(p) => Some(p),
            None if silent.any() => None,
            None => tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => Some(p),
                    Err(_) => break,
                },
                _ = &mut shutdown => break,
            },
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
        let permit = match ready {
            Some(p) => p,
            None => {
                silent.evict_oldest();
                tokio::select! {
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = &mut shutdown => break,
                }
            }
        };
        if permits.available_permits() > cap / 2 {
            warned_full = false;
        }
        let _ = tcp.set_nodelay(true);
        let (id, evicted) = silent.add();
        let service = TowerToHyperService::new(app.clone());
        // The first head takes the connection off the list; the next ones cost a load.
        let (heard, spoke) = (silent.clone(), std::sync::atomic::AtomicBool::new(false));
        let service = hyper::service::service_fn(move |request| {
            if !spoke.swap(true, std::sync::atomic::Ordering::Relaxed) {
                heard.heard(id);
            }
            hyper::service::Service::call(&service, request)
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
        let done = silent.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = evicted.cancelled() => debug!("closed a connection that sent nothing, to make room at the cap"),
            }
            done.heard(id);
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

/// The connections of one listener that have not sent a request head yet, oldest first,
/// each with the token that closes it.
#[derive(Clone, Default)]
struct Silent {
    inner: Arc<Mutex<SilentList>>,
}

#[derive(Default)]
struct SilentList {
    /// The last id given (ids increase with age).
    last: u64,
    open: std::collections::BTreeMap<u64, CancellationToken>,
}

impl Silent {
    fn lock(&self) -> std::sync::MutexGuard<'_, SilentList> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self) -> (u64, CancellationToken) {
        let mut list = self.lock();
        list.last += 1;
        let (id, token) = (list.last, CancellationToken::new());
        list.open.insert(id, token.clone());
        (id, token)
    }

    /// The connection sent a head (or ended): it is no longer a candidate for eviction.
    fn heard(&self, id: u64) {
        self.lock().open.remove(&id);
    }

    fn any(&self) -> bool {
        !self.lock().open.is_empty()
    }

    fn evict_oldest(&self) {
        if let Some((_, token)) = self.lock().open.pop_first() {
            token.cancel();
        }
    }
}

/// The clock hyper times request heads with, recycling each head's timer. hyper makes a
/// new sleep for every head and drops it once the head is in; a new timer due before every
/// other one makes tokio wake its own event loop through the driver, which on a keep-alive
/// connection cost every request an eventfd write and an extra `epoll_wait` (found with
/// `perf record -e syscalls:sys_enter_write` on the proxy under wrk). A recycled timer is
/// still registered, and moving it later is one atomic store. Written here because neither
/// tokio nor hyper-util offers a timer that is reused.
#[derive(Clone, Default)]
struct HeadClock {
    spare: Arc<Mutex<Vec<Pin<Box<tokio::time::Sleep>>>>>,
}

/// Spare timers a listener keeps (one per connection that read a head at the same time).
const SPARE_TIMERS: usize = 256;

/// One head's timer; it goes back to its clock's spares when hyper drops it.
struct HeadSleep {
    inner: Option<Pin<Box<tokio::time::Sleep>>>,
    spare: Arc<Mutex<Vec<Pin<Box<tokio::time::Sleep>>>>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.inner.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl Drop for HeadSleep {
    fn drop(&mut self) {
        if let Some(sleep) = self.inner.take() {
            let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
            if spare.len() < SPARE_TIMERS {
                spare.push(sleep);
            }
        }
    }
}

impl hyper::rt::Timer for HeadClock {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let reused = self.spare.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let inner = match reused {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Box::pin(HeadSleep {
            inner: Some(inner),
            spare: self.spare.clone(),
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        if let Some(mut head) = sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            if let Some(inner) = head.inner.as_mut() {
                inner
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(new_deadline));
            }
        }
    }

    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head's timer goes back to the clock when hyper drops it and serves the next head,
    /// due at the new deadline, not the old one.
    #[tokio::test(start_paused = true)]
    async fn a_recycled_head_timer_fires_at_its_new_deadline_only() {
        use hyper::rt::Timer;
        let clock = HeadClock::default();
        let start = tokio::time::Instant::now();
        let mut first = clock.sleep(Duration::from_secs(10));
        assert!(futures_poll(first.as_mut()).is_pending());
        drop(first);
        assert_eq!(clock.spare.lock().unwrap().len(), 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        let mut second = clock.sleep(Duration::from_secs(10));
        assert!(
            clock.spare.lock().unwrap().is_empty(),
            "the spare was not reused"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(
            futures_poll(second.as_mut()).is_pending(),
            "fired at the old deadline"
        );
        second.await;
        assert_eq!(start.elapsed(), Duration::from_secs(15));
    }

    fn futures_poll<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(std::task::Waker::noop()))
    }

    /// On a kept-alive connection the next head must still arrive within [`HEAD_TIMEOUT`]
    /// of the last answer (the timer reused from the first head is moved, not left at its
    /// old deadline, which would cut the connection 4 s early here).
    #[tokio::test(start_paused = true)]
    async fn a_slow_head_on_a_kept_alive_connection_is_cut_at_the_head_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, app, async {
            let _ = stopped.await;
        }));
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Lets the server take the connection and start timing its first head.
        tokio::time::sleep(Duration::from_millis(1)).await;
        tokio::time::advance(Duration::from_secs(4)).await;
        conn.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let mut answer = Vec::new();
        while !answer.ends_with(b"ok") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the answer");
            answer.extend_from_slice(&buf[..n]);
        }
        let answered = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_secs(4)).await;
        conn.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let closed = loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break answered.elapsed(),
                Ok(_) => {}
            }
        };
        assert!(
            closed >= HEAD_TIMEOUT && closed < HEAD_TIMEOUT + Duration::from_secs(1),
            "cut {closed:?} after the answer, not {HEAD_TIMEOUT:?}"
        );
    }

    /// N5: a listener at its cap, held by a flood of silent connections that keeps coming.
    /// Legitimate clients (a fresh connection each, sending their head at once) get through
    /// because each new connection displaces the oldest silent one; before, they waited in
    /// the backlog for a head timeout and 2 of 7 metadata calls succeeded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn legitimate_clients_get_through_a_flood_of_silent_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let cap = 8;
        tokio::spawn(serve_capped(
            listener,
            app,
            async {
                let _ = stopped.await;
            },
            cap,
        ));
        let mut flood = Vec::new();
        for _ in 0..cap * 4 {
            flood.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let (mut ok, calls) = (0, 200);
        for _ in 0..calls {
            // The flood goes on between calls.
            for _ in 0..2 {
                flood.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            }
            let call = async {
                let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
                conn.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .await
                    .ok()?;
                let mut answer = Vec::new();
                conn.read_to_end(&mut answer).await.ok()?;
                answer.ends_with(b"ok").then_some(())
            };
            if tokio::time::timeout(Duration::from_secs(3), call)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                ok += 1;
            }
        }
        assert!(flood.len() > cap * 4 + calls, "the flood was not kept up");
        assert!(ok * 100 >= calls * 99, "{ok} of {calls} calls got through");
    }

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
