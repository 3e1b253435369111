//! Request bodies: OpenAI chat completions <-> Anthropic messages.

use serde_json::{Map, Value, json};

use super::shared::{DEFAULT_MAX_TOKENS, plain_text, tool_use_block};
use crate::failure::ProxyError;

type Result<T> = std::result::Result<T, ProxyError>;

fn refuse(message: impl Into<String>, param: &'static str) -> ProxyError {
    ProxyError::invalid_request(message, Some(param))
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(ProxyError::invalid_request(
            "request body is not a valid JSON object",
            None,
        )),
    }
}

/// An OpenAI chat-completions body as an Anthropic messages body for `upstream_model`.
pub fn chat_to_messages(body: &[u8], upstream_model: &str) -> Result<Vec<u8>> {
    let mut chat = parse_object(body)?;
    if chat.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(refuse(
            "'n' greater than 1 is not supported by this model's provider",
            "n",
        ));
    }
    let mut out = Map::new();
    out.insert("model".into(), upstream_model.into());
    let (system, messages) = openai_messages(chat.remove("messages").unwrap_or_default())?;
    if !system.is_empty() {
        out.insert("system".into(), system.join("\n\n").into());
    }
    out.insert("messages".into(), Value::Array(messages));
    let max_tokens = chat
        .remove("max_completion_tokens")
        .or_else(|| chat.remove("max_tokens"))
        .filter(|v| !v.is_null())
        .unwrap_or_else(|| DEFAULT_MAX_TOKENS.into());
    out.insert("max_tokens".into(), max_tokens);
    for name in ["temperature", "top_p", "stream"] {
        if let Some(v) = chat.remove(name).filter(|v| !v.is_null()) {
            out.insert(name.into(), v);
        }
    }
    match chat.remove("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(list)) => {
            out.insert("stop_sequences".into(), Value::Array(list));
        }
        _ => {}
    }
    if let Some(Value::Array(tools)) = chat.remove("tools") {
        out.insert("tools".into(), Value::Array(openai_tools(tools)?));
    }
    let parallel = chat.remove("parallel_tool_calls").and_then(|v| v.as_bool());
    if let Some(choice) = chat.remove("tool_choice").filter(|v| !v.is_null()) {
        let mut choice = match &choice {
            Value::String(s) if s == "none" => json!({"type": "none"}),
            Value::String(s) if s == "required" => json!({"type": "any"}),
            Value::String(_) => json!({"type": "auto"}),
            Value::Object(_) => match choice.pointer("/function/name") {
                Some(name) => json!({"type": "tool", "name": name}),
                None => return Err(refuse("'tool_choice' names no function", "tool_choice")),
            },
            _ => return Err(refuse("'tool_choice' is not valid", "tool_choice")),
        };
        if parallel == Some(false) && choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = true.into();
        }
        out.insert("tool_choice".into(), choice);
    } else if parallel == Some(false) && out.contains_key("tools") {
        out.insert(
            "tool_choice".into(),
            json!({"type": "auto", "disable_parallel_tool_use": true}),
        );
    }
    if let Some(Value::String(user)) = chat.remove("user") {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    Ok(serde_json::to_vec(&Value::Object(out)).unwrap_or_default())
}

/// OpenAI messages as Anthropic's: system texts apart; tool results become user turns;
/// consecutive turns of one role merged (Anthropic wants them alternating).
fn openai_messages(messages: Value) -> Result<(Vec<String>, Vec<Value>)> {
    let Value::Array(messages) = messages else {
        return Err(refuse("'messages' must be an array", "messages"));
    };
    let mut system = Vec::new();
    let mut out: Vec<Value> = Vec::new();
    for message in messages {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        let content = message.get("content").cloned().unwrap_or(Value::Null);
        let (role, blocks) = match role {
            "system" | "developer" => {
                system.push(plain_text(&content));
                continue;
            }
            "user" => ("user", openai_content(&content)?),
            "assistant" => {
                let mut blocks = openai_content(&content)?;
                for call in message
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    blocks.push(tool_use_block(call));
                }
                ("assistant", blocks)
            }
            "tool" => {
                let id = message.get("tool_call_id").cloned().unwrap_or_default();
                let block = json!({"type": "tool_result", "tool_use_id": id,
                    "content": plain_text(&content)});
                ("user", vec![block])
            }
            other => {
                return Err(refuse(
                    format!("message role '{other}' is not supported by this model's provider"),
                    "messages",
                ));
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(last) if last["role"] == role => {
                if let Some(existing) = last["content"].as_array_mut() {
                    existing.extend(blocks);
                }
            }
            _ => out.push(json!({"role": role, "content": blocks})),
        }
    }
    Ok((system, out))
}

/// OpenAI message content (a string or parts) as Anthropic content blocks.
fn openai_content(content: &Value) -> Result<Vec<Value>> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(parts) => parts.iter().map(openai_part).collect(),
        _ => Err(refuse("message 'content' is not valid", "messages")),
    }
}

fn openai_part(part: &Value) -> Result<Value> {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => {
            Ok(json!({"type": "text", "text": part.get("text").cloned().unwrap_or_default()}))
        }
        Some("image_url") => {
            let url = part
                .pointer("/image_url/url")
                .and_then(Value::as_str)
                .unwrap_or("");
            let source = match url
                .strip_prefix("data:")
                .and_then(|rest| rest.split_once(";base64,"))
            {
                Some((media_type, data)) => {
                    json!({"type": "base64", "media_type": media_type, "data": data})
                }
                None => json!({"type": "url", "url": url}),
            };
            Ok(json!({"type": "image", "source": source}))
        }
        other => Err(refuse(
            format!(
                "content part type '{}' is not supported by this model's provider",
                other.unwrap_or("")
            ),
            "messages",
        )),
    }
}

fn openai_tools(tools: Vec<Value>) -> Result<Vec<Value>> {
    tools
        .into_iter()
        .map(|tool| {
            if tool.get("type").and_then(Value::as_str) != Some("function") {
                return Err(refuse(
                    "only 'function' tools are supported by this model's provider",
                    "tools",
                ));
            }
            let function = tool.get("function").cloned().unwrap_or_default();
            let mut out = json!({
                "name": function.get("name").cloned().unwrap_or_default(),
                "input_schema": function.get("parameters").cloned()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            });
            if let Some(d) = function.get("description").filter(|d| d.is_string()) {
                out["description"] = d.clone();
            }
            Ok(out)
        })
        .collect()
}

/// An Anthropic messages body as an OpenAI chat-completions body for `upstream_model`.
/// Streams ask for the usage chunk (the answer's `message_delta` reports usage).
pub fn messages_to_chat(body: &[u8], upstream_model: &str) -> Result<Vec<u8>> {
    let mut anthropic = parse_object(body)?;
    let mut out = Map::new();
    out.insert("model".into(), upstream_model.into());
    let mut messages = Vec::new();
    match anthropic.remove("system") {
        Some(Value::Null) | None => {}
        Some(system) => {
            let text = plain_text(&system);
            if !text.is_empty() {
                messages.push(json!({"role": "system", "content": text}));
            }
        }
    }
    let Some(Value::Array(turns)) = anthropic.remove("messages") else {
        return Err(refuse("'messages' must be an array", "messages"));
    };
    for turn in turns {
        anthropic_turn(&turn, &mut messages)?;
    }
    out.insert("messages".into(), Value::Array(messages));
    for name in ["max_tokens", "temperature", "top_p"] {
        if let Some(v) = anthropic.remove(name).filter(|v| !v.is_null()) {
            out.insert(name.into(), v);
        }
    }
    if let Some(Value::Array(stop)) = anthropic.remove("stop_sequences") {
        out.insert("stop".into(), Value::Array(stop));
    }
    if anthropic.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), true.into());
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(Value::Array(tools)) = anthropic.remove("tools") {
        out.insert("tools".into(), Value::Array(anthropic_tools(tools)?));
    }
    if let Some(choice) = anthropic.remove("tool_choice").filter(Value::is_object) {
        let openai = match choice.get("type").and_then(Value::as_str) {
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => {
                json!({"type": "function", "function": {"name": choice.get("name").cloned().unwrap_or_default()}})
            }
            _ => json!("auto"),
        };
        out.insert("tool_choice".into(), openai);
        if choice
            .get("disable_parallel_tool_use")
            .and_then(Value::as_bool)
            == Some(true)
        {
            out.insert("parallel_tool_calls".into(), false.into());
        }
    }
    if let Some(user) = anthropic
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .filter(|u| u.is_string())
    {
        out.insert("user".into(), user.clone());
    }
    Ok(serde_json::to_vec(&Value::Object(out)).unwrap_or_default())
}

/// One Anthropic turn as OpenAI messages: tool results become `tool` messages (first,
/// as OpenAI wants them right after the assistant's calls); tool uses become
/// `tool_calls`.
fn anthropic_turn(turn: &Value, out: &mut Vec<Value>) -> Result<()> {
    let role = match turn.get("role").and_then(Value::as_str) {
        Some(role @ ("user" | "assistant")) => role,
        _ => {
            return Err(refuse(
                "each message needs a role of 'user' or 'assistant'",
                "messages",
            ));
        }
    };
    let blocks = match turn.get("content") {
        Some(Value::String(s)) => {
            out.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => return Err(refuse("message 'content' is not valid", "messages")),
    };
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                parts.push(
                    json!({"type": "text", "text": block.get("text").cloned().unwrap_or_default()}),
                );
            }
            Some("image") => {
                let source = block.get("source").cloned().unwrap_or_default();
                let url = match source.get("type").and_then(Value::as_str) {
                    Some("base64") => format!(
                        "data:{};base64,{}",
                        source
                            .get("media_type")
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                        source.get("data").and_then(Value::as_str).unwrap_or("")
                    ),
                    _ => source
                        .get("url")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                };
                parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            Some("tool_use") => {
                let arguments = block
                    .get("input")
                    .map_or_else(|| "{}".to_owned(), Value::to_string);
                calls.push(json!({"id": block.get("id").cloned().unwrap_or_default(), "type": "function",
                    "function": {"name": block.get("name").cloned().unwrap_or_default(), "arguments": arguments}}));
            }
            Some("tool_result") => {
                let content = block.get("content").map(plain_text).unwrap_or_default();
                out.push(json!({"role": "tool",
                    "tool_call_id": block.get("tool_use_id").cloned().unwrap_or_default(),
                    "content": content}));
            }
            // Reasoning of earlier turns has no OpenAI form; the answer stands without it.
            Some("thinking" | "redacted_thinking") => {}
            other => {
                return Err(refuse(
                    format!(
                        "content block type '{}' is not supported by this model's provider",
                        other.unwrap_or("")
                    ),
                    "messages",
                ));
            }
        }
    }
    if role == "assistant" {
        let text: Vec<&str> = parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect();
        let mut message = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { text.join("").into() }});
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
        }
        out.push(message);
    } else if !parts.is_empty() {
        let only_text = parts.iter().all(|p| p["type"] == "text");
        let content = if only_text {
            Value::String(
                parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        } else {
            Value::Array(parts)
        };
        out.push(json!({"role": "user", "content": content}));
    }
    Ok(())
}

fn anthropic_tools(tools: Vec<Value>) -> Result<Vec<Value>> {
    tools
        .into_iter()
        .map(|tool| {
            if let Some(kind) = tool.get("type").and_then(Value::as_str)
                && kind != "custom"
            {
                return Err(refuse(
                    format!("tool type '{kind}' is not supported by this model's provider"),
                    "tools",
                ));
            }
            let mut function = json!({
                "name": tool.get("name").cloned().unwrap_or_default(),
                "parameters": tool.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"})),
            });
            if let Some(d) = tool.get("description").filter(|d| d.is_string()) {
                function["description"] = d.clone();
            }
            Ok(json!({"type": "function", "function": function}))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn to_messages(body: Value) -> Value {
        serde_json::from_slice(&chat_to_messages(body.to_string().as_bytes(), "claude-up").unwrap())
            .unwrap()
    }

    fn to_chat(body: Value) -> Value {
        serde_json::from_slice(&messages_to_chat(body.to_string().as_bytes(), "gpt-up").unwrap())
            .unwrap()
    }

    #[test]
    fn chat_becomes_messages() {
        let out = to_messages(json!({
            "model": "alias", "stream": true, "temperature": 0.2, "stop": "END", "user": "u1",
            "frequency_penalty": 1,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "user", "content": "thanks"}
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "required", "parallel_tool_calls": false
        }));
        assert_eq!(
            out,
            json!({
                "model": "claude-up", "system": "be brief", "max_tokens": DEFAULT_MAX_TOKENS,
                "temperature": 0.2, "stream": true, "stop_sequences": ["END"],
                "metadata": {"user_id": "u1"},
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "weather?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                        {"type": "text", "text": "thanks"}]}
                ],
                "tools": [{"name": "get_weather", "description": "d",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true}
            })
        );
    }

    #[test]
    fn messages_become_chat() {
        let out = to_chat(json!({
            "model": "alias", "max_tokens": 100, "stream": true, "top_k": 5,
            "system": [{"type": "text", "text": "be brief"}],
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "thanks"}]}
            ],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "get_weather"},
            "stop_sequences": ["END"]
        }));
        assert_eq!(
            out,
            json!({
                "model": "gpt-up", "max_tokens": 100, "stream": true,
                "stream_options": {"include_usage": true}, "stop": ["END"],
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": "Let me check.", "tool_calls": [{"id": "toolu_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
                    {"role": "user", "content": "thanks"}
                ],
                "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}
            })
        );
    }

    #[test]
    fn what_cannot_be_expressed_is_refused_with_its_parameter() {
        let param = |r: Result<Vec<u8>>| match r {
            Err(ProxyError::InvalidRequest { param, .. }) => param,
            _ => panic!("expected a refusal"),
        };
        let n = json!({"model": "a", "n": 2, "messages": []}).to_string();
        assert_eq!(param(chat_to_messages(n.as_bytes(), "x")), Some("n"));
        let tool = json!({"model": "a", "max_tokens": 1, "messages": [],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
        .to_string();
        assert_eq!(param(messages_to_chat(tool.as_bytes(), "x")), Some("tools"));
        let audio = json!({"model": "a", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]})
            .to_string();
        assert_eq!(
            param(chat_to_messages(audio.as_bytes(), "x")),
            Some("messages")
        );
    }
}
