//! AWS Bedrock's Converse API <-> the canonical form, as an upstream format: requests
//! out, whole answers and `converse-stream` events in (their binary framing is turned
//! into server-sent events first, see `formats::eventstream`). The model is in the
//! URL, not the body.
//!
//! Content blocks are `text`, `image` (base64 `bytes`), `toolUse`, `toolResult` and
//! `reasoningContent`; prompt-cache markers become `cachePoint` blocks after the block
//! they were set on (system, messages and tools). Bedrock gives answers no id: one is
//! minted. `inputTokens` excludes the cache reads and writes reported beside it.
//! `guardrail_intervened` and `content_filtered` stops are `content_filter`.

use serde_json::{Map, Value, json};

use super::canonical::{
    Answer, Block, Event, ImageSource, Request, Role, Stop, Text, ToolChoice, Usage,
};
use super::codec::{StreamDecoder, UpstreamCodec, UpstreamStream};
use super::wire::{
    Result, one_choice, push_turn, refuse, sampling, str_at, str_of, to_bytes, u64_of, unreadable,
};
use crate::formats::sse::{self, StreamBreak};

pub struct BedrockConverse;

/// The block that marks the end of a cached prefix.
fn cache_point() -> Value {
    json!({"cachePoint": {"type": "default"}})
}

impl UpstreamCodec for BedrockConverse {
    fn write_request(&self, request: &Request, _model: &str) -> Result<Vec<u8>> {
        one_choice(request)?;
        let mut out = Map::new();
        out.insert("messages".into(), Value::Array(write_turns(request)?));
        if !request.system.is_empty() {
            let mut system = Vec::new();
            for text in &request.system {
                system.push(json!({"text": text.text}));
                if text.cache_control.is_some() {
                    system.push(cache_point());
                }
            }
            out.insert("system".into(), Value::Array(system));
        }
        let config = sampling(request, "maxTokens");
        if !config.is_empty() {
            out.insert("inferenceConfig".into(), Value::Object(config));
        }
        if let Some(tools) = tool_config(request) {
            out.insert("toolConfig".into(), tools);
        }
        if let Some(budget) = request.thinking_budget {
            out.insert(
                "additionalModelRequestFields".into(),
                json!({"thinking": {"type": "enabled", "budget_tokens": budget}}),
            );
        }
        Ok(to_bytes(&Value::Object(out)))
    }

    fn read_answer(&self, body: &[u8]) -> Result<Answer> {
        let answer: Value = serde_json::from_slice(body).map_err(|_| unreadable("Bedrock"))?;
        let blocks = answer
            .pointer("/output/message/content")
            .and_then(Value::as_array)
            .ok_or_else(|| unreadable("Bedrock"))?;
        Ok(Answer {
            id: minted_id(),
            model: String::new(),
            content: blocks.iter().filter_map(read_block).collect(),
            stop: answer
                .get("stopReason")
                .and_then(Value::as_str)
                .map(stop_of),
            usage: read_usage(answer.get("usage").unwrap_or(&Value::Null)),
        })
    }
}

impl UpstreamStream for BedrockConverse {
    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(Decoder::default())
    }
}

/// Bedrock answers carry no id (only the HTTP request id): the caller gets a fresh one.
fn minted_id() -> String {
    format!("bedrock-{}", uuid::Uuid::new_v4().simple())
}

/// The tools, the choice among them and their cache markers. A caller's `none` has no
/// Converse equivalent: the tools are left out, unless the conversation already holds
/// tool calls (Bedrock then requires them), where the model may still call one.
fn tool_config(request: &Request) -> Option<Value> {
    let tools = request.tools.as_ref().filter(|t| !t.is_empty())?;
    let used = request
        .turns
        .iter()
        .flat_map(|t| &t.content)
        .any(|b| matches!(b, Block::ToolCall { .. } | Block::ToolResult { .. }));
    if request.tool_choice == Some(ToolChoice::None) && !used {
        return None;
    }
    let mut specs = Vec::new();
    for tool in tools {
        let mut spec = json!({"name": tool.name, "inputSchema": {"json": tool.schema}});
        if let Some(d) = &tool.description {
            spec["description"] = d.as_str().into();
        }
        specs.push(json!({ "toolSpec": spec }));
        if tool.cache_control.is_some() {
            specs.push(cache_point());
        }
    }
    let mut config = json!({ "tools": specs });
    match &request.tool_choice {
        Some(ToolChoice::Auto) => config["toolChoice"] = json!({"auto": {}}),
        Some(ToolChoice::Any) => config["toolChoice"] = json!({"any": {}}),
        Some(ToolChoice::Named(name)) => config["toolChoice"] = json!({"tool": {"name": name}}),
        Some(ToolChoice::None) | None => {}
    }
    Some(config)
}

/// The conversation as alternating `user` and `assistant` messages of content blocks.
fn write_turns(request: &Request) -> Result<Vec<Value>> {
    let mut out: Vec<Value> = Vec::new();
    for turn in &request.turns {
        let mut content = Vec::new();
        for block in &turn.content {
            let (written, marked) = match block {
                Block::Text(t) if t.text.is_empty() => continue,
                Block::Text(t) => (json!({"text": t.text}), t.cache_control.is_some()),
                Block::Image {
                    source,
                    cache_control,
                } => (image(source)?, cache_control.is_some()),
                Block::ToolCall { id, name, input } => (
                    json!({"toolUse": {"toolUseId": id, "name": name, "input": input}}),
                    false,
                ),
                Block::ToolResult {
                    call_id,
                    content,
                    cache_control,
                } => (
                    json!({"toolResult": {"toolUseId": call_id, "content": [{"text": content}]}}),
                    cache_control.is_some(),
                ),
                // Reasoning goes back only with the signature that lets the model
                // trust it; reasoning without one (another provider's) is dropped.
                Block::Thinking {
                    text,
                    signature: Some(signature),
                } => (
                    json!({"reasoningContent": {"reasoningText": {"text": text, "signature": signature}}}),
                    false,
                ),
                Block::Thinking { .. } => continue,
                Block::RedactedThinking { data } => (
                    json!({"reasoningContent": {"redactedContent": data}}),
                    false,
                ),
            };
            content.push(written);
            if marked {
                content.push(cache_point());
            }
        }
        let role = match turn.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        push_turn(&mut out, role, "content", content);
    }
    Ok(out)
}

fn image(source: &ImageSource) -> Result<Value> {
    let ImageSource::Base64 { media_type, data } = source else {
        return Err(refuse(
            "image URLs are not supported by this model's provider: send the image as base64 data",
            "messages",
        ));
    };
    let format = match media_type.as_str() {
        "image/png" => "png",
        "image/jpeg" | "image/jpg" => "jpeg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        other => {
            return Err(refuse(
                format!(
                    "image type '{other}' is not supported by this model's provider (png, jpeg, gif, webp)"
                ),
                "messages",
            ));
        }
    };
    Ok(json!({"image": {"format": format, "source": {"bytes": data}}}))
}

fn read_block(block: &Value) -> Option<Block> {
    if let Some(text) = block.get("text").and_then(Value::as_str) {
        return Some(Block::Text(Text::plain(text)));
    }
    if let Some(call) = block.get("toolUse") {
        return Some(Block::ToolCall {
            id: str_of(call, "toolUseId").to_owned(),
            name: str_of(call, "name").to_owned(),
            input: call.get("input").cloned().unwrap_or_else(|| json!({})),
        });
    }
    let reasoning = block.get("reasoningContent")?;
    if let Some(data) = reasoning.get("redactedContent").and_then(Value::as_str) {
        return Some(Block::RedactedThinking {
            data: data.to_owned(),
        });
    }
    Some(Block::Thinking {
        text: str_at(reasoning, "/reasoningText/text").to_owned(),
        signature: reasoning
            .pointer("/reasoningText/signature")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

fn stop_of(reason: &str) -> Stop {
    match reason {
        "tool_use" => Stop::ToolUse,
        "max_tokens" | "model_context_window_exceeded" => Stop::MaxTokens,
        "stop_sequence" => Stop::StopSequence,
        "guardrail_intervened" | "content_filtered" => Stop::ContentFilter,
        _ => Stop::EndTurn,
    }
}

/// `usage`: `inputTokens` are the uncached input; the canonical prompt counts all of it.
fn read_usage(usage: &Value) -> Usage {
    let cache_read = u64_of(usage, "cacheReadInputTokens").unwrap_or(0);
    let cache_write = u64_of(usage, "cacheWriteInputTokens").unwrap_or(0);
    Usage {
        prompt: u64_of(usage, "inputTokens").unwrap_or(0) + cache_read + cache_write,
        completion: u64_of(usage, "outputTokens").unwrap_or(0),
        cache_read,
        cache_write,
        reasoning: 0,
    }
}

/// Reads `converse-stream` events: `messageStart`, content blocks (a `toolUse` block
/// opens with its id and name, its input arrives as JSON text in deltas),
/// `messageStop` with the stop reason, then `metadata` with the usage, which ends the
/// answer.
#[derive(Default)]
struct Decoder {
    /// The tool call number of each content block index that is a tool call.
    calls: Vec<(u64, usize)>,
}

impl StreamDecoder for Decoder {
    fn decode(
        &mut self,
        event: &sse::Event,
        out: &mut Vec<Event>,
    ) -> std::result::Result<(), StreamBreak> {
        if let Some(message) = sse::error_message(event) {
            return Err(StreamBreak::Upstream(message));
        }
        let Ok(data) = serde_json::from_slice::<Value>(&event.data) else {
            return Err(StreamBreak::Unreadable);
        };
        let index = u64_of(&data, "contentBlockIndex").unwrap_or(0);
        match event.name.as_deref().unwrap_or("") {
            "messageStart" => out.push(Event::Start {
                id: minted_id(),
                model: String::new(),
            }),
            "contentBlockStart" => {
                if let Some(call) = data.pointer("/start/toolUse") {
                    let number = self.calls.len();
                    self.calls.push((index, number));
                    out.push(Event::ToolCall {
                        call: number,
                        id: str_of(call, "toolUseId").to_owned(),
                        name: str_of(call, "name").to_owned(),
                    });
                }
            }
            "contentBlockDelta" => {
                let delta = data.get("delta").unwrap_or(&Value::Null);
                if let Some(text) = delta.get("text").and_then(Value::as_str) {
                    out.push(Event::Text(text.to_owned()));
                } else if let Some(json) = delta.pointer("/toolUse/input").and_then(Value::as_str) {
                    let call = self
                        .calls
                        .iter()
                        .find(|(i, _)| *i == index)
                        .map(|(_, n)| *n)
                        .ok_or(StreamBreak::Unreadable)?;
                    out.push(Event::ToolArguments {
                        call,
                        json: json.to_owned(),
                    });
                } else if let Some(reasoning) = delta.get("reasoningContent") {
                    if let Some(text) = reasoning.get("text").and_then(Value::as_str) {
                        out.push(Event::Thinking(text.to_owned()));
                    }
                    if let Some(s) = reasoning.get("signature").and_then(Value::as_str) {
                        out.push(Event::ThinkingSignature(s.to_owned()));
                    }
                    if let Some(d) = reasoning.get("redactedContent").and_then(Value::as_str) {
                        out.push(Event::RedactedThinking(d.to_owned()));
                    }
                }
            }
            "messageStop" => out.push(Event::Stop(stop_of(str_of(&data, "stopReason")))),
            "metadata" => {
                if let Some(usage) = data.get("usage") {
                    out.push(Event::Usage(read_usage(usage)));
                }
                out.push(Event::End);
            }
            _ => {}
        }
        Ok(())
    }
}
