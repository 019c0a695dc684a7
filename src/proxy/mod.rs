//! The authenticating proxy: any HTTP client that knows only a base URL reaches the
//! workspace with the current token (`PAT_PROXY_LISTEN`).
//!
//! The incident it replaces: a hand-written local proxy that cached the token for 30 s and
//! forwarded revoked tokens after every rotation. Invariants:
//! - the token comes from the same snapshot rule as the metadata endpoint
//!   ([`Shared::servable_until`] over [`Shared::view`]): re-validated on every request (one
//!   look at the change feed, or a `stat` pair), never a timed cache;
//!   whatever `Authorization` the client sent is replaced;
//! - only requests that pass the local-surface checks (capability in the path, loopback
//!   `Host`, no `Origin`) are forwarded; anything else is answered here and never reaches
//!   the workspace;
//! - bodies stream both ways (a server-sent event reaches the client as it is sent); the
//!   only timeouts are a connect timeout and an idle-read timeout, never a total one;
//! - a 401/403 that says the token is invalid or expired is retried once with the token
//!   re-read, and only when the request body was small enough to keep (at most
//!   [`RETRY_BODY_CAP`]); nothing else is retried;
//! - no token, no request or response body and no capability is ever logged.

use crate::local_surface::{not_found, refusal, LocalListener};
use crate::shared::Shared;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::uri::PathAndQuery;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures_util::StreamExt;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::json;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A request body up to this size is kept, so the request can be retried once after a
/// token rotated under it; a larger one streams through and is never retried.
pub(crate) const RETRY_BODY_CAP: usize = 1024 * 1024;

/// The most of a 401/403 body read to decide whether the token was the cause.
const REJECTION_BODY_CAP: usize = 64 * 1024;

/// The proxy's base URL for a listener at `addr` (clients append the workspace path).
pub fn proxy_url(addr: std::net::SocketAddr, secret: &crate::secret::ControlSecret) -> String {
    format!("http://{addr}/{}/", secret.expose())
}

/// Why the proxy could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProxySetupError {
    #[error("DATABRICKS_HOST is not a URL the proxy can forward to: {0}")]
    Host(String),
    #[error("cannot load the system's TLS trust store: {0}")]
    Tls(#[from] rustls::Error),
}

mod upstream;
use upstream::Upstream;

/// Everything a request needs, shared behind one `Arc` (axum clones the state per request).
struct Proxy {
    shared: Shared,
    /// The workspace's connections, with the same trust as the provider's client (the
    /// platform verifier over the OS store). hyper directly rather than reqwest: a request
    /// and its answer pass through as hyper types, with no URL parse, header copy or body
    /// conversion per request (reqwest cost the proxy about half its throughput).
    upstream: Upstream,
    /// The workspace's `Host`, sent with every request.
    host: HeaderValue,
    listener: LocalListener,
    /// How long the workspace may stay silent (before its answer's head, between chunks).
    idle: Duration,
    user_agent: HeaderValue,
}

/// The proxy's router for a listener bound at `listener`.
pub fn router(shared: Shared, listener: std::net::SocketAddr) -> Result<Router, ProxySetupError> {
    crate::provider::install_crypto_provider();
    let timeout = shared.config.http_timeout;
    let base: Uri = shared
        .config
        .host
        .as_deref()
        .unwrap_or_default()
        .parse()
        .map_err(|e: axum::http::uri::InvalidUri| ProxySetupError::Host(e.to_string()))?;
    let (Some(scheme), Some(authority)) = (base.scheme().cloned(), base.authority().cloned())
    else {
        return Err(ProxySetupError::Host(
            "it needs a scheme and a host, as in https://adb-123.4.azuredatabricks.net".into(),
        ));
    };
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .try_with_platform_verifier()?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let host = HeaderValue::from_str(authority.as_str())
        .map_err(|e| ProxySetupError::Host(e.to_string()))?;
    let origin = Uri::from_parts({
        let mut parts = axum::http::uri::Parts::default();
        parts.scheme = Some(scheme);
        parts.authority = Some(authority);
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
        parts
    })
    .map_err(|e| ProxySetupError::Host(e.to_string()))?;
    let proxy = Arc::new(Proxy {
        shared,
        upstream: Upstream::new(https, origin),
        host,
        listener: LocalListener(listener),
        // Idle time between reads, not a total: a long stream is never cut while it flows.
        idle: idle_timeout(timeout),
        user_agent: HeaderValue::from_static(concat!(
            "pat-rotator-proxy/",
            env!("CARGO_PKG_VERSION")
        )),
    });
    Ok(Router::new().fallback(forward).with_state(proxy))
}

/// How long an upstream response may stay silent: model streams pause while they think.
fn idle_timeout(http_timeout: Duration) -> Duration {
    (http_timeout * 4).max(Duration::from_secs(120))
}

/// Headers that describe one hop, not the message (RFC 9110 7.6.1), plus those the proxy
/// sets itself.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Makes the client's headers the ones sent upstream: hop-by-hop ones (and those the
/// `Connection` header names), `Host`, `Authorization` and forwarding headers dropped.
fn upstream_headers(headers: &mut HeaderMap) {
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
        .collect();
    for name in named_by_connection {
        headers.remove(name);
    }
    for name in [
        header::HOST,
        header::AUTHORIZATION,
        header::FORWARDED,
        HeaderName::from_static("x-real-ip"),
    ] {
        headers.remove(name);
    }
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n) || n.as_str().starts_with("x-forwarded-"))
        .cloned()
        .collect();
    for name in dropped {
        headers.remove(name);
    }
}

/// Makes the workspace's headers the ones relayed to the client: not hop-by-hop ones, and
/// no CORS header (the workspace's `Access-Control-Allow-*` would let a web page read what
/// the proxy answers).
fn response_headers(headers: &mut HeaderMap) {
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n) || n.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for name in dropped {
        headers.remove(name);
    }
}

fn answer(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// The request body: whole when it fits [`RETRY_BODY_CAP`] (retryable), else streamed.
enum OutgoingBody {
    Kept(Bytes),
    Streamed(Body),
}

/// How long a client's request body may pause between chunks: as long as a request head may
/// take to arrive (`listener::HEAD_TIMEOUT`); a client that stops half-way through its body
/// would otherwise hold its connection and an upstream one for good.
const BODY_IDLE: Duration = crate::listener::HEAD_TIMEOUT;

/// The client stopped sending its request body.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing of its request body for {0:?}")]
struct BodyIdle(Duration);

/// `stream`, ended with an error once it stays silent for `idle`.
fn cut_when_idle<S>(
    stream: S,
    idle: Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, axum::Error>> + Send + Unpin + 'static
where
    S: futures_util::Stream<Item = Result<Bytes, axum::Error>> + Send + Unpin + 'static,
{
    Box::pin(futures_util::stream::unfold(
        Some(stream),
        move |state| async move {
            let mut stream = state?;
            match tokio::time::timeout(idle, stream.next()).await {
                Ok(Some(item)) => Some((item, Some(stream))),
                Ok(None) => None,
                Err(_) => Some((Err(axum::Error::new(BodyIdle(idle))), None)),
            }
        },
    ))
}

async fn take_body(body: Body) -> Result<OutgoingBody, axum::Error> {
    if body.is_end_stream() {
        return Ok(OutgoingBody::Kept(Bytes::new()));
    }
    let mut stream = cut_when_idle(body.into_data_stream(), BODY_IDLE);
    let mut kept: Vec<Bytes> = Vec::new();
    let mut size = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        size += chunk.len();
        kept.push(chunk);
        if size > RETRY_BODY_CAP {
            // Too big to keep: what was read goes first, the rest follows as it arrives.
            let head = futures_util::stream::iter(kept.into_iter().map(Ok::<_, axum::Error>));
            return Ok(OutgoingBody::Streamed(Body::from_stream(
                head.chain(stream),
            )));
        }
    }
    Ok(OutgoingBody::Kept(kept.concat().into()))
}

/// Whether a 401/403 body says the token itself was refused (invalid, expired, revoked),
/// as Databricks words it, rather than a permission the user lacks.
fn says_token_rejected(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    [
        "invalid access token",
        "token expired",
        "expired token",
        "token is expiring",
        "invalid token",
        "revoked",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

impl Proxy {
    /// The workspace URI (origin-form: path and query, as HTTP/1.1 sends it) for a request
    /// to the proxy, or `None` when its first path segment is not the capability. The rest
    /// of the path, encoded as sent, and the query are kept.
    fn upstream_uri(&self, uri: &Uri) -> Option<Uri> {
        let raw = uri.path().strip_prefix('/')?;
        let (capability, rest) = raw.split_once('/').unwrap_or((raw, ""));
        if !self.shared.config.control_secret.matches(capability) {
            return None;
        }
        let target = match uri.query() {
            Some(q) => format!("/{rest}?{q}"),
            None => format!("/{rest}"),
        };
        Uri::try_from(target).ok()
    }

    /// The `Authorization` value to send now, by the one serving rule.
    async fn bearer(&self) -> Result<HeaderValue, Response> {
        let now = self.shared.now();
        let refused = |message: String| {
            self.shared.metrics.proxied("no_token");
            answer(StatusCode::SERVICE_UNAVAILABLE, &message)
        };
        let view = match self.shared.view().await {
            Ok(view) => view,
            Err(e) => return Err(refused(format!("cannot read the token: {e}"))),
        };
        if let Err(why) = self.shared.servable_until(&view, now) {
            return Err(refused(format!("no token to forward with: {why}")));
        }
        view.bearer()
            .cloned()
            .ok_or_else(|| refused("the token on disk cannot be sent in a header".into()))
    }
}

async fn forward(State(p): State<Arc<Proxy>>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    if let Some(refused) = refusal(&parts.headers, &parts.uri, p.listener) {
        return refused;
    }
    let Some(uri) = p.upstream_uri(&parts.uri) else {
        return not_found();
    };
    let metrics = &p.shared.metrics;
    let mut outgoing = match take_body(body).await {
        Ok(b) => Some(b),
        Err(_) => {
            metrics.proxied("client_error");
            return answer(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            );
        }
    };
    upstream_headers(&mut parts.headers);
    if !parts.headers.contains_key(header::USER_AGENT) {
        parts
            .headers
            .insert(header::USER_AGENT, p.user_agent.clone());
    }
    let started = Instant::now();
    let mut retried = false;
    loop {
        let bearer = match p.bearer().await {
            Ok(b) => b,
            Err(refused) => return refused,
        };
        let request = upstream_request(&parts, &uri, &p.host, bearer, &mut outgoing);
        let sent = tokio::time::timeout(p.idle, p.upstream.send(request)).await;
        let response = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return no_answer(&p, &parts, &uri, started, e.detail()),
            Err(_) => {
                let error = format!("no answer within {}s", p.idle.as_secs());
                return no_answer(&p, &parts, &uri, started, error);
            }
        };
        let (mut head, mut body) = response.into_parts();
        let mut start = Vec::new();
        let retryable = !retried && matches!(outgoing, Some(OutgoingBody::Kept(_)));
        if retryable && matches!(head.status.as_u16(), 401 | 403) {
            start = answer_start(&mut body).await;
            if says_token_rejected(&start) {
                // The rotator checks the token with the provider at once: revoked out of
                // band, it is replaced within seconds instead of at the next forced window.
                p.shared.suspect_current().await;
                retried = true;
                metrics.proxy_retries.inc();
                tracing::info!(method = %parts.method, path = %uri.path(), status = head.status.as_u16(), "proxy: the token was refused (rotated meanwhile?); retrying once with the token re-read");
                continue;
            }
        }
        metrics
            .proxy_upstream_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.proxied(status_class(head.status));
        tracing::debug!(method = %parts.method, path = %uri.path(), status = head.status.as_u16(), retried, "proxy: forwarded");
        response_headers(&mut head.headers);
        let relay = Relay::new(
            (!start.is_empty()).then(|| Bytes::from(start)),
            body,
            p.idle,
            metrics.proxy_open_streams.clone(),
        );
        return Response::from_parts(head, Body::new(relay));
    }
}

/// One attempt's request to the workspace: the client's method, headers (already cleaned)
/// and body, the workspace's URI and the current token. A kept body stays in `outgoing` for
/// the one retry; a streamed one is handed over and cannot be sent twice.
fn upstream_request(
    parts: &axum::http::request::Parts,
    uri: &Uri,
    host: &HeaderValue,
    bearer: HeaderValue,
    outgoing: &mut Option<OutgoingBody>,
) -> axum::http::Request<Body> {
    let mut request = axum::http::Request::new(Body::empty());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = parts.headers.clone();
    request.headers_mut().insert(header::HOST, host.clone());
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    *request.body_mut() = match outgoing.take() {
        Some(OutgoingBody::Kept(bytes)) => {
            // The length comes from the kept body itself, never twice.
            request.headers_mut().remove(header::CONTENT_LENGTH);
            *outgoing = Some(OutgoingBody::Kept(bytes.clone()));
            Body::from(bytes)
        }
        // A streamed body keeps the client's length, if it gave one.
        Some(OutgoingBody::Streamed(b)) => b,
        None => Body::empty(),
    };
    request
}

/// The workspace gave no answer (refused, reset, TLS, or silent past the idle timeout):
/// counted, logged without the token, and a 502 that says where to look.
fn no_answer(
    p: &Proxy,
    parts: &axum::http::request::Parts,
    uri: &Uri,
    started: Instant,
    error: String,
) -> Response {
    let metrics = &p.shared.metrics;
    metrics.proxied("upstream_error");
    metrics
        .proxy_upstream_seconds
        .observe(started.elapsed().as_secs_f64());
    tracing::warn!(method = %parts.method, path = %uri.path(), error, "proxy: the workspace did not answer");
    answer(
        StatusCode::BAD_GATEWAY,
        "the workspace did not answer; see the rotator's log",
    )
}

/// The start of a 401/403 answer (an error, small by nature), up to `REJECTION_BODY_CAP`,
/// to tell a refused token from any other refusal; whatever is not retried is relayed
/// whole, this start first.
async fn answer_start(body: &mut Incoming) -> Vec<u8> {
    let mut start = Vec::new();
    while start.len() < REJECTION_BODY_CAP {
        match body.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(chunk) => start.extend_from_slice(&chunk),
                Err(_) => break,
            },
            _ => break,
        }
    }
    start
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Why a relayed answer stopped early.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("the workspace stopped answering: {0}")]
    Upstream(#[from] hyper::Error),
    #[error("the workspace sent nothing for {0:?}")]
    Idle(Duration),
}

/// A workspace answer on its way to the client, as hyper delivers it (frames pass through
/// as they arrive, so a server-sent event is never held back). It fails when the workspace
/// stays silent longer than the idle timeout, and is counted in
/// `pat_rotator_proxy_open_streams` until it ends or the client goes away. The timer is only
/// armed while the workspace is silent: a short answer that arrives with its head never
/// touches it.
struct Relay {
    /// What was read to decide on a retry, sent first.
    start: Option<Bytes>,
    inner: Incoming,
    idle: Duration,
    silent_since: Option<Pin<Box<tokio::time::Sleep>>>,
    open_streams: Gauge<i64, AtomicI64>,
}

impl Relay {
    fn new(
        start: Option<Bytes>,
        inner: Incoming,
        idle: Duration,
        open_streams: Gauge<i64, AtomicI64>,
    ) -> Relay {
        open_streams.inc();
        Relay {
            start,
            inner,
            idle,
            silent_since: None,
            open_streams,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.open_streams.dec();
    }
}

impl http_body::Body for Relay {
    type Data = Bytes;
    type Error = RelayError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RelayError>>> {
        if let Some(start) = self.start.take() {
            return Poll::Ready(Some(Ok(Frame::data(start))));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.silent_since = None;
                Poll::Ready(frame.map(|f| f.map_err(RelayError::from)))
            }
            Poll::Pending => {
                let idle = self.idle;
                let timer = self
                    .silent_since
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(RelayError::Idle(idle)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.start.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(start) = &self.start {
            let len = start.len() as u64;
            hint.set_lower(hint.lower() + len);
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + len);
            }
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's body: `chunks` of `size` bytes, then silence for good.
    fn stalled_body(chunks: usize, size: usize) -> Body {
        let sent = futures_util::stream::iter(
            (0..chunks).map(move |_| Ok::<_, axum::Error>(Bytes::from(vec![b'x'; size]))),
        );
        Body::from_stream(sent.chain(futures_util::stream::pending()))
    }

    /// A body that stops half-way is cut after `BODY_IDLE`, whether it was being kept for a
    /// retry or streamed upstream (it held its connection and an upstream one for good).
    #[tokio::test(start_paused = true)]
    async fn a_request_body_that_stops_is_cut_after_the_idle_time() {
        let start = tokio::time::Instant::now();
        assert!(take_body(stalled_body(1, 10)).await.is_err());
        assert_eq!(start.elapsed(), BODY_IDLE);

        let start = tokio::time::Instant::now();
        let streamed = match take_body(stalled_body(3, RETRY_BODY_CAP / 2)).await {
            Ok(OutgoingBody::Streamed(b)) => b,
            _ => panic!("a body past the cap is streamed"),
        };
        assert!(start.elapsed() < BODY_IDLE);
        assert!(streamed.collect().await.is_err());
        assert_eq!(start.elapsed(), BODY_IDLE);
    }

    #[test]
    fn hop_by_hop_host_auth_and_forwarding_headers_stay_here() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("host", "127.0.0.1:9466"),
            ("authorization", "Bearer dummy-key"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("x-forwarded-for", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
            ("content-type", "application/json"),
            ("accept", "text/event-stream"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        upstream_headers(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["accept", "content-type"]);
    }

    #[test]
    fn no_cors_header_is_relayed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("access-control-allow-origin", "*"),
            ("access-control-allow-credentials", "true"),
            ("access-control-expose-headers", "x-request-id"),
            ("content-type", "application/json"),
            ("x-request-id", "1"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        response_headers(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["content-type", "x-request-id"]);
    }

    #[test]
    fn only_a_refused_token_is_worth_a_retry() {
        assert!(says_token_rejected(
            br#"{"error_code": 403, "message": "Invalid access token."}"#
        ));
        assert!(says_token_rejected(
            br#"{"error_code":"403","message":"Token is expiring within 30 seconds. (token expired)"}"#
        ));
        assert!(!says_token_rejected(
            br#"{"error_code":"PERMISSION_DENIED","message":"User does not have permission to use endpoint"}"#
        ));
    }
}
