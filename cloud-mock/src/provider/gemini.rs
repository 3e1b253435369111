//! Google's Gemini shapes (the Gemini API, and Vertex AI with its OAuth2 token endpoint):
//! `POST /v1beta/models/{model}:generateContent` and
//! `:streamGenerateContent?alt=sse` (server-sent events with CRLF line endings, as
//! Google sends them), `:batchEmbedContents` (and Vertex AI's `:predict`) for
//! embeddings, `x-goog-api-key` required, Google's error envelope
//! (`{"error": {code, message, status}}`), function calls as `functionCall` parts.

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{SharedState, Usage, event_stream, receive};

/// Google's status name for an HTTP status.
fn google_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

fn error_body(status: StatusCode) -> Value {
    json!({"error": {"code": status.as_u16(), "message": format!("mock error {}", status.as_u16()),
                     "status": google_status(status)}})
}

fn usage_metadata(u: Usage) -> Value {
    let mut usage = json!({"promptTokenCount": u.prompt_tokens, "candidatesTokenCount": u.completion_tokens,
                           "totalTokenCount": u.prompt_tokens + u.completion_tokens});
    if u.cache_read_tokens > 0 {
        usage["cachedContentTokenCount"] = u.cache_read_tokens.into();
    }
    usage
}

/// `POST /v1beta/models/{model}:{method}` (the Gemini API, `x-goog-api-key`).
pub(super) async fn generate(
    State(shared): State<SharedState>,
    Path(action): Path<String>,
    request: Request,
) -> Response {
    let key = request
        .headers()
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if key.is_empty() {
        let body = json!({"error": {"code": 403, "status": "PERMISSION_DENIED",
            "message": "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API."}});
        return (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
    }
    answer(&shared, &action, request).await
}

/// `POST /v1/projects/{project}/locations/{region}/publishers/google/models/
/// {model}:{method}` (Vertex AI): a `ya29.` bearer token, as the mock's token endpoint
/// mints them.
pub(super) async fn vertex(
    State(shared): State<SharedState>,
    Path((_project, _region, action)): Path<(String, String, String)>,
    request: Request,
) -> Response {
    if let Some(refused) = unauthenticated(&request) {
        return refused;
    }
    answer(&shared, &action, request).await
}

/// `POST /v1/projects/{project}/locations/{region}/publishers/anthropic/models/
/// {model}:rawPredict` (or `:streamRawPredict`): Claude on Vertex AI, Anthropic's
/// messages with `anthropic_version: vertex-2023-10-16` in the body and no `model`.
pub(super) async fn claude(
    State(shared): State<SharedState>,
    Path((_project, _region, action)): Path<(String, String, String)>,
    request: Request,
) -> Response {
    if let Some(refused) = unauthenticated(&request) {
        return refused;
    }
    let Some((model, "rawPredict" | "streamRawPredict")) = action.rsplit_once(':') else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(error_body(StatusCode::NOT_FOUND)),
        )
            .into_response();
    };
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    if request["anthropic_version"] != "vertex-2023-10-16" || request.get("model").is_some() {
        let body = json!({"type": "error", "error": {"type": "invalid_request_error",
            "message": "anthropic_version: vertex-2023-10-16 is required and model must not be set"}});
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    }
    let call = receive(
        &shared,
        &parts.method,
        &parts.uri,
        &parts.headers,
        &body,
        Some(model.to_owned()),
    )
    .await;
    super::anthropic::messages(call).await
}

/// Vertex AI's refusal of a request without a `ya29.` bearer token.
fn unauthenticated(request: &Request) -> Option<Response> {
    let token = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if token.starts_with("ya29.") {
        return None;
    }
    let body = json!({"error": {"code": 401, "status": "UNAUTHENTICATED",
        "message": "Request had invalid authentication credentials. Expected OAuth 2 access token."}});
    Some((StatusCode::UNAUTHORIZED, axum::Json(body)).into_response())
}

/// `POST /token`: Google's OAuth2 token endpoint for service accounts (RFC 7523): the
/// assertion is kept (for tests to verify) and a `ya29.` token minted.
pub(super) async fn token(
    State(shared): State<SharedState>,
    axum::Form(form): axum::Form<std::collections::HashMap<String, String>>,
) -> Response {
    let assertion = form.get("assertion").cloned().unwrap_or_default();
    let grant = form.get("grant_type").map(String::as_str);
    if grant != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
        || assertion.split('.').count() != 3
    {
        let body = json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."});
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    }
    let mut s = super::lock(&shared);
    s.google_assertions.push(assertion);
    let token = format!("ya29.mock-{}", s.google_assertions.len());
    axum::Json(json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

async fn answer(shared: &SharedState, action: &str, request: Request) -> Response {
    let Some((model, method)) = action.rsplit_once(':') else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(error_body(StatusCode::NOT_FOUND)),
        )
            .into_response();
    };
    let (parts, body) = request.into_parts();
    let stream = match method {
        "generateContent" => false,
        "streamGenerateContent" => true,
        "batchEmbedContents" | "predict" => {
            let body = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            let call = receive(
                shared,
                &parts.method,
                &parts.uri,
                &parts.headers,
                &body,
                Some(model.to_owned()),
            )
            .await;
            return embeddings(&call, method == "predict");
        }
        _ => {
            return (
                StatusCode::NOT_FOUND,
                axum::Json(error_body(StatusCode::NOT_FOUND)),
            )
                .into_response();
        }
    };
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let call = receive(
        shared,
        &parts.method,
        &parts.uri,
        &parts.headers,
        &body,
        Some(model.to_owned()),
    )
    .await;
    if let Some(error) = call.error(error_body) {
        return error;
    }
    let usage = call.script.usage.map(usage_metadata);
    let finish = call
        .script
        .finish_reason
        .clone()
        .unwrap_or_else(|| "STOP".to_owned());
    let candidate = |parts: Value, finish: Option<&str>| {
        let mut c = json!({"content": {"role": "model", "parts": parts}, "index": 0});
        if let Some(finish) = finish {
            c["finishReason"] = finish.into();
        }
        c
    };
    let answer = |candidate: Value, usage: Option<&Value>| {
        let mut a = json!({"candidates": [candidate], "modelVersion": model, "responseId": "mock-response"});
        if let Some(usage) = usage {
            a["usageMetadata"] = usage.clone();
        }
        a
    };
    let call_part = call.script.tool_call.as_ref().map(|t| {
        let args: Value = serde_json::from_str(&t.arguments).unwrap_or_else(|_| json!({}));
        json!({"functionCall": {"name": t.name, "args": args}})
    });
    if !stream {
        let parts = match &call_part {
            Some(part) => json!([part]),
            None => json!([{"text": call.content()}]),
        };
        return axum::Json(answer(candidate(parts, Some(&finish)), usage.as_ref())).into_response();
    }
    // Text in pieces, the last with the finish reason and the usage; a function call
    // comes whole in one chunk.
    let pieces = match &call_part {
        Some(part) => vec![json!([part])],
        None => call
            .pieces()
            .into_iter()
            .map(|p| json!([{"text": p}]))
            .collect(),
    };
    let last = pieces.len().saturating_sub(1);
    let events: Vec<String> = pieces
        .into_iter()
        .enumerate()
        .map(|(i, parts)| {
            let chunk = if i == last {
                answer(candidate(parts, Some(&finish)), usage.as_ref())
            } else {
                answer(candidate(parts, None), None)
            };
            format!("data: {chunk}\r\n\r\n")
        })
        .collect();
    let error = format!(
        "data: {}\r\n\r\n",
        error_body(StatusCode::SERVICE_UNAVAILABLE)
    );
    event_stream(events, &call.script, &error)
}

/// `:batchEmbedContents` (Gemini API: `requests[].content.parts[].text`) and `:predict`
/// (Vertex AI: `instances[].content`, token counts in each prediction's statistics).
fn embeddings(call: &super::Call, vertex: bool) -> Response {
    if let Some(error) = call.error(error_body) {
        return error;
    }
    let texts: Vec<&str> = if vertex {
        call.request["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| i["content"].as_str().unwrap_or(""))
            .collect()
    } else {
        call.request["requests"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                r.pointer("/content/parts/0/text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
            })
            .collect()
    };
    if texts.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(error_body(StatusCode::BAD_REQUEST)),
        )
            .into_response();
    }
    let body = if vertex {
        let predictions: Vec<Value> = texts
            .iter()
            .map(|t| {
                json!({"embeddings": {"values": super::openai::embed(t),
                "statistics": {"token_count": t.split_whitespace().count(), "truncated": false}}})
            })
            .collect();
        json!({ "predictions": predictions })
    } else {
        let embeddings: Vec<Value> = texts
            .iter()
            .map(|t| json!({ "values": super::openai::embed(t) }))
            .collect();
        json!({ "embeddings": embeddings })
    };
    axum::Json(body).into_response()
}
