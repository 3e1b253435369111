//! The mock providers as a client sees them: OpenAI and Anthropic shapes, streaming
//! formats, error envelopes, scripting over HTTP, and recorded requests.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::time::{Duration, Instant};

use cloud_mock::provider::{MockProvider, Script, Usage};
use serde_json::{Value, json};
use tests::http_client;

async fn start() -> MockProvider {
    MockProvider::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

async fn post(url: String, body: Value) -> reqwest::Response {
    http_client()
        .post(url)
        .header("x-api-key", "sk-ant-test")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of an SSE body, and the `event:` names.
fn sse(text: &str) -> (Vec<String>, Vec<String>) {
    let mut names = Vec::new();
    let mut data = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("event: ") {
            names.push(name.to_owned());
        } else if let Some(d) = line.strip_prefix("data: ") {
            data.push(d.to_owned());
        }
    }
    (names, data)
}

#[tokio::test]
async fn openai_routes_answer_in_the_openai_shape() {
    let mock = start().await;
    let url = |path: &str| format!("{}{path}", mock.url());

    let chat = post(
        url("/v1/chat/completions"),
        json!({"model": "gpt", "messages": []}),
    )
    .await;
    assert_eq!(chat.status(), 200);
    let chat: Value = chat.json().await.unwrap();
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(
        chat["choices"][0]["message"]["content"],
        "Hello from the mock provider."
    );
    assert_eq!(chat["usage"]["total_tokens"], 13);

    let streamed = post(
        url("/v1/chat/completions"),
        json!({"model": "gpt", "stream": true, "messages": []}),
    )
    .await;
    assert_eq!(streamed.headers()["content-type"], "text/event-stream");
    let (_, data) = sse(&streamed.text().await.unwrap());
    assert_eq!(data.len(), 3 + 1, "no usage chunk unless asked: {data:?}");
    assert_eq!(data.last().unwrap(), "[DONE]");
    let with_usage = post(
        url("/v1/chat/completions"),
        json!({"model": "gpt", "stream": true, "stream_options": {"include_usage": true}, "messages": []}),
    )
    .await;
    let (_, asked) = sse(&with_usage.text().await.unwrap());
    assert_eq!(asked.len(), 3 + 1 + 1, "{asked:?}");
    let usage: Value = serde_json::from_str(&asked[3]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 13);
    let text: String = data[..3]
        .iter()
        .map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(text, "Hello from the mock provider.");

    let completion: Value = post(
        url("/v1/completions"),
        json!({"model": "gpt", "prompt": "hi"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(
        completion["choices"][0]["text"],
        "Hello from the mock provider."
    );
    let streamed = post(
        url("/v1/completions"),
        json!({"model": "gpt", "prompt": "hi", "stream": true}),
    )
    .await;
    let (_, data) = sse(&streamed.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["object"], "text_completion");

    let embeddings: Value = post(
        url("/v1/embeddings"),
        json!({"model": "emb", "input": ["a", "b"]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(embeddings["data"].as_array().unwrap().len(), 2);
    assert_eq!(embeddings["data"][1]["index"], 1);
    assert_ne!(
        embeddings["data"][0]["embedding"],
        embeddings["data"][1]["embedding"]
    );
    let missing = post(url("/v1/embeddings"), json!({"model": "emb"})).await;
    assert_eq!(missing.status(), 400);

    mock.set_script_for("scripted", Script::default());
    let models: Value = http_client()
        .get(url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["mock-model", "scripted"]);
}

#[tokio::test]
async fn errors_use_each_shapes_envelope_with_retry_after() {
    let mock = start().await;
    mock.set_script(Script {
        status: 429,
        retry_after: Some("7".to_owned()),
        ..Script::default()
    });
    let openai = post(
        format!("{}/v1/chat/completions", mock.url()),
        json!({"model": "gpt"}),
    )
    .await;
    assert_eq!(openai.status(), 429);
    assert_eq!(openai.headers()["retry-after"], "7");
    let body: Value = openai.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");

    for (status, kind) in [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (529, "overloaded_error"),
    ] {
        mock.set_script(Script {
            status,
            ..Script::default()
        });
        let answer = post(
            format!("{}/v1/messages", mock.url()),
            json!({"model": "claude", "max_tokens": 10, "messages": []}),
        )
        .await;
        assert_eq!(answer.status().as_u16(), status);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], kind, "{status}");
    }
    // A scripted body is sent as is.
    mock.set_script(Script {
        status: 502,
        error_body: Some("upstream exploded".to_owned()),
        ..Script::default()
    });
    let answer = post(format!("{}/v1/messages", mock.url()), json!({})).await;
    assert_eq!(answer.status(), 502);
    assert_eq!(answer.text().await.unwrap(), "upstream exploded");
}

#[tokio::test]
async fn anthropic_messages_follow_the_anthropic_shapes() {
    let mock = start().await;
    mock.set_script(Script {
        usage: Some(Usage {
            prompt_tokens: 21,
            completion_tokens: 4,
            ..Usage::default()
        }),
        chunks: 2,
        ..Script::default()
    });
    let url = format!("{}/v1/messages", mock.url());
    let message: Value = post(
        url.clone(),
        json!({"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["content"][0]["type"], "text");
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(
        message["usage"],
        json!({"input_tokens": 21, "output_tokens": 4})
    );

    let streamed = post(
        url,
        json!({"model": "claude", "max_tokens": 10, "stream": true, "messages": []}),
    )
    .await;
    assert_eq!(streamed.headers()["content-type"], "text/event-stream");
    let (names, data) = sse(&streamed.text().await.unwrap());
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let parsed: Vec<Value> = data
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    for (name, value) in names.iter().zip(&parsed) {
        assert_eq!(&value["type"], name);
    }
    assert_eq!(parsed[0]["message"]["usage"]["input_tokens"], 21);
    let text: String = parsed[3..5]
        .iter()
        .map(|v| v["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "Hello from the mock provider.");
    assert_eq!(parsed[6]["delta"]["stop_reason"], "end_turn");
    assert_eq!(parsed[6]["usage"]["output_tokens"], 4);

    let counted: Value = post(
        format!("{}/v1/messages/count_tokens", mock.url()),
        json!({"model": "claude", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(counted, json!({"input_tokens": 21}));
}

#[tokio::test]
async fn scripts_control_timing_and_drops_and_requests_are_recorded() {
    let mock = start().await;
    let http = http_client();
    // Scripted over HTTP, for one model.
    let scripted = http
        .put(format!("{}/_mock/script?model=slow", mock.url()))
        .json(&json!({"headers_delay_ms": 300, "chunks": 4, "chunk_interval_ms": 50}))
        .send()
        .await
        .unwrap();
    assert_eq!(scripted.status(), 204);
    let started = Instant::now();
    let answer = post(
        format!("{}/v1/chat/completions", mock.url()),
        json!({"model": "slow", "stream": true}),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    let (_, data) = sse(&answer.text().await.unwrap());
    assert_eq!(data.len(), 4 + 1, "4 pieces and [DONE]");
    assert!(started.elapsed() >= Duration::from_millis(300 + 5 * 50));

    mock.set_script(Script {
        drop_after_chunks: Some(3),
        ..Script::default()
    });
    let dropped = post(
        format!("{}/v1/messages", mock.url()),
        json!({"model": "claude", "stream": true}),
    )
    .await;
    assert_eq!(dropped.status(), 200);
    assert!(dropped.text().await.is_err(), "the body is cut mid-stream");

    let recorded: Value = http
        .get(format!("{}/_mock/requests", mock.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last = recorded.as_array().unwrap().last().unwrap();
    assert_eq!(last["path"], "/v1/messages");
    assert_eq!(last["headers"]["x-api-key"], "sk-ant-test");
    assert_eq!(mock.requests().len(), 2);
    assert_eq!(mock.requests()[1].json()["model"], "claude");
    http.delete(format!("{}/_mock/requests", mock.url()))
        .send()
        .await
        .unwrap();
    assert!(mock.requests().is_empty());
}
