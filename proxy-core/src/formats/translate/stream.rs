//! Streams: each translator takes runs of complete upstream events (see
//! `sse::filter_events`) and returns the caller's events for them, keeping what it must
//! remember between runs (ids, open content blocks, tool-call positions, usage).
//!
//! A stream that ends early upstream ends early for the caller too: the closing events
//! (`[DONE]`, `message_stop`) are only sent when the upstream sent its own.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Value, json};

use super::shared::{anthropic_input_tokens, finish_reason, stop_reason, unix_now};
use crate::formats::sse;

/// Anthropic message events -> OpenAI `chat.completion.chunk`s, ending with a usage
/// chunk and `[DONE]`.
#[derive(Default)]
pub struct AnthropicToOpenAi {
    id: String,
    model: String,
    created: u64,
    /// Content block index -> tool call index, for the blocks that are tool uses.
    tool_blocks: Vec<(u64, usize)>,
    prompt: u64,
    completion: u64,
}

impl AnthropicToOpenAi {
    pub fn new() -> Self {
        Self {
            created: unix_now(),
            ..Self::default()
        }
    }

    pub fn translate(&mut self, run: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        for event in sse::events(run) {
            let Ok(data) = serde_json::from_slice::<Value>(&event.data) else {
                continue;
            };
            let kind = data.get("type").and_then(Value::as_str).unwrap_or("");
            match kind {
                "message_start" => {
                    let message = data.get("message").cloned().unwrap_or_default();
                    self.id = message["id"].as_str().unwrap_or("").to_owned();
                    self.model = message["model"].as_str().unwrap_or("").to_owned();
                    if let Some(usage) = message.get("usage") {
                        self.prompt = anthropic_input_tokens(usage);
                    }
                    self.chunk(&mut out, json!({"role": "assistant", "content": ""}), None);
                }
                "content_block_start" => {
                    let block = data.get("content_block").cloned().unwrap_or_default();
                    let index = data["index"].as_u64().unwrap_or(0);
                    match block["type"].as_str() {
                        Some("tool_use") => {
                            let call = self.tool_blocks.len();
                            self.tool_blocks.push((index, call));
                            let delta = json!({"tool_calls": [{"index": call, "id": block["id"], "type": "function",
                                "function": {"name": block["name"], "arguments": ""}}]});
                            self.chunk(&mut out, delta, None);
                        }
                        Some("text") if block["text"].as_str().is_some_and(|t| !t.is_empty()) => {
                            self.chunk(&mut out, json!({"content": block["text"]}), None);
                        }
                        _ => {}
                    }
                }
                "content_block_delta" => {
                    let delta = data.get("delta").cloned().unwrap_or_default();
                    let index = data["index"].as_u64().unwrap_or(0);
                    match delta["type"].as_str() {
                        Some("text_delta") => {
                            self.chunk(&mut out, json!({"content": delta["text"]}), None);
                        }
                        Some("input_json_delta") => {
                            let Some(call) = self.tool_call(index) else {
                                continue;
                            };
                            let delta = json!({"tool_calls": [{"index": call,
                                "function": {"arguments": delta["partial_json"]}}]});
                            self.chunk(&mut out, delta, None);
                        }
                        _ => {}
                    }
                }
                "message_delta" => {
                    if let Some(usage) = data.get("usage") {
                        self.prompt = self.prompt.max(anthropic_input_tokens(usage));
                        self.completion =
                            usage["output_tokens"].as_u64().unwrap_or(self.completion);
                    }
                    let finish = data
                        .pointer("/delta/stop_reason")
                        .and_then(Value::as_str)
                        .map(finish_reason);
                    if let Some(finish) = finish {
                        self.chunk(&mut out, json!({}), Some(finish));
                    }
                }
                "message_stop" => {
                    let mut usage = self.base();
                    usage["choices"] = json!([]);
                    usage["usage"] = json!({"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                        "total_tokens": self.prompt + self.completion});
                    data_event(&mut out, &usage);
                    out.put_slice(b"data: [DONE]\n\n");
                }
                "error" => {
                    let error = data.get("error").cloned().unwrap_or_default();
                    let message = error["message"]
                        .as_str()
                        .unwrap_or("the upstream stream failed");
                    data_event(
                        &mut out,
                        &json!({"error": {"message": message, "type": "upstream_error"}}),
                    );
                }
                _ => {}
            }
        }
        out.freeze()
    }

    fn tool_call(&self, block: u64) -> Option<usize> {
        self.tool_blocks
            .iter()
            .find(|(b, _)| *b == block)
            .map(|(_, call)| *call)
    }

    fn base(&self) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model})
    }

    fn chunk(&self, out: &mut BytesMut, delta: Value, finish: Option<&str>) {
        let mut chunk = self.base();
        chunk["choices"] = json!([{"index": 0, "delta": delta, "finish_reason": finish}]);
        data_event(out, &chunk);
    }
}

/// What content block of the Anthropic stream is open.
#[derive(Clone, Copy)]
enum Open {
    Text { block: u64 },
    Tool { block: u64, call: u64 },
}

/// OpenAI `chat.completion.chunk`s -> Anthropic message events (`message_start`,
/// content blocks for text and each tool call, `message_delta` with the stop reason
/// and usage, `message_stop` when the upstream sent `[DONE]`).
#[derive(Default)]
pub struct OpenAiToAnthropic {
    started: bool,
    open: Option<Open>,
    next_block: u64,
    stop: Option<&'static str>,
    prompt: u64,
    completion: u64,
}

impl OpenAiToAnthropic {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn translate(&mut self, run: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        for event in sse::events(run) {
            if event.data.trim_ascii() == b"[DONE]" {
                self.finish(&mut out);
                continue;
            }
            let Ok(chunk) = serde_json::from_slice::<Value>(&event.data) else {
                continue;
            };
            if let Some(error) = chunk.get("error") {
                let message = error["message"]
                    .as_str()
                    .unwrap_or("the upstream stream failed");
                named_event(
                    &mut out,
                    "error",
                    &json!({"type": "error", "error": {"type": "api_error", "message": message}}),
                );
                continue;
            }
            if !self.started {
                self.started = true;
                let message = json!({"id": chunk["id"], "type": "message", "role": "assistant",
                    "model": chunk["model"], "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0}});
                named_event(
                    &mut out,
                    "message_start",
                    &json!({"type": "message_start", "message": message}),
                );
            }
            if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
                self.prompt = usage["prompt_tokens"].as_u64().unwrap_or(self.prompt);
                self.completion = usage["completion_tokens"]
                    .as_u64()
                    .unwrap_or(self.completion);
            }
            let Some(choice) = chunk.pointer("/choices/0") else {
                continue;
            };
            if let Some(text) = choice
                .pointer("/delta/content")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.text(&mut out, text);
            }
            for call in choice
                .pointer("/delta/tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                self.tool_call(&mut out, call);
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.stop = Some(stop_reason(reason));
            }
        }
        out.freeze()
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

    fn tool_call(&mut self, out: &mut BytesMut, call: &Value) {
        let index = call["index"].as_u64().unwrap_or(0);
        let block = match self.open {
            Some(Open::Tool { block, call }) if call == index => block,
            _ => {
                self.close(out);
                let block = self.start_block(
                    out,
                    json!({"type": "tool_use", "id": call["id"], "name": call.pointer("/function/name"), "input": {}}),
                );
                self.open = Some(Open::Tool { block, call: index });
                block
            }
        };
        if let Some(arguments) = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
        {
            named_event(
                out,
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": block,
                    "delta": {"type": "input_json_delta", "partial_json": arguments}}),
            );
        }
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
        if let Some(Open::Text { block } | Open::Tool { block, .. }) = self.open.take() {
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
        named_event(
            out,
            "message_delta",
            &json!({"type": "message_delta",
                "delta": {"stop_reason": self.stop.unwrap_or("end_turn"), "stop_sequence": null},
                "usage": {"input_tokens": self.prompt, "output_tokens": self.completion}}),
        );
        named_event(out, "message_stop", &json!({"type": "message_stop"}));
        self.started = false;
    }
}

fn data_event(out: &mut BytesMut, data: &Value) {
    out.put_slice(b"data: ");
    out.put_slice(data.to_string().as_bytes());
    out.put_slice(b"\n\n");
}

fn named_event(out: &mut BytesMut, name: &str, data: &Value) {
    out.put_slice(b"event: ");
    out.put_slice(name.as_bytes());
    out.put_slice(b"\n");
    data_event(out, data);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// The JSON payloads of a translated stream (`[DONE]` as a string).
    fn payloads(out: &[u8]) -> Vec<Value> {
        sse::events(out)
            .map(|e| serde_json::from_slice(&e.data).unwrap_or_else(|_| json!("[DONE]")))
            .collect()
    }

    fn anthropic_stream() -> Vec<String> {
        let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
        vec![
            ev(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_1", "model": "claude", "usage": {"input_tokens": 12, "output_tokens": 1}}}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            ev("ping", json!({"type": "ping"})),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking"}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\":"}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
            ev(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}}),
            ),
            ev("message_stop", json!({"type": "message_stop"})),
        ]
    }

    #[test]
    fn anthropic_events_become_openai_chunks_whatever_the_runs() {
        let events = anthropic_stream();
        // One run per event, and everything in one run, give the same chunks.
        let mut one_by_one = AnthropicToOpenAi::new();
        let split: Vec<u8> = events
            .iter()
            .flat_map(|e| one_by_one.translate(e.as_bytes()).to_vec())
            .collect();
        let whole = AnthropicToOpenAi::new().translate(events.concat().as_bytes());
        let (mut a, mut b) = (payloads(&split), payloads(&whole));
        for v in a.iter_mut().chain(b.iter_mut()) {
            if v.is_object() {
                v["created"] = json!(0);
            }
        }
        assert_eq!(a, b);
        let deltas: Vec<Value> = a
            .iter()
            .map(|c| c.pointer("/choices/0/delta").cloned().unwrap_or_default())
            .collect();
        assert_eq!(deltas[0], json!({"role": "assistant", "content": ""}));
        assert_eq!(deltas[1], json!({"content": "Checking"}));
        assert_eq!(
            deltas[2],
            json!({"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]})
        );
        assert_eq!(
            deltas[3]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":"
        );
        assert_eq!(
            deltas[4]["tool_calls"][0]["function"]["arguments"],
            "\"Paris\"}"
        );
        assert_eq!(a[5]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(a[6]["choices"], json!([]));
        assert_eq!(
            a[6]["usage"],
            json!({"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19})
        );
        assert_eq!(a[7], json!("[DONE]"));
        assert_eq!(a.len(), 8);
        assert!(
            a[..7]
                .iter()
                .all(|c| c["id"] == "msg_1" && c["object"] == "chat.completion.chunk")
        );
    }

    #[test]
    fn a_cut_anthropic_stream_gets_no_done() {
        let events = anthropic_stream();
        let out = AnthropicToOpenAi::new().translate(events[..5].concat().as_bytes());
        assert!(!out.windows(6).any(|w| w == b"[DONE]"));
    }

    #[test]
    fn openai_chunks_become_anthropic_events() {
        let chunk = |delta: Value, finish: Value| {
            format!(
                "data: {}\n\n",
                json!({"id": "chatcmpl-1", "model": "gpt", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            )
        };
        let stream = [
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            chunk(json!({"content": "Hel"}), Value::Null),
            chunk(json!({"content": "lo"}), Value::Null),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":1}"}}]}),
                Value::Null,
            ),
            chunk(json!({}), json!("tool_calls")),
            format!(
                "data: {}\n\n",
                json!({"id": "chatcmpl-1", "model": "gpt", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}})
            ),
            "data: [DONE]\n\n".to_owned(),
        ];
        let mut t = OpenAiToAnthropic::new();
        let out: Vec<u8> = stream
            .iter()
            .flat_map(|c| t.translate(c.as_bytes()).to_vec())
            .collect();
        let names: Vec<String> = sse::events(&out)
            .map(|e| e.name.unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let p = payloads(&out);
        assert_eq!(p[0]["message"]["id"], "chatcmpl-1");
        assert_eq!(p[2]["delta"], json!({"type": "text_delta", "text": "Hel"}));
        assert_eq!(
            p[5]["content_block"],
            json!({"type": "tool_use", "id": "call_1", "name": "f", "input": {}})
        );
        assert_eq!(p[6]["index"], 1);
        assert_eq!(
            p[6]["delta"],
            json!({"type": "input_json_delta", "partial_json": "{\"a\":1}"})
        );
        assert_eq!(
            p[8],
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                "usage": {"input_tokens": 4, "output_tokens": 2}})
        );
    }
}
