//! Anthropic messages <-> the canonical form: requests and whole answers (streams are
//! in `anthropic_stream.rs`).

use serde_json::{Map, Value, json};

use super::canonical::{
    Answer, Block, ImageSource, Request, Role, Stop, Text, Tool, ToolChoice, Turn, Usage,
};
use super::codec::{CallerCodec, UpstreamCodec};
use super::wire::{
    Result, count, number, one_choice, parse_object, plain_text, push_turn, refuse, str_of,
    strings, take, to_bytes, u64_of, unreadable,
};
use crate::resources::PromptCache;

/// Adds prompt-cache breakpoints to an Anthropic request that has none: on the last
/// system block and on the last block of the last message, so the tools, the system
/// prompt and the conversation so far are read from the cache on the next turn. `None`
/// (the body stays as it is) when the caller placed its own markers anywhere, or when
/// there is nothing to mark.
pub fn add_cache_breakpoints(body: &[u8], ttl: PromptCache) -> Option<Vec<u8>> {
    let mut request: Value = serde_json::from_slice(body).ok()?;
    if ["system", "messages", "tools"]
        .iter()
        .any(|f| request.get(*f).is_some_and(has_marker))
    {
        return None;
    }
    let marker = match ttl {
        PromptCache::FiveMinutes => json!({"type": "ephemeral"}),
        PromptCache::OneHour => json!({"type": "ephemeral", "ttl": "1h"}),
    };
    let mut added = false;
    if let Some(system) = request.get_mut("system") {
        added |= mark_last(system, &marker);
    }
    if let Some(last) = request
        .get_mut("messages")
        .and_then(Value::as_array_mut)
        .and_then(|m| m.last_mut())
        .and_then(|m| m.get_mut("content"))
    {
        added |= mark_last(last, &marker);
    }
    added.then(|| to_bytes(&request))
}

/// Whether a `cache_control` marker is set anywhere in `value` (bodies are at most
/// `formats::body::MAX_DEPTH` deep by now).
fn has_marker(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.contains_key("cache_control") || map.values().any(has_marker),
        Value::Array(items) => items.iter().any(has_marker),
        _ => false,
    }
}

/// Marks the last markable block of `content` (a string becomes one text block).
fn mark_last(content: &mut Value, marker: &Value) -> bool {
    if let Value::String(text) = content {
        if text.is_empty() {
            return false;
        }
        *content = json!([{"type": "text", "text": text, "cache_control": marker}]);
        return true;
    }
    let Some(block) = content.as_array_mut().and_then(|blocks| {
        blocks
            .iter_mut()
            .rev()
            .find(|b| !matches!(str_of(b, "type"), "thinking" | "redacted_thinking"))
    }) else {
        return false;
    };
    block["cache_control"] = marker.clone();
    true
}

/// Used for `max_tokens` when the caller set none: Anthropic requires one.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
/// The smallest `thinking.budget_tokens` Anthropic accepts.
const MIN_THINKING: u64 = 1024;

pub struct AnthropicMessages;

impl CallerCodec for AnthropicMessages {
    fn read_request(&self, body: &[u8]) -> Result<Request> {
        let mut body = parse_object(body)?;
        let mut request = Request {
            choices: 1,
            system: read_system(take(&mut body, "system")),
            max_tokens: count(take(&mut body, "max_tokens"), "max_tokens")?,
            temperature: number(take(&mut body, "temperature"), "temperature")?,
            top_p: number(take(&mut body, "top_p"), "top_p")?,
            stream: body.get("stream").and_then(Value::as_bool) == Some(true),
            user: body
                .get("metadata")
                .and_then(|m| m.get("user_id"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            ..Request::default()
        };
        if let Some(Value::Array(stop)) = body.remove("stop_sequences") {
            request.stop = strings(&stop);
        }
        if let Some(thinking) = body
            .remove("thinking")
            .filter(|t| str_of(t, "type") == "enabled")
        {
            request.thinking_budget =
                Some(u64_of(&thinking, "budget_tokens").unwrap_or(MIN_THINKING));
        }
        let Some(Value::Array(turns)) = body.remove("messages") else {
            return Err(refuse("'messages' must be an array", "messages"));
        };
        request.turns = turns.iter().map(read_turn).collect::<Result<_>>()?;
        if let Some(Value::Array(tools)) = body.remove("tools") {
            request.tools = Some(tools.iter().map(read_tool).collect::<Result<_>>()?);
        }
        if let Some(choice) = body.remove("tool_choice").filter(Value::is_object) {
            request.tool_choice = Some(match str_of(&choice, "type") {
                "any" => ToolChoice::Any,
                "none" => ToolChoice::None,
                "tool" => ToolChoice::Named(str_of(&choice, "name").to_owned()),
                _ => ToolChoice::Auto,
            });
            if choice
                .get("disable_parallel_tool_use")
                .and_then(Value::as_bool)
                == Some(true)
            {
                request.parallel_tool_calls = Some(false);
            }
        }
        Ok(request)
    }

    fn write_answer(&self, answer: &Answer) -> Vec<u8> {
        let content: Vec<Value> = answer
            .content
            .iter()
            .filter(|b| !matches!(b, Block::Text(t) if t.text.is_empty()))
            .filter_map(|block| match block {
                // Reasoning an OpenAI-compatible upstream gave, shown to the caller;
                // it has no signature to be sent back with.
                Block::Thinking {
                    text,
                    signature: None,
                } => Some(json!({"type": "thinking", "thinking": text, "signature": ""})),
                block => write_block(block),
            })
            .collect();
        to_bytes(&json!({
            "id": answer.id,
            "type": "message",
            "role": "assistant",
            "model": answer.model,
            "content": content,
            "stop_reason": stop_reason(answer.stop.unwrap_or(Stop::EndTurn)),
            "stop_sequence": null,
            "usage": write_usage(&answer.usage),
        }))
    }
}

impl UpstreamCodec for AnthropicMessages {
    fn write_request(&self, request: &Request, model: &str) -> Result<Vec<u8>> {
        one_choice(request)?;
        let mut out = Map::new();
        out.insert("model".into(), model.into());
        if !request.system.is_empty() {
            out.insert("system".into(), write_system(&request.system));
        }
        out.insert("messages".into(), Value::Array(write_turns(&request.turns)));
        let mut max_tokens = request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if let Some(budget) = request.thinking_budget {
            // The budget is a part of max_tokens, which must leave room for the answer.
            let budget = budget.max(MIN_THINKING);
            if max_tokens <= budget {
                max_tokens += budget;
            }
            out.insert(
                "thinking".into(),
                json!({"type": "enabled", "budget_tokens": budget}),
            );
        }
        out.insert("max_tokens".into(), max_tokens.into());
        if let Some(t) = &request.temperature {
            out.insert("temperature".into(), t.clone().into());
        }
        if let Some(p) = &request.top_p {
            out.insert("top_p".into(), p.clone().into());
        }
        if request.stream {
            out.insert("stream".into(), true.into());
        }
        if !request.stop.is_empty() {
            out.insert("stop_sequences".into(), request.stop.clone().into());
        }
        if let Some(tools) = &request.tools {
            out.insert("tools".into(), tools.iter().map(write_tool).collect());
        }
        if let Some(choice) = write_tool_choice(request) {
            out.insert("tool_choice".into(), choice);
        }
        if let Some(user) = &request.user {
            out.insert("metadata".into(), json!({"user_id": user}));
        }
        Ok(to_bytes(&Value::Object(out)))
    }

    fn read_answer(&self, body: &[u8]) -> Result<Answer> {
        let message: Value = serde_json::from_slice(body).map_err(|_| unreadable("Anthropic"))?;
        let content = message
            .get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|block| match block.get("type").and_then(Value::as_str) {
                Some("text") => Some(Block::Text(Text::plain(str_of(block, "text")))),
                Some("tool_use") => Some(read_tool_use(block)),
                Some("thinking" | "redacted_thinking") => read_thinking(block),
                _ => None,
            })
            .collect();
        Ok(Answer {
            id: str_of(&message, "id").to_owned(),
            model: str_of(&message, "model").to_owned(),
            content,
            stop: message
                .get("stop_reason")
                .and_then(Value::as_str)
                .map(stop_of),
            usage: read_usage(message.get("usage").unwrap_or(&Value::Null)),
        })
    }
}

/// `system` as a string or as text blocks (each keeps its cache marker).
fn read_system(system: Option<Value>) -> Vec<Text> {
    match system {
        Some(Value::String(s)) => vec![Text::plain(s)],
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| {
                Some(Text {
                    text: p.get("text")?.as_str()?.to_owned(),
                    cache_control: p.get("cache_control").cloned(),
                })
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The system prompt as one string, or as blocks when a part carries a cache marker
/// (the marker must stay on the part it was set on).
fn write_system(system: &[Text]) -> Value {
    if system.iter().all(|t| t.cache_control.is_none()) {
        let texts: Vec<&str> = system.iter().map(|t| t.text.as_str()).collect();
        return texts.join("\n\n").into();
    }
    system
        .iter()
        .map(|t| text_block(&t.text, t.cache_control.as_ref()))
        .collect()
}

fn read_turn(turn: &Value) -> Result<Turn> {
    let role = match turn.get("role").and_then(Value::as_str) {
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        _ => {
            return Err(refuse(
                "each message needs a role of 'user' or 'assistant'",
                "messages",
            ));
        }
    };
    let content = match turn.get("content") {
        Some(Value::String(s)) => vec![Block::Text(Text::plain(s.as_str()))],
        Some(Value::Array(blocks)) => {
            let mut content = Vec::with_capacity(blocks.len());
            for block in blocks {
                content.extend(read_block(block)?);
            }
            content
        }
        _ => return Err(refuse("message 'content' is not valid", "messages")),
    };
    Ok(Turn { role, content })
}

/// One content block.
fn read_block(block: &Value) -> Result<Option<Block>> {
    let cache_control = block.get("cache_control").cloned();
    Ok(Some(match block.get("type").and_then(Value::as_str) {
        Some("text") => Block::Text(Text {
            text: str_of(block, "text").to_owned(),
            cache_control,
        }),
        Some("image") => {
            let source = block.get("source").unwrap_or(&Value::Null);
            let source = match str_of(source, "type") {
                "base64" => ImageSource::Base64 {
                    media_type: str_of(source, "media_type").to_owned(),
                    data: str_of(source, "data").to_owned(),
                },
                _ => ImageSource::Url(str_of(source, "url").to_owned()),
            };
            Block::Image {
                source,
                cache_control,
            }
        }
        Some("tool_use") => read_tool_use(block),
        Some("tool_result") => Block::ToolResult {
            call_id: str_of(block, "tool_use_id").to_owned(),
            content: block.get("content").map(plain_text).unwrap_or_default(),
            cache_control,
        },
        Some("thinking" | "redacted_thinking") => return Ok(read_thinking(block)),
        other => {
            return Err(refuse(
                format!(
                    "content block type '{}' is not supported by this model's provider",
                    other.unwrap_or("")
                ),
                "messages",
            ));
        }
    }))
}

fn read_thinking(block: &Value) -> Option<Block> {
    match str_of(block, "type") {
        "thinking" => Some(Block::Thinking {
            text: str_of(block, "thinking").to_owned(),
            signature: block
                .get("signature")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        }),
        "redacted_thinking" => Some(Block::RedactedThinking {
            data: str_of(block, "data").to_owned(),
        }),
        _ => None,
    }
}

fn read_tool_use(block: &Value) -> Block {
    Block::ToolCall {
        id: str_of(block, "id").to_owned(),
        name: str_of(block, "name").to_owned(),
        input: block.get("input").cloned().unwrap_or_else(|| json!({})),
    }
}

fn read_tool(tool: &Value) -> Result<Tool> {
    if let Some(kind) = tool.get("type").and_then(Value::as_str)
        && kind != "custom"
    {
        return Err(refuse(
            format!("tool type '{kind}' is not supported by this model's provider"),
            "tools",
        ));
    }
    Ok(Tool {
        name: str_of(tool, "name").to_owned(),
        description: tool
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_owned),
        schema: tool
            .get("input_schema")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object"})),
        cache_control: tool.get("cache_control").cloned(),
    })
}

/// Turns as Anthropic wants them: alternating roles (consecutive turns of one role
/// merged), none empty.
fn write_turns(turns: &[Turn]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for turn in turns {
        let blocks: Vec<Value> = turn.content.iter().filter_map(write_block).collect();
        let role = match turn.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        push_turn(&mut out, role, "content", blocks);
    }
    out
}

fn text_block(text: &str, cache_control: Option<&Value>) -> Value {
    let mut block = json!({"type": "text", "text": text});
    if let Some(marker) = cache_control {
        block["cache_control"] = marker.clone();
    }
    block
}

fn write_block(block: &Block) -> Option<Value> {
    let (mut out, cache_control) = match block {
        Block::Text(t) => return Some(text_block(&t.text, t.cache_control.as_ref())),
        Block::Image {
            source,
            cache_control,
        } => {
            let source = match source {
                ImageSource::Base64 { media_type, data } => {
                    json!({"type": "base64", "media_type": media_type, "data": data})
                }
                ImageSource::Url(url) => json!({"type": "url", "url": url}),
            };
            (json!({"type": "image", "source": source}), cache_control)
        }
        Block::ToolCall { id, name, input } => {
            return Some(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
        }
        // Anthropic takes reasoning back only with its signature.
        Block::Thinking {
            text,
            signature: Some(signature),
        } => {
            return Some(json!({"type": "thinking", "thinking": text, "signature": signature}));
        }
        Block::Thinking {
            signature: None, ..
        } => return None,
        Block::RedactedThinking { data } => {
            return Some(json!({"type": "redacted_thinking", "data": data}));
        }
        Block::ToolResult {
            call_id,
            content,
            cache_control,
        } => (
            json!({"type": "tool_result", "tool_use_id": call_id, "content": content}),
            cache_control,
        ),
    };
    if let Some(marker) = cache_control {
        out["cache_control"] = marker.clone();
    }
    Some(out)
}

fn write_tool(tool: &Tool) -> Value {
    let mut out = json!({"name": tool.name, "input_schema": tool.schema});
    if let Some(d) = &tool.description {
        out["description"] = d.as_str().into();
    }
    if let Some(marker) = &tool.cache_control {
        out["cache_control"] = marker.clone();
    }
    out
}

/// `tool_choice`, carrying "one tool call at most" (Anthropic has no separate field).
fn write_tool_choice(request: &Request) -> Option<Value> {
    let single = request.parallel_tool_calls == Some(false);
    let mut choice = match &request.tool_choice {
        Some(ToolChoice::None) => return Some(json!({"type": "none"})),
        Some(ToolChoice::Any) => json!({"type": "any"}),
        Some(ToolChoice::Auto) => json!({"type": "auto"}),
        Some(ToolChoice::Named(name)) => json!({"type": "tool", "name": name}),
        None if single && request.tools.is_some() => json!({"type": "auto"}),
        None => return None,
    };
    if single {
        choice["disable_parallel_tool_use"] = true.into();
    }
    Some(choice)
}

/// Anthropic usage: `input_tokens` excludes the tokens read from or written to the
/// prompt cache, which come apart.
pub(super) fn read_usage(usage: &Value) -> Usage {
    let read = u64_of(usage, "cache_read_input_tokens").unwrap_or(0);
    let write = u64_of(usage, "cache_creation_input_tokens").unwrap_or(0);
    Usage {
        prompt: u64_of(usage, "input_tokens").unwrap_or(0) + read + write,
        completion: u64_of(usage, "output_tokens").unwrap_or(0),
        cache_read: read,
        cache_write: write,
        reasoning: 0,
    }
}

pub(super) fn write_usage(usage: &Usage) -> Value {
    let cached = usage.cache_read + usage.cache_write;
    let mut out = json!({"input_tokens": usage.prompt.saturating_sub(cached),
        "output_tokens": usage.completion});
    if usage.cache_write > 0 {
        out["cache_creation_input_tokens"] = usage.cache_write.into();
    }
    if usage.cache_read > 0 {
        out["cache_read_input_tokens"] = usage.cache_read.into();
    }
    out
}

pub(super) fn stop_reason(stop: Stop) -> &'static str {
    match stop {
        Stop::EndTurn => "end_turn",
        Stop::MaxTokens => "max_tokens",
        Stop::StopSequence => "stop_sequence",
        Stop::ToolUse => "tool_use",
        Stop::ContentFilter => "refusal",
    }
}

pub(super) fn stop_of(stop_reason: &str) -> Stop {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => Stop::MaxTokens,
        "tool_use" => Stop::ToolUse,
        "refusal" => Stop::ContentFilter,
        "stop_sequence" => Stop::StopSequence,
        _ => Stop::EndTurn,
    }
}
