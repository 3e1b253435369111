//! Streaming timing: one streamed chat completion, timed from the request to the first
//! body bytes and to the last event.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

/// Time to the first body bytes, and the span from the first event to the last.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub first_chunk: Duration,
    pub span: Duration,
}

pub async fn one(http: &reqwest::Client, url: &str, caller_key: &str) -> Timing {
    let body = serde_json::json!({
        "model": "bench",
        "stream": true,
        "messages": [{"role": "user", "content": "Say hello."}],
    });
    let started = Instant::now();
    let response = http
        .post(url)
        .bearer_auth(caller_key)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("stream from {url}: {e}"));
    assert_eq!(response.status(), 200, "stream from {url}");
    let mut chunks = response.bytes_stream();
    let mut first = None;
    let mut last_event = started;
    let mut text = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("stream from {url}: {e}"));
        let now = Instant::now();
        first.get_or_insert(now);
        text.extend_from_slice(&chunk);
        if text.ends_with(b"\n\n") {
            last_event = now;
        }
    }
    let body = String::from_utf8_lossy(&text);
    assert!(
        body.trim_end().ends_with("data: [DONE]"),
        "stream from {url} ends with [DONE]: {body}"
    );
    let first = first.unwrap_or(started);
    Timing {
        first_chunk: first - started,
        span: last_event - first,
    }
}
