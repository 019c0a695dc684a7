//! The token API's handlers: `token/create`, `token/delete`, `token/list`, and the SCIM
//! `Me` call readers use to prove a token works, with Databricks' own status codes and
//! bodies.

use super::{error, info_json, issue_locked, Emulator, TokenRecord, USER_NAME};
use std::time::Duration;

/// The token API's routes, served with the emulator as their state.
pub(super) fn routes() -> Router<Emulator> {
    Router::new()
        .route("/api/2.0/token/create", post(create))
        .route("/api/2.0/token/delete", post(delete))
        .route("/api/2.0/token/list", get(list))
        .route("/api/2.0/preview/scim/v2/Me", get(me))
}
use axum::extract::{Json, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

fn missing_body() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        json!("INVALID_PARAMETER_VALUE"),
        "Request body must be JSON.",
    )
}

#[derive(Deserialize)]
struct CreateRequest {
    lifetime_seconds: Option<i64>,
    comment: Option<String>,
}

async fn create(
    State(e): State<Emulator>,
    headers: HeaderMap,
    body: Option<Json<CreateRequest>>,
) -> Response {
    if let Some(r) = e.admit(&headers, "/api/2.0/token/create") {
        return r;
    }
    let Some(Json(req)) = body else {
        return missing_body();
    };
    if let Some(refusal) = e.refused_by_rules(req.lifetime_seconds) {
        return refusal;
    }
    let (minted, quota) = {
        let now = e.now();
        let mut inner = e.lock();
        inner.counters.creates += 1;
        let quota = inner.rules.token_quota;
        let live = inner
            .tokens
            .values()
            .filter(|t| !t.oauth && t.is_live(now))
            .count();
        let minted = if live >= quota {
            None
        } else {
            let lifetime = req
                .lifetime_seconds
                .filter(|s| *s > 0)
                .map(|s| Duration::from_secs(s as u64));
            Some(issue_locked(
                &mut inner,
                now,
                lifetime,
                req.comment.as_deref().unwrap_or(""),
            ))
        };
        (minted, quota)
    };
    let Some((token, record)) = minted else {
        return error(
            StatusCode::BAD_REQUEST,
            json!("QUOTA_EXCEEDED"),
            &format!("Cannot create more than {quota} tokens."),
        );
    };
    e.latency().await;
    e.lock().counters.creates_answered += 1;
    Json(json!({ "token_value": token.expose(), "token_info": info_json(&record) })).into_response()
}

#[derive(Deserialize)]
struct DeleteRequest {
    token_id: String,
}

async fn delete(
    State(e): State<Emulator>,
    headers: HeaderMap,
    body: Option<Json<DeleteRequest>>,
) -> Response {
    e.latency().await;
    if let Some(r) = e.admit(&headers, "/api/2.0/token/delete") {
        return r;
    }
    let Some(Json(req)) = body else {
        return missing_body();
    };
    let now = e.now();
    let mut inner = e.lock();
    inner.counters.deletes += 1;
    match inner
        .tokens
        .values_mut()
        .find(|t| !t.oauth && t.token_id == req.token_id && t.is_live(now))
    {
        Some(t) => {
            t.revoked_at = Some(now);
            Json(json!({})).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            json!("RESOURCE_DOES_NOT_EXIST"),
            &format!("Token with id {} does not exist.", req.token_id),
        ),
    }
}

async fn list(State(e): State<Emulator>, headers: HeaderMap) -> Response {
    e.latency().await;
    if let Some(r) = e.admit(&headers, "/api/2.0/token/list") {
        return r;
    }
    let now = e.now();
    let mut inner = e.lock();
    inner.counters.lists += 1;
    let mut live: Vec<&TokenRecord> = inner
        .tokens
        .values()
        .filter(|t| !t.oauth && t.is_live(now))
        .collect();
    live.sort_by_key(|t| t.created_at);
    let infos: Vec<Value> = live.into_iter().map(info_json).collect();
    Json(json!({ "token_infos": infos })).into_response()
}

async fn me(State(e): State<Emulator>, headers: HeaderMap) -> Response {
    if let Some(r) = e.authenticate(&headers, "/api/2.0/preview/scim/v2/Me") {
        return r;
    }
    e.lock().counters.verifies += 1;
    Json(json!({
        "id": "1000",
        "userName": USER_NAME,
        "displayName": "Emulated User",
        "active": true,
        "emails": [{ "value": USER_NAME, "primary": true, "type": "work" }],
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
    }))
    .into_response()
}
