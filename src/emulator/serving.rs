//! The emulator's workspace routes beyond the token API: the SDK discovery document and
//! model serving (OpenAI-compatible chat completions, streamed as server-sent events, and
//! endpoint invocations), what a client of the authenticating proxy calls.
//!
//! Invariant: every model-serving request needs a live token, checked exactly as the token
//! API checks it (the same counters of dead-token requests).

use super::{new_secret, Emulator, EMULATED_WORKSPACE_ID};
use axum::extract::{Json, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::{json, Value};
use std::time::Duration;

/// The unauthenticated discovery document every SDK `Config` probes first, shaped as a
/// workspace answers it (the SDK reads `oidc_endpoint`, `workspace_id`, `account_id`,
/// `cloud`); without it every client logs a warning.
pub(super) async fn host_metadata(headers: HeaderMap) -> Response {
    let host = request_host(&headers);
    Json(json!({
        "oidc_endpoint": format!("http://{host}/oidc"),
        "workspace_id": EMULATED_WORKSPACE_ID,
    }))
    .into_response()
}

/// The `Host` a request was sent to: the emulator's URLs in its documents use it.
pub(super) fn request_host(headers: &HeaderMap) -> String {
    headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string()
}

/// Emulator-only request fields that pace a streamed answer (a real endpoint ignores
/// unknown fields): how many content chunks, and the pause before each.
const DEFAULT_CHUNKS: u64 = 5;
const DEFAULT_CHUNK_INTERVAL_MS: u64 = 400;

/// `POST /serving-endpoints/chat/completions`: the OpenAI-compatible route (`model` names
/// the endpoint). `stream: true` is answered as server-sent events spread over a few
/// seconds, each chunk carrying `x_emulator_sent_at_ms` so a test can see when it left.
pub(super) async fn chat_completions(
    State(e): State<Emulator>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let model = body["model"].as_str().unwrap_or("unknown").to_string();
    chat_answer(
        e,
        &headers,
        "/serving-endpoints/chat/completions",
        model,
        &body,
    )
}

/// `POST /serving-endpoints/{name}/invocations`: a chat request (with `messages`) gets a
/// chat completion; anything else gets its inputs back as `predictions`.
pub(super) async fn invocations(
    State(e): State<Emulator>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let path = format!("/serving-endpoints/{name}/invocations");
    if body.get("messages").is_some() {
        return chat_answer(e, &headers, &path, name, &body);
    }
    if let Some(r) = e.authenticate(&headers, &path) {
        return r;
    }
    e.lock().counters.serving_requests += 1;
    let inputs = body
        .get("inputs")
        .or_else(|| body.get("dataframe_records"))
        .or_else(|| body.get("instances"))
        .cloned()
        .unwrap_or(Value::Null);
    Json(json!({ "predictions": inputs })).into_response()
}

fn chat_answer(
    e: Emulator,
    headers: &HeaderMap,
    path: &str,
    model: String,
    body: &Value,
) -> Response {
    if let Some(r) = e.authenticate(headers, path) {
        return r;
    }
    e.lock().counters.serving_requests += 1;
    let created = Utc::now().timestamp();
    let id = format!("chatcmpl-{}", new_secret("", 16));
    let chunks = body["x_emulator_chunks"]
        .as_u64()
        .unwrap_or(DEFAULT_CHUNKS)
        .min(10_000);
    if !body["stream"].as_bool().unwrap_or(false) {
        let content: Vec<String> = (0..chunks).map(|i| format!("word{i}")).collect();
        return Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": content.join(" ") },
                "finish_reason": "stop",
            }],
            "usage": { "prompt_tokens": 7, "completion_tokens": chunks, "total_tokens": 7 + chunks },
        }))
        .into_response();
    }
    let interval = Duration::from_millis(
        body["x_emulator_interval_ms"]
            .as_u64()
            .unwrap_or(DEFAULT_CHUNK_INTERVAL_MS)
            .min(60_000),
    );
    // Event i (0..chunks) is a content chunk, then the finishing chunk, then [DONE].
    let events = futures_util::stream::unfold(0u64, move |i| {
        let (e, id, model) = (e.clone(), id.clone(), model.clone());
        async move {
            if i > chunks + 1 {
                return None;
            }
            if i < chunks {
                tokio::time::sleep(interval).await;
            }
            let data = if i == chunks + 1 {
                e.lock().counters.streams_completed += 1;
                "[DONE]".to_string()
            } else {
                let (delta, finish) = if i < chunks {
                    let role = if i == 0 {
                        json!("assistant")
                    } else {
                        Value::Null
                    };
                    (
                        json!({ "role": role, "content": format!("word{i} ") }),
                        Value::Null,
                    )
                } else {
                    (json!({}), json!("stop"))
                };
                json!({
                    "id": id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
                    "x_emulator_sent_at_ms": Utc::now().timestamp_millis(),
                })
                .to_string()
            };
            Some((
                Ok::<_, std::convert::Infallible>(format!("data: {data}\n\n")),
                i + 1,
            ))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(axum::body::Body::from_stream(events))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
