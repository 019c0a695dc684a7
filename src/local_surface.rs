//! Who may get a token from a local listener: the rules every listener that hands out a
//! token (the control listener, the proxy) applies before anything else.
//!
//! The incident: a loopback listener is reachable by every user on the host, and through DNS
//! rebinding by any web page in a local browser, while the config file it serves is 0600.
//! Invariant: a token leaves a listener only to a request that (1) names the capability
//! secret in its path (so exactly who can read `<config>.control.json`, i.e. the config
//! file's directory, can ask), compared in constant time and answered with the same 404 as
//! any unknown path when wrong; (2) carries a `Host` that is a loopback literal or
//! `localhost` (a rebound name is refused with 403); (3) carries no `Origin` (only browsers
//! send it). No CORS header is ever sent, so a browser never lets a page read an answer.

use crate::store::{atomic_write_private, StoreError};
use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

/// The listener's own address: a `Host` with a port is checked against its port, and its
/// own IP literal (say `127.0.0.2`) is as good a name as `127.0.0.1`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalListener(pub SocketAddr);

/// Whether `host` (a `Host` header value) names this loopback listener: `127.0.0.1`,
/// `localhost`, `[::1]` or the listener's own IP (case-insensitive), with no port or exactly
/// the listener's.
pub(crate) fn is_local_host(host: &str, listener: SocketAddr) -> bool {
    let host = host.trim();
    let (name, given_port) = match host.rsplit_once(':') {
        // "[::1]" alone contains ':' but no port after the bracket.
        Some((name, p)) if !p.contains(']') => (name, Some(p)),
        _ => (host, None),
    };
    let name_ok = ["127.0.0.1", "localhost", "[::1]"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
        || (listener.ip().is_loopback() && {
            // Rare (a listener on, say, 127.0.0.2 named by its address): worth a format.
            let own = match listener.ip() {
                IpAddr::V4(ip) => ip.to_string(),
                IpAddr::V6(ip) => format!("[{ip}]"),
            };
            name.eq_ignore_ascii_case(&own)
        });
    let port_ok = match given_port {
        None => true,
        Some(p) => p.parse::<u16>().is_ok_and(|p| p == listener.port()),
    };
    name_ok && port_ok
}

/// Refuses a request before any route sees it when it is not plainly from a local program
/// (see [`refusal`]): a layer over every route of a listener, so that no route can forget
/// the check. Written as a plain tower service rather than axum's `from_fn`, which clones
/// the inner route and boxes a future per request; here a refusal is a ready answer and
/// anything else is the route's own future.
#[derive(Clone)]
pub(crate) struct LocalOnly<S> {
    inner: S,
    listener: LocalListener,
}

impl<S> LocalOnly<S> {
    /// The layer for a listener bound to `listener`.
    pub fn layer(listener: LocalListener) -> impl tower::Layer<S, Service = LocalOnly<S>> + Clone {
        tower::layer::layer_fn(move |inner| LocalOnly { inner, listener })
    }
}

impl<S> tower::Service<Request> for LocalOnly<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future =
        futures_util::future::Either<std::future::Ready<Result<Response, S::Error>>, S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        use futures_util::future::Either;
        match refusal(request.headers(), request.uri(), self.listener) {
            Some(refused) => Either::Left(std::future::ready(Ok(refused))),
            None => Either::Right(self.inner.call(request)),
        }
    }
}

/// The answer to a request that is not plainly from a local program, `None` for one that
/// is: a `Host` that is not this loopback listener (403: DNS rebinding), an `Origin` or a
/// cross-site `Sec-Fetch-Site` (403: only browsers send them), two `Host` headers or an
/// absolute-form target (400: a request line that names another server). The proxy asks
/// it inline (one function call, not a middleware layer per request).
pub fn refusal(headers: &HeaderMap, uri: &Uri, listener: LocalListener) -> Option<Response> {
    if headers.contains_key(header::ORIGIN) {
        return Some(refuse(
            "requests from web pages (with an Origin header) are refused",
        ));
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"none" | b"same-origin") {
            return Some(refuse(
                "requests from web pages (Sec-Fetch-Site) are refused",
            ));
        }
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some(bad_request("a request must carry exactly one Host header"));
    }
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Some(bad_request(
            "absolute-form request targets are not served; send the path only",
        ));
    }
    match host.and_then(|h| h.to_str().ok()) {
        Some(h) if is_local_host(h, listener.0) => None,
        _ => Some(refuse("the Host header must be 127.0.0.1, localhost, [::1] or the listener's own address (this listener is loopback only)")),
    }
}

fn bad_request(why: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": why }))).into_response()
}

fn refuse(why: &str) -> Response {
    (StatusCode::FORBIDDEN, Json(json!({ "error": why }))).into_response()
}

/// The answer to a wrong secret and to any unknown path alike, so that a guess learns
/// nothing about which part was wrong.
pub(crate) fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error": "not found" }))).into_response()
}

/// `<config>.control.json`: where the running service's capability URLs are published, to
/// exactly those who may read the config file's directory (the file itself is 0600). Its
/// `Debug` leaves the URLs out: they carry the capability.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ControlFile {
    /// The SDK metadata-service URL (`DATABRICKS_METADATA_SERVICE_URL`).
    pub metadata_url: Option<String>,
    /// The authenticating proxy's base URL, when the proxy is on.
    pub proxy_url: Option<String>,
    /// The process that serves them.
    pub pid: u32,
    pub written_at: DateTime<Utc>,
}

impl std::fmt::Debug for ControlFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlFile")
            .field(
                "metadata_url",
                &self.metadata_url.as_ref().map(|_| "[redacted]"),
            )
            .field("proxy_url", &self.proxy_url.as_ref().map(|_| "[redacted]"))
            .field("pid", &self.pid)
            .field("written_at", &self.written_at)
            .finish()
    }
}

impl ControlFile {
    pub fn write(&self, path: &Path) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| StoreError::State {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        atomic_write_private(path, &json)
    }

    /// The published URLs; `None` when no service has published any (not running yet), or
    /// when the file is not one our service wrote: owned by another user, readable by
    /// others, a symlink, a FIFO or huge (a forged file must not send clients elsewhere).
    pub fn read(path: &Path) -> Option<ControlFile> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path).ok()?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me || meta.mode() & 0o077 != 0 {
            return None;
        }
        let bytes = crate::store::read_capped(path, crate::store::Follow::No, 64 * 1024).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Whether the service that wrote this file still serves it: its process is alive and
    /// its control listener accepts a connection.
    pub fn served(&self) -> bool {
        let pid_alive = i32::try_from(self.pid).is_ok_and(|pid| {
            // SAFETY: signal 0 only checks that the process exists.
            let rc = unsafe { libc::kill(pid, 0) };
            rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
        });
        let addr = self
            .metadata_url
            .as_deref()
            .and_then(|u| u.strip_prefix("http://"))
            .and_then(|rest| rest.split('/').next())
            .and_then(|a| a.parse::<SocketAddr>().ok());
        pid_alive
            && addr.is_some_and(|a| {
                std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).is_ok()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_file_debug_hides_the_capability() {
        let f = ControlFile {
            metadata_url: Some("http://127.0.0.1:1/SECRETSECRET/v1/databricks/token".into()),
            proxy_url: Some("http://127.0.0.1:2/SECRETSECRET/".into()),
            pid: 1,
            written_at: Utc::now(),
        };
        assert!(!format!("{f:?}").contains("SECRETSECRET"));
    }

    #[test]
    fn only_loopback_names_with_our_port_pass() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9465",
            "localhost",
            "LOCALHOST:9465",
            "[::1]",
            "[::1]:9465",
        ] {
            assert!(is_local_host(ok, addr("127.0.0.1:9465")), "{ok}");
        }
        for bad in [
            "evil.example.com",
            "evil.example.com:9465",
            "127.0.0.1:80",
            "localhost:9466",
            "127.0.0.1.nip.io",
            "localhost.evil.com",
            "[::1]:1",
            "10.0.0.1:9465",
            "",
            "127.0.0.1:",
            "0.0.0.0:9465",
        ] {
            assert!(!is_local_host(bad, addr("127.0.0.1:9465")), "{bad}");
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_listener_on_another_loopback_address_admits_its_own_name() {
        let listener = addr("127.0.0.2:9465");
        assert!(is_local_host("127.0.0.2:9465", listener));
        assert!(is_local_host("127.0.0.2", listener));
        assert!(is_local_host("localhost:9465", listener));
        assert!(!is_local_host("127.0.0.3:9465", listener));
        assert!(!is_local_host("127.0.0.2:9465", addr("127.0.0.1:9465")));
    }
}
