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
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::Path;

/// The listener's own port, against which a `Host` with a port is checked.
#[derive(Debug, Clone, Copy)]
pub struct ListenerPort(pub u16);

/// Whether `host` (a `Host` header value) names this loopback listener: `127.0.0.1`,
/// `localhost` or `[::1]` (case-insensitive), with no port or exactly `port`.
pub fn is_local_host(host: &str, port: u16) -> bool {
    let host = host.trim();
    let (name, given_port) = match host.rsplit_once(':') {
        // "[::1]" alone contains ':' but no port after the bracket.
        Some((name, p)) if !p.contains(']') => (name, Some(p)),
        _ => (host, None),
    };
    let name_ok = matches!(
        name.to_ascii_lowercase().as_str(),
        "127.0.0.1" | "localhost" | "[::1]"
    );
    let port_ok = match given_port {
        None => true,
        Some(p) => p.parse::<u16>().is_ok_and(|p| p == port),
    };
    name_ok && port_ok
}

/// Middleware: refuses (403) a request whose `Host` is not this loopback listener or that
/// carries an `Origin`, before any route sees it.
pub async fn require_local_client(
    State(port): State<ListenerPort>,
    request: Request,
    next: Next,
) -> Response {
    if request.headers().contains_key(header::ORIGIN) {
        return refuse("requests from web pages (with an Origin header) are refused");
    }
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    match host {
        Some(h) if is_local_host(h, port.0) => next.run(request).await,
        _ => refuse("the Host header must be 127.0.0.1, localhost or [::1] (this listener is loopback only)"),
    }
}

fn refuse(why: &str) -> Response {
    (StatusCode::FORBIDDEN, Json(json!({ "error": why }))).into_response()
}

/// The answer to a wrong secret and to any unknown path alike, so that a guess learns
/// nothing about which part was wrong.
pub fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error": "not found" }))).into_response()
}

/// `<config>.control.json`: where the running service's capability URLs are published, to
/// exactly those who may read the config file's directory (the file itself is 0600). Its
/// `Debug` leaves the URLs out: they carry the capability.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ControlFile {
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

    /// The published URLs; `None` when no service has published any (not running yet).
    pub fn read(path: &Path) -> Option<ControlFile> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
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
            assert!(is_local_host(ok, 9465), "{ok}");
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
            assert!(!is_local_host(bad, 9465), "{bad}");
        }
    }
}
