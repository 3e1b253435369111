//! The OpenAI Responses API as a caller format, for the providers that have none of
//! their own (Anthropic, Gemini, Vertex AI, Bedrock): `/v1/responses` requests are read
//! into the canonical form and the answer comes back as a Responses object, or as its
//! stream of typed events (`response.created`, `response.output_item.added`,
//! `response.output_text.delta`, `response.function_call_arguments.delta`, ...,
//! `response.completed`).
//!
//! The bridge is stateless: `previous_response_id` and `conversation` (the provider
//! keeping the conversation) are refused with 400, as are tools other than functions
//! (web search, file search, computer use run on OpenAI's side). `input` is a string or
//! a list of items: messages (`input_text`, `output_text`, `input_image` parts),
//! `function_call` and `function_call_output`; reasoning items are left out (their
//! encrypted content is OpenAI's own). Reasoning the provider answers with is not
//! relayed either.

use bytes::BytesMut;
use serde_json::{Value, json};

use super::canonical::{
    Answer, Block, Event, Request, Role, Stop, Text, Tool, ToolChoice, Turn, Usage,
};
use super::codec::{CallerCodec, CallerStream, StreamEncoder};
use super::openai::read_effort;
use super::wire::{
    Result, count, image_source, named_event, number, parse_object, plain_text, refuse, str_of,
    take, to_bytes, unix_now,
};

pub struct OpenAiResponses;

impl CallerCodec for OpenAiResponses {
    fn read_request(&self, body: &[u8]) -> Result<Request> {
        let mut r = parse_object(body)?;
        for stateful in ["previous_response_id", "conversation"] {
            if take(&mut r, stateful).is_some() {
                return Err(refuse(
                    format!(
                        "'{stateful}' needs a provider that keeps responses; this model's provider does not: send the whole conversation in 'input'"
                    ),
                    if stateful == "conversation" {
                        "conversation"
                    } else {
                        "previous_response_id"
                    },
                ));
            }
        }
        let reasoning = take(&mut r, "reasoning");
        let mut request = Request {
            choices: 1,
            max_tokens: count(take(&mut r, "max_output_tokens"), "max_output_tokens")?,
            temperature: number(take(&mut r, "temperature"), "temperature")?,
            top_p: number(take(&mut r, "top_p"), "top_p")?,
            stream: r.get("stream").and_then(Value::as_bool) == Some(true),
            parallel_tool_calls: r.get("parallel_tool_calls").and_then(Value::as_bool),
            user: r.get("user").and_then(Value::as_str).map(str::to_owned),
            thinking_budget: read_effort(
                reasoning.and_then(|r| r.get("effort").cloned()),
                "reasoning",
            )?,
            ..Request::default()
        };
        if let Some(instructions) = take(&mut r, "instructions") {
            let Value::String(text) = instructions else {
                return Err(refuse("'instructions' must be a string", "instructions"));
            };
            request.system.push(Text::plain(text));
        }
        match take(&mut r, "input") {
            Some(Value::String(text)) => request.turns.push(Turn {
                role: Role::User,
                content: vec![Block::Text(Text::plain(text))],
            }),
            Some(Value::Array(items)) => {
                for item in &items {
                    read_item(item, &mut request)?;
                }
            }
            _ => {
                return Err(refuse(
                    "'input' must be a string or a list of items",
                    "input",
                ));
            }
        }
        if let Some(Value::Array(tools)) = take(&mut r, "tools") {
            request.tools = Some(tools.iter().map(read_tool).collect::<Result<_>>()?);
        }
        request.tool_choice = take(&mut r, "tool_choice")
            .map(|c| read_tool_choice(&c))
            .transpose()?;
        Ok(request)
    }

    fn write_answer(&self, answer: &Answer) -> Vec<u8> {
        let mut output = Vec::new();
        let mut text = String::new();
        for block in &answer.content {
            match block {
                Block::Text(t) => text.push_str(&t.text),
                Block::ToolCall { id, name, input } => {
                    if !text.is_empty() {
                        output.push(message_item(&answer.id, output.len(), &text));
                        text.clear();
                    }
                    output.push(call_item(id, name, &input.to_string(), "completed"));
                }
                _ => {}
            }
        }
        if !text.is_empty() || output.is_empty() {
            output.push(message_item(&answer.id, output.len(), &text));
        }
        let mut response = skeleton(&answer.id, &answer.model, unix_now());
        finish(&mut response, answer.stop, &answer.usage, output);
        to_bytes(&response)
    }
}

/// One input item into the request.
fn read_item(item: &Value, request: &mut Request) -> Result<()> {
    let kind = item.get("type").and_then(Value::as_str);
    match kind {
        None | Some("message") => read_message(item, request),
        Some("function_call") => {
            let arguments = str_of(item, "arguments");
            let input = serde_json::from_str::<Value>(arguments)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            push(
                request,
                Role::Assistant,
                Block::ToolCall {
                    id: str_of(item, "call_id").to_owned(),
                    name: str_of(item, "name").to_owned(),
                    input,
                },
            );
            Ok(())
        }
        Some("function_call_output") => {
            let output = plain_text(item.get("output").unwrap_or(&Value::Null));
            push(
                request,
                Role::User,
                Block::ToolResult {
                    call_id: str_of(item, "call_id").to_owned(),
                    content: output,
                    cache_control: None,
                },
            );
            Ok(())
        }
        // OpenAI's own reasoning (encrypted for OpenAI): nothing another provider reads.
        Some("reasoning") => Ok(()),
        Some(other) => Err(refuse(
            format!("input item type '{other}' is not supported by this model's provider"),
            "input",
        )),
    }
}

fn push(request: &mut Request, role: Role, block: Block) {
    match request.turns.last_mut() {
        Some(turn) if turn.role == role => turn.content.push(block),
        _ => request.turns.push(Turn {
            role,
            content: vec![block],
        }),
    }
}

fn read_message(item: &Value, request: &mut Request) -> Result<()> {
    let role = match str_of(item, "role") {
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "system" | "developer" => {
            let text = plain_text(item.get("content").unwrap_or(&Value::Null));
            request.system.push(Text::plain(text));
            return Ok(());
        }
        other => {
            return Err(refuse(
                format!("message role '{other}' is not supported by this model's provider"),
                "input",
            ));
        }
    };
    match item.get("content") {
        Some(Value::String(s)) if !s.is_empty() => {
            push(request, role, Block::Text(Text::plain(s.as_str())));
        }
        Some(Value::Array(parts)) => {
            for part in parts {
                push(request, role, read_part(part)?);
            }
        }
        _ => {}
    }
    Ok(())
}

fn read_part(part: &Value) -> Result<Block> {
    match part.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text" | "text") => {
            Ok(Block::Text(Text::plain(str_of(part, "text"))))
        }
        Some("input_image") => {
            let url = part
                .get("image_url")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    refuse(
                        "an 'input_image' needs an 'image_url' (file ids are not supported by this model's provider)",
                        "input",
                    )
                })?;
            Ok(Block::Image {
                source: image_source(url),
                cache_control: None,
            })
        }
        other => Err(refuse(
            format!(
                "content part type '{}' is not supported by this model's provider",
                other.unwrap_or("")
            ),
            "input",
        )),
    }
}

/// Responses tools are flat: `{type: "function", name, description, parameters}`.
fn read_tool(tool: &Value) -> Result<Tool> {
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(refuse(
            "only 'function' tools are supported by this model's provider",
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
            .get("parameters")
            .filter(|p| p.is_object())
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
        cache_control: None,
    })
}

fn read_tool_choice(choice: &Value) -> Result<ToolChoice> {
    match choice {
        Value::String(s) if s == "none" => Ok(ToolChoice::None),
        Value::String(s) if s == "required" => Ok(ToolChoice::Any),
        Value::String(_) => Ok(ToolChoice::Auto),
        Value::Object(_) => match choice.get("name").and_then(Value::as_str) {
            Some(name) => Ok(ToolChoice::Named(name.to_owned())),
            None => Err(refuse("'tool_choice' names no function", "tool_choice")),
        },
        _ => Err(refuse("'tool_choice' is not valid", "tool_choice")),
    }
}

/// The response's id: the answer's, as a Responses id.
fn response_id(id: &str) -> String {
    format!("resp_{id}")
}

fn message_item(answer_id: &str, index: usize, text: &str) -> Value {
    json!({"type": "message", "id": format!("msg_{answer_id}_{index}"), "status": "completed",
           "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn call_item(call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": format!("fc_{call_id}"), "call_id": call_id,
           "name": name, "arguments": arguments, "status": status})
}

/// A response object still in progress, with nothing in its output.
fn skeleton(id: &str, model: &str, created: u64) -> Value {
    json!({"id": response_id(id), "object": "response", "created_at": created,
           "status": "in_progress", "error": null, "incomplete_details": null,
           "instructions": null, "metadata": {}, "model": model, "output": [],
           "parallel_tool_calls": true, "temperature": null, "top_p": null,
           "tool_choice": "auto", "tools": [], "usage": null})
}

/// Completes `response`: its status by the stop, its output and its usage.
fn finish(response: &mut Value, stop: Option<Stop>, usage: &Usage, output: Vec<Value>) {
    let incomplete = match stop {
        Some(Stop::MaxTokens) => Some("max_output_tokens"),
        Some(Stop::ContentFilter) => Some("content_filter"),
        _ => None,
    };
    response["status"] = if incomplete.is_some() {
        "incomplete"
    } else {
        "completed"
    }
    .into();
    if let Some(reason) = incomplete {
        response["incomplete_details"] = json!({ "reason": reason });
    }
    response["output"] = Value::Array(output);
    response["usage"] = json!({
        "input_tokens": usage.prompt,
        "input_tokens_details": {"cached_tokens": usage.cache_read},
        "output_tokens": usage.completion,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning},
        "total_tokens": usage.prompt + usage.completion,
    });
}

impl CallerStream for OpenAiResponses {
    fn stream_encoder(&self) -> Box<dyn StreamEncoder> {
        Box::new(Encoder::default())
    }
}

/// The item being streamed.
enum Open {
    Message { text: String },
    Call { call: usize },
}

/// A function call streamed so far.
struct Call {
    index: usize,
    id: String,
    name: String,
    arguments: String,
}

/// Writes the Responses stream: `response.created` and `response.in_progress` first,
/// one output item at a time (added, its deltas, done), and `response.completed` (or
/// `response.incomplete`) with the whole response when the upstream ended its answer.
#[derive(Default)]
struct Encoder {
    response: Option<Value>,
    id: String,
    sequence: u64,
    open: Option<Open>,
    /// The finished output items, in order.
    output: Vec<Value>,
    calls: Vec<(usize, Call)>,
    usage: Usage,
    stop: Option<Stop>,
}

impl Encoder {
    fn event(&mut self, out: &mut BytesMut, kind: &str, mut data: Value) {
        data["type"] = kind.into();
        data["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        named_event(out, kind, &data);
    }

    fn start(&mut self, out: &mut BytesMut, id: &str, model: &str) {
        if self.response.is_some() {
            return;
        }
        self.id = id.to_owned();
        let response = skeleton(id, model, unix_now());
        self.event(out, "response.created", json!({ "response": response }));
        self.event(out, "response.in_progress", json!({ "response": response }));
        self.response = Some(response);
    }

    fn item_id(&self) -> String {
        format!("msg_{}_{}", self.id, self.output.len())
    }

    /// Ends the open item with its `done` events.
    fn close(&mut self, out: &mut BytesMut) {
        let index = self.output.len();
        match self.open.take() {
            None => {}
            Some(Open::Message { text }) => {
                let item_id = self.item_id();
                let at = json!({"item_id": item_id, "output_index": index, "content_index": 0});
                let mut done = at.clone();
                done["text"] = text.as_str().into();
                self.event(out, "response.output_text.done", done);
                let mut part = at;
                part["part"] = json!({"type": "output_text", "text": text, "annotations": []});
                self.event(out, "response.content_part.done", part);
                let item = message_item(&self.id, index, &text);
                self.event(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
            }
            Some(Open::Call { call }) => {
                let Some((_, c)) = self.calls.iter().find(|(n, _)| *n == call) else {
                    return;
                };
                let item = call_item(&c.id, &c.name, &c.arguments, "completed");
                let done = json!({"item_id": format!("fc_{}", c.id), "output_index": c.index,
                                  "arguments": c.arguments});
                self.event(out, "response.function_call_arguments.done", done);
                self.event(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
            }
        }
    }

    fn text(&mut self, out: &mut BytesMut, delta: String) {
        if !matches!(self.open, Some(Open::Message { .. })) {
            self.close(out);
            let index = self.output.len();
            let item_id = self.item_id();
            let item = json!({"type": "message", "id": item_id, "status": "in_progress",
                              "role": "assistant", "content": []});
            self.event(
                out,
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            let part = json!({"item_id": item_id, "output_index": index, "content_index": 0,
                              "part": {"type": "output_text", "text": "", "annotations": []}});
            self.event(out, "response.content_part.added", part);
            self.open = Some(Open::Message {
                text: String::new(),
            });
        }
        let at = json!({"item_id": self.item_id(), "output_index": self.output.len(),
                        "content_index": 0, "delta": delta});
        if let Some(Open::Message { text }) = &mut self.open {
            text.push_str(&delta);
        }
        self.event(out, "response.output_text.delta", at);
    }
}

impl StreamEncoder for Encoder {
    fn encode(&mut self, event: Event, out: &mut BytesMut) {
        if self.response.is_none() && !matches!(event, Event::Start { .. }) {
            self.start(out, "", "");
        }
        match event {
            Event::Start { id, model } => self.start(out, &id, &model),
            Event::Text(text) => self.text(out, text),
            Event::ToolCall { call, id, name } => {
                self.close(out);
                let index = self.output.len();
                let item = call_item(&id, &name, "", "in_progress");
                self.event(
                    out,
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                );
                self.calls.push((
                    call,
                    Call {
                        index,
                        id,
                        name,
                        arguments: String::new(),
                    },
                ));
                self.open = Some(Open::Call { call });
            }
            Event::ToolArguments { call, json } => {
                let Some((_, c)) = self.calls.iter_mut().find(|(n, _)| *n == call) else {
                    return;
                };
                c.arguments.push_str(&json);
                let delta = json!({"item_id": format!("fc_{}", c.id), "output_index": c.index,
                                   "delta": json});
                self.event(out, "response.function_call_arguments.delta", delta);
            }
            Event::Usage(usage) => self.usage = usage,
            Event::Stop(stop) => self.stop = Some(stop),
            Event::End => {
                self.close(out);
                let mut response = self.response.take().unwrap_or_default();
                let output = std::mem::take(&mut self.output);
                finish(&mut response, self.stop, &self.usage, output);
                let kind = if response["status"] == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                self.event(out, kind, json!({ "response": response }));
            }
            Event::Thinking(_) | Event::ThinkingSignature(_) | Event::RedactedThinking(_) => {}
        }
    }
}
