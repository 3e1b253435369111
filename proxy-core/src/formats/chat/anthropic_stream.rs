//! Anthropic message event streams <-> canonical stream events.

use bytes::BytesMut;
use serde_json::{Value, json};

use super::anthropic::{AnthropicMessages, read_usage, stop_of, stop_reason, write_usage};
use super::canonical::{Event, Stop, Usage};
use super::codec::{CallerStream, StreamDecoder, StreamEncoder, UpstreamStream};
use super::wire::{named_event, str_of, u64_of};
use crate::formats::sse::{self, StreamBreak};

/// Reads an upstream's events. Tool calls are numbered in the order their content
/// blocks start.
#[derive(Default)]
pub struct Decoder {
    /// The content block index of each tool call so far.
    tool_blocks: Vec<u64>,
    usage: Usage,
}

impl StreamDecoder for Decoder {
    fn decode(&mut self, event: &sse::Event, out: &mut Vec<Event>) -> Result<(), StreamBreak> {
        if let Some(message) = sse::error_message(event) {
            return Err(StreamBreak::Upstream(message));
        }
        let Ok(data) = serde_json::from_slice::<Value>(&event.data) else {
            return Err(StreamBreak::Unreadable);
        };
        let index = u64_of(&data, "index").unwrap_or(0);
        match str_of(&data, "type") {
            "message_start" => {
                let message = data.get("message").unwrap_or(&Value::Null);
                out.push(Event::Start {
                    id: str_of(message, "id").to_owned(),
                    model: str_of(message, "model").to_owned(),
                });
                if let Some(usage) = message.get("usage") {
                    self.usage = read_usage(usage);
                    out.push(Event::Usage(self.usage));
                }
            }
            "content_block_start" => {
                let block = data.get("content_block").unwrap_or(&Value::Null);
                match str_of(block, "type") {
                    "tool_use" => {
                        out.push(Event::ToolCall {
                            call: self.tool_blocks.len(),
                            id: str_of(block, "id").to_owned(),
                            name: str_of(block, "name").to_owned(),
                        });
                        self.tool_blocks.push(index);
                    }
                    "text" if !str_of(block, "text").is_empty() => {
                        out.push(Event::Text(str_of(block, "text").to_owned()));
                    }
                    "thinking" if !str_of(block, "thinking").is_empty() => {
                        out.push(Event::Thinking(str_of(block, "thinking").to_owned()));
                    }
                    "redacted_thinking" => {
                        out.push(Event::RedactedThinking(str_of(block, "data").to_owned()));
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let delta = data.get("delta").unwrap_or(&Value::Null);
                match str_of(delta, "type") {
                    "text_delta" => out.push(Event::Text(str_of(delta, "text").to_owned())),
                    "thinking_delta" => {
                        out.push(Event::Thinking(str_of(delta, "thinking").to_owned()));
                    }
                    "signature_delta" => {
                        out.push(Event::ThinkingSignature(
                            str_of(delta, "signature").to_owned(),
                        ));
                    }
                    "input_json_delta" => {
                        if let Some(call) = self.tool_blocks.iter().position(|b| *b == index) {
                            out.push(Event::ToolArguments {
                                call,
                                json: str_of(delta, "partial_json").to_owned(),
                            });
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(usage) = data.get("usage") {
                    self.usage = later_usage(self.usage, usage);
                    out.push(Event::Usage(self.usage));
                }
                if let Some(reason) = data.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    out.push(Event::Stop(stop_of(reason)));
                }
            }
            "message_stop" => out.push(Event::End),
            _ => {}
        }
        Ok(())
    }
}

/// `message_delta` usage is cumulative; what it leaves out stays as it was.
fn later_usage(was: Usage, usage: &Value) -> Usage {
    let now = read_usage(usage);
    let or_was = |name: &str, value: u64, previous: u64| {
        if usage.get(name).is_some() {
            value
        } else {
            previous
        }
    };
    Usage {
        prompt: was.prompt.max(now.prompt),
        completion: or_was("output_tokens", now.completion, was.completion),
        cache_read: or_was("cache_read_input_tokens", now.cache_read, was.cache_read),
        cache_write: or_was(
            "cache_creation_input_tokens",
            now.cache_write,
            was.cache_write,
        ),
        reasoning: 0,
    }
}

/// What content block of the caller's stream is open.
#[derive(Clone, Copy)]
enum Open {
    Text { block: u64 },
    Thinking { block: u64 },
    Tool { block: u64, call: usize },
}

/// Writes message events for an Anthropic caller: `message_start`, a content block
/// for the text and for each tool call, then `message_delta` with the stop reason and
/// usage and `message_stop` when the upstream ended its answer.
#[derive(Default)]
pub struct Encoder {
    started: bool,
    open: Option<Open>,
    next_block: u64,
    /// Each tool call's id and name, for a block reopened when calls interleave.
    calls: Vec<(usize, String, String)>,
    stop: Option<Stop>,
    usage: Usage,
}

impl StreamEncoder for Encoder {
    fn encode(&mut self, event: Event, out: &mut BytesMut) {
        match event {
            Event::Start { id, model } => {
                if self.started {
                    return;
                }
                self.started = true;
                let message = json!({"id": id, "type": "message", "role": "assistant",
                    "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0}});
                named_event(
                    out,
                    "message_start",
                    &json!({"type": "message_start", "message": message}),
                );
            }
            Event::Text(text) => self.text(out, &text),
            Event::Thinking(text) => {
                let block = self.thinking_block(out);
                let delta = json!({"type": "thinking_delta", "thinking": text});
                self.delta(out, block, delta);
            }
            Event::ThinkingSignature(signature) => {
                let block = self.thinking_block(out);
                let delta = json!({"type": "signature_delta", "signature": signature});
                self.delta(out, block, delta);
            }
            Event::RedactedThinking(data) => {
                self.close(out);
                let block =
                    self.start_block(out, json!({"type": "redacted_thinking", "data": data}));
                self.open = Some(Open::Text { block });
                self.close(out);
            }
            Event::ToolCall { call, id, name } => {
                self.calls.push((call, id, name));
                self.tool_block(out, call);
            }
            Event::ToolArguments { call, json } => {
                let block = self.tool_block(out, call);
                named_event(
                    out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": block,
                        "delta": {"type": "input_json_delta", "partial_json": json}}),
                );
            }
            Event::Usage(usage) => self.usage = usage,
            Event::Stop(stop) => self.stop = Some(stop),
            Event::End => self.finish(out),
        }
    }
}

impl Encoder {
    /// The open thinking block, started when another block (or none) is open.
    fn thinking_block(&mut self, out: &mut BytesMut) -> u64 {
        if let Some(Open::Thinking { block }) = self.open {
            return block;
        }
        self.close(out);
        let block = self.start_block(
            out,
            json!({"type": "thinking", "thinking": "", "signature": ""}),
        );
        self.open = Some(Open::Thinking { block });
        block
    }

    fn delta(&mut self, out: &mut BytesMut, block: u64, delta: Value) {
        named_event(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": block, "delta": delta}),
        );
    }

    fn text(&mut self, out: &mut BytesMut, text: &str) {
        let block = match self.open {
            Some(Open::Text { block }) => block,
            _ => {
                self.close(out);
                let block = self.start_block(out, json!({"type": "text", "text": ""}));
                self.open = Some(Open::Text { block });
                block
            }
        };
        named_event(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": block,
                "delta": {"type": "text_delta", "text": text}}),
        );
    }

    /// The open block of tool call `call`, started when another block is open.
    fn tool_block(&mut self, out: &mut BytesMut, call: usize) -> u64 {
        if let Some(Open::Tool { block, call: open }) = self.open
            && open == call
        {
            return block;
        }
        self.close(out);
        let (id, name) = self
            .calls
            .iter()
            .find(|(c, ..)| *c == call)
            .map_or(("", ""), |(_, id, name)| (id.as_str(), name.as_str()));
        let content_block = json!({"type": "tool_use", "id": id, "name": name, "input": {}});
        let block = self.start_block(out, content_block);
        self.open = Some(Open::Tool { block, call });
        block
    }

    fn start_block(&mut self, out: &mut BytesMut, content_block: Value) -> u64 {
        let block = self.next_block;
        self.next_block += 1;
        named_event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": block, "content_block": content_block}),
        );
        block
    }

    fn close(&mut self, out: &mut BytesMut) {
        if let Some(Open::Text { block } | Open::Thinking { block } | Open::Tool { block, .. }) =
            self.open.take()
        {
            named_event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": block}),
            );
        }
    }

    fn finish(&mut self, out: &mut BytesMut) {
        if !self.started {
            return;
        }
        self.close(out);
        let stop = stop_reason(self.stop.unwrap_or(Stop::EndTurn));
        named_event(
            out,
            "message_delta",
            &json!({"type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": null},
                "usage": write_usage(&self.usage)}),
        );
        named_event(out, "message_stop", &json!({"type": "message_stop"}));
        self.started = false;
    }
}

impl CallerStream for AnthropicMessages {
    fn stream_encoder(&self) -> Box<dyn StreamEncoder> {
        Box::new(Encoder::default())
    }
}

impl UpstreamStream for AnthropicMessages {
    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(Decoder::default())
    }
}
