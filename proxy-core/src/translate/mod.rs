//! Translation between the two caller formats: OpenAI chat completions and Anthropic
//! messages, both ways, for requests, whole answers and streams.
//!
//! A request in one format going to an upstream of the other is rewritten before it is
//! sent, and the answer is rewritten on its way back: whole answers at once, streams
//! event by event as the upstream sends them (the caller sees well-formed events of its
//! own format). System prompts, multi-turn conversations, images, tool definitions,
//! tool calls and results, stop reasons and usage carry over; parameters the other side
//! has no equivalent for are dropped, and requests that cannot be expressed at all
//! (several choices, server-side tools) are refused with a 400 naming the parameter.
//!
//! Layout:
//! - `request.rs`: request bodies, both ways.
//! - `response.rs`: whole answers, both ways.
//! - `stream.rs`: stateful event translators, both ways.

mod request;
mod response;
mod stream;

pub use request::{chat_to_messages, messages_to_chat};
pub use response::{completion_to_message, message_to_completion};
pub use stream::{AnthropicToOpenAi, OpenAiToAnthropic};

/// How an answer is rewritten on its way to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// Same format both sides.
    None,
    /// An Anthropic upstream answering an OpenAI caller.
    AnthropicToOpenAi,
    /// An OpenAI-compatible upstream answering an Anthropic caller.
    OpenAiToAnthropic,
}

impl Conversion {
    /// A whole answer in the caller's format.
    pub fn answer(self, body: bytes::Bytes) -> Result<bytes::Bytes, crate::error::ProxyError> {
        match self {
            Conversion::None => Ok(body),
            Conversion::AnthropicToOpenAi => message_to_completion(&body),
            Conversion::OpenAiToAnthropic => completion_to_message(&body),
        }
    }

    /// The event translator for a stream, when one is needed.
    pub fn stream(self) -> Option<StreamTranslator> {
        match self {
            Conversion::None => None,
            Conversion::AnthropicToOpenAi => {
                Some(StreamTranslator::ToOpenAi(AnthropicToOpenAi::new()))
            }
            Conversion::OpenAiToAnthropic => {
                Some(StreamTranslator::ToAnthropic(OpenAiToAnthropic::new()))
            }
        }
    }
}

/// A stream translator of either direction.
pub enum StreamTranslator {
    ToOpenAi(AnthropicToOpenAi),
    ToAnthropic(OpenAiToAnthropic),
}

impl StreamTranslator {
    pub fn translate(&mut self, run: &[u8]) -> bytes::Bytes {
        match self {
            StreamTranslator::ToOpenAi(t) => t.translate(run),
            StreamTranslator::ToAnthropic(t) => t.translate(run),
        }
    }
}

use serde_json::Value;

use crate::error::UpstreamErrorFields;

/// Used for `max_tokens` when an OpenAI caller sets none: Anthropic requires one.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Anthropic's `stop_reason` as an OpenAI `finish_reason`.
fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// OpenAI's `finish_reason` as an Anthropic `stop_reason`.
fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// The text of a string or of an array of `{type: "text", text}` parts, joined by
/// newlines (other parts are skipped).
fn plain_text(content: &Value) -> String {
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
fn tool_use_block(call: &Value) -> Value {
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
fn anthropic_input_tokens(usage: &Value) -> u64 {
    [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    .iter()
    .filter_map(|k| usage.get(*k).and_then(Value::as_u64))
    .sum()
}

/// An Anthropic upstream 4xx as OpenAI-style fields: `upstream_error` with a code
/// saying what kind of refusal it was, and Anthropic's message.
pub fn anthropic_error_fields(status: u16, body: &[u8]) -> UpstreamErrorFields {
    let error: Value = serde_json::from_slice(body).unwrap_or_default();
    let kind = error.pointer("/error/type").and_then(Value::as_str);
    let code = match (kind, status) {
        (Some("rate_limit_error"), _) | (None, 429) => "rate_limit_exceeded",
        (Some("permission_error"), _) | (None, 403) => "permission_denied",
        (Some("not_found_error"), _) | (None, 404) => "model_not_found",
        (Some("request_too_large"), _) | (None, 413) => "request_too_large",
        (Some("authentication_error"), _) | (None, 401) => "upstream_authentication_failed",
        (Some("timeout_error"), _) | (None, 408) => "timeout",
        _ => "invalid_request",
    };
    let message = error
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map_or_else(
            || format!("the upstream provider answered {status}"),
            str::to_owned,
        );
    UpstreamErrorFields {
        message,
        kind: "upstream_error".to_owned(),
        param: None,
        code: Some(code.to_owned()),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
