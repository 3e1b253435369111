//! OpenAI `chat.completion.chunk` streams <-> canonical stream events.

use bytes::{BufMut, BytesMut};
use serde_json::{Value, json};

use super::canonical::{Event, Usage};
use super::codec::{CallerStream, StreamDecoder, StreamEncoder, UpstreamStream};
use super::openai::{OpenAiChat, finish_reason, read_usage, stop_of, write_usage};
use super::wire::{data_event, str_at, str_of, unix_now};
use crate::formats::sse::{self, StreamBreak};

/// Reads an upstream's chunks. Tool calls keep OpenAI's own numbering.
#[derive(Default)]
pub struct Decoder {
    started: bool,
    calls: Vec<u64>,
    usage: Usage,
}

impl StreamDecoder for Decoder {
    fn decode(&mut self, event: &sse::Event, out: &mut Vec<Event>) -> Result<(), StreamBreak> {
        if event.data.trim_ascii() == b"[DONE]" {
            out.push(Event::End);
            return Ok(());
        }
        if let Some(message) = sse::error_message(event) {
            return Err(StreamBreak::Upstream(message));
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(&event.data) else {
            return Err(StreamBreak::Unreadable);
        };
        if !self.started {
            self.started = true;
            out.push(Event::Start {
                id: str_of(&chunk, "id").to_owned(),
                model: str_of(&chunk, "model").to_owned(),
            });
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = read_usage(usage, self.usage);
            out.push(Event::Usage(self.usage));
        }
        let Some(choice) = chunk.pointer("/choices/0") else {
            return Ok(());
        };
        for field in ["/delta/reasoning_content", "/delta/reasoning"] {
            if let Some(text) = choice
                .pointer(field)
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                out.push(Event::Thinking(text.to_owned()));
                break;
            }
        }
        if let Some(text) = choice
            .pointer("/delta/content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            out.push(Event::Text(text.to_owned()));
        }
        for call in choice
            .pointer("/delta/tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.tool_call(call, out);
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            out.push(Event::Stop(stop_of(reason)));
        }
        Ok(())
    }
}

impl Decoder {
    fn tool_call(&mut self, call: &Value, out: &mut Vec<Event>) {
        let index = call["index"].as_u64().unwrap_or(0);
        let number = usize::try_from(index).unwrap_or(usize::MAX);
        if !self.calls.contains(&index) {
            self.calls.push(index);
            out.push(Event::ToolCall {
                call: number,
                id: str_of(call, "id").to_owned(),
                name: str_at(call, "/function/name").to_owned(),
            });
        }
        if let Some(arguments) = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
        {
            out.push(Event::ToolArguments {
                call: number,
                json: arguments.to_owned(),
            });
        }
    }
}

/// Writes chunks for an OpenAI caller, ending with a usage chunk and `[DONE]` when
/// the upstream ended its answer.
pub struct Encoder {
    started: bool,
    id: String,
    model: String,
    created: u64,
    usage: Usage,
}

impl Encoder {
    pub fn new() -> Self {
        Self {
            started: false,
            id: String::new(),
            model: String::new(),
            created: unix_now(),
            usage: Usage::default(),
        }
    }

    fn base(&self) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model})
    }

    fn chunk(&self, out: &mut BytesMut, delta: Value, finish: Option<&str>) {
        let mut chunk = self.base();
        chunk["choices"] = json!([{"index": 0, "delta": delta, "finish_reason": finish}]);
        data_event(out, &chunk);
    }
}

impl StreamEncoder for Encoder {
    fn encode(&mut self, event: Event, out: &mut BytesMut) {
        match event {
            // A stream continued on another upstream keeps its first id and role chunk.
            Event::Start { .. } if self.started => {}
            Event::Start { id, model } => {
                self.started = true;
                self.id = id;
                self.model = model;
                self.chunk(out, json!({"role": "assistant", "content": ""}), None);
            }
            Event::Text(text) => self.chunk(out, json!({"content": text}), None),
            Event::Thinking(text) => self.chunk(out, json!({"reasoning_content": text}), None),
            // LiteLLM's convention: the signed and the redacted reasoning as
            // `thinking_blocks`, so a caller can send them back to Anthropic.
            Event::ThinkingSignature(signature) => {
                let block = json!({"type": "thinking", "thinking": "", "signature": signature});
                self.chunk(out, json!({"thinking_blocks": [block]}), None);
            }
            Event::RedactedThinking(data) => {
                let block = json!({"type": "redacted_thinking", "data": data});
                self.chunk(out, json!({"thinking_blocks": [block]}), None);
            }
            Event::ToolCall { call, id, name } => {
                let delta = json!({"tool_calls": [{"index": call, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""}}]});
                self.chunk(out, delta, None);
            }
            Event::ToolArguments { call, json } => {
                let delta = json!({"tool_calls": [{"index": call,
                    "function": {"arguments": json}}]});
                self.chunk(out, delta, None);
            }
            Event::Usage(usage) => self.usage = usage,
            Event::Stop(stop) => self.chunk(out, json!({}), Some(finish_reason(stop))),
            Event::End => {
                let mut usage = self.base();
                usage["choices"] = json!([]);
                usage["usage"] = write_usage(&self.usage);
                data_event(out, &usage);
                out.put_slice(b"data: [DONE]\n\n");
            }
        }
    }
}

impl CallerStream for OpenAiChat {
    fn stream_encoder(&self) -> Box<dyn StreamEncoder> {
        Box::new(Encoder::new())
    }
}

impl UpstreamStream for OpenAiChat {
    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(Decoder::default())
    }
}
