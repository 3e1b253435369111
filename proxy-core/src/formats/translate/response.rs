//! Whole answers: Anthropic message <-> OpenAI chat completion.

use bytes::Bytes;
use serde_json::{Value, json};

use super::shared::{anthropic_input_tokens, finish_reason, stop_reason, tool_use_block, unix_now};
use crate::failure::ProxyError;

fn unreadable(what: &str) -> ProxyError {
    ProxyError::UpstreamFailed {
        detail: format!("the upstream {what} answer could not be read"),
        retry_after: None,
    }
}

/// An Anthropic message as an OpenAI `chat.completion`.
pub fn message_to_completion(body: &[u8]) -> Result<Bytes, ProxyError> {
    let message: Value = serde_json::from_slice(body).map_err(|_| unreadable("Anthropic"))?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in message
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": block.get("id").cloned().unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": block.get("name").cloned().unwrap_or_default(),
                    "arguments": block.get("input").map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            })),
            _ => {}
        }
    }
    let mut reply = json!({"role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { text.into() }});
    if !calls.is_empty() {
        reply["tool_calls"] = Value::Array(calls);
    }
    let usage = message.get("usage").cloned().unwrap_or_default();
    let prompt = anthropic_input_tokens(&usage);
    let completion = usage
        .get("output_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let finish = message
        .get("stop_reason")
        .and_then(Value::as_str)
        .map_or("stop", finish_reason);
    let completion = json!({
        "id": message.get("id").cloned().unwrap_or_default(),
        "object": "chat.completion",
        "created": unix_now(),
        "model": message.get("model").cloned().unwrap_or_default(),
        "choices": [{"index": 0, "message": reply, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    });
    Ok(Bytes::from(
        serde_json::to_vec(&completion).unwrap_or_default(),
    ))
}

/// An OpenAI `chat.completion` as an Anthropic message (the first choice).
pub fn completion_to_message(body: &[u8]) -> Result<Bytes, ProxyError> {
    let completion: Value = serde_json::from_slice(body).map_err(|_| unreadable("OpenAI"))?;
    let choice = completion
        .pointer("/choices/0")
        .cloned()
        .unwrap_or_default();
    let reply = choice.get("message").cloned().unwrap_or_default();
    let mut content = Vec::new();
    if let Some(text) = reply
        .get("content")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in reply
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        content.push(tool_use_block(call));
    }
    let stop = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .map_or("end_turn", stop_reason);
    let tokens = |name: &str| {
        completion
            .pointer(&format!("/usage/{name}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let message = json!({
        "id": completion.get("id").cloned().unwrap_or_default(),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model").cloned().unwrap_or_default(),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": {"input_tokens": tokens("prompt_tokens"), "output_tokens": tokens("completion_tokens")},
    });
    Ok(Bytes::from(
        serde_json::to_vec(&message).unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn json_of(b: Bytes) -> Value {
        serde_json::from_slice(&b).unwrap()
    }

    #[test]
    fn anthropic_message_becomes_a_completion() {
        let message = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
            "content": [{"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 2}});
        let mut out = json_of(message_to_completion(message.to_string().as_bytes()).unwrap());
        out["created"] = json!(0);
        assert_eq!(
            out,
            json!({"id": "msg_1", "object": "chat.completion", "created": 0, "model": "claude",
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant",
                    "content": "Checking.", "tool_calls": [{"id": "toolu_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})
        );
    }

    #[test]
    fn openai_completion_becomes_a_message() {
        let completion = json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt",
            "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "Hi"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}});
        let out = json_of(completion_to_message(completion.to_string().as_bytes()).unwrap());
        assert_eq!(
            out,
            json!({"id": "chatcmpl-1", "type": "message", "role": "assistant", "model": "gpt",
                "content": [{"type": "text", "text": "Hi"}], "stop_reason": "max_tokens",
                "stop_sequence": null, "usage": {"input_tokens": 5, "output_tokens": 1}})
        );
        assert!(matches!(
            completion_to_message(b"<html>"),
            Err(ProxyError::UpstreamFailed { .. })
        ));
    }
}
