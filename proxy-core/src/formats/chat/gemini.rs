//! Google's Gemini `generateContent` (Gemini API and Vertex AI) <-> the canonical form,
//! as an upstream format: requests out, whole answers and `streamGenerateContent`
//! server-sent events in. The model is in the URL, not the body.
//!
//! Gemini names function calls but gives them no ids: answers get `call_<n>` ids, and a
//! tool result is sent back under the name of the call with its id in the
//! conversation. Safety stops (`SAFETY`, `RECITATION`, `PROHIBITED_CONTENT`, ...) and
//! blocked prompts are `content_filter`.

use serde_json::{Map, Value, json};

use super::canonical::{
    Answer, Block, Event, ImageSource, Request, Role, Stop, Text, ToolChoice, Usage,
};
use super::codec::{StreamDecoder, UpstreamCodec, UpstreamStream};
use super::wire::{
    Result, one_choice, push_turn, refuse, sampling, str_of, to_bytes, u64_of, unreadable,
};
use crate::formats::sse::{self, StreamBreak};

pub struct GeminiContent;

impl UpstreamCodec for GeminiContent {
    fn write_request(&self, request: &Request, _model: &str) -> Result<Vec<u8>> {
        one_choice(request)?;
        let mut out = Map::new();
        out.insert("contents".into(), Value::Array(write_turns(request)?));
        if !request.system.is_empty() {
            let parts: Vec<Value> = request
                .system
                .iter()
                .map(|t| json!({"text": t.text}))
                .collect();
            out.insert("systemInstruction".into(), json!({"parts": parts}));
        }
        let mut config = sampling(request, "maxOutputTokens");
        if let Some(budget) = request.thinking_budget {
            config.insert(
                "thinkingConfig".into(),
                json!({"thinkingBudget": budget, "includeThoughts": true}),
            );
        }
        if !config.is_empty() {
            out.insert("generationConfig".into(), Value::Object(config));
        }
        if let Some(tools) = request.tools.as_ref().filter(|t| !t.is_empty()) {
            let declarations: Vec<Value> = tools
                .iter()
                .map(|tool| {
                    let mut declaration =
                        json!({"name": tool.name, "parameters": schema(&tool.schema)});
                    if let Some(d) = &tool.description {
                        declaration["description"] = d.as_str().into();
                    }
                    declaration
                })
                .collect();
            out.insert(
                "tools".into(),
                json!([{"functionDeclarations": declarations}]),
            );
        }
        if let Some(choice) = &request.tool_choice {
            let config = match choice {
                ToolChoice::Auto => json!({"mode": "AUTO"}),
                ToolChoice::None => json!({"mode": "NONE"}),
                ToolChoice::Any => json!({"mode": "ANY"}),
                ToolChoice::Named(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
            };
            out.insert(
                "toolConfig".into(),
                json!({"functionCallingConfig": config}),
            );
        }
        Ok(to_bytes(&Value::Object(out)))
    }

    fn read_answer(&self, body: &[u8]) -> Result<Answer> {
        let answer: Value = serde_json::from_slice(body).map_err(|_| unreadable("Gemini"))?;
        let candidate = answer.pointer("/candidates/0").unwrap_or(&Value::Null);
        let mut content = Vec::new();
        let mut calls = 0;
        for part in parts(candidate) {
            if let Some(block) = read_part(part, &mut calls) {
                content.push(block);
            }
        }
        let stop = stop_of(&answer, calls > 0);
        Ok(Answer {
            id: str_of(&answer, "responseId").to_owned(),
            model: str_of(&answer, "modelVersion").to_owned(),
            content,
            stop,
            usage: read_usage(answer.get("usageMetadata").unwrap_or(&Value::Null)),
        })
    }
}

impl UpstreamStream for GeminiContent {
    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(Decoder::default())
    }
}

/// Reads `streamGenerateContent` chunks: each has the next parts of the candidate and
/// the usage so far; the one with a finish reason ends the answer.
#[derive(Default)]
struct Decoder {
    started: bool,
    calls: usize,
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
        let Ok(chunk) = serde_json::from_slice::<Value>(&event.data) else {
            return Err(StreamBreak::Unreadable);
        };
        if !self.started {
            self.started = true;
            out.push(Event::Start {
                id: str_of(&chunk, "responseId").to_owned(),
                model: str_of(&chunk, "modelVersion").to_owned(),
            });
        }
        let candidate = chunk.pointer("/candidates/0").unwrap_or(&Value::Null);
        for part in parts(candidate) {
            match read_part(part, &mut self.calls) {
                Some(Block::Text(text)) => out.push(Event::Text(text.text)),
                Some(Block::Thinking { text, .. }) => out.push(Event::Thinking(text)),
                Some(Block::ToolCall { id, name, input }) => {
                    let call = self.calls - 1;
                    out.push(Event::ToolCall { call, id, name });
                    out.push(Event::ToolArguments {
                        call,
                        json: input.to_string(),
                    });
                }
                _ => {}
            }
        }
        if let Some(usage) = chunk.get("usageMetadata") {
            out.push(Event::Usage(read_usage(usage)));
        }
        let finished = candidate.get("finishReason").is_some()
            || chunk.pointer("/promptFeedback/blockReason").is_some();
        if finished {
            if let Some(stop) = stop_of(&chunk, self.calls > 0) {
                out.push(Event::Stop(stop));
            }
            out.push(Event::End);
        }
        Ok(())
    }
}

fn parts(candidate: &Value) -> impl Iterator<Item = &Value> {
    candidate
        .pointer("/content/parts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// One answer part: text, reasoning (`thought: true`) or a function call, numbered by
/// `calls`.
fn read_part(part: &Value, calls: &mut usize) -> Option<Block> {
    if let Some(call) = part.get("functionCall") {
        *calls += 1;
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .map_or_else(|| format!("call_{}", *calls - 1), str::to_owned);
        return Some(Block::ToolCall {
            id,
            name: str_of(call, "name").to_owned(),
            input: call.get("args").cloned().unwrap_or_else(|| json!({})),
        });
    }
    let text = part.get("text").and_then(Value::as_str)?;
    if part.get("thought").and_then(Value::as_bool) == Some(true) {
        return Some(Block::Thinking {
            text: text.to_owned(),
            signature: None,
        });
    }
    Some(Block::Text(Text::plain(text)))
}

/// The stop of an answer or a final chunk; `None` before the answer has one.
fn stop_of(answer: &Value, called: bool) -> Option<Stop> {
    if answer.pointer("/promptFeedback/blockReason").is_some() {
        return Some(Stop::ContentFilter);
    }
    let reason = answer
        .pointer("/candidates/0/finishReason")
        .and_then(Value::as_str)?;
    Some(match reason {
        "MAX_TOKENS" => Stop::MaxTokens,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            Stop::ContentFilter
        }
        _ if called => Stop::ToolUse,
        _ => Stop::EndTurn,
    })
}

/// `usageMetadata`: `promptTokenCount` counts every input token, the cached ones
/// (`cachedContentTokenCount`) included; output is the answer's and the reasoning's.
fn read_usage(usage: &Value) -> Usage {
    let thoughts = u64_of(usage, "thoughtsTokenCount").unwrap_or(0);
    Usage {
        prompt: u64_of(usage, "promptTokenCount").unwrap_or(0),
        completion: u64_of(usage, "candidatesTokenCount").unwrap_or(0) + thoughts,
        cache_read: u64_of(usage, "cachedContentTokenCount").unwrap_or(0),
        cache_write: 0,
        reasoning: thoughts,
    }
}

/// The conversation as `contents`: `user` and `model` turns of parts; tool results as
/// `functionResponse` parts named after the call they answer.
fn write_turns(request: &Request) -> Result<Vec<Value>> {
    let mut names: Vec<(&str, &str)> = Vec::new();
    let mut out: Vec<Value> = Vec::new();
    for turn in &request.turns {
        let mut parts = Vec::new();
        for block in &turn.content {
            match block {
                Block::Text(t) if !t.text.is_empty() => parts.push(json!({"text": t.text})),
                Block::Text(_) | Block::Thinking { .. } | Block::RedactedThinking { .. } => {}
                Block::Image { source, .. } => match source {
                    ImageSource::Base64 { media_type, data } => {
                        parts.push(json!({"inlineData": {"mimeType": media_type, "data": data}}))
                    }
                    ImageSource::Url(_) => {
                        return Err(refuse(
                            "image URLs are not supported by this model's provider: send the image as base64 data",
                            "messages",
                        ));
                    }
                },
                Block::ToolCall { id, name, input } => {
                    names.push((id.as_str(), name.as_str()));
                    parts.push(json!({"functionCall": {"name": name, "args": input}}));
                }
                Block::ToolResult {
                    call_id, content, ..
                } => {
                    let name = names
                        .iter()
                        .find(|(id, _)| id == call_id)
                        .map(|(_, name)| *name)
                        .ok_or_else(|| {
                            refuse(
                                format!("tool result '{call_id}' answers no tool call of the conversation"),
                                "messages",
                            )
                        })?;
                    // Gemini wants an object: a JSON object result as it is, any other
                    // text under `result`.
                    let response = match serde_json::from_str::<Value>(content) {
                        Ok(object @ Value::Object(_)) => object,
                        _ => json!({"result": content}),
                    };
                    parts.push(json!({"functionResponse": {"name": name, "response": response}}));
                }
            }
        }
        let role = match turn.role {
            Role::User => "user",
            Role::Assistant => "model",
        };
        push_turn(&mut out, role, "parts", parts);
    }
    Ok(out)
}

/// A JSON schema as Gemini's OpenAPI subset takes it: the keywords it refuses removed
/// (property names are left alone, whatever they are).
fn schema(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "$schema" | "additionalProperties" | "strict")
                })
                .map(|(k, v)| {
                    let v = match (k.as_str(), v) {
                        ("properties", Value::Object(properties)) => Value::Object(
                            properties
                                .iter()
                                .map(|(name, s)| (name.clone(), schema(s)))
                                .collect(),
                        ),
                        _ => schema(v),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(schema).collect()),
        other => other.clone(),
    }
}
