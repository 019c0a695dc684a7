//! The proxy's connections to the workspace: HTTP/1.1 on hyper's connection-level client,
//! with a pool of its own.
//!
//! Why not hyper-util's pooled client: the proxy talks to one host, and the general pool
//! (keyed by scheme and authority, checkout waiters, an idle-reaper task, a wrapper around
//! every sender, a request rewritten to origin-form on every call) showed in the profile of
//! a one-connection load. Here a checkout is a look along a short vector under an
//! uncontended lock, and the request is built in origin-form once, by the caller.
//!
//! Invariants:
//! - a connection carries one request at a time: it goes back to the pool as soon as its
//!   answer's head arrived and is taken again only once hyper says it is ready (the previous
//!   answer was read to its end), so answers are never queued behind each other;
//! - a request is sent again on a new connection only when hyper hands it back unsent (a
//!   pooled connection the workspace had closed meanwhile), never once any of it was
//!   written: the proxy's one retry stays the token retry;
//! - at most [`MAX_POOLED`] connections are kept, each closed after [`IDLE_FOR`] unused.

use axum::body::Body;
use axum::http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an unused connection is kept (hyper-util's default, and under the 120 s that
/// common load balancers in front of a workspace keep an idle connection).
const IDLE_FOR: Duration = Duration::from_secs(90);

/// The most connections kept for reuse (nginx's `keepalive` in `scripts/bench.sh` is 128).
const MAX_POOLED: usize = 128;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Why no answer came from the workspace.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpstreamError {
    #[error("cannot connect to the workspace: {0}")]
    Connect(Box<dyn std::error::Error + Send + Sync>),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    /// The error with its cause, for the log (hyper's own message names only the kind).
    pub(super) fn detail(&self) -> String {
        use std::error::Error as _;
        let cause = match self {
            UpstreamError::Connect(e) => e.source(),
            UpstreamError::Http(e) => e.source(),
        };
        match cause {
            Some(cause) => format!("{self}: {cause}"),
            None => self.to_string(),
        }
    }
}

struct Pooled {
    sender: http1::SendRequest<Body>,
    last_used: Instant,
}

/// See the module documentation.
pub(super) struct Upstream {
    connector: Connector,
    /// `scheme://authority` of the workspace: what the connector dials.
    origin: Uri,
    pool: Mutex<Vec<Pooled>>,
}

impl Upstream {
    pub(super) fn new(connector: Connector, origin: Uri) -> Upstream {
        Upstream {
            connector,
            origin,
            pool: Mutex::new(Vec::new()),
        }
    }

    /// Sends `request` (origin-form URI, `Host` set) and returns the answer's head; its body
    /// streams from the connection as the caller reads it.
    pub(super) async fn send(
        &self,
        mut request: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.checkin(sender);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // Unsent, on a connection the workspace had closed: a new one.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }

    /// A pooled connection ready for a request, dropping the closed and the long unused.
    fn checkout(&self) -> Option<http1::SendRequest<Body>> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        pool.retain(|c| !c.sender.is_closed() && now.duration_since(c.last_used) < IDLE_FOR);
        // The most recently used first: it is the likeliest to be ready and warm.
        let ready = pool.iter().rposition(|c| c.sender.is_ready())?;
        Some(pool.swap_remove(ready).sender)
    }

    /// Back into the pool, answer in flight: it is taken again once that answer was read.
    fn checkin(&self, sender: http1::SendRequest<Body>) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < MAX_POOLED {
            pool.push(Pooled {
                sender,
                last_used: Instant::now(),
            });
        }
    }

    /// A new connection (TCP, TLS for `https`), driven by a task of its own until it closes.
    async fn connect(&self) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let mut connector = self.connector.clone();
        let io = tower::Service::call(&mut connector, self.origin.clone())
            .await
            .map_err(UpstreamError::Connect)?;
        let (sender, connection) = http1::handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "proxy: a connection to the workspace ended");
            }
        });
        Ok(sender)
    }
}
