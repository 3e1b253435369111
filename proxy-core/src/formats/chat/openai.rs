//! OpenAI chat completions <-> the canonical form: requests and whole answers (streams
//! are in `openai_stream.rs`). OpenAI-compatible vendors speak the same.

use serde_json::{Map, Value, json};

use super::canonical::{
    Answer, Block, ImageSource, Request, Role, Stop, Text, Tool, ToolChoice, Turn, Usage,
};
use super::codec::{CallerCodec, UpstreamCodec};
use super::wire::{
    Result, count, image_source, number, parse_object, plain_text, refuse, str_at, str_of, strings,
    take, to_bytes, u64_of, unix_now, unreadable,
};

pub struct OpenAiChat;

impl CallerCodec for OpenAiChat {
    fn read_request(&self, body: &[u8]) -> Result<Request> {
        let mut chat = parse_object(body)?;
        let (max_param, max) = match take(&mut chat, "max_completion_tokens") {
            Some(v) => ("max_completion_tokens", Some(v)),
            None => ("max_tokens", take(&mut chat, "max_tokens")),
        };
        let mut request = Request {
            choices: chat.get("n").and_then(Value::as_u64).unwrap_or(1),
            max_tokens: count(max, max_param)?,
            temperature: number(take(&mut chat, "temperature"), "temperature")?,
            top_p: number(take(&mut chat, "top_p"), "top_p")?,
            stream: chat.get("stream").and_then(Value::as_bool) == Some(true),
            stop: match take(&mut chat, "stop") {
                Some(Value::String(s)) => vec![s],
                Some(Value::Array(list)) => strings(&list),
                _ => Vec::new(),
            },
            parallel_tool_calls: chat.get("parallel_tool_calls").and_then(Value::as_bool),
            user: chat.get("user").and_then(Value::as_str).map(str::to_owned),
            thinking_budget: read_effort(take(&mut chat, "reasoning_effort"), "reasoning_effort")?,
            ..Request::default()
        };
        let Some(Value::Array(messages)) = chat.remove("messages") else {
            return Err(refuse("'messages' must be an array", "messages"));
        };
        for message in &messages {
            read_message(message, &mut request)?;
        }
        if let Some(Value::Array(tools)) = chat.remove("tools") {
            request.tools = Some(tools.iter().map(read_tool).collect::<Result<_>>()?);
        }
        request.tool_choice = take(&mut chat, "tool_choice")
            .map(|c| read_tool_choice(&c))
            .transpose()?;
        Ok(request)
    }

    fn write_answer(&self, answer: &Answer) -> Vec<u8> {
        let text: String = answer
            .content
            .iter()
            .filter_map(|b| match b {
                Block::Text(t) => Some(t.text.as_str()),
                _ => None,
            })
            .collect();
        let calls: Vec<Value> = answer.content.iter().filter_map(tool_call).collect();
        let content = if text.is_empty() && !calls.is_empty() {
            Value::Null
        } else {
            text.into()
        };
        let mut message = json!({"role": "assistant", "content": content});
        write_reasoning(&answer.content, &mut message);
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
        }
        to_bytes(&json!({
            "id": answer.id,
            "object": "chat.completion",
            "created": unix_now(),
            "model": answer.model,
            "choices": [{"index": 0, "message": message,
                "finish_reason": answer.stop.map_or("stop", finish_reason)}],
            "usage": write_usage(&answer.usage),
        }))
    }
}

impl UpstreamCodec for OpenAiChat {
    /// Streams ask for the usage chunk (the canonical stream reports usage).
    fn write_request(&self, request: &Request, model: &str) -> Result<Vec<u8>> {
        let mut out = Map::new();
        out.insert("model".into(), model.into());
        out.insert("messages".into(), Value::Array(write_messages(request)));
        if let Some(max) = request.max_tokens {
            out.insert("max_tokens".into(), max.into());
        }
        if let Some(t) = &request.temperature {
            out.insert("temperature".into(), t.clone().into());
        }
        if let Some(p) = &request.top_p {
            out.insert("top_p".into(), p.clone().into());
        }
        if !request.stop.is_empty() {
            out.insert("stop".into(), request.stop.clone().into());
        }
        if request.choices > 1 {
            out.insert("n".into(), request.choices.into());
        }
        if request.stream {
            out.insert("stream".into(), true.into());
            out.insert("stream_options".into(), json!({"include_usage": true}));
        }
        if let Some(tools) = &request.tools {
            out.insert("tools".into(), tools.iter().map(write_tool).collect());
        }
        if let Some(choice) = &request.tool_choice {
            let choice = match choice {
                ToolChoice::Auto => json!("auto"),
                ToolChoice::None => json!("none"),
                ToolChoice::Any => json!("required"),
                ToolChoice::Named(name) => {
                    json!({"type": "function", "function": {"name": name}})
                }
            };
            out.insert("tool_choice".into(), choice);
        }
        if request.parallel_tool_calls == Some(false) {
            out.insert("parallel_tool_calls".into(), false.into());
        }
        if let Some(user) = &request.user {
            out.insert("user".into(), user.as_str().into());
        }
        if let Some(budget) = request.thinking_budget {
            out.insert("reasoning_effort".into(), effort_of(budget).into());
        }
        Ok(to_bytes(&Value::Object(out)))
    }

    fn read_answer(&self, body: &[u8]) -> Result<Answer> {
        let completion: Value = serde_json::from_slice(body).map_err(|_| unreadable("OpenAI"))?;
        let choice = completion.pointer("/choices/0").unwrap_or(&Value::Null);
        let reply = choice.get("message").unwrap_or(&Value::Null);
        let mut content = read_reasoning(reply);
        if let Some(text) = reply
            .get("content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            content.push(Block::Text(Text::plain(text)));
        }
        for call in reply
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            content.push(read_tool_call(call));
        }
        Ok(Answer {
            id: str_of(&completion, "id").to_owned(),
            model: str_of(&completion, "model").to_owned(),
            content,
            stop: choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .map(stop_of),
            usage: read_usage(
                completion.get("usage").unwrap_or(&Value::Null),
                Usage::default(),
            ),
        })
    }
}

/// One OpenAI message into the request: system texts apart, tool results as user
/// turns.
fn read_message(message: &Value, request: &mut Request) -> Result<()> {
    let content = message.get("content").unwrap_or(&Value::Null);
    let (role, blocks) = match str_of(message, "role") {
        "system" | "developer" => {
            request.system.extend(system_parts(content));
            return Ok(());
        }
        "user" => (Role::User, read_content(content)?),
        "assistant" => {
            let mut blocks = read_reasoning(message);
            blocks.extend(read_content(content)?);
            for call in message
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                blocks.push(read_tool_call(call));
            }
            (Role::Assistant, blocks)
        }
        "tool" => {
            let result = Block::ToolResult {
                call_id: str_of(message, "tool_call_id").to_owned(),
                content: plain_text(content),
                cache_control: content
                    .as_array()
                    .and_then(|parts| parts.iter().rev().find_map(|p| p.get("cache_control")))
                    .cloned(),
            };
            (Role::User, vec![result])
        }
        other => {
            return Err(refuse(
                format!("message role '{other}' is not supported by this model's provider"),
                "messages",
            ));
        }
    };
    request.turns.push(Turn {
        role,
        content: blocks,
    });
    Ok(())
}

/// A system message: one text, or its parts apart when any carries a cache marker.
fn system_parts(content: &Value) -> Vec<Text> {
    match content.as_array() {
        Some(parts) if parts.iter().any(|p| p.get("cache_control").is_some()) => parts
            .iter()
            .filter_map(|p| {
                Some(Text {
                    text: p.get("text")?.as_str()?.to_owned(),
                    cache_control: p.get("cache_control").cloned(),
                })
            })
            .collect(),
        _ => vec![Text::plain(plain_text(content))],
    }
}

/// Message content (a string or parts) as blocks.
fn read_content(content: &Value) -> Result<Vec<Block>> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![Block::Text(Text::plain(s.as_str()))]),
        Value::Array(parts) => parts.iter().map(read_part).collect(),
        _ => Err(refuse("message 'content' is not valid", "messages")),
    }
}

fn read_part(part: &Value) -> Result<Block> {
    let cache_control = part.get("cache_control").cloned();
    match part.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Block::Text(Text {
            text: str_of(part, "text").to_owned(),
            cache_control,
        })),
        Some("image_url") => Ok(Block::Image {
            source: image_source(str_at(part, "/image_url/url")),
            cache_control,
        }),
        other => Err(refuse(
            format!(
                "content part type '{}' is not supported by this model's provider",
                other.unwrap_or("")
            ),
            "messages",
        )),
    }
}

/// A tool call (`arguments` as JSON text) as a block whose input is an object (`{}`
/// when unreadable).
fn read_tool_call(call: &Value) -> Block {
    let arguments = str_at(call, "/function/arguments");
    let input = serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    Block::ToolCall {
        id: str_of(call, "id").to_owned(),
        name: str_at(call, "/function/name").to_owned(),
        input,
    }
}

fn read_tool(tool: &Value) -> Result<Tool> {
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(refuse(
            "only 'function' tools are supported by this model's provider",
            "tools",
        ));
    }
    let function = tool.get("function").unwrap_or(&Value::Null);
    Ok(Tool {
        name: str_of(function, "name").to_owned(),
        description: function
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_owned),
        schema: function
            .get("parameters")
            .filter(|p| p.is_object())
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
        cache_control: tool.get("cache_control").cloned(),
    })
}

fn read_tool_choice(choice: &Value) -> Result<ToolChoice> {
    match choice {
        Value::String(s) if s == "none" => Ok(ToolChoice::None),
        Value::String(s) if s == "required" => Ok(ToolChoice::Any),
        Value::String(_) => Ok(ToolChoice::Auto),
        Value::Object(_) => match choice.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => Ok(ToolChoice::Named(name.to_owned())),
            None => Err(refuse("'tool_choice' names no function", "tool_choice")),
        },
        _ => Err(refuse("'tool_choice' is not valid", "tool_choice")),
    }
}

/// The canonical turns as OpenAI messages: the system prompt first; tool results as
/// `tool` messages ahead of the rest of their turn (OpenAI wants them right after the
/// assistant's calls); an assistant's tool calls as `tool_calls`.
fn write_messages(request: &Request) -> Vec<Value> {
    let mut out = Vec::new();
    let system = request
        .system
        .iter()
        .map(|t| t.text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    if !system.is_empty() {
        out.push(json!({"role": "system", "content": system}));
    }
    for turn in &request.turns {
        for block in &turn.content {
            if let Block::ToolResult {
                call_id, content, ..
            } = block
            {
                out.push(json!({"role": "tool", "tool_call_id": call_id, "content": content}));
            }
        }
        match turn.role {
            Role::Assistant => out.push(assistant_message(&turn.content)),
            Role::User => {
                if let Some(message) = user_message(&turn.content) {
                    out.push(message);
                }
            }
        }
    }
    out
}

fn assistant_message(blocks: &[Block]) -> Value {
    let text: Vec<&str> = blocks
        .iter()
        .filter_map(|b| match b {
            Block::Text(t) => Some(t.text.as_str()),
            _ => None,
        })
        .collect();
    let content = if text.is_empty() {
        Value::Null
    } else {
        text.concat().into()
    };
    let mut message = json!({"role": "assistant", "content": content});
    let calls: Vec<Value> = blocks.iter().filter_map(tool_call).collect();
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    message
}

/// A user turn's text and images: a plain string when it is only text.
fn user_message(blocks: &[Block]) -> Option<Value> {
    let parts: Vec<&Block> = blocks
        .iter()
        .filter(|b| matches!(b, Block::Text(_) | Block::Image { .. }))
        .collect();
    if parts.is_empty() {
        return None;
    }
    let texts: Option<Vec<&str>> = parts
        .iter()
        .map(|b| match b {
            Block::Text(t) => Some(t.text.as_str()),
            _ => None,
        })
        .collect();
    let content = match texts {
        Some(texts) => Value::String(texts.join("\n")),
        None => parts.iter().filter_map(|b| write_part(b)).collect(),
    };
    Some(json!({"role": "user", "content": content}))
}

fn write_part(block: &Block) -> Option<Value> {
    match block {
        Block::Text(t) => Some(json!({"type": "text", "text": t.text})),
        Block::Image { source, .. } => {
            let url = match source {
                ImageSource::Base64 { media_type, data } => {
                    format!("data:{media_type};base64,{data}")
                }
                ImageSource::Url(url) => url.clone(),
            };
            Some(json!({"type": "image_url", "image_url": {"url": url}}))
        }
        _ => None,
    }
}

fn tool_call(block: &Block) -> Option<Value> {
    let Block::ToolCall { id, name, input } = block else {
        return None;
    };
    Some(json!({"id": id, "type": "function",
        "function": {"name": name, "arguments": input.to_string()}}))
}

fn write_tool(tool: &Tool) -> Value {
    let mut function = json!({"name": tool.name, "parameters": tool.schema});
    if let Some(d) = &tool.description {
        function["description"] = d.as_str().into();
    }
    json!({"type": "function", "function": function})
}

/// OpenAI usage over the counts so far: `prompt_tokens` includes the cached ones.
pub(super) fn read_usage(usage: &Value, was: Usage) -> Usage {
    Usage {
        prompt: u64_of(usage, "prompt_tokens").unwrap_or(was.prompt),
        completion: u64_of(usage, "completion_tokens").unwrap_or(was.completion),
        cache_read: usage
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(was.cache_read),
        cache_write: was.cache_write,
        reasoning: usage
            .pointer("/completion_tokens_details/reasoning_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(was.reasoning),
    }
}

/// Usage as OpenAI writes it; cached tokens (a part of `prompt_tokens`) when any were
/// read from the provider's prompt cache.
pub(super) fn write_usage(usage: &Usage) -> Value {
    let mut out = json!({"prompt_tokens": usage.prompt, "completion_tokens": usage.completion,
        "total_tokens": usage.prompt + usage.completion});
    if usage.cache_read > 0 {
        out["prompt_tokens_details"] = json!({"cached_tokens": usage.cache_read});
    }
    if usage.reasoning > 0 {
        out["completion_tokens_details"] = json!({"reasoning_tokens": usage.reasoning});
    }
    out
}

/// Reasoning budgets for `reasoning_effort` levels, and back: `minimal` and `low`
/// 1,024 tokens (Anthropic's least), `medium` 4,096, `high` 16,384.
/// A reasoning effort (`none` to `high`) as a thinking budget; `param` names the field
/// in a refusal.
pub(super) fn read_effort(effort: Option<Value>, param: &'static str) -> Result<Option<u64>> {
    let Some(effort) = effort else {
        return Ok(None);
    };
    match effort.as_str() {
        Some("none") => Ok(None),
        Some("minimal" | "low") => Ok(Some(1024)),
        Some("medium") => Ok(Some(4096)),
        Some("high") => Ok(Some(16_384)),
        _ => Err(refuse(
            format!("'{param}' must name an effort: none, minimal, low, medium or high"),
            param,
        )),
    }
}

pub(super) fn effort_of(budget: u64) -> &'static str {
    match budget {
        0..=2048 => "low",
        2049..=8192 => "medium",
        _ => "high",
    }
}

/// An assistant message's reasoning: LiteLLM's `thinking_blocks` (signed Anthropic
/// reasoning, so it can be sent back), else the `reasoning_content` (or OpenRouter's
/// `reasoning`) text OpenAI-compatible providers answer with.
fn read_reasoning(message: &Value) -> Vec<Block> {
    if let Some(blocks) = message.get("thinking_blocks").and_then(Value::as_array) {
        return blocks
            .iter()
            .filter_map(|b| match str_of(b, "type") {
                "thinking" => Some(Block::Thinking {
                    text: str_of(b, "thinking").to_owned(),
                    signature: b
                        .get("signature")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                }),
                "redacted_thinking" => Some(Block::RedactedThinking {
                    data: str_of(b, "data").to_owned(),
                }),
                _ => None,
            })
            .collect();
    }
    ["reasoning_content", "reasoning"]
        .iter()
        .find_map(|field| message.get(*field).and_then(Value::as_str))
        .filter(|text| !text.is_empty())
        .map(|text| Block::Thinking {
            text: text.to_owned(),
            signature: None,
        })
        .into_iter()
        .collect()
}

/// An answer's reasoning on its message: the text as `reasoning_content`, and the
/// blocks as `thinking_blocks` when they can be sent back (signed or redacted).
fn write_reasoning(blocks: &[Block], message: &mut Value) {
    let text: String = blocks
        .iter()
        .filter_map(|b| match b {
            Block::Thinking { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    if !text.is_empty() {
        message["reasoning_content"] = text.into();
    }
    let returnable = blocks.iter().any(|b| {
        matches!(
            b,
            Block::RedactedThinking { .. }
                | Block::Thinking {
                    signature: Some(_),
                    ..
                }
        )
    });
    if !returnable {
        return;
    }
    let thinking: Vec<Value> = blocks
        .iter()
        .filter_map(|b| match b {
            Block::Thinking { text, signature } => {
                Some(json!({"type": "thinking", "thinking": text, "signature": signature}))
            }
            Block::RedactedThinking { data } => {
                Some(json!({"type": "redacted_thinking", "data": data}))
            }
            _ => None,
        })
        .collect();
    message["thinking_blocks"] = Value::Array(thinking);
}

pub(super) fn finish_reason(stop: Stop) -> &'static str {
    match stop {
        Stop::EndTurn | Stop::StopSequence => "stop",
        Stop::MaxTokens => "length",
        Stop::ToolUse => "tool_calls",
        Stop::ContentFilter => "content_filter",
    }
}

pub(super) fn stop_of(finish_reason: &str) -> Stop {
    match finish_reason {
        "length" => Stop::MaxTokens,
        "tool_calls" | "function_call" => Stop::ToolUse,
        "content_filter" => Stop::ContentFilter,
        _ => Stop::EndTurn,
    }
}
