//! The codecs, pairwise through the canonical form: requests, whole answers and
//! streams both ways, refusals, and what survives translation (cache markers, cached
//! tokens).

#![allow(clippy::unwrap_used, reason = "tests")]

use bytes::Bytes;
use serde_json::{Value, json};

use super::*;
use crate::formats::sse::StreamBreak;

const OPENAI: &OpenAiChat = &OpenAiChat;
const ANTHROPIC: &AnthropicMessages = &AnthropicMessages;

fn chat_to_messages(body: &[u8], model: &str) -> Result<Vec<u8>, ProxyError> {
    translate_request(body, OPENAI, ANTHROPIC, model)
}

fn messages_to_chat(body: &[u8], model: &str) -> Result<Vec<u8>, ProxyError> {
    translate_request(body, ANTHROPIC, OPENAI, model)
}

fn message_to_completion(body: &[u8]) -> Result<Bytes, ProxyError> {
    Conversion::Translate {
        upstream: ANTHROPIC,
        caller: OPENAI,
    }
    .answer(Bytes::copy_from_slice(body), "")
}

fn completion_to_message(body: &[u8]) -> Result<Bytes, ProxyError> {
    Conversion::Translate {
        upstream: OPENAI,
        caller: ANTHROPIC,
    }
    .answer(Bytes::copy_from_slice(body), "")
}

fn anthropic_to_openai() -> StreamTranslator {
    StreamTranslator::new(ANTHROPIC, OPENAI)
}

fn openai_to_anthropic() -> StreamTranslator {
    StreamTranslator::new(OPENAI, ANTHROPIC)
}

// Requests

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
    let param = |r: Result<Vec<u8>, ProxyError>| match r {
        Err(ProxyError::InvalidRequest { param, .. }) => param,
        _ => panic!("expected a refusal"),
    };
    let n = json!({"model": "a", "n": 2, "messages": []}).to_string();
    assert_eq!(param(chat_to_messages(n.as_bytes(), "x")), Some("n"));
    let tool = json!({"model": "a", "max_tokens": 1, "messages": [],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    .to_string();
    assert_eq!(param(messages_to_chat(tool.as_bytes(), "x")), Some("tools"));
    let audio =
        json!({"model": "a", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]})
            .to_string();
    assert_eq!(
        param(chat_to_messages(audio.as_bytes(), "x")),
        Some("messages")
    );
}

// Whole answers

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
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
                "prompt_tokens_details": {"cached_tokens": 2}}})
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

// Streams

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
    let mut one_by_one = anthropic_to_openai();
    let split: Vec<u8> = events
        .iter()
        .flat_map(|e| one_by_one.translate(e.as_bytes()).0.to_vec())
        .collect();
    let (whole, _) = anthropic_to_openai().translate(events.concat().as_bytes());
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
    let (out, broke) = anthropic_to_openai().translate(events[..5].concat().as_bytes());
    assert!(!out.windows(6).any(|w| w == b"[DONE]"));
    assert_eq!(broke, None);
}

#[test]
fn upstream_error_events_and_unreadable_events_break_a_translated_stream() {
    let events = anthropic_stream();
    let error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    let run = format!("{}{error}{}", events[..3].concat(), events[3]);
    let (out, broke) = anthropic_to_openai().translate(run.as_bytes());
    assert_eq!(broke, Some(StreamBreak::Upstream("Overloaded".into())));
    // What came before the error is translated; nothing after it is.
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("\"role\":\"assistant\""), "{out}");
    assert!(!out.contains("Checking"), "{out}");
    assert!(!out.contains("[DONE]"));
    let (_, broke) =
        anthropic_to_openai().translate(b"event: content_block_delta\ndata: {not json\n\n");
    assert_eq!(broke, Some(StreamBreak::Unreadable));
    let openai_error = b"data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n";
    let (out, broke) = openai_to_anthropic().translate(openai_error);
    assert_eq!(broke, Some(StreamBreak::Upstream("boom".into())));
    assert!(out.is_empty());
    // Empty data lines and comments are not events to read.
    let (_, broke) = openai_to_anthropic().translate(b": keep-alive\n\ndata:\n\n");
    assert_eq!(broke, None);
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
    let mut t = openai_to_anthropic();
    let out: Vec<u8> = stream
        .iter()
        .flat_map(|c| t.translate(c.as_bytes()).0.to_vec())
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

// What survives translation

#[test]
fn cache_markers_stay_where_the_caller_put_them() {
    let marker = json!({"type": "ephemeral"});
    let out = to_messages(json!({"model": "a", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "long rules", "cache_control": marker}]},
        {"role": "system", "content": "and more"},
        {"role": "user", "content": [{"type": "text", "text": "the document", "cache_control": marker},
            {"type": "text", "text": "question"}]},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "r", "cache_control": marker}]}
    ], "tools": [{"type": "function", "cache_control": marker, "function": {"name": "f"}}]}));
    assert_eq!(
        out["system"],
        json!([{"type": "text", "text": "long rules", "cache_control": marker},
            {"type": "text", "text": "and more"}])
    );
    assert_eq!(
        out["messages"][0]["content"],
        json!([{"type": "text", "text": "the document", "cache_control": marker},
            {"type": "text", "text": "question"}])
    );
    assert_eq!(out["messages"][2]["content"][0]["cache_control"], marker);
    assert_eq!(out["tools"][0]["cache_control"], marker);
    // Without markers the system prompt stays one string.
    let plain = to_messages(json!({"model": "a", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "system", "content": "c"}, {"role": "user", "content": "hi"}]}));
    assert_eq!(plain["system"], "a\nb\n\nc");
}

#[test]
fn cached_tokens_come_back_in_each_formats_arithmetic() {
    // OpenAI counts cached tokens inside prompt_tokens; Anthropic apart from input_tokens.
    let completion = json!({"id": "c", "model": "gpt", "choices": [{"index": 0,
        "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi"}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 80}}});
    let message = json_of(completion_to_message(completion.to_string().as_bytes()).unwrap());
    assert_eq!(
        message["usage"],
        json!({"input_tokens": 20, "cache_read_input_tokens": 80, "output_tokens": 5})
    );
    let anthropic = json!({"id": "m", "model": "claude", "content": [], "stop_reason": "end_turn",
        "usage": {"input_tokens": 20, "cache_read_input_tokens": 70, "cache_creation_input_tokens": 10,
            "output_tokens": 5}});
    let completion = json_of(message_to_completion(anthropic.to_string().as_bytes()).unwrap());
    assert_eq!(
        completion["usage"],
        json!({"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
            "prompt_tokens_details": {"cached_tokens": 70}})
    );
    // Streams too: the usage chunk of a translated Anthropic stream.
    let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let stream = [
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "m", "model": "claude",
            "usage": {"input_tokens": 20, "cache_read_input_tokens": 70, "output_tokens": 1}}}),
        ),
        ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 5}}),
        ),
        ev("message_stop", json!({"type": "message_stop"})),
    ]
    .concat();
    let chunks = payloads(&anthropic_to_openai().translate(stream.as_bytes()).0);
    let usage = chunks.iter().find_map(|c| c.get("usage")).unwrap();
    assert_eq!(
        usage,
        &json!({"prompt_tokens": 90, "completion_tokens": 5, "total_tokens": 95,
            "prompt_tokens_details": {"cached_tokens": 70}})
    );
}

#[test]
fn a_parameter_of_the_wrong_type_is_refused_by_name() {
    let param = |body: Value, from_openai: bool| {
        let body = body.to_string();
        let result = if from_openai {
            chat_to_messages(body.as_bytes(), "x")
        } else {
            messages_to_chat(body.as_bytes(), "x")
        };
        match result {
            Err(ProxyError::InvalidRequest { param, .. }) => param,
            other => panic!("expected a refusal, got {other:?}"),
        }
    };
    assert_eq!(
        param(json!({"messages": [], "temperature": "hot"}), true),
        Some("temperature")
    );
    assert_eq!(
        param(json!({"messages": [], "max_completion_tokens": -1}), true),
        Some("max_completion_tokens")
    );
    assert_eq!(
        param(json!({"messages": [], "max_tokens": "many"}), false),
        Some("max_tokens")
    );
}

#[test]
fn a_request_read_and_written_in_its_own_format_keeps_its_meaning() {
    // Both codecs read what they write: canonical -> format -> canonical is stable.
    let chat = json!({"model": "a", "temperature": 0.3, "stop": ["x"], "user": "u",
        "tool_choice": {"type": "function", "function": {"name": "f"}}, "parallel_tool_calls": false,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"k\":1}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "r"}]});
    let request = OPENAI.read_request(chat.to_string().as_bytes()).unwrap();
    let pairs: [(&dyn UpstreamCodec, &dyn CallerCodec); 2] =
        [(OPENAI, OPENAI), (ANTHROPIC, ANTHROPIC)];
    for (writer, reader) in pairs {
        let again = reader
            .read_request(&writer.write_request(&request, "m").unwrap())
            .unwrap();
        assert_eq!(again.turns, request.turns);
        assert_eq!(again.tools, request.tools);
        assert_eq!(again.tool_choice, request.tool_choice);
        assert_eq!(again.parallel_tool_calls, Some(false));
        assert_eq!(
            (again.stop, again.user),
            (request.stop.clone(), request.user.clone())
        );
    }
}

// Reasoning

#[test]
fn reasoning_effort_becomes_a_thinking_budget_and_back() {
    let sent = to_messages(
        json!({"model": "x", "reasoning_effort": "high", "max_tokens": 1000,
        "messages": [{"role": "user", "content": "Think."}]}),
    );
    assert_eq!(
        sent["thinking"],
        json!({"type": "enabled", "budget_tokens": 16384})
    );
    // The budget is a part of max_tokens, which still leaves the caller's 1000.
    assert_eq!(sent["max_tokens"], 17384);
    let sent = to_messages(json!({"model": "x", "reasoning_effort": "low",
        "messages": [{"role": "user", "content": "Think."}]}));
    assert_eq!(sent["thinking"]["budget_tokens"], 1024);
    assert_eq!(sent["max_tokens"], 4096);
    let bad = json!({"model": "x", "reasoning_effort": "extreme", "messages": []});
    match chat_to_messages(bad.to_string().as_bytes(), "c") {
        Err(ProxyError::InvalidRequest { param, .. }) => {
            assert_eq!(param, Some("reasoning_effort"))
        }
        other => panic!("{other:?}"),
    }
    let sent = to_chat(json!({"model": "x", "max_tokens": 8000,
        "thinking": {"type": "enabled", "budget_tokens": 3000},
        "messages": [{"role": "user", "content": "Think."}]}));
    assert_eq!(sent["reasoning_effort"], "medium");
    let sent = to_chat(
        json!({"model": "x", "max_tokens": 8000, "thinking": {"type": "disabled"},
        "messages": [{"role": "user", "content": "Think."}]}),
    );
    assert!(sent.get("reasoning_effort").is_none());
}

#[test]
fn signed_reasoning_goes_back_to_anthropic_and_unsigned_reasoning_stays_behind() {
    // An OpenAI caller returning Anthropic's signed reasoning (LiteLLM's thinking_blocks)
    // in a tool-use loop: it reaches Anthropic first in the turn, as Anthropic requires.
    let sent = to_messages(json!({"model": "x", "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": null,
         "thinking_blocks": [{"type": "thinking", "thinking": "Use the tool.", "signature": "sig-1"},
                             {"type": "redacted_thinking", "data": "opaque"}],
         "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"}]}));
    let assistant = &sent["messages"][1]["content"];
    assert_eq!(
        assistant[0],
        json!({"type": "thinking", "thinking": "Use the tool.", "signature": "sig-1"})
    );
    assert_eq!(
        assistant[1],
        json!({"type": "redacted_thinking", "data": "opaque"})
    );
    assert_eq!(assistant[2]["type"], "tool_use");
    // Unsigned reasoning (an OpenAI-compatible provider's reasoning_content) cannot be
    // sent to Anthropic, and OpenAI-compatible providers refuse reasoning in input.
    let sent = to_messages(json!({"model": "x", "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "Greet back."},
        {"role": "user", "content": "Bye"}]}));
    assert_eq!(
        sent["messages"][1]["content"],
        json!([{"type": "text", "text": "Hello"}])
    );
    let sent = to_chat(json!({"model": "x", "max_tokens": 10, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Greet back.", "signature": "sig"},
            {"type": "text", "text": "Hello"}]},
        {"role": "user", "content": "Bye"}]}));
    assert_eq!(
        sent["messages"][1],
        json!({"role": "assistant", "content": "Hello"})
    );
}

#[test]
fn reasoning_in_whole_answers_is_carried_both_ways() {
    let message = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "thinking", "thinking": "Let me see.", "signature": "sig-1"},
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "text", "text": "42"}],
        "stop_reason": "end_turn", "usage": {"input_tokens": 5, "output_tokens": 9}});
    let completion: Value =
        serde_json::from_slice(&message_to_completion(message.to_string().as_bytes()).unwrap())
            .unwrap();
    let reply = &completion["choices"][0]["message"];
    assert_eq!(reply["content"], "42");
    assert_eq!(reply["reasoning_content"], "Let me see.");
    assert_eq!(
        reply["thinking_blocks"],
        json!([{"type": "thinking", "thinking": "Let me see.", "signature": "sig-1"},
               {"type": "redacted_thinking", "data": "opaque"}])
    );

    let completion = json!({"id": "c1", "object": "chat.completion", "model": "deepseek-reasoner",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "42", "reasoning_content": "Let me see."}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 9,
                  "completion_tokens_details": {"reasoning_tokens": 6}}});
    let message: Value =
        serde_json::from_slice(&completion_to_message(completion.to_string().as_bytes()).unwrap())
            .unwrap();
    assert_eq!(
        message["content"],
        json!([{"type": "thinking", "thinking": "Let me see.", "signature": ""},
               {"type": "text", "text": "42"}])
    );
    // Reasoning tokens are a part of output_tokens, which Anthropic does not split.
    assert_eq!(message["usage"]["output_tokens"], 9);
}

#[test]
fn reasoning_in_streams_is_carried_both_ways() {
    let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let stream = [
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {"input_tokens": 3}}}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Hmm."}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig-1"}}),
        ),
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "42"}}),
        ),
    ]
    .concat();
    let (out, broke) = anthropic_to_openai().translate(stream.as_bytes());
    assert_eq!(broke, None);
    let deltas: Vec<Value> = payloads(&out)
        .into_iter()
        .map(|c| c["choices"][0]["delta"].clone())
        .collect();
    assert!(
        deltas.contains(&json!({"reasoning_content": "Hmm."})),
        "{deltas:?}"
    );
    assert!(
        deltas.contains(&json!({"thinking_blocks": [{"type": "thinking", "thinking": "", "signature": "sig-1"}]})),
        "{deltas:?}"
    );
    assert!(deltas.contains(&json!({"content": "42"})), "{deltas:?}");

    let chunk = |delta: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "c", "model": "r", "choices": [{"index": 0, "delta": delta}]})
        )
    };
    let stream = [
        chunk(json!({"role": "assistant", "reasoning_content": "Hmm."})),
        chunk(json!({"reasoning_content": " Yes."})),
        chunk(json!({"content": "42"})),
    ]
    .concat();
    let (out, broke) = openai_to_anthropic().translate(stream.as_bytes());
    assert_eq!(broke, None);
    let events = payloads(&out);
    let starts: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "content_block_start")
        .map(|e| &e["content_block"]["type"])
        .collect();
    assert_eq!(starts, [&json!("thinking"), &json!("text")]);
    let thinking: String = events
        .iter()
        .filter_map(|e| e.pointer("/delta/thinking").and_then(Value::as_str))
        .collect();
    assert_eq!(thinking, "Hmm. Yes.");
    // The thinking block is closed before the text block opens.
    let order: Vec<(&str, u64)> = events
        .iter()
        .filter_map(|e| Some((e["type"].as_str()?, e["index"].as_u64()?)))
        .filter(|(t, _)| t.ends_with("_start") || t.ends_with("_stop"))
        .collect();
    assert_eq!(
        order,
        [
            ("content_block_start", 0),
            ("content_block_stop", 0),
            ("content_block_start", 1)
        ]
    );
}

// Automatic prompt-cache breakpoints

#[test]
fn breakpoints_go_on_the_system_prompt_and_the_last_message() {
    use crate::resources::PromptCache;
    let add = |body: Value, ttl| {
        add_cache_breakpoints(body.to_string().as_bytes(), ttl)
            .map(|b| serde_json::from_slice::<Value>(&b).unwrap())
    };
    let body = json!({"model": "c", "system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        "messages": [{"role": "user", "content": "q1"},
                     {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                                       {"type": "text", "text": "a1"},
                                                       {"type": "thinking", "thinking": "t2", "signature": "s2"}]}]});
    let out = add(body, PromptCache::OneHour).unwrap();
    let hour = json!({"type": "ephemeral", "ttl": "1h"});
    assert!(out["system"][0].get("cache_control").is_none());
    assert_eq!(out["system"][1]["cache_control"], hour);
    // Reasoning blocks are not markable: the last other block is.
    assert_eq!(out["messages"][1]["content"][1]["cache_control"], hour);
    assert!(
        out["messages"][1]["content"][2]
            .get("cache_control")
            .is_none()
    );
    assert_eq!(out["messages"][0]["content"], "q1");
    // Without a system prompt, only the last message.
    let out = add(
        json!({"model": "c", "messages": [{"role": "user", "content": "q"}]}),
        PromptCache::FiveMinutes,
    )
    .unwrap();
    assert!(out.get("system").is_none());
    assert_eq!(
        out["messages"][0]["content"],
        json!([{"type": "text", "text": "q", "cache_control": {"type": "ephemeral"}}])
    );
    // A marker anywhere (here on a tool) and the gateway stands down; so does an
    // unreadable body.
    let marked = json!({"model": "c", "tools": [{"name": "t", "input_schema": {}, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "q"}]});
    assert_eq!(add(marked, PromptCache::FiveMinutes), None);
    assert_eq!(
        add_cache_breakpoints(b"{not json", PromptCache::FiveMinutes),
        None
    );
}

// Gemini

#[test]
fn gemini_refuses_what_it_cannot_express() {
    let gemini: &GeminiContent = &GeminiContent;
    let param =
        |body: Value| match translate_request(body.to_string().as_bytes(), OPENAI, gemini, "g") {
            Err(ProxyError::InvalidRequest { param, .. }) => param,
            other => panic!("{other:?}"),
        };
    let user = json!([{"role": "user", "content": "Hi"}]);
    assert_eq!(
        param(json!({"model": "x", "n": 2, "messages": user})),
        Some("n")
    );
    assert_eq!(
        param(
            json!({"model": "x", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]})
        ),
        Some("messages")
    );
    assert_eq!(
        param(
            json!({"model": "x", "messages": [{"role": "user", "content": "Hi"},
            {"role": "tool", "tool_call_id": "nowhere", "content": "42"}]})
        ),
        Some("messages")
    );
    // A base64 image is sent inline.
    let sent: Value = serde_json::from_slice(
        &translate_request(
            json!({"model": "x", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]}]})
            .to_string()
            .as_bytes(),
            OPENAI,
            gemini,
            "g",
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        sent["contents"][0]["parts"][0],
        json!({"inlineData": {"mimeType": "image/png", "data": "iVBORw0K"}})
    );
}

// Bedrock

const BEDROCK: &BedrockConverse = &BedrockConverse;

fn to_converse(body: Value, caller: &dyn CallerCodec) -> Value {
    serde_json::from_slice(
        &translate_request(body.to_string().as_bytes(), caller, BEDROCK, "b").unwrap(),
    )
    .unwrap()
}

#[test]
fn messages_become_a_converse_request_with_cache_points_tools_and_images() {
    let sent = to_converse(
        json!({"model": "x", "max_tokens": 100, "temperature": 0.5, "stop_sequences": ["END"],
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "get_weather"},
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Look", "cache_control": {"type": "ephemeral"}},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4A"}}]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "tu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "tu_1", "content": "18C"}]}]}),
        ANTHROPIC,
    );
    assert_eq!(
        sent["system"],
        json!([{"text": "Be brief."}, {"cachePoint": {"type": "default"}}])
    );
    assert_eq!(
        sent["inferenceConfig"],
        json!({"maxTokens": 100, "temperature": 0.5, "stopSequences": ["END"]})
    );
    assert_eq!(
        sent["toolConfig"],
        json!({"tools": [{"toolSpec": {"name": "get_weather", "description": "Weather",
                                       "inputSchema": {"json": {"type": "object"}}}}],
               "toolChoice": {"tool": {"name": "get_weather"}}})
    );
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "user", "content": [{"text": "Look"}, {"cachePoint": {"type": "default"}},
                {"image": {"format": "jpeg", "source": {"bytes": "/9j/4A"}}}]},
            {"role": "assistant", "content": [
                {"toolUse": {"toolUseId": "tu_1", "name": "get_weather", "input": {"city": "Paris"}}}]},
            {"role": "user", "content": [
                {"toolResult": {"toolUseId": "tu_1", "content": [{"text": "18C"}]}}]}])
    );
    assert!(sent.get("model").is_none(), "the model is in the URL");
}

#[test]
fn chat_becomes_converse_and_what_it_cannot_say_is_refused() {
    let sent = to_converse(
        json!({"model": "x", "messages": [
            {"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
            {"role": "user", "content": "again"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": "none"}),
        OPENAI,
    );
    assert_eq!(sent["system"], json!([{"text": "S"}]));
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": [{"text": "Hi"}, {"text": "again"}]}]),
        "turns of one role are merged: Converse wants them alternating"
    );
    assert!(
        sent.get("toolConfig").is_none(),
        "tool_choice none leaves the tools out"
    );
    let param =
        |body: Value| match translate_request(body.to_string().as_bytes(), OPENAI, BEDROCK, "b") {
            Err(ProxyError::InvalidRequest { param, .. }) => param,
            other => panic!("{other:?}"),
        };
    assert_eq!(
        param(json!({"model": "x", "n": 2, "messages": [{"role": "user", "content": "Hi"}]})),
        Some("n")
    );
    assert_eq!(
        param(
            json!({"model": "x", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]})
        ),
        Some("messages")
    );
}

#[test]
fn a_converse_answer_becomes_each_callers_answer_with_its_cache_arithmetic() {
    let answer = json!({"output": {"message": {"role": "assistant", "content": [
            {"text": "Calling."},
            {"toolUse": {"toolUseId": "tu_9", "name": "get_weather", "input": {"city": "Paris"}}}]}},
        "stopReason": "tool_use",
        "usage": {"inputTokens": 5, "outputTokens": 7, "totalTokens": 112,
                  "cacheReadInputTokens": 60, "cacheWriteInputTokens": 40}});
    let chat = json_of(
        Conversion::Translate {
            upstream: BEDROCK,
            caller: OPENAI,
        }
        .answer(Bytes::from(answer.to_string()), "br-claude")
        .unwrap(),
    );
    assert_eq!(chat["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(chat["choices"][0]["message"]["content"], "Calling.");
    let call = &chat["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["id"], "tu_9");
    assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
    assert_eq!(chat["usage"]["prompt_tokens"], 105);
    assert_eq!(chat["usage"]["prompt_tokens_details"]["cached_tokens"], 60);
    assert!(chat["id"].as_str().unwrap().starts_with("bedrock-"));
    assert_eq!(
        chat["model"], "br-claude",
        "Bedrock names no model: the gateway's name"
    );
    let message = json_of(
        Conversion::Translate {
            upstream: BEDROCK,
            caller: ANTHROPIC,
        }
        .answer(Bytes::from(answer.to_string()), "br-claude")
        .unwrap(),
    );
    assert_eq!(message["stop_reason"], "tool_use");
    assert_eq!(message["usage"]["input_tokens"], 5);
    assert_eq!(message["usage"]["cache_read_input_tokens"], 60);
    assert_eq!(message["usage"]["cache_creation_input_tokens"], 40);
    let filtered = json!({"output": {"message": {"role": "assistant", "content": []}},
                          "stopReason": "guardrail_intervened", "usage": {}});
    let chat = json_of(
        Conversion::Translate {
            upstream: BEDROCK,
            caller: OPENAI,
        }
        .answer(Bytes::from(filtered.to_string()), "")
        .unwrap(),
    );
    assert_eq!(chat["choices"][0]["finish_reason"], "content_filter");
}

/// Converse stream events as the event-stream converter writes them.
fn converse_events(events: &[(&str, Value)]) -> Vec<u8> {
    let mut converter = crate::formats::eventstream::EventStreamToSse::default();
    let mut out = Vec::new();
    for (name, payload) in events {
        let frame = cloud_mock::provider::bedrock::event_message(name, payload);
        out.extend_from_slice(&converter.push(&frame).unwrap());
    }
    out
}

#[test]
fn a_converse_stream_becomes_each_callers_stream() {
    let run = converse_events(&[
        ("messageStart", json!({"role": "assistant"})),
        (
            "contentBlockDelta",
            json!({"contentBlockIndex": 0, "delta": {"text": "Hel"}}),
        ),
        (
            "contentBlockDelta",
            json!({"contentBlockIndex": 0, "delta": {"text": "lo"}}),
        ),
        ("contentBlockStop", json!({"contentBlockIndex": 0})),
        (
            "contentBlockStart",
            json!({"contentBlockIndex": 1,
            "start": {"toolUse": {"toolUseId": "tu_1", "name": "get_weather"}}}),
        ),
        (
            "contentBlockDelta",
            json!({"contentBlockIndex": 1, "delta": {"toolUse": {"input": "{\"city\":"}}}),
        ),
        (
            "contentBlockDelta",
            json!({"contentBlockIndex": 1, "delta": {"toolUse": {"input": "\"Paris\"}"}}}),
        ),
        ("contentBlockStop", json!({"contentBlockIndex": 1})),
        ("messageStop", json!({"stopReason": "tool_use"})),
        (
            "metadata",
            json!({"usage": {"inputTokens": 10, "outputTokens": 3, "totalTokens": 13},
                            "metrics": {"latencyMs": 5}}),
        ),
    ]);
    let (out, broke) = StreamTranslator::new(BEDROCK, OPENAI).translate(&run);
    assert_eq!(broke, None);
    let chunks = payloads(&out);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello");
    let arguments: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(arguments, r#"{"city":"Paris"}"#);
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "tool_calls")
    );
    assert!(chunks.iter().any(|c| c["usage"]["completion_tokens"] == 3));
    assert!(out.ends_with(b"data: [DONE]\n\n"));

    let (out, broke) = StreamTranslator::new(BEDROCK, ANTHROPIC).translate(&run);
    assert_eq!(broke, None);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains(r#""stop_reason":"tool_use""#), "{text}");
    assert!(text.contains(r#""name":"get_weather""#), "{text}");
    assert!(
        text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
        "{text}"
    );
}

#[test]
fn a_converse_exception_breaks_the_stream() {
    let mut converter = crate::formats::eventstream::EventStreamToSse::default();
    let mut run = converter
        .push(&cloud_mock::provider::bedrock::event_message(
            "messageStart",
            &json!({"role": "assistant"}),
        ))
        .unwrap()
        .to_vec();
    run.extend_from_slice(
        &converter
            .push(&cloud_mock::provider::bedrock::exception_message(
                "modelStreamErrorException",
                "the model broke",
            ))
            .unwrap(),
    );
    let (_, broke) = StreamTranslator::new(BEDROCK, OPENAI).translate(&run);
    assert_eq!(broke, Some(StreamBreak::Upstream("the model broke".into())));
}

// The Responses API, bridged

const RESPONSES: &OpenAiResponses = &OpenAiResponses;

#[test]
fn a_responses_request_becomes_messages_with_its_items() {
    let sent: Value = serde_json::from_slice(
        &translate_request(
            json!({"model": "x", "instructions": "Be brief.", "max_output_tokens": 50,
                "reasoning": {"effort": "low"},
                "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
                "tool_choice": {"type": "function", "name": "get_weather"},
                "input": [
                    {"role": "user", "content": [{"type": "input_text", "text": "Weather?"},
                        {"type": "input_image", "image_url": "data:image/png;base64,iVBO"}]},
                    {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "21C"},
                    {"type": "reasoning", "id": "rs_1", "summary": []}]})
            .to_string()
            .as_bytes(),
            RESPONSES,
            ANTHROPIC,
            "claude-up",
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["thinking"]["budget_tokens"], 1024);
    assert_eq!(
        sent["max_tokens"],
        50 + 1024,
        "room for the answer beside the reasoning"
    );
    assert_eq!(sent["tools"][0]["name"], "get_weather");
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "tool", "name": "get_weather"})
    );
    let messages = sent["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert_eq!(
        messages[0]["content"][1]["source"]["media_type"],
        "image/png"
    );
    assert_eq!(messages[1]["content"][0]["type"], "tool_use");
    assert_eq!(messages[1]["content"][0]["input"], json!({"city": "Paris"}));
    assert_eq!(messages[2]["content"][0]["tool_use_id"], "c1");

    // What a stateless bridge cannot do is refused by name.
    let param = |body: Value| match translate_request(
        body.to_string().as_bytes(),
        RESPONSES,
        ANTHROPIC,
        "c",
    ) {
        Err(ProxyError::InvalidRequest { param, .. }) => param,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        param(json!({"model": "x", "input": "Hi", "previous_response_id": "resp_1"})),
        Some("previous_response_id")
    );
    assert_eq!(
        param(json!({"model": "x", "input": "Hi", "tools": [{"type": "web_search"}]})),
        Some("tools")
    );
    assert_eq!(param(json!({"model": "x"})), Some("input"));
}

#[test]
fn an_answer_becomes_a_response_object() {
    let message = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-up",
        "content": [{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "tu_1", "name": "get_weather", "input": {"city": "Paris"}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 100}});
    let response = json_of(
        Conversion::Translate {
            upstream: ANTHROPIC,
            caller: RESPONSES,
        }
        .answer(Bytes::from(message.to_string()), "")
        .unwrap(),
    );
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "completed");
    assert_eq!(response["id"], "resp_msg_1");
    assert_eq!(response["output"][0]["content"][0]["text"], "Checking.");
    assert_eq!(response["output"][1]["type"], "function_call");
    assert_eq!(response["output"][1]["call_id"], "tu_1");
    assert_eq!(response["output"][1]["arguments"], r#"{"city":"Paris"}"#);
    assert_eq!(response["usage"]["input_tokens"], 105);
    assert_eq!(
        response["usage"]["input_tokens_details"]["cached_tokens"],
        100
    );
    let cut = json!({"id": "msg_2", "type": "message", "role": "assistant", "model": "m",
        "content": [{"type": "text", "text": "Lo"}], "stop_reason": "max_tokens",
        "usage": {"input_tokens": 1, "output_tokens": 1}});
    let response = json_of(
        Conversion::Translate {
            upstream: ANTHROPIC,
            caller: RESPONSES,
        }
        .answer(Bytes::from(cut.to_string()), "")
        .unwrap(),
    );
    assert_eq!(response["status"], "incomplete");
    assert_eq!(
        response["incomplete_details"]["reason"],
        "max_output_tokens"
    );
}

#[test]
fn a_stream_becomes_responses_events_in_order() {
    let run = anthropic_stream().join("");
    let (out, broke) = StreamTranslator::new(ANTHROPIC, RESPONSES).translate(run.as_bytes());
    assert_eq!(broke, None);
    let events: Vec<(String, Value)> = crate::formats::sse::events(&out)
        .map(|e| {
            (
                e.name.unwrap_or_default(),
                serde_json::from_slice(&e.data).unwrap(),
            )
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(*names.last().unwrap(), "response.completed");
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["sequence_number"], i);
    }
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap().to_owned())
        .collect();
    let done = &events.last().unwrap().1["response"];
    assert_eq!(done["output"][0]["content"][0]["text"], text.as_str());
    assert!(done["usage"]["output_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn a_stream_cut_by_the_token_limit_ends_as_response_incomplete() {
    let run = converse_events(&[
        ("messageStart", json!({"role": "assistant"})),
        (
            "contentBlockDelta",
            json!({"contentBlockIndex": 0, "delta": {"text": "Lo"}}),
        ),
        ("messageStop", json!({"stopReason": "max_tokens"})),
        (
            "metadata",
            json!({"usage": {"inputTokens": 3, "outputTokens": 1}}),
        ),
    ]);
    let (out, broke) = StreamTranslator::new(BEDROCK, RESPONSES).translate(&run);
    assert_eq!(broke, None);
    let last = crate::formats::sse::events(&out).last().unwrap();
    assert_eq!(last.name.as_deref(), Some("response.incomplete"));
    let data: Value = serde_json::from_slice(&last.data).unwrap();
    assert_eq!(data["response"]["status"], "incomplete");
    assert_eq!(
        data["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
    assert_eq!(data["response"]["output"][0]["content"][0]["text"], "Lo");
}
