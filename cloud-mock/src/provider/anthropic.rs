//! The Anthropic shape: `/v1/messages` as JSON or as Anthropic's SSE event sequence
//! (`message_start`, `content_block_start`, `ping`, `content_block_delta`...,
//! `content_block_stop`, `message_delta`, `message_stop`), `/v1/messages/count_tokens`,
//! and `{"type": "error", "error": {type, message}}` errors.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Call, event_stream};

/// Anthropic's error type for a status.
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 => "timeout_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

fn error_body(status: StatusCode) -> Value {
    json!({"type": "error", "error": {"type": error_type(status), "message": format!("mock error {}", status.as_u16())}})
}

fn event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

pub async fn messages(call: Call) -> Response {
    if let Some(error) = call.error(error_body) {
        return error;
    }
    let usage = call.script.usage.unwrap_or_default();
    let output = usage.completion_tokens;
    // Anthropic's input_tokens leave the cached parts out.
    let cached = usage.cache_read_tokens + usage.cache_write_tokens;
    let mut input_usage = json!({"input_tokens": usage.prompt_tokens.saturating_sub(cached)});
    if usage.cache_read_tokens > 0 {
        input_usage["cache_read_input_tokens"] = usage.cache_read_tokens.into();
    }
    if usage.cache_write_tokens > 0 {
        input_usage["cache_creation_input_tokens"] = usage.cache_write_tokens.into();
    }
    let message = |content: Value, stop: Value, output_tokens: u64| {
        let mut usage = input_usage.clone();
        usage["output_tokens"] = output_tokens.into();
        json!({
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": null,
            "usage": usage,
        })
    };
    let tool = call.script.tool_call.clone();
    let stop = if tool.is_some() {
        "tool_use"
    } else {
        "end_turn"
    };
    if !call.stream {
        let content = match &tool {
            Some(t) => {
                let input: Value = serde_json::from_str(&t.arguments).unwrap_or_else(|_| json!({}));
                json!([{"type": "tool_use", "id": t.id, "name": t.name, "input": input}])
            }
            None => json!([{"type": "text", "text": call.content()}]),
        };
        return axum::Json(message(content, json!(stop), output)).into_response();
    }
    let block = match &tool {
        Some(t) => json!({"type": "tool_use", "id": t.id, "name": t.name, "input": {}}),
        None => json!({"type": "text", "text": ""}),
    };
    let mut events = vec![
        event(
            "message_start",
            &json!({"type": "message_start", "message": message(json!([]), Value::Null, 1)}),
        ),
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": block}),
        ),
        event("ping", &json!({"type": "ping"})),
    ];
    events.extend(call.pieces().iter().map(|piece| {
        let delta = if tool.is_some() {
            json!({"type": "input_json_delta", "partial_json": piece})
        } else {
            json!({"type": "text_delta", "text": piece})
        };
        event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": delta}),
        )
    }));
    events.push(event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(event(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                "usage": {"output_tokens": output}}),
    ));
    events.push(event("message_stop", &json!({"type": "message_stop"})));
    let error = event(
        "error",
        &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    );
    event_stream(events, &call.script, &error)
}

/// `{"input_tokens"}`: the script's prompt tokens, or about one token per four bytes
/// of the messages and system prompt when the script has no usage.
pub async fn count_tokens(call: Call) -> Response {
    if let Some(error) = call.error(error_body) {
        return error;
    }
    let estimate = || {
        let text = |field: &str| call.request.get(field).map_or(0, |v| v.to_string().len());
        u64::try_from((text("messages") + text("system")).div_ceil(4)).unwrap_or(u64::MAX)
    };
    let tokens = call.script.usage.map_or_else(estimate, |u| u.prompt_tokens);
    axum::Json(json!({"input_tokens": tokens})).into_response()
}
