//! The OpenAI shape: chat completions and completions (JSON or SSE ending `[DONE]`),
//! embeddings, the model list, and `{"error": {message, type, param, code}}` errors.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};

use super::{Call, SharedState, Usage, event_stream, lock, receive, unix_now};

fn error_body(status: StatusCode) -> Value {
    let kind = match status.as_u16() {
        400 | 404 | 413 | 422 => "invalid_request_error",
        401 | 403 => "authentication_error",
        429 => "rate_limit_error",
        _ => "server_error",
    };
    json!({"error": {"message": format!("mock error {}", status.as_u16()), "type": kind, "param": null, "code": "mock"}})
}

fn usage_json(u: Usage) -> Value {
    let mut usage = json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens});
    if u.cache_read_tokens > 0 {
        usage["prompt_tokens_details"] = json!({"cached_tokens": u.cache_read_tokens});
    }
    usage
}

/// The error event OpenAI sends when a stream fails after it began.
const STREAM_ERROR: &str =
    "data: {\"error\":{\"message\":\"scripted stream error\",\"type\":\"server_error\"}}\n\n";

fn data(value: &Value) -> String {
    format!("data: {value}\n\n")
}

/// The chunks of a stream: one per piece (the last carries `finish_reason`), a usage
/// chunk when the script has usage and the request asked for it
/// (`stream_options.include_usage`, as OpenAI does), then `[DONE]`.
fn stream(call: &Call, chunk: impl Fn(usize, &str, bool) -> Value) -> Response {
    let pieces = call.pieces();
    let mut events: Vec<String> = pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| data(&chunk(i, piece, i + 1 == pieces.len())))
        .collect();
    let asked = call.request["stream_options"]["include_usage"] == true;
    if let Some(usage) = call.script.usage.filter(|_| asked) {
        let mut last = chunk(0, "", false);
        last["choices"] = json!([]);
        last["usage"] = usage_json(usage);
        events.push(data(&last));
    }
    events.push("data: [DONE]\n\n".to_owned());
    event_stream(events, &call.script, STREAM_ERROR)
}

pub async fn chat(call: Call) -> Response {
    if let Some(error) = call.error(error_body) {
        return error;
    }
    let created = unix_now();
    let model = call.model.clone();
    let tool = call.script.tool_call.clone();
    let finish_reason = if tool.is_some() { "tool_calls" } else { "stop" };
    if call.stream {
        return stream(&call, |i, piece, last| {
            let delta = match &tool {
                Some(t) if i == 0 => json!({"role": "assistant", "content": null, "tool_calls": [
                    {"index": 0, "id": t.id, "type": "function", "function": {"name": t.name, "arguments": piece}}]}),
                Some(_) => json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
                None if i == 0 => json!({"role": "assistant", "content": piece}),
                None => json!({"content": piece}),
            };
            let finish = if last {
                json!(finish_reason)
            } else {
                Value::Null
            };
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        });
    }
    let message = match &tool {
        Some(t) => json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}]}),
        None => json!({"role": "assistant", "content": call.content()}),
    };
    axum::Json(json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": created,
        "model": call.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": call.script.usage.map(usage_json),
    }))
    .into_response()
}

pub async fn completions(call: Call) -> Response {
    if let Some(error) = call.error(error_body) {
        return error;
    }
    let created = unix_now();
    let model = call.model.clone();
    if call.stream {
        return stream(&call, |_, piece, last| {
            let finish = if last { json!("stop") } else { Value::Null };
            json!({"id": "cmpl-mock", "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": piece, "logprobs": null, "finish_reason": finish}]})
        });
    }
    axum::Json(json!({
        "id": "cmpl-mock",
        "object": "text_completion",
        "created": created,
        "model": call.model,
        "choices": [{"index": 0, "text": call.script.content, "logprobs": null, "finish_reason": "stop"}],
        "usage": call.script.usage.map(usage_json),
    }))
    .into_response()
}

/// Dimensions of mock embeddings.
const DIMENSIONS: usize = 8;

/// A deterministic unit-ish vector for `text`.
pub(super) fn embed(text: &str) -> Vec<f64> {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        state = (state ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (0..DIMENSIONS)
        .map(|i| {
            state = state.rotate_left(7).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64);
            f64::from(u32::try_from(state >> 40).unwrap_or(0)) / f64::from(1u32 << 24) - 0.5
        })
        .collect()
}

pub async fn embeddings(call: Call) -> Response {
    if let Some(error) = call.error(error_body) {
        return error;
    }
    let inputs: Vec<String> = match call.request.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect(),
        _ => {
            let mut error = error_body(StatusCode::BAD_REQUEST);
            error["error"]["message"] = json!("'input' is required");
            return (StatusCode::BAD_REQUEST, axum::Json(error)).into_response();
        }
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| json!({"object": "embedding", "index": i, "embedding": embed(text)}))
        .collect();
    let prompt_tokens = call.script.usage.map_or(0, |u| u.prompt_tokens);
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": call.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response()
}

/// `/v1/responses`: one output message with the script's text, usage in input/output
/// tokens; streams send `response.created`, text deltas and `response.completed`.
pub async fn responses(call: Call) -> Response {
    if let Some(error) = call.error(error_body) {
        return error;
    }
    let usage = call.script.usage.map(|u| {
        json!({"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
               "total_tokens": u.prompt_tokens + u.completion_tokens})
    });
    let response = |status: &str, text: &str| {
        json!({"id": "resp_mock", "object": "response", "created_at": unix_now(), "status": status,
               "model": call.model, "output": [{"type": "message", "id": "msg_mock", "status": status, "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}],
               "usage": if status == "completed" { usage.clone() } else { None }})
    };
    if !call.stream {
        return axum::Json(response("completed", &call.script.content)).into_response();
    }
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![event(
        "response.created",
        json!({"type": "response.created", "response": response("in_progress", "")}),
    )];
    events.extend(call.pieces().iter().map(|piece| {
        event(
            "response.output_text.delta",
            json!({"type": "response.output_text.delta", "item_id": "msg_mock", "output_index": 0,
                   "content_index": 0, "delta": piece}),
        )
    }));
    events.push(event(
        "response.completed",
        json!({"type": "response.completed", "response": response("completed", &call.script.content)}),
    ));
    let error = event(
        "error",
        json!({"type": "error", "code": "server_error", "message": "scripted stream error"}),
    );
    event_stream(events, &call.script, &error)
}

/// `/v1/rerank` (the Cohere/Jina shape OpenAI-compatible servers use): documents scored
/// by how many query words they contain.
pub async fn rerank(call: Call) -> Response {
    if let Some(error) = call.error(error_body) {
        return error;
    }
    let query = call.request["query"].as_str().unwrap_or("").to_lowercase();
    let documents = call.request["documents"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut results: Vec<Value> = documents
        .iter()
        .enumerate()
        .map(|(index, doc)| {
            let text = doc.as_str().map_or_else(|| doc.to_string(), str::to_owned).to_lowercase();
            let hits = query.split_whitespace().filter(|w| text.contains(w)).count();
            json!({"index": index, "relevance_score": hits as f64 / (1 + query.split_whitespace().count()) as f64})
        })
        .collect();
    results.sort_by(|a, b| {
        b["relevance_score"]
            .as_f64()
            .partial_cmp(&a["relevance_score"].as_f64())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    axum::Json(
        json!({"id": "rerank-mock", "model": call.model, "results": results,
        "usage": {"total_tokens": call.script.usage.map_or(0, |u| u.prompt_tokens)}}),
    )
    .into_response()
}

/// `/v1/images/generations`: one tiny base64 "image" per `n`.
pub async fn images(call: Call) -> Response {
    if let Some(error) = call.error(error_body) {
        return error;
    }
    let n = call.request["n"].as_u64().unwrap_or(1);
    let data: Vec<Value> = (0..n).map(|_| json!({"b64_json": "bW9jaw=="})).collect();
    axum::Json(json!({"created": unix_now(), "data": data})).into_response()
}

/// `/v1/audio/speech`: a few bytes of "audio".
pub async fn speech(call: Call) -> Response {
    if let Some(error) = call.error(error_body) {
        return error;
    }
    (
        [(axum::http::header::CONTENT_TYPE, "audio/mpeg")],
        format!(
            "MOCK-AUDIO:{}",
            call.request["input"].as_str().unwrap_or("")
        ),
    )
        .into_response()
}

/// `/v1/audio/transcriptions` and `/translations` (multipart): the script's text.
pub async fn transcription(call: Call) -> Response {
    if let Some(error) = call.error(error_body) {
        return error;
    }
    axum::Json(json!({"text": call.script.content})).into_response()
}

/// `mock-model` and every model with its own script (the request is recorded).
pub async fn models(
    State(shared): State<SharedState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> axum::Json<Value> {
    receive(&shared, &method, &uri, &headers, &Bytes::new(), None).await;
    let mut names: Vec<String> = lock(&shared).by_model.keys().cloned().collect();
    names.push("mock-model".to_owned());
    names.sort();
    names.dedup();
    let data: Vec<Value> = names
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "mock"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_deterministic_and_differ_by_text() {
        assert_eq!(embed("a"), embed("a"));
        assert_ne!(embed("a"), embed("b"));
        assert_eq!(embed("a").len(), DIMENSIONS);
        assert!(embed("hello").iter().all(|x| (-0.5..0.5).contains(x)));
    }
}
