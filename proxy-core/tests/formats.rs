//! In-process tests of the API surface beyond OpenAI chat: Anthropic messages (native and
//! translated), chat completions to Anthropic upstreams, the forwarded OpenAI routes,
//! passthrough, and each route family's error envelope.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

mod common;

use cloud_mock::provider::{Script, ToolCall, Usage};
use common::*;
use proxy_core::formats::sse;
use proxy_core::http::ProxyOptions;
use serde_json::{Value, json};

const WEATHER_TOOL: &str = r#"{"city":"Paris","unit":"celsius"}"#;

fn weather_call() -> Script {
    Script {
        tool_call: Some(ToolCall {
            id: "call_weather_1".into(),
            name: "get_weather".into(),
            arguments: WEATHER_TOOL.into(),
        }),
        ..Script::default()
    }
}

impl Harness {
    /// POSTs `body` to `path` with the caller key in `x-api-key` (Anthropic style).
    async fn anthropic(&self, path: &str, key: Option<&str>, body: Value) -> reqwest::Response {
        let mut r = self
            .client
            .post(format!("{}{path}", self.url))
            .header("anthropic-version", "2023-06-01")
            .json(&body);
        if let Some(key) = key {
            r = r.header("x-api-key", key);
        }
        r.send().await.unwrap()
    }

    async fn openai(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.url))
            .bearer_auth(CALLER)
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

fn messages_hello(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 64, "stream": stream, "system": "Be brief.",
           "messages": [{"role": "user", "content": "Say hello."}]})
}

/// The events of an SSE body: (name, JSON payload or the raw text), and whether the
/// response was aborted.
async fn events_and_end(r: reqwest::Response) -> (Vec<(String, Value)>, bool) {
    let (body, aborted) = read_stream(r).await;
    let events = sse::events(body.as_bytes())
        .map(|e| {
            let data = serde_json::from_slice(&e.data)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&e.data).into()));
            (e.name.unwrap_or_default(), data)
        })
        .collect();
    (events, aborted)
}

/// The events of a stream that ended well.
async fn events(r: reqwest::Response) -> Vec<(String, Value)> {
    let (events, aborted) = events_and_end(r).await;
    assert!(!aborted, "the stream was aborted: {events:?}");
    events
}

/// The text and the tool-call arguments of OpenAI chunks, concatenated.
fn openai_stream_text(chunks: &[(String, Value)]) -> (String, String) {
    let mut text = String::new();
    let mut arguments = String::new();
    for (_, c) in chunks {
        if let Some(t) = c
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            text.push_str(t);
        }
        if let Some(a) = c
            .pointer("/choices/0/delta/tool_calls/0/function/arguments")
            .and_then(Value::as_str)
        {
            arguments.push_str(a);
        }
    }
    (text, arguments)
}

#[tokio::test]
async fn chat_completions_reach_anthropic_upstreams_translated() {
    let h = harness(ProxyOptions::default()).await;
    let body = json!({"model": "claude", "temperature": 0.5, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello."}]});
    let r = h.chat(Some(CALLER), body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aisix-served-by"], "claude");
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.headers().contains_key("x-aisix-call-id"));
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(
        answer["choices"][0]["message"],
        json!({"role": "assistant", "content": "Hello from the mock provider."})
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13})
    );
    let seen = &h.mock.requests()[0];
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.headers["x-api-key"], "sk-ant-upstream");
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    assert!(!seen.headers.contains_key("authorization"));
    assert_eq!(
        seen.json(),
        json!({"model": "claude-x", "system": "Be brief.", "max_tokens": 4096, "temperature": 0.5,
               "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]})
    );
}

#[tokio::test]
async fn chat_streams_from_anthropic_become_openai_chunks() {
    let h = harness(ProxyOptions::default()).await;
    // Without include_usage: no usage chunk; with it: the usage chunk before [DONE].
    for asked in [false, true] {
        let mut body = stream_hello("claude");
        if asked {
            body["stream_options"] = json!({"include_usage": true});
        }
        let r = h.chat(Some(CALLER), body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let chunks = events(r).await;
        assert_eq!(
            openai_stream_text(&chunks).0,
            "Hello from the mock provider."
        );
        assert_eq!(chunks.last().unwrap().1, "[DONE]");
        let usage: Vec<&Value> = chunks
            .iter()
            .filter_map(|(_, c)| c.get("usage").filter(|u| u.is_object()))
            .collect();
        if asked {
            assert_eq!(
                usage,
                [&json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13})]
            );
        } else {
            assert!(usage.is_empty(), "{chunks:?}");
        }
        let finish: Vec<&Value> = chunks
            .iter()
            .filter_map(|(_, c)| {
                c.pointer("/choices/0/finish_reason")
                    .filter(|f| !f.is_null())
            })
            .collect();
        assert_eq!(finish, [&json!("stop")]);
    }
}

#[tokio::test]
async fn tool_calls_cross_both_ways_whole_and_streamed() {
    let h = harness(ProxyOptions::default()).await;
    h.mock.set_script_for("claude-x", weather_call());
    h.mock.set_script_for("up-gpt", weather_call());
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);

    // OpenAI caller, Anthropic upstream.
    let chat = json!({"model": "claude", "tools": tools, "tool_choice": "auto",
        "messages": [{"role": "user", "content": "Weather in Paris?"}]});
    let answer: Value = h
        .chat(Some(CALLER), chat.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
    let call = &answer["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["id"], "call_weather_1");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, serde_json::from_str::<Value>(WEATHER_TOOL).unwrap());
    let sent = h.mock.requests().last().unwrap().json();
    assert_eq!(sent["tools"][0]["name"], "get_weather");
    assert_eq!(
        sent["tools"][0]["input_schema"]["properties"]["city"]["type"],
        "string"
    );
    assert_eq!(sent["tool_choice"], json!({"type": "auto"}));

    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let chunks = events(h.chat(Some(CALLER), streamed).await).await;
    assert_eq!(openai_stream_text(&chunks).1, WEATHER_TOOL);
    assert!(
        chunks
            .iter()
            .any(|(_, c)| c.pointer("/choices/0/finish_reason") == Some(&json!("tool_calls")))
    );

    // Anthropic caller, OpenAI upstream, and the tool result going back.
    let messages = json!({"model": "gpt", "max_tokens": 100,
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "Weather in Paris?"}]});
    let message: Value = h
        .anthropic("/v1/messages", Some(CALLER), messages.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(message["stop_reason"], "tool_use");
    assert_eq!(
        message["content"],
        json!([{"type": "tool_use", "id": "call_weather_1", "name": "get_weather",
                "input": serde_json::from_str::<Value>(WEATHER_TOOL).unwrap()}])
    );
    let mut streamed = messages.clone();
    streamed["stream"] = json!(true);
    let evs = events(h.anthropic("/v1/messages", Some(CALLER), streamed).await).await;
    let partial: String = evs
        .iter()
        .filter_map(|(_, e)| e.pointer("/delta/partial_json").and_then(Value::as_str))
        .collect();
    assert_eq!(partial, WEATHER_TOOL);
    let start = evs
        .iter()
        .find(|(n, _)| n == "content_block_start")
        .unwrap();
    assert_eq!(start.1["content_block"]["type"], "tool_use");
    let delta = evs.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");

    let follow_up = json!({"model": "gpt", "max_tokens": 100, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_weather_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_weather_1", "content": "18C, sunny"}]}]});
    h.mock.set_script_for("up-gpt", Script::default());
    let r = h.anthropic("/v1/messages", Some(CALLER), follow_up).await;
    assert_eq!(r.status(), 200);
    let sent = h.mock.requests().last().unwrap().json();
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": null, "tool_calls": [{"id": "call_weather_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
               {"role": "tool", "tool_call_id": "call_weather_1", "content": "18C, sunny"}])
    );
}

#[tokio::test]
async fn messages_to_openai_upstreams_are_translated() {
    let h = harness(ProxyOptions::default()).await;
    let r = h
        .anthropic("/v1/messages", Some(CALLER), messages_hello("gpt", false))
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-aisix-request-id"));
    assert!(!r.headers().contains_key("x-aisix-call-id"));
    assert_eq!(r.headers()["x-aisix-served-by"], "gpt");
    let message: Value = r.json().await.unwrap();
    assert_eq!(
        (&message["type"], &message["role"], &message["stop_reason"]),
        (&json!("message"), &json!("assistant"), &json!("end_turn"))
    );
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "Hello from the mock provider."}])
    );
    assert_eq!(
        message["usage"],
        json!({"input_tokens": 10, "output_tokens": 3})
    );
    let seen = &h.mock.requests()[0];
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {UPSTREAM_SECRET}")
    );
    assert!(!seen.headers.contains_key("x-api-key"));
    assert_eq!(
        seen.json()["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}])
    );

    let r = h
        .anthropic("/v1/messages", Some(CALLER), messages_hello("gpt", true))
        .await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let evs = events(r).await;
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let text: String = evs
        .iter()
        .filter_map(|(_, e)| e.pointer("/delta/text").and_then(Value::as_str))
        .collect();
    assert_eq!(text, "Hello from the mock provider.");
    let delta = &evs[evs.len() - 2].1;
    assert_eq!(
        delta["usage"],
        json!({"input_tokens": 10, "output_tokens": 3})
    );
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
}

#[tokio::test]
async fn native_messages_and_count_tokens_pass_through() {
    let h = harness(ProxyOptions::default()).await;
    let body = messages_hello("claude", false);
    let r = h
        .client
        .post(format!("{}/v1/messages", h.url))
        .header("x-api-key", CALLER)
        .header("anthropic-version", "2023-01-01")
        .header("anthropic-beta", "tools-2024-04-04")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let message: Value = r.json().await.unwrap();
    assert_eq!(message["model"], "claude-x");
    assert_eq!(
        message["content"][0]["text"],
        "Hello from the mock provider."
    );
    let seen = &h.mock.requests()[0];
    assert_eq!(seen.headers["anthropic-version"], "2023-01-01");
    assert_eq!(seen.headers["anthropic-beta"], "tools-2024-04-04");
    assert_eq!(seen.headers["x-api-key"], "sk-ant-upstream");
    let mut expected = body.clone();
    expected["model"] = json!("claude-x");
    assert_eq!(seen.json(), expected);

    // A native stream is relayed as the upstream sent it.
    let evs = events(
        h.anthropic("/v1/messages", Some(CALLER), messages_hello("claude", true))
            .await,
    )
    .await;
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );

    // Bearer works too on Anthropic-style routes.
    let count = json!({"model": "claude", "messages": [{"role": "user", "content": "hi"}]});
    let r = h
        .client
        .post(format!("{}/v1/messages/count_tokens", h.url))
        .bearer_auth(CALLER)
        .json(&count)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"input_tokens": 10})
    );
    assert_eq!(
        h.mock.requests().last().unwrap().path,
        "/v1/messages/count_tokens"
    );

    let mut count = count;
    count["model"] = json!("gpt");
    let r = h
        .anthropic("/v1/messages/count_tokens", Some(CALLER), count)
        .await;
    assert_eq!(
        status_and_body(r).await,
        (501, r#"{"type":"error","error":{"type":"api_error","message":"provider adapter 'openai' does not implement /v1/messages/count_tokens"}}"#.into())
    );
}

#[tokio::test]
async fn anthropic_routes_answer_in_the_anthropic_envelope() {
    let h = harness(ProxyOptions::default()).await;
    let cases = [
        (
            None,
            messages_hello("claude", false),
            401,
            "authentication_error",
        ),
        (
            Some("wrong-key"),
            messages_hello("claude", false),
            401,
            "authentication_error",
        ),
        (
            Some("narrow-key"),
            messages_hello("claude", false),
            403,
            "permission_error",
        ),
        (
            Some(CALLER),
            messages_hello("nope", false),
            404,
            "not_found_error",
        ),
        (
            Some(CALLER),
            json!({"model": "claude", "messages": "hi"}),
            400,
            "invalid_request_error",
        ),
        (
            Some(CALLER),
            json!({"model": "guarded-in", "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a Forbidden-Word here"}]}]}),
            422,
            "invalid_request_error",
        ),
    ];
    for (key, body, status, kind) in cases {
        let r = h.anthropic("/v1/messages", key, body).await;
        assert_eq!(r.status(), status, "{kind}");
        assert!(r.headers().contains_key("x-aisix-request-id"));
        let envelope: Value = r.json().await.unwrap();
        assert_eq!(envelope["type"], "error");
        assert_eq!(envelope["error"]["type"], kind);
        assert!(envelope["error"]["message"].is_string());
        assert_eq!(
            envelope["error"].as_object().unwrap().len(),
            2,
            "{envelope}"
        );
    }
    assert!(h.mock.requests().is_empty());
}

#[tokio::test]
async fn upstream_errors_keep_their_class_in_the_callers_format() {
    let h = harness(ProxyOptions::default()).await;
    let fail = |status: u16| Script {
        status,
        retry_after: Some("7".into()),
        ..Script::default()
    };
    // Anthropic upstream, OpenAI caller: upstream_error with a specific code.
    for (status, code) in [
        (429, "rate_limit_exceeded"),
        (404, "model_not_found"),
        (400, "invalid_request"),
    ] {
        h.mock.set_script_for("claude-x", fail(status));
        let r = h.chat(Some(CALLER), hello("claude")).await;
        assert_eq!(r.status(), status);
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(retry.as_deref(), (status == 429).then_some("7"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body,
            json!({"error": {"message": format!("mock error {status}"), "type": "upstream_error", "code": code}})
        );
    }
    h.mock.set_script_for(
        "claude-x",
        Script {
            error_body: Some("private detail".into()),
            ..fail(529)
        },
    );
    let r = h.chat(Some(CALLER), hello("claude")).await;
    assert_eq!(
        status_and_body(r).await,
        (502, r#"{"error":{"message":"the upstream provider failed to answer","type":"upstream_error"}}"#.into())
    );
    // OpenAI upstream, Anthropic caller.
    h.mock.set_script_for("up-gpt", fail(400));
    let r = h
        .anthropic("/v1/messages", Some(CALLER), messages_hello("gpt", false))
        .await;
    assert_eq!(
        status_and_body(r).await,
        (400, r#"{"type":"error","error":{"type":"invalid_request_error","message":"mock error 400"}}"#.into())
    );
    h.mock.set_script_for("up-gpt", fail(429));
    let r = h
        .anthropic("/v1/messages", Some(CALLER), messages_hello("gpt", false))
        .await;
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(
        status_and_body(r).await,
        (
            429,
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"mock error 429"}}"#
                .into()
        )
    );
    h.mock.set_script_for(
        "up-gpt",
        Script {
            error_body: Some("private detail".into()),
            ..fail(503)
        },
    );
    let r = h
        .anthropic("/v1/messages", Some(CALLER), messages_hello("gpt", false))
        .await;
    assert_eq!(
        status_and_body(r).await,
        (502, r#"{"type":"error","error":{"type":"api_error","message":"the upstream provider failed to answer"}}"#.into())
    );
}

#[tokio::test]
async fn a_blocked_anthropic_stream_ends_with_an_anthropic_error_event() {
    let h = harness(ProxyOptions::default()).await;
    let r = h
        .anthropic(
            "/v1/messages",
            Some(CALLER),
            messages_hello("guarded-out", true),
        )
        .await;
    assert_eq!(r.status(), 200);
    let (evs, aborted) = events_and_end(r).await;
    assert!(aborted, "a blocked stream must not end cleanly");
    let (name, last) = evs.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(last["type"], "error");
    assert_eq!(last["error"]["type"], "invalid_request_error");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-mocks")
    );
    assert!(!evs.iter().any(|(n, _)| n == "message_stop"));
}

#[tokio::test]
async fn openai_routes_are_forwarded_with_the_model_rewritten() {
    let h = harness(ProxyOptions::default()).await;
    let cases = [
        (
            "/v1/embeddings",
            json!({"model": "gpt", "input": ["a", "b"]}),
            "data",
        ),
        (
            "/v1/completions",
            json!({"model": "gpt", "prompt": "Say"}),
            "choices",
        ),
        (
            "/v1/responses",
            json!({"model": "gpt", "input": "Say hello."}),
            "output",
        ),
        (
            "/v1/rerank",
            json!({"model": "gpt", "query": "red fox", "documents": ["a red fox", "blue"]}),
            "results",
        ),
        (
            "/v1/images/generations",
            json!({"model": "gpt", "prompt": "a fox", "n": 2}),
            "data",
        ),
    ];
    for (path, body, field) in cases {
        let r = h.openai(path, body).await;
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers().contains_key("x-aisix-request-id"), "{path}");
        assert!(!r.headers().contains_key("x-aisix-call-id"), "{path}");
        assert_eq!(r.headers()["x-aisix-served-by"], "gpt", "{path}");
        let answer: Value = r.json().await.unwrap();
        assert!(
            answer[field].as_array().is_some_and(|a| !a.is_empty()),
            "{path}: {answer}"
        );
        let seen = h.mock.requests().pop().unwrap();
        assert_eq!(
            (seen.path.as_str(), &seen.json()["model"]),
            (path, &json!("up-gpt"))
        );
        assert_eq!(
            seen.headers["authorization"],
            format!("Bearer {UPSTREAM_SECRET}")
        );
    }
    let speech = h
        .openai(
            "/v1/audio/speech",
            json!({"model": "gpt", "input": "hi", "voice": "alloy"}),
        )
        .await;
    assert_eq!(speech.headers()["content-type"], "audio/mpeg");
    assert_eq!(speech.bytes().await.unwrap(), "MOCK-AUDIO:hi");

    // Streams of forwarded routes are relayed (completions ask for usage on the
    // caller's behalf and drop it again).
    let r = h
        .openai(
            "/v1/completions",
            json!({"model": "gpt", "prompt": "Say", "stream": true}),
        )
        .await;
    let chunks = events(r).await;
    let text: String = chunks
        .iter()
        .filter_map(|(_, c)| c.pointer("/choices/0/text").and_then(Value::as_str))
        .collect();
    assert_eq!(text, "Hello from the mock provider.");
    assert!(
        chunks
            .iter()
            .all(|(_, c)| c.get("usage").is_none_or(Value::is_null))
    );
    assert_eq!(
        h.mock.requests().last().unwrap().json()["stream_options"]["include_usage"],
        true
    );

    // What the adapter cannot do: 501 in the OpenAI envelope.
    let r = h
        .openai("/v1/embeddings", json!({"model": "claude", "input": "a"}))
        .await;
    assert_eq!(
        status_and_body(r).await,
        (501, r#"{"error":{"message":"provider adapter 'anthropic' does not implement /v1/embeddings","type":"not_implemented"}}"#.into())
    );
    let r = h.openai("/v1/embeddings", json!({"input": "a"})).await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn passthrough_forwards_with_the_gateway_credential() {
    let h = harness(ProxyOptions::default()).await;
    let r = h
        .client
        .get(format!("{}/passthrough/openai/v1/models?limit=2", h.url))
        .bearer_auth(CALLER)
        .header("openai-organization", "org-1")
        .header("cookie", "session=caller")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-aisix-request-id"));
    let list: Value = r.json().await.unwrap();
    assert_eq!(list["object"], "list");
    let seen = h.mock.requests().pop().unwrap();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", "/v1/models")
    );
    assert_eq!(seen.query.as_deref(), Some("limit=2"));
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {UPSTREAM_SECRET}")
    );
    assert_eq!(seen.headers["openai-organization"], "org-1");
    assert!(!seen.headers.contains_key("cookie"));
    assert!(!seen.headers.values().any(|v| v.contains(CALLER)));

    // Anthropic: the caller's x-api-key is replaced by the upstream's.
    let body = json!({"model": "claude-raw", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    let r = h
        .anthropic(
            "/passthrough/anthropic/v1/messages",
            Some(CALLER),
            body.clone(),
        )
        .await;
    assert_eq!(r.status(), 200);
    let seen = h.mock.requests().pop().unwrap();
    assert_eq!(seen.headers["x-api-key"], "sk-ant-upstream");
    assert_eq!(seen.json(), body, "the body goes as sent");

    // Upstream errors come back unchanged.
    h.mock.set_script_for(
        "claude-raw",
        Script {
            status: 418,
            error_body: Some("{\"teapot\":true}".into()),
            ..Script::default()
        },
    );
    let r = h
        .anthropic("/passthrough/anthropic/v1/messages", Some(CALLER), body)
        .await;
    assert_eq!(status_and_body(r).await, (418, "{\"teapot\":true}".into()));

    // Refusals before the upstream is reached.
    let before = h.mock.requests().len();
    let status = |r: reqwest::Response| r.status().as_u16();
    let get = |path: &str, key: &str| {
        h.client
            .get(format!("{}{path}", h.url))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(
        status(get("/passthrough/openai/v1/models", "wrong").await.unwrap()),
        401
    );
    assert_eq!(
        status(
            get("/passthrough/anthropic/v1/models", "narrow-key")
                .await
                .unwrap()
        ),
        403
    );
    assert_eq!(
        status(get("/passthrough/nobody/v1/models", CALLER).await.unwrap()),
        404
    );
    assert_eq!(
        status(
            get("/passthrough/openai/v1%2F..%2Fadmin", CALLER)
                .await
                .unwrap()
        ),
        400
    );
    assert_eq!(
        h.mock.requests().len(),
        before,
        "refused before the upstream"
    );
    // Gateway refusals speak the provider family's envelope.
    let refused: Value = get("/passthrough/anthropic/v1/models", "narrow-key")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&refused["type"], &refused["error"]["type"]),
        (&json!("error"), &json!("permission_error"))
    );
    let refused: Value = get("/passthrough/openai/v1/models", "wrong")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(refused["error"]["type"], "invalid_api_key");
}

#[tokio::test]
async fn guardrails_read_a_forms_text_fields_and_its_answer() {
    let h = harness(ProxyOptions::default()).await;
    let form = |prompt: &str| {
        reqwest::multipart::Form::new()
            .text("model", "guarded-pii")
            .text("prompt", prompt.to_owned())
            .part(
                "file",
                reqwest::multipart::Part::bytes(b"RIFF-fake-wave".to_vec()).file_name("a.wav"),
            )
    };
    let send = |prompt: &str| {
        h.client
            .post(format!("{}/v1/audio/transcriptions", h.url))
            .bearer_auth(CALLER)
            .multipart(form(prompt))
            .send()
    };
    // The answer's text is masked as a chat answer's would be.
    let r = send("names of speakers").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"text": "Hello from the [VENDOR_REDACTED]."})
    );
    // A form cannot be rewritten in place: a mask on it refuses the request.
    let r = send("speaker: ann@corp.example").await.unwrap();
    let (status, body) = status_and_body(r).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("a form upload cannot be masked in place"),
        "{body}"
    );
    assert!(!body.contains("ann@corp.example"));
    assert_eq!(
        h.mock.requests().len(),
        1,
        "the refused form never went upstream"
    );
}

#[tokio::test]
async fn forms_are_routed_by_their_model_field_and_sent_on_intact() {
    let h = harness(ProxyOptions::default()).await;
    let form = || {
        reqwest::multipart::Form::new()
            .text("model", "gpt")
            .text("language", "en")
            .part(
                "file",
                reqwest::multipart::Part::bytes(b"RIFF-fake-wave".to_vec())
                    .file_name("hello.wav")
                    .mime_str("audio/wav")
                    .unwrap(),
            )
    };
    let r = h
        .client
        .post(format!("{}/v1/audio/transcriptions", h.url))
        .bearer_auth(CALLER)
        .multipart(form())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"text": "Hello from the mock provider."})
    );
    let seen = h.mock.requests().pop().unwrap();
    assert_eq!(seen.path, "/v1/audio/transcriptions");
    assert!(seen.headers["content-type"].starts_with("multipart/form-data; boundary="));
    for part in [
        "name=\"model\"\r\n\r\nup-gpt\r\n",
        "name=\"language\"\r\n\r\nen\r\n",
        "filename=\"hello.wav\"",
        "Content-Type: audio/wav\r\n\r\nRIFF-fake-wave\r\n",
    ] {
        assert!(seen.body.contains(part), "{part:?} in {}", seen.body);
    }
    assert!(!seen.body.contains("name=\"model\"\r\n\r\ngpt\r\n"));

    // A form naming a model the key may not use, and a form without a model.
    let r = h
        .client
        .post(format!("{}/v1/audio/transcriptions", h.url))
        .bearer_auth("narrow-key")
        .multipart(form())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = h
        .client
        .post(format!("{}/v1/audio/translations", h.url))
        .bearer_auth(CALLER)
        .multipart(reqwest::multipart::Form::new().text("language", "en"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_body(r).await,
        (400, r#"{"error":{"message":"missing required parameter 'model'","type":"invalid_request_error","param":"model"}}"#.into())
    );
}

#[tokio::test]
async fn usage_is_counted_whatever_the_formats() {
    let (h, recorder) = harness_recording(ProxyOptions::default()).await;
    for stream in [false, true] {
        let mut chat = stream_hello("claude");
        chat["stream"] = json!(stream);
        let calls = [
            h.chat(Some(CALLER), chat).await,
            h.anthropic("/v1/messages", Some(CALLER), messages_hello("gpt", stream))
                .await,
            h.anthropic(
                "/v1/messages",
                Some(CALLER),
                messages_hello("claude", stream),
            )
            .await,
        ];
        for r in calls {
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
    }
    // A stream's event is recorded when its body ends, just after the last byte.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while recorder.0.lock().unwrap().len() < 6 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let events = recorder.0.lock().unwrap().clone();
    let mut seen: Vec<(String, bool, u64, u64)> = events
        .iter()
        .map(|e| {
            (
                e.model.clone(),
                e.stream,
                e.prompt_tokens,
                e.completion_tokens,
            )
        })
        .collect();
    seen.sort();
    let expected = |model: &str, stream| (model.to_owned(), stream, 10, 3);
    assert_eq!(
        seen,
        [
            expected("claude", false),
            expected("claude", false),
            expected("claude", true),
            expected("claude", true),
            expected("gpt", false),
            expected("gpt", true),
        ]
    );
}

#[tokio::test]
async fn rate_limit_headers_come_with_messages_too() {
    let h = harness(ProxyOptions::default()).await;
    let r = h
        .anthropic(
            "/v1/messages",
            Some("limited-key"),
            messages_hello("claude", false),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aisix-served-by"], "claude");
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "2");
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "100");
    assert!(r.headers().contains_key("x-ratelimit-remaining-requests"));
}

#[tokio::test]
async fn passthrough_answers_are_charged_their_tokens() {
    let (h, recorder) = harness_recording(ProxyOptions::default()).await;
    let send = |key: &'static str, body: Value| {
        h.client
            .post(format!("{}/passthrough/openai/v1/chat/completions", h.url))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    let whole = json!({"model": "up-gpt", "messages": [{"role": "user", "content": "hi"}]});
    let streamed = json!({"model": "up-gpt", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]});
    for body in [whole.clone(), streamed] {
        let r = send(CALLER, body).await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let events = recorder.0.lock().unwrap().clone();
    assert_eq!(events.len(), 2, "{events:?}");
    for (event, stream) in events.iter().zip([false, true]) {
        assert_eq!(
            (event.prompt_tokens, event.completion_tokens, event.stream),
            (10, 3, stream),
            "{event:?}"
        );
        // Charged to the model that grants the access (the alphabetically first).
        assert_eq!(event.model, "broken");
        assert_eq!(event.provider, "openai");
    }
    // The caller key's token limit (tpm 20) counts passthrough tokens: 13, then 26.
    for expected in [200, 200, 429] {
        let r = send("token-key", whole.clone()).await.unwrap();
        assert_eq!(r.status(), expected);
        r.bytes().await.unwrap();
    }
}

/// The mock's usage with a prompt-cache hit: 2006 input tokens, 1920 of them read from
/// the cache and 64 written to it.
fn cached_usage() -> Script {
    Script {
        usage: Some(Usage {
            prompt_tokens: 2006,
            completion_tokens: 300,
            cache_read_tokens: 1920,
            cache_write_tokens: 64,
        }),
        ..Script::default()
    }
}

#[tokio::test]
async fn prompt_cache_markers_reach_anthropic_and_cached_tokens_come_back_in_each_format() {
    let (h, recorder) = harness_recording(ProxyOptions::default()).await;
    h.mock.set_script(cached_usage());
    let marker = json!({"type": "ephemeral"});
    let long = json!({"type": "ephemeral", "ttl": "1h"});
    let body = json!({"model": "claude", "messages": [
        {"role": "system", "content": [
            {"type": "text", "text": "You are a careful assistant."},
            {"type": "text", "text": "The long shared context.", "cache_control": long}]},
        {"role": "user", "content": [
            {"type": "text", "text": "The question.", "cache_control": marker}]}],
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}},
                   "cache_control": marker}]});
    let r = h.chat(Some(CALLER), body.clone()).await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    // OpenAI's arithmetic: cached tokens are a part of prompt_tokens.
    assert_eq!(answer["usage"]["prompt_tokens"], 2006);
    assert_eq!(
        answer["usage"]["prompt_tokens_details"]["cached_tokens"],
        1920
    );
    assert_eq!(answer["usage"]["total_tokens"], 2306);
    // The upstream got the markers where the caller put them; the system prompt stays
    // in parts.
    let sent = h.mock.requests().last().unwrap().json();
    assert_eq!(
        sent["system"],
        json!([{"type": "text", "text": "You are a careful assistant."},
               {"type": "text", "text": "The long shared context.", "cache_control": long}])
    );
    assert_eq!(sent["messages"][0]["content"][0]["cache_control"], marker);
    assert_eq!(sent["tools"][0]["cache_control"], marker);

    // Streamed, with the usage chunk asked for.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = events(h.chat(Some(CALLER), streamed).await).await;
    let usage = chunks
        .iter()
        .find_map(|(_, c)| c.get("usage").filter(|u| u.is_object()))
        .unwrap();
    assert_eq!(usage["prompt_tokens"], 2006);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 1920);

    // Anthropic's arithmetic, from an OpenAI upstream's cached tokens: input_tokens
    // leaves the cached part out (OpenAI reports no cache writes).
    let r = h
        .anthropic("/v1/messages", Some(CALLER), messages_hello("gpt", false))
        .await;
    let message: Value = r.json().await.unwrap();
    assert_eq!(message["usage"]["input_tokens"], 2006 - 1920);
    assert_eq!(message["usage"]["cache_read_input_tokens"], 1920);
    assert!(
        message["usage"]
            .get("cache_creation_input_tokens")
            .is_none()
    );
    // Native Anthropic: the upstream's own numbers, and the body as the caller wrote it.
    let mut native = messages_hello("claude", false);
    native["system"] = json!([{"type": "text", "text": "Context.", "cache_control": marker}]);
    let r = h.anthropic("/v1/messages", Some(CALLER), native).await;
    let message: Value = r.json().await.unwrap();
    assert_eq!(message["usage"]["input_tokens"], 2006 - 1920 - 64);
    assert_eq!(message["usage"]["cache_read_input_tokens"], 1920);
    assert_eq!(message["usage"]["cache_creation_input_tokens"], 64);
    let sent = h.mock.requests().last().unwrap().json();
    assert_eq!(sent["system"][0]["cache_control"], marker);

    // Usage events: every input token in prompt_tokens, the cached parts apart.
    let events = recorder.0.lock().unwrap().clone();
    assert_eq!(events.len(), 4);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.prompt_tokens, 2006, "event {i}: {e:?}");
        assert_eq!(e.cache_read_tokens, 1920, "event {i}: {e:?}");
    }
    let writes: Vec<u64> = events.iter().map(|e| e.cache_write_tokens).collect();
    assert_eq!(writes, [64, 64, 0, 64]);
}

#[tokio::test]
async fn automatic_prompt_cache_breakpoints_are_added_unless_the_caller_set_its_own() {
    let (h, recorder) = harness_recording(ProxyOptions::default()).await;
    let marker = json!({"type": "ephemeral"});
    let chat = json!({"model": "claude-auto-cache", "messages": [
        {"role": "system", "content": "A long, shared system prompt."},
        {"role": "user", "content": "The question."}]});
    // Translated (an OpenAI caller), twice: the first call writes the cache, the second
    // reads it, and the caller sees it in its own arithmetic.
    let first: Value = h
        .chat(Some(CALLER), chat.clone())
        .await
        .json()
        .await
        .unwrap();
    let sent = h.mock.requests().last().unwrap().json();
    assert_eq!(
        sent["system"],
        json!([{"type": "text", "text": "A long, shared system prompt.", "cache_control": marker}])
    );
    assert_eq!(
        sent["messages"][0]["content"],
        json!([{"type": "text", "text": "The question.", "cache_control": marker}])
    );
    assert!(
        first["usage"].get("prompt_tokens_details").is_none(),
        "{first}"
    );
    let second: Value = h.chat(Some(CALLER), chat).await.json().await.unwrap();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached > 0, "{second}");
    {
        let events = recorder.0.lock().unwrap();
        assert!(events[0].cache_write_tokens > 0, "{:?}", events[0]);
        assert_eq!(events[0].cache_read_tokens, 0);
        assert_eq!(events[1].cache_read_tokens, cached);
        assert_eq!(events[1].cache_write_tokens, 0);
    }

    // Native (an Anthropic caller), streamed: the body gets the same breakpoints.
    let r = h
        .anthropic(
            "/v1/messages",
            Some(CALLER),
            messages_hello("claude-auto-cache", true),
        )
        .await;
    assert_eq!(r.status(), 200);
    events(r).await;
    let sent = h.mock.requests().last().unwrap().json();
    assert_eq!(sent["system"][0]["cache_control"], marker);
    assert_eq!(sent["messages"][0]["content"][0]["cache_control"], marker);

    // A caller that placed its own breakpoint keeps exactly its own.
    let mut own = messages_hello("claude-auto-cache", false);
    own["messages"] = json!([{"role": "user", "content": [
        {"type": "text", "text": "Context.", "cache_control": marker},
        {"type": "text", "text": "The question."}]}]);
    h.anthropic("/v1/messages", Some(CALLER), own.clone()).await;
    let sent = h.mock.requests().last().unwrap().json();
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["messages"], own["messages"]);
    // A model without the setting sends the body as it came.
    h.anthropic(
        "/v1/messages",
        Some(CALLER),
        messages_hello("claude", false),
    )
    .await;
    let sent = h.mock.requests().last().unwrap().json();
    assert_eq!(sent["system"], "Be brief.");
}
