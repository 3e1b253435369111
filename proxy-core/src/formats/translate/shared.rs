//! What the translators of both directions share: stop reasons, text, tool calls,
//! usage and the defaults one side needs and the other does not send.

use serde_json::Value;

/// Used for `max_tokens` when an OpenAI caller sets none: Anthropic requires one.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Anthropic's `stop_reason` as an OpenAI `finish_reason`.
pub(super) fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// OpenAI's `finish_reason` as an Anthropic `stop_reason`.
pub(super) fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// The text of a string or of an array of `{type: "text", text}` parts, joined by
/// newlines (other parts are skipped).
pub(super) fn plain_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// An OpenAI tool call (`{id, function: {name, arguments}}`, arguments as JSON text)
/// as an Anthropic `tool_use` block (`input` an object; `{}` when unreadable).
pub(super) fn tool_use_block(call: &Value) -> Value {
    let arguments = call
        .pointer("/function/arguments")
        .and_then(Value::as_str)
        .unwrap_or("");
    let input = serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}));
    serde_json::json!({"type": "tool_use", "id": call.get("id").cloned().unwrap_or_default(),
        "name": call.pointer("/function/name").cloned().unwrap_or_default(), "input": input})
}

/// Anthropic usage: input tokens include the cached ones.
pub(super) fn anthropic_input_tokens(usage: &Value) -> u64 {
    [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    .iter()
    .filter_map(|k| usage.get(*k).and_then(Value::as_u64))
    .sum()
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
