//! The authenticating proxy: any HTTP client that knows only a base URL reaches the
//! workspace with the current token (`PAT_PROXY_LISTEN`).
//!
//! The incident it replaces: a hand-written local proxy that cached the token for 30 s and
//! forwarded revoked tokens after every rotation. Invariants:
//! - the token comes from the same snapshot rule as the metadata endpoint
//!   ([`Shared::servable`]): re-validated by `stat` on every request, never a timed cache;
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

use crate::local_surface::{not_found, require_local_client, LocalListener};
use crate::service::Shared;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use serde_json::json;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A request body up to this size is kept, so the request can be retried once after a
/// token rotated under it; a larger one streams through and is never retried.
pub const RETRY_BODY_CAP: usize = 1024 * 1024;

/// The most of a 401/403 body read to decide whether the token was the cause.
const REJECTION_BODY_CAP: usize = 64 * 1024;

/// The proxy's base URL for a listener at `addr` (clients append the workspace path).
pub fn proxy_url(addr: std::net::SocketAddr, secret: &crate::secret::ControlSecret) -> String {
    format!("http://{addr}/{}/", secret.expose())
}

#[derive(Clone)]
struct Proxy {
    shared: Shared,
    upstream: reqwest::Client,
    host: Arc<str>,
}

/// The proxy's router for a listener bound at `port`.
pub fn router(shared: Shared, listener: std::net::SocketAddr) -> Result<Router, reqwest::Error> {
    crate::provider::install_crypto_provider();
    let timeout = shared.config.http_timeout;
    let upstream = reqwest::Client::builder()
        .connect_timeout(timeout)
        // Idle time between reads, not a total: a long stream is never cut while it flows.
        .read_timeout(idle_timeout(timeout))
        .redirect(reqwest::redirect::Policy::none())
        .tcp_nodelay(true)
        .user_agent(concat!("pat-rotator-proxy/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let host: Arc<str> = shared.config.host.clone().unwrap_or_default().into();
    Ok(Router::new()
        .fallback(forward)
        .with_state(Proxy {
            shared,
            upstream,
            host,
        })
        .layer(axum::middleware::from_fn_with_state(
            LocalListener(listener),
            require_local_client,
        )))
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

/// The request headers sent upstream: hop-by-hop ones (and those the `Connection` header
/// names), `Host`, `Authorization` and forwarding headers dropped.
fn upstream_headers(incoming: &HeaderMap) -> HeaderMap {
    let named_by_connection: Vec<String> = incoming
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (name, value) in incoming {
        let n = name.as_str();
        if is_hop_by_hop(name)
            || named_by_connection.iter().any(|c| c == n)
            || n == "host"
            || n == "authorization"
            || n == "forwarded"
            || n.starts_with("x-forwarded-")
            || n == "x-real-ip"
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The response headers relayed to the client: not hop-by-hop ones, and no CORS header (the
/// workspace's `Access-Control-Allow-*` would let a web page read what the proxy answers).
fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in upstream {
        if !is_hop_by_hop(name)
            && name != header::CONTENT_LENGTH
            && !name.as_str().starts_with("access-control-")
        {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn answer(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// The request body: whole when it fits [`RETRY_BODY_CAP`] (retryable), else streamed.
enum OutgoingBody {
    Kept(Bytes),
    Streamed(reqwest::Body),
}

async fn take_body(body: Body) -> Result<OutgoingBody, axum::Error> {
    let mut stream = body.into_data_stream();
    let mut kept: Vec<Bytes> = Vec::new();
    let mut size = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        size += chunk.len();
        kept.push(chunk);
        if size > RETRY_BODY_CAP {
            // Too big to keep: what was read goes first, the rest follows as it arrives.
            let head = futures_util::stream::iter(kept.into_iter().map(Ok::<_, axum::Error>));
            return Ok(OutgoingBody::Streamed(reqwest::Body::wrap_stream(
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

async fn forward(State(p): State<Proxy>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // The capability is the first path segment; the rest, encoded as sent, is the workspace
    // path.
    let raw_path = parts.uri.path();
    let Some((capability, rest)) = raw_path
        .strip_prefix('/')
        .map(|p| p.split_once('/').unwrap_or((p, "")))
    else {
        return not_found();
    };
    if !p.shared.config.control_secret.matches(capability) {
        return not_found();
    }
    let path = format!("/{rest}");
    let url = match parts.uri.query() {
        Some(q) => format!("{}{path}?{q}", p.host),
        None => format!("{}{path}", p.host),
    };
    let metrics = &p.shared.metrics;
    let outgoing = match take_body(body).await {
        Ok(b) => b,
        Err(_) => {
            metrics.proxied("client_error");
            return answer(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            );
        }
    };
    let headers = upstream_headers(&parts.headers);
    let started = Instant::now();
    let mut retried = false;
    let mut outgoing = Some(outgoing);
    loop {
        let now = p.shared.now();
        let token = match p
            .shared
            .read()
            .await
            .map(|snap| p.shared.servable(&snap, now))
        {
            Ok(Ok(s)) => s.token,
            Ok(Err(why)) => {
                metrics.proxied("no_token");
                return answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("no token to forward with: {why}"),
                );
            }
            Err(e) => {
                metrics.proxied("no_token");
                return answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("cannot read the token: {e}"),
                );
            }
        };
        let Ok(mut bearer) = HeaderValue::from_str(&format!("Bearer {}", token.expose())) else {
            metrics.proxied("no_token");
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "the token on disk cannot be sent in a header",
            );
        };
        bearer.set_sensitive(true);
        let mut request_headers = headers.clone();
        let body = match outgoing.take() {
            Some(OutgoingBody::Kept(bytes)) => {
                // The length comes from the kept body itself, never twice.
                request_headers.remove(header::CONTENT_LENGTH);
                outgoing = Some(OutgoingBody::Kept(bytes.clone()));
                reqwest::Body::from(bytes)
            }
            // A streamed body keeps the client's length, if it gave one.
            Some(OutgoingBody::Streamed(b)) => b,
            None => reqwest::Body::from(Bytes::new()),
        };
        let sent = p
            .upstream
            .request(parts.method.clone(), &url)
            .headers(request_headers)
            .header(header::AUTHORIZATION, bearer)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                metrics.proxied("upstream_error");
                metrics
                    .proxy_upstream_seconds
                    .observe(started.elapsed().as_secs_f64());
                tracing::warn!(method = %parts.method, path = %path, error = %e.without_url(), "proxy: the workspace did not answer");
                return answer(
                    StatusCode::BAD_GATEWAY,
                    "the workspace did not answer; see the rotator's log",
                );
            }
        };
        let status = response.status();
        let upstream_headers = response.headers().clone();
        let mut body = response.bytes_stream();
        let mut head = Vec::new();
        let retryable = !retried && matches!(outgoing, Some(OutgoingBody::Kept(_)));
        if retryable && matches!(status.as_u16(), 401 | 403) {
            // Read the start of the answer (an error, small by nature) to decide; whatever
            // is not retried is relayed whole, this start first.
            while head.len() < REJECTION_BODY_CAP {
                match body.next().await {
                    Some(Ok(chunk)) => head.extend_from_slice(&chunk),
                    _ => break,
                }
            }
            if says_token_rejected(&head) {
                retried = true;
                metrics.proxy_retries.inc();
                tracing::info!(method = %parts.method, path = %path, status = status.as_u16(), "proxy: the token was refused (rotated meanwhile?); retrying once with the token re-read");
                continue;
            }
        }
        metrics
            .proxy_upstream_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.proxied(status_class(status));
        tracing::debug!(method = %parts.method, path = %path, status = status.as_u16(), retried, "proxy: forwarded");
        let head = (!head.is_empty()).then(|| Ok(Bytes::from(head)));
        let stream = futures_util::stream::iter(head).chain(body);
        let mut out = Response::new(Body::from_stream(OpenStream::new(
            stream,
            p.shared.metrics.clone(),
        )));
        *out.status_mut() = status;
        *out.headers_mut() = response_headers(&upstream_headers);
        return out;
    }
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

/// A response body in flight, counted in `pat_rotator_proxy_open_streams` until it ends or
/// the client goes away.
struct OpenStream<S> {
    inner: S,
    metrics: crate::metrics::Metrics,
}

impl<S> OpenStream<S> {
    fn new(inner: S, metrics: crate::metrics::Metrics) -> Self {
        metrics.proxy_open_streams.inc();
        OpenStream { inner, metrics }
    }
}

impl<S> Drop for OpenStream<S> {
    fn drop(&mut self) {
        self.metrics.proxy_open_streams.dec();
    }
}

impl<S: Stream<Item = reqwest::Result<Bytes>> + Unpin> Stream for OpenStream<S> {
    type Item = reqwest::Result<Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let out = upstream_headers(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["content-type", "accept"]);
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
        let out = response_headers(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
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
