//! The service surface: health, readiness and metrics on `PAT_LISTEN`; session leases and the
//! Databricks SDK metadata-service token endpoint on `PAT_CONTROL_LISTEN`.
//!
//! Invariants: nothing on `PAT_LISTEN` ever carries a token. The metadata endpoint answers
//! only with both protocol headers and the configured host, and advertises
//! `expires_on = min(real expiry, now + PAT_REVOKE_GRACE)`: the rotator revokes an old token
//! no earlier than one second after `written_at + PAT_REVOKE_GRACE`, so a token is never
//! revoked before any `expires_on` advertised for it, and `expires_on` never exceeds the real
//! expiry. (With a grace under the SDKs' 40 s refresh margin, SDKs simply ask again on each
//! call; the endpoint is a local file read.)

use crate::config::normalize_host;
use crate::local_surface::{not_found, LocalListener, LocalOnly};
use crate::secret::ControlSecret;
use crate::sessions::SessionError;
use crate::shared::Shared;
use axum::extract::{Path, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use chrono::TimeDelta;
use serde_json::json;
use std::sync::Arc;

/// The path of the metadata-service endpoint on the control listener, after the
/// capability segment: the full path is `/<PAT_CONTROL_SECRET>/v1/databricks/token`.
pub(crate) const METADATA_PATH: &str = "/v1/databricks/token";

/// The metadata-service URL for a control listener bound at `addr` (`SocketAddr` brackets an
/// IPv6 address as a URL needs).
pub fn metadata_url(addr: std::net::SocketAddr, secret: &ControlSecret) -> String {
    format!("http://{addr}/{}{METADATA_PATH}", secret.expose())
}

#[derive(Clone)]
struct App {
    shared: Shared,
    /// `DATABRICKS_HOST` as the metadata endpoint compares it, normalised once.
    configured_host: Option<Arc<str>>,
}

pub(crate) fn public_router(shared: Shared) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// The control listener: session leases at fixed paths, the metadata endpoint under the
/// capability segment, every route behind the local-client check (`listener` is the address
/// it is bound to).
pub(crate) fn control_router(shared: Shared, listener: std::net::SocketAddr) -> Router {
    Router::new()
        .route("/v1/sessions", post(open_session).get(list_sessions))
        .route("/v1/sessions/{id}", axum::routing::delete(close_session))
        .route("/v1/sessions/{id}/heartbeat", post(heartbeat))
        .route(
            &format!("/{{capability}}{METADATA_PATH}"),
            any(metadata_token),
        )
        .fallback(|| async { not_found() })
        .with_state(App {
            configured_host: shared
                .config
                .host
                .as_deref()
                .map(|h| normalize_host(h).into()),
            shared,
        })
        .layer(LocalOnly::layer(LocalListener(listener)))
}

/// 200 while the loop runs and is not stuck past its planned wake-up; the body is the loop's
/// own account (last decision, last rotation, next wake-up, last error), never a token.
async fn healthz(State(s): State<Shared>) -> Response {
    let st = s.status();
    let stuck = st.next_wake.is_some_and(|w| {
        s.now() - w
            > TimeDelta::seconds(120)
                + TimeDelta::from_std(s.config.http_timeout * 4).unwrap_or_default()
    });
    let code = if st.alive && !stuck {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let verdict = match (st.alive, stuck) {
        (false, _) => "rotation loop is not running",
        (true, true) => "rotation loop is stuck past its wake-up",
        (true, false) => "ok",
    };
    (code, Json(json!({ "status": verdict, "loop": st }))).into_response()
}

async fn readyz(State(s): State<Shared>) -> Response {
    match s.read().await {
        Ok(snap) => match s.readiness(&snap, s.now()) {
            Ok(()) => (StatusCode::OK, "ready\n").into_response(),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            )
                .into_response(),
        },
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response(),
    }
}

async fn metrics(State(s): State<Shared>) -> Response {
    if let Ok(snap) = s.read().await {
        s.update_gauges(&snap, s.now());
    }
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn open_session(State(a): State<App>) -> Response {
    match a.shared.sessions.open() {
        Ok(lease) => {
            a.shared
                .metrics
                .active_sessions
                .set(a.shared.sessions.active() as i64);
            tracing::debug!(session = %lease.id, "session opened");
            (StatusCode::CREATED, Json(lease)).into_response()
        }
        Err(e @ SessionError::Full { .. }) => {
            a.shared.metrics.sessions_refused.inc();
            (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({ "error": e.to_string() })),
            )
                .into_response()
        }
    }
}

async fn heartbeat(State(a): State<App>, Path(id): Path<String>) -> Response {
    match a.shared.sessions.heartbeat(&id) {
        Some(lease) => Json(lease).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such session (expired or closed); open a new one"})),
        )
            .into_response(),
    }
}

async fn close_session(State(a): State<App>, Path(id): Path<String>) -> Response {
    if a.shared.sessions.close(&id) {
        tracing::debug!(session = %id, "session closed");
        StatusCode::NO_CONTENT.into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such session"})),
        )
            .into_response()
    }
}

/// Only the count: a lease id is the only right to heartbeat or close a lease, so listing
/// them would let any local user close everyone's.
async fn list_sessions(State(a): State<App>) -> Response {
    Json(json!({ "active": a.shared.sessions.active() })).into_response()
}

fn bad_request(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn metadata_token(
    State(a): State<App>,
    Path(capability): Path<String>,
    request: axum::extract::Request,
) -> Response {
    if !a.shared.config.control_secret.matches(&capability) {
        return not_found();
    }
    if request.method() != Method::GET {
        return bad_request(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    // Taken before the token is read, so `now + grace` can never pass the old token's
    // revocation time (written_at + grace + 1 s, with written_at after the rename).
    let now = a.shared.now();
    let headers = request.headers();
    match headers
        .get("x-databricks-metadata-version")
        .map(|v| v.as_bytes())
    {
        Some(b"1") => {}
        Some(_) => {
            return bad_request(
                StatusCode::BAD_REQUEST,
                "unsupported X-Databricks-Metadata-Version; this endpoint speaks version 1",
            )
        }
        None => {
            return bad_request(
                StatusCode::BAD_REQUEST,
                "missing X-Databricks-Metadata-Version header",
            )
        }
    }
    let Some(asked) = headers
        .get("x-databricks-host")
        .and_then(|v| v.to_str().ok())
    else {
        return bad_request(StatusCode::BAD_REQUEST, "missing X-Databricks-Host header");
    };
    let view = match a.shared.view().await {
        Ok(v) => v,
        Err(e) => return bad_request(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let host_matches = match (&a.configured_host, &view.snap.host) {
        // A client that sends the host as configured (the SDKs do) costs no allocation.
        (Some(configured), _) => asked == &**configured || **configured == *normalize_host(asked),
        (None, Some(profile_host)) => normalize_host(profile_host) == normalize_host(asked),
        (None, None) => false,
    };
    if !host_matches {
        return bad_request(
            StatusCode::FORBIDDEN,
            "X-Databricks-Host does not match the workspace this rotator serves",
        );
    }
    // Token and expiry from one view, so a rotation in between can never pair a token with
    // another token's expiry.
    match a.shared.servable_until(&view, now) {
        Ok(until) => (
            [(header::CONTENT_TYPE, "application/json")],
            view.metadata_answer(until.timestamp()),
        )
            .into_response(),
        Err(why) => bad_request(StatusCode::SERVICE_UNAVAILABLE, &why.to_string()),
    }
}
