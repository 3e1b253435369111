//! In-process tests of the proxy listener against the mock provider.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

mod common;

use std::time::{Duration, Instant};

use cloud_mock::provider::Script;
use common::*;
use futures_util::StreamExt;
use proxy_core::http::{Hooks, ProxyOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn chat_completion_rewrites_model_and_carries_ids() {
    let h = harness(ProxyOptions::default()).await;
    let r = h.chat(Some(CALLER), hello("gpt")).await;
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from the mock provider."
    );
    assert_eq!(headers["x-aisix-served-by"], "gpt");
    assert_eq!(headers["content-type"], "application/json");
    let request_id = headers["x-aisix-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(request_id).is_ok());
    assert!(uuid::Uuid::parse_str(headers["x-aisix-call-id"].to_str().unwrap()).is_ok());

    let seen = h.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].json()["model"], "up-gpt");
    assert_eq!(seen[0].json()["messages"], hello("gpt")["messages"]);
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {UPSTREAM_SECRET}")
    );
    assert_eq!(seen[0].headers["x-aisix-request-id"], request_id);
}

#[tokio::test]
async fn deepseek_and_custom_openai_compatible_vendors() {
    let h = harness(ProxyOptions::default()).await;
    for (alias, upstream_model, credential) in [
        ("ds-chat", "deepseek-chat", "sk-deepseek"),
        ("custom", "acme-1", "sk-custom"),
    ] {
        let r = h.chat(Some(CALLER), hello(alias)).await;
        assert_eq!(r.status(), 200, "{alias}");
        assert_eq!(r.headers()["x-aisix-served-by"], alias);
        let seen = h.mock.requests().pop().unwrap();
        assert_eq!(seen.path, "/v1/chat/completions");
        assert_eq!(seen.json()["model"], upstream_model);
        assert_eq!(
            seen.headers["authorization"],
            format!("Bearer {credential}")
        );
    }
}

#[tokio::test]
async fn caller_request_ids_are_honoured_only_where_configured() {
    let h = harness(ProxyOptions::default()).await;
    let send = |h: &Harness, name: &'static str, value: &'static str| {
        h.client
            .post(format!("{}/v1/chat/completions", h.url))
            .bearer_auth(CALLER)
            .header(name, value)
            .json(&hello("gpt"))
            .send()
    };
    let r = send(&h, "x-aisix-request-id", "trace-123").await.unwrap();
    assert_eq!(r.headers()["x-aisix-request-id"], "trace-123");
    assert_eq!(
        h.mock.requests()[0].headers["x-aisix-request-id"],
        "trace-123"
    );
    let r = send(&h, "x-request-id", "ingress-9").await.unwrap();
    assert_ne!(r.headers()["x-aisix-request-id"], "ingress-9");
    let r = send(&h, "x-aisix-request-id", "not ok!").await.unwrap();
    assert_ne!(r.headers()["x-aisix-request-id"], "not ok!");

    let options = ProxyOptions {
        request_id_headers: vec![http::HeaderName::from_static("x-request-id")],
        ..ProxyOptions::default()
    };
    let h = harness(options).await;
    let r = send(&h, "x-request-id", "ingress-9").await.unwrap();
    assert_eq!(r.headers()["x-aisix-request-id"], "ingress-9");
}

#[tokio::test]
async fn one_request_id_from_the_caller_to_every_attempt_and_the_usage_event() {
    let (h, recorder) = harness_recording(ProxyOptions::default()).await;
    // `persistent`: two retries of a broken target, then a working one.
    let r = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(CALLER)
        .header("x-aisix-request-id", "req_abc123-orders-svc")
        .json(&hello("persistent"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aisix-request-id"], "req_abc123-orders-svc");
    r.bytes().await.unwrap();
    let attempts = h.mock.requests();
    assert!(attempts.len() >= 3, "{attempts:?}");
    for attempt in &attempts {
        assert_eq!(
            attempt.headers["x-aisix-request-id"],
            "req_abc123-orders-svc"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while recorder.0.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let events = recorder.0.lock().unwrap().clone();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].request_id, "req_abc123-orders-svc");
}

#[tokio::test]
async fn authentication_errors_are_401_invalid_api_key() {
    let h = harness(ProxyOptions::default()).await;
    // An unknown key has no code; a known one that may not be used says why.
    let cases = [
        (
            None,
            "missing API key: send 'Authorization: Bearer <key>'",
            "",
        ),
        (Some("wrong"), "invalid API key", ""),
        (
            Some("disabled-key"),
            "this API key is disabled",
            r#","code":"api_key_disabled""#,
        ),
        (
            Some("expired-key"),
            "this API key has expired",
            r#","code":"api_key_expired""#,
        ),
    ];
    for (key, message, code) in cases {
        let r = h.chat(key, hello("gpt")).await;
        assert!(r.headers().contains_key("x-aisix-request-id"));
        assert!(r.headers().contains_key("x-aisix-call-id"));
        let expected =
            format!(r#"{{"error":{{"message":"{message}","type":"invalid_api_key"{code}}}}}"#);
        assert_eq!(status_and_body(r).await, (401, expected));
    }
    // The same codes in Anthropic's envelope.
    for (key, code) in [
        ("disabled-key", "api_key_disabled"),
        ("expired-key", "api_key_expired"),
    ] {
        let r = h
            .client
            .post(format!("{}/v1/messages", h.url))
            .header("x-api-key", key)
            .json(&json!({"model": "gpt", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["type"], "authentication_error");
        assert_eq!(body["error"]["code"], code);
    }
    let r = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .header("x-api-key", CALLER)
        .json(&hello("gpt"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_body(r).await,
        (401, r#"{"error":{"message":"this route reads the API key from 'Authorization: Bearer <key>', not x-api-key","type":"invalid_api_key"}}"#.into())
    );
    assert!(h.mock.requests().is_empty());
}

#[tokio::test]
async fn allowed_cidrs_use_forwarded_addresses_only_from_trusted_proxies() {
    let forwarded = |h: &Harness, from: &'static str| {
        h.client
            .post(format!("{}/v1/chat/completions", h.url))
            .bearer_auth(CALLER)
            .header("x-forwarded-for", from)
            .json(&hello("fenced"))
            .send()
    };
    // Loopback is not a trusted proxy here: the header is ignored.
    let h = harness(ProxyOptions::default()).await;
    let r = forwarded(&h, "10.1.2.3").await.unwrap();
    assert_eq!(r.status(), 403);
    // Trusted: the forwarded client decides.
    let h = harness(ProxyOptions {
        trusted_proxies: vec!["127.0.0.0/8".parse().unwrap()],
        ..ProxyOptions::default()
    })
    .await;
    let r = forwarded(&h, "10.1.2.3").await.unwrap();
    assert_eq!(r.status(), 200);
    let r = forwarded(&h, "10.1.2.3, 192.0.2.9").await.unwrap();
    assert_eq!(status_and_body(r).await, (403, r#"{"error":{"message":"client address 192.0.2.9 may not use model 'fenced'","type":"permission_denied"}}"#.into()));
}

#[tokio::test]
async fn access_and_request_errors() {
    let h = harness(ProxyOptions {
        body_limit: Some(2048),
        ..ProxyOptions::default()
    })
    .await;
    let r = h.chat(Some("narrow-key"), hello("gpt")).await;
    assert_eq!(status_and_body(r).await, (403, r#"{"error":{"message":"this API key may not use model 'gpt'","type":"permission_denied"}}"#.into()));
    let r = h.chat(Some(CALLER), hello("fenced")).await;
    assert_eq!(status_and_body(r).await, (403, r#"{"error":{"message":"client address 127.0.0.1 may not use model 'fenced'","type":"permission_denied"}}"#.into()));
    let r = h.chat(Some(CALLER), hello("nope")).await;
    assert_eq!(
        status_and_body(r).await,
        (
            404,
            r#"{"error":{"message":"model 'nope' does not exist","type":"model_not_found"}}"#
                .into()
        )
    );
    let r = h.chat(Some(CALLER), json!({"messages": []})).await;
    assert_eq!(status_and_body(r).await, (400, r#"{"error":{"message":"missing required parameter 'model'","type":"invalid_request_error","param":"model"}}"#.into()));
    let r = h.chat(Some(CALLER), json!({"model": "gpt"})).await;
    assert_eq!(status_and_body(r).await, (400, r#"{"error":{"message":"missing required parameter 'messages'","type":"invalid_request_error","param":"messages"}}"#.into()));
    let r = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(CALLER)
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_body(r).await;
    assert_eq!(status, 400);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("request body is not a valid JSON object")
    );

    let big = json!({"model": "gpt", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
    let too_large = r#"{"error":{"message":"request body exceeds the limit of 2048 bytes","type":"invalid_request_error"}}"#;
    let r = h.chat(Some(CALLER), big.clone()).await;
    assert_eq!(status_and_body(r).await, (413, too_large.into()));
    // Chunked, so no Content-Length to check up front.
    let chunks = futures_util::stream::iter(
        big.to_string()
            .into_bytes()
            .chunks(512)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(CALLER)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(status_and_body(r).await, (413, too_large.into()));
    assert!(h.mock.requests().is_empty());
}

#[tokio::test]
async fn upstream_failures_map_to_gateway_errors() {
    let h = harness(ProxyOptions::default()).await;
    let r = h.chat(Some(CALLER), hello("broken")).await;
    assert!(!r.headers().contains_key("x-aisix-served-by"));
    assert_eq!(status_and_body(r).await, (502, r#"{"error":{"message":"the upstream provider failed to answer","type":"upstream_error"}}"#.into()));

    // Nothing listens: the adapter cannot complete the request.
    let r = h.chat(Some(CALLER), hello("unreachable")).await;
    assert_eq!(status_and_body(r).await, (503, r#"{"error":{"message":"the upstream provider of model 'unreachable' cannot be reached","type":"provider_unavailable"}}"#.into()));

    h.mock.set_script_for("up-gpt", Script { status: 429, error_body: Some(r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#.into()), ..Script::default() });
    let r = h.chat(Some(CALLER), hello("gpt")).await;
    assert_eq!(status_and_body(r).await, (429, r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#.into()));

    h.mock.set_script_for(
        "up-gpt",
        Script {
            status: 401,
            error_body: Some(format!(
                r#"{{"error":{{"message":"Incorrect API key provided: {UPSTREAM_SECRET}"}}}}"#
            )),
            ..Script::default()
        },
    );
    let r = h.chat(Some(CALLER), hello("gpt")).await;
    let (status, body) = status_and_body(r).await;
    assert_eq!(status, 401);
    assert!(!body.contains(UPSTREAM_SECRET));
    assert_eq!(
        body,
        r#"{"error":{"message":"the upstream provider rejected the gateway's credential for model 'gpt'","type":"upstream_error","code":"upstream_authentication_failed"}}"#
    );

    h.mock.set_script_for(
        "up-gpt",
        Script {
            status: 418,
            error_body: Some("<html>teapot</html>".into()),
            ..Script::default()
        },
    );
    let r = h.chat(Some(CALLER), hello("gpt")).await;
    assert_eq!(
        status_and_body(r).await,
        (
            418,
            r#"{"error":{"message":"the upstream provider answered 418","type":"upstream_error"}}"#
                .into()
        )
    );
}

#[tokio::test]
async fn slow_upstreams_time_out_with_504() {
    let h = harness(ProxyOptions::default()).await;
    h.mock.set_script_for(
        "up-slow",
        Script {
            headers_delay_ms: 5_000,
            ..Script::default()
        },
    );
    let started = Instant::now();
    let r = h.chat(Some(CALLER), hello("slow")).await;
    let elapsed = started.elapsed();
    assert_eq!(status_and_body(r).await, (504, r#"{"error":{"message":"the upstream provider did not answer within 300 ms","type":"timeout"}}"#.into()));
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn unsupported_adapters_answer_501() {
    let h = harness(ProxyOptions::default()).await;
    let r = h.chat(Some(CALLER), hello("odd")).await;
    assert_eq!(
        status_and_body(r).await,
        (
            501,
            r#"{"error":{"message":"provider adapter 'sagemaker' is not available in this build","type":"not_implemented"}}"#.into()
        )
    );
    assert!(h.mock.requests().is_empty());
}

#[tokio::test]
async fn routing_model_fails_over_to_the_next_target() {
    let h = harness(ProxyOptions::default()).await;
    let r = h.chat(Some(CALLER), hello("auto")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aisix-served-by"], "gpt");
    assert_eq!(h.tried(), ["up-broken", "up-gpt"]);
}

/// Waits out the end of a minute when fewer than 3 s are left, so a test's requests
/// share one rate-limit window.
async fn well_inside_a_minute() {
    let into = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 60_000;
    if into > 57_000 {
        tokio::time::sleep(Duration::from_millis(60_100 - into as u64)).await;
    }
}

fn header<'r>(r: &'r reqwest::Response, name: &str) -> &'r str {
    r.headers()[name].to_str().unwrap()
}

#[tokio::test]
async fn request_limits_refuse_with_429_and_report_their_state_in_headers() {
    let (h, metrics) = harness_counting(ProxyOptions::default()).await;
    well_inside_a_minute().await;
    let r = h.chat(Some("limited-key"), hello("gpt")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "2");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "1");
    let reset = header(&r, "x-ratelimit-reset-requests");
    let seconds: f64 = reset.trim_end_matches('s').parse().unwrap();
    assert!(seconds > 0.0 && seconds <= 60.0, "{reset}");
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "100");
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), "100");
    let r = h.chat(Some("limited-key"), hello("gpt")).await;
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens"),
        "87",
        "13 tokens charged"
    );
    let r = h.chat(Some("limited-key"), hello("gpt")).await;
    let retry_after: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry_after));
    assert!(!r.headers().contains_key("x-ratelimit-limit-requests"));
    assert_eq!(
        status_and_body(r).await,
        (429, r#"{"error":{"message":"rate limit exceeded: 2 requests per minute for this API key","type":"rate_limit_exceeded"}}"#.into())
    );
    assert_eq!(
        h.tried().len(),
        2,
        "the refused request never reached the upstream"
    );
    // Keys without limits carry no x-ratelimit headers.
    let r = h.chat(Some(CALLER), hello("gpt")).await;
    assert!(!r.headers().contains_key("x-ratelimit-limit-requests"));
    // AISIX's family names the scope that refused.
    let text = exposition(&metrics);
    for line in [
        r#"aisix_ratelimit_rejections_total{scope="api_key"} 1"#,
        r#"aisix_ratelimit_rejections_total{scope="model"} 0"#,
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
}

#[tokio::test]
async fn streams_keep_the_usage_chunk_for_callers_who_ask() {
    let h = harness(ProxyOptions::default()).await;
    let mut body = stream_hello("gpt");
    body["stream_options"] = json!({"include_usage": true});
    let text = h.chat(Some(CALLER), body).await.text().await.unwrap();
    assert!(text.contains("\"choices\":[],"), "{text}");
    assert!(text.contains("\"total_tokens\":13"), "{text}");
}

#[tokio::test]
async fn token_limits_are_charged_from_streams_too() {
    let h = harness(ProxyOptions::default()).await;
    well_inside_a_minute().await;
    for remaining in ["20", "7"] {
        let r = h.chat(Some("token-key"), stream_hello("gpt")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), remaining);
        let text = r.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"));
        // The gateway asked for usage; the caller, who did not, does not get the chunk.
        assert!(!text.contains("\"choices\":[]"), "{text}");
    }
    let upstream = &h.mock.requests()[0];
    assert_eq!(upstream.json()["stream_options"]["include_usage"], true);
    let r = h.chat(Some("token-key"), stream_hello("gpt")).await;
    let (status, body) = status_and_body(r).await;
    assert_eq!(status, 429);
    assert!(
        body.contains("20 tokens per minute for this API key"),
        "{body}"
    );
}

#[tokio::test]
async fn concurrency_is_held_until_the_body_ends_and_released_when_the_caller_leaves() {
    let h = harness(ProxyOptions::default()).await;
    h.mock.set_script_for(
        "up-single",
        Script {
            chunks: 50,
            chunk_interval_ms: 100,
            ..Script::default()
        },
    );
    let first = h.chat(Some(CALLER), stream_hello("single")).await;
    assert_eq!(first.status(), 200);
    let r = h.chat(Some(CALLER), stream_hello("single")).await;
    assert_eq!(r.headers()["retry-after"], "1");
    let (status, body) = status_and_body(r).await;
    assert_eq!(status, 429);
    assert!(
        body.contains("1 concurrent requests for model 'single'"),
        "{body}"
    );
    // The caller goes away mid-stream: its slot is freed.
    drop(first);
    let mut admitted = false;
    for _ in 0..50 {
        let r = h.chat(Some(CALLER), hello("gpt")).await;
        assert_eq!(r.status(), 200);
        let r = h.chat(Some(CALLER), stream_hello("single")).await;
        if r.status() == 200 {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted, "the slot of the abandoned stream was never freed");
}

fn says(model: &str, text: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]})
}

#[tokio::test]
async fn input_guardrails_block_before_dispatch_without_echoing_the_match() {
    let h = harness(ProxyOptions::default()).await;
    let r = h
        .chat(
            Some(CALLER),
            says("guarded-in", "tell me the FORBIDDEN-WORD now", false),
        )
        .await;
    assert_eq!(
        status_and_body(r).await,
        (422, r#"{"error":{"message":"the input was blocked by guardrail 'no-secrets'","type":"content_filter"}}"#.into())
    );
    assert!(
        h.tried().is_empty(),
        "a blocked request never reaches the upstream"
    );
    let r = h
        .chat(Some(CALLER), says("guarded-in", "hello", false))
        .await;
    assert_eq!(r.status(), 200);
    // Scoped to its model: the same words pass elsewhere.
    let r = h
        .chat(Some(CALLER), says("gpt", "forbidden-word", false))
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn output_guardrails_block_answers_and_end_streams_with_an_error_event() {
    let (h, metrics) = harness_counting(ProxyOptions::default()).await;
    // The mock answers "Hello from the mock provider.".
    let r = h.chat(Some(CALLER), says("guarded-out", "hi", false)).await;
    assert_eq!(
        status_and_body(r).await,
        (422, r#"{"error":{"message":"the output was blocked by guardrail 'no-mocks'","type":"content_filter"}}"#.into())
    );
    // Streamed in pieces: the text that completes the match is replaced by an error
    // event, and the response is aborted after it, without [DONE].
    let r = h.chat(Some(CALLER), says("guarded-out", "hi", true)).await;
    assert_eq!(r.status(), 200);
    let (text, aborted) = read_stream(r).await;
    assert!(aborted, "{text}");
    assert!(text.starts_with("data: "), "{text}");
    assert!(
        text.trim_end().ends_with(r#"data: {"error":{"message":"the output was blocked by guardrail 'no-mocks'","type":"content_filter"}}"#),
        "{text}"
    );
    assert!(
        !text.contains("[DONE]") && !text.contains("provider"),
        "{text}"
    );
    // Both count as guardrail rejections: the 422 and the stream cut after a 200.
    let exposition = exposition(&metrics);
    assert!(
        exposition.contains("aisix_policy_rejections_total{policy=\"guardrail\"} 2"),
        "{exposition}"
    );
    // Monitor mode lets everything through.
    let r = h
        .chat(Some(CALLER), says("guarded-watch", "forbidden-word", false))
        .await;
    assert_eq!(r.status(), 200);
    let r = h
        .chat(Some(CALLER), says("guarded-watch", "hi", true))
        .await;
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn pii_is_masked_before_the_upstream_and_before_the_caller_whole_and_streamed() {
    let (h, recorder) = harness_recording(ProxyOptions::default()).await;
    // The mock answers "Hello from the mock provider.": the rule masks "mock provider".
    let r = h
        .chat(
            Some(CALLER),
            says("guarded-pii", "mail me at ann.lee@corp.example", false),
        )
        .await;
    let (status, body) = status_and_body(r).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Hello from the [VENDOR_REDACTED]."
    );
    let sent = h.mock.requests()[0].json();
    assert_eq!(
        sent["messages"][0]["content"],
        "mail me at [EMAIL_REDACTED]"
    );
    assert_eq!(sent["model"], "up-gpt");
    // Streamed in pieces, the span split across them: still masked whole.
    let r = h.chat(Some(CALLER), says("guarded-pii", "hi", true)).await;
    let (text, aborted) = read_stream(r).await;
    assert!(!aborted, "{text}");
    let deltas = chat_deltas(&text);
    assert_eq!(deltas, "Hello from the [VENDOR_REDACTED].");
    assert!(!text.contains("provider"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // Each usage event says what the rule did, never the text.
    let deadline = Instant::now() + Duration::from_secs(5);
    while recorder.0.lock().unwrap().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = recorder.0.lock().unwrap().clone();
    let verdicts: Vec<(String, String, Vec<String>)> = events[0]
        .guardrails
        .iter()
        .map(|v| (v.hook.clone(), v.outcome.clone(), v.found.clone()))
        .collect();
    assert_eq!(
        verdicts,
        [
            ("input".into(), "masked".into(), vec!["EMAIL".into()]),
            ("output".into(), "masked".into(), vec!["VENDOR".into()]),
        ]
    );
    assert_eq!(events[1].guardrails[0].outcome, "masked");
    assert!(!format!("{events:?}").contains("ann.lee"));
}

#[tokio::test]
async fn the_response_cache_serves_repeats_per_caller_without_the_upstream_or_token_charges() {
    let h = harness(ProxyOptions {
        cache: Some(proxy_core::pipeline::cache::CacheOptions {
            ttl: Duration::from_secs(60),
            max_entries: std::num::NonZeroUsize::new(100).unwrap(),
            max_entry_bytes: 1 << 20,
            redis: None,
        }),
        ..ProxyOptions::default()
    })
    .await;
    well_inside_a_minute().await;
    let body = says("gpt", "cache me", false);
    let miss = h.chat(Some("token-key"), body.clone()).await;
    assert_eq!(miss.headers()["x-aisix-cache"], "miss");
    assert_eq!(header(&miss, "x-ratelimit-remaining-tokens"), "20");
    let miss_body = miss.text().await.unwrap();
    // The same request written differently: served from the cache.
    let reordered = r#"{ "messages": [{"content": "cache me", "role": "user"}], "stream": false, "model": "gpt" }"#;
    for _ in 0..2 {
        let hit = h
            .client
            .post(format!("{}/v1/chat/completions", h.url))
            .bearer_auth("token-key")
            .header("content-type", "application/json")
            .body(reordered)
            .send()
            .await
            .unwrap();
        assert_eq!(hit.status(), 200);
        assert_eq!(hit.headers()["x-aisix-cache"], "hit");
        assert_eq!(hit.headers()["x-aisix-served-by"], "gpt");
        assert_eq!(
            header(&hit, "x-ratelimit-remaining-tokens"),
            "7",
            "hits charge no tokens"
        );
        assert!(hit.headers().contains_key("x-aisix-call-id"));
        assert_eq!(hit.text().await.unwrap(), miss_body);
    }
    assert_eq!(h.tried().len(), 1, "hits never reach the upstream");
    // Another caller does not share the entry; streams and no-cache requests bypass it.
    let other = h.chat(Some(CALLER), body.clone()).await;
    assert_eq!(other.headers()["x-aisix-cache"], "miss");
    let stream = h.chat(Some(CALLER), says("gpt", "cache me", true)).await;
    assert!(!stream.headers().contains_key("x-aisix-cache"));
    stream.text().await.unwrap();
    let bypass = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(CALLER)
        .header("cache-control", "no-cache")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(bypass.status(), 200);
    assert!(!bypass.headers().contains_key("x-aisix-cache"));
    assert_eq!(h.tried().len(), 4);
}

#[tokio::test]
async fn round_robin_spreads_by_weight() {
    let h = harness(ProxyOptions::default()).await;
    let mut served = Vec::new();
    for _ in 0..8 {
        let r = h.chat(Some(CALLER), hello("spread")).await;
        assert_eq!(r.status(), 200);
        served.push(
            r.headers()["x-aisix-served-by"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    let gpt = served.iter().filter(|s| *s == "gpt").count();
    assert_eq!((gpt, served.len() - gpt), (6, 2), "3:1 weights: {served:?}");
    assert_ne!(
        served[..4].iter().filter(|s| *s == "other").count(),
        0,
        "smooth, not bunched: {served:?}"
    );
}

#[tokio::test]
async fn retries_then_failover_and_cooldown_skips_the_failed_target() {
    let (h, metrics) = harness_counting(ProxyOptions::default()).await;
    let r = h.chat(Some(CALLER), hello("persistent")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aisix-served-by"], "gpt");
    assert_eq!(
        h.tried(),
        ["up-broken", "up-broken", "up-broken", "up-gpt"],
        "2 retries, then the next target"
    );
    // `broken` now cools down (30 s by default): the next request goes straight on.
    let r = h.chat(Some(CALLER), hello("persistent")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.tried()[4..], ["up-gpt"]);
    // AISIX's deployment families count every attempt under the routing model; the
    // first request moved to `gpt`, which answered; the second started there.
    let text = exposition(&metrics);
    for line in [
        r#"aisix_deployment_requests_total{model="persistent",deployment="broken"} 3"#,
        r#"aisix_deployment_failure_responses_total{model="persistent",deployment="broken"} 3"#,
        r#"aisix_deployment_cooled_down_total{model="persistent",deployment="broken"} 1"#,
        r#"aisix_deployment_success_responses_total{model="persistent",deployment="gpt"} 2"#,
        r#"aisix_routing_successful_fallbacks_total{model="persistent"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    assert!(
        !text.contains("aisix_routing_failed_fallbacks_total{"),
        "{text}"
    );
}

#[tokio::test]
async fn a_caller_gone_before_the_answer_began_is_counted_as_cancelled() {
    let (h, metrics) = harness_counting(ProxyOptions::default()).await;
    h.mock.set_script_for(
        "up-gpt",
        Script {
            headers_delay_ms: 2_000,
            ..Script::default()
        },
    );
    let gone = tokio::time::timeout(
        Duration::from_millis(300),
        h.chat(Some(CALLER), hello("gpt")),
    );
    assert!(gone.await.is_err(), "the caller gives up first");
    let line = r#"aisix_proxy_client_cancelled_requests_total{endpoint="/v1/chat/completions",model="gpt"} 1"#;
    let mut text = String::new();
    for _ in 0..50 {
        text = exposition(&metrics);
        if text.contains(line) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(text.contains(line), "{line} missing:\n{text}");
    // An answered request is not.
    h.mock.set_script_for("up-gpt", Script::default());
    assert_eq!(h.chat(Some(CALLER), hello("gpt")).await.status(), 200);
    let text = exposition(&metrics);
    assert!(text.contains(line), "{text}");
}

#[tokio::test]
async fn a_stream_that_broke_after_sending_bytes_is_not_retried() {
    let h = harness(ProxyOptions::default()).await;
    h.mock.set_script_for(
        "up-gpt",
        Script {
            chunks: 5,
            drop_after_chunks: Some(2),
            ..Script::default()
        },
    );
    // `persistent` retries twice per target: `broken` is retried before any byte is
    // sent, `gpt` is not once its stream has begun.
    let r = h.chat(Some(CALLER), stream_hello("persistent")).await;
    assert_eq!(r.status(), 200);
    let (text, aborted) = read_stream(r).await;
    assert!(aborted, "{text}");
    // Two content events, then the gateway's error event.
    assert_eq!(text.matches("data: ").count(), 3, "{text}");
    assert!(text.contains("\"code\":\"stream_cut\""), "{text}");
    assert!(!text.contains("[DONE]"));
    assert_eq!(h.tried(), ["up-broken", "up-broken", "up-broken", "up-gpt"]);
}

#[tokio::test]
async fn failover_on_timeout_transport_and_listed_statuses_but_not_on_other_4xx() {
    let h = harness(ProxyOptions::default()).await;
    h.mock.set_script_for(
        "up-slow",
        Script {
            headers_delay_ms: 5_000,
            ..Script::default()
        },
    );
    h.mock.set_script_for(
        "up-picky",
        Script {
            status: 404,
            ..Script::default()
        },
    );
    let r = h.chat(Some(CALLER), hello("resilient")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aisix-served-by"], "gpt");
    assert_eq!(
        h.tried(),
        ["up-slow", "up-picky", "up-gpt"],
        "the unreachable target never answered"
    );

    // A 400 is the caller's problem: returned at once, no other target tried.
    let h2 = harness(ProxyOptions::default()).await;
    h2.mock.set_script_for(
        "up-slow",
        Script {
            status: 400,
            ..Script::default()
        },
    );
    let r = h2.chat(Some(CALLER), hello("resilient")).await;
    assert_eq!(r.status(), 400);
    assert_eq!(h2.tried(), ["up-slow"]);
}

#[tokio::test]
async fn upstream_429_is_retried_only_with_retry_on_429_and_its_retry_after_is_passed_on() {
    let h = harness(ProxyOptions::default()).await;
    h.mock.set_script_for(
        "up-limited",
        Script {
            status: 429,
            retry_after: Some("1".into()),
            ..Script::default()
        },
    );
    // Without retry_on_429 the 429 is the answer, with the upstream's hint.
    let r = h.chat(Some(CALLER), hello("impatient")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(h.tried(), ["up-limited"]);
    // With it: retried after the hinted second, then the next target.
    let started = Instant::now();
    let r = h.chat(Some(CALLER), hello("patient")).await;
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited for Retry-After"
    );
    assert_eq!(h.tried()[1..], ["up-limited", "up-limited", "up-gpt"]);
}

#[tokio::test]
async fn all_candidates_cooling_down_is_503_with_retry_after_unless_try_anyway() {
    let h = harness(ProxyOptions::default()).await;
    let r = h.chat(Some(CALLER), hello("fragile")).await;
    assert_eq!(r.status(), 502);
    let r = h.chat(Some(CALLER), hello("fragile")).await;
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((29..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(
        status_and_body(r).await,
        (503, r#"{"error":{"message":"every target of model 'fragile' is cooling down after failures","type":"all_candidates_unavailable"}}"#.into())
    );
    assert_eq!(h.tried(), ["up-broken"]);
    // try_anyway tries the cooling target again.
    let r = h.chat(Some(CALLER), hello("stubborn")).await;
    assert_eq!(r.status(), 502);
    assert_eq!(h.tried(), ["up-broken", "up-broken"]);
}

#[tokio::test]
async fn max_fallbacks_bounds_the_targets_tried() {
    let h = harness(ProxyOptions::default()).await;
    let r = h.chat(Some(CALLER), hello("bounded")).await;
    // The last target tried (unreachable) answers: nothing listens there.
    assert_eq!(
        r.status(),
        503,
        "gpt is the second fallback, beyond max_fallbacks 1"
    );
    assert_eq!(h.tried(), ["up-broken"]);
}

#[tokio::test]
async fn stream_chunks_arrive_before_the_upstream_finishes() {
    let h = harness(ProxyOptions::default()).await;
    h.mock.set_script(Script {
        chunks: 4,
        chunk_interval_ms: 300,
        ..Script::default()
    });
    let mut body = hello("gpt");
    body["stream"] = json!(true);
    let started = Instant::now();
    let r = h.chat(Some(CALLER), body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["x-aisix-served-by"], "gpt");
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).starts_with("data: {"));
    let mut all = first.to_vec();
    while let Some(chunk) = stream.next().await {
        all.extend_from_slice(&chunk.unwrap());
    }
    let done_at = started.elapsed();
    // The upstream spends at least 6 x 300 ms on its events; the first must not wait for them.
    assert!(done_at >= Duration::from_millis(1_800), "{done_at:?}");
    assert!(
        first_at < done_at - Duration::from_millis(900),
        "first {first_at:?}, done {done_at:?}"
    );
    let text = String::from_utf8(all).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    // 4 content events and [DONE]: the usage event the gateway asked for is not passed on.
    assert_eq!(text.matches("data: ").count(), 5, "{text}");
    assert_eq!(h.mock.requests()[0].json()["stream"], true);
}

#[tokio::test]
async fn models_lists_only_allowed_aliases() {
    let h = harness(ProxyOptions::default()).await;
    let r = h
        .client
        .get(format!("{}/v1/models", h.url))
        .bearer_auth("narrow-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-aisix-request-id"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(
        (
            data[0]["id"].as_str(),
            data[0]["object"].as_str(),
            data[0]["owned_by"].as_str()
        ),
        (Some("odd"), Some("model"), Some("sagemaker"))
    );
    assert_eq!(data[1]["id"], "other");
    assert!(data[1]["created"].is_u64());

    let r = h
        .client
        .get(format!("{}/v1/models", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn livez_reports_drain() {
    let h = harness(ProxyOptions::default()).await;
    let get = |q: &'static str| h.client.get(format!("{}/livez{q}", h.url)).send();
    assert_eq!(
        status_and_body(get("").await.unwrap()).await,
        (200, "ok".into())
    );
    let (status, body) = status_and_body(get("?verbose=1").await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(body.lines().count() > 1 && body.ends_with("livez check passed"));
    h.draining.cancel();
    let (status, body) = status_and_body(get("").await.unwrap()).await;
    assert_eq!((status, body.ends_with("livez check failed")), (500, true));
    let (status, body) = status_and_body(get("?verbose=1").await.unwrap()).await;
    assert_eq!(
        (
            status,
            body.lines().count() > 1,
            body.ends_with("livez check failed")
        ),
        (500, true, true)
    );
    // Requests are still served while draining, and close their connection.
    let r = h.chat(Some(CALLER), hello("gpt")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["connection"], "close");
    // A keep-alive client sees the connection end after its response.
    let mut tcp = tokio::net::TcpStream::connect(h.url.trim_start_matches("http://"))
        .await
        .unwrap();
    tcp.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("the server kept the connection open while draining")
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 500"));
    h.stop.cancel();
}

#[tokio::test]
async fn unknown_routes_and_methods_use_the_envelope() {
    let h = harness(ProxyOptions::default()).await;
    let r = h
        .client
        .get(format!("{}/v1/nothing", h.url))
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("x-aisix-request-id"));
    assert_eq!(status_and_body(r).await, (404, r#"{"error":{"message":"unknown route: GET /v1/nothing","type":"invalid_request_error"}}"#.into()));
    let r = h
        .client
        .get(format!("{}/v1/chat/completions", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(status_and_body(r).await, (405, r#"{"error":{"message":"method not allowed: GET /v1/chat/completions","type":"invalid_request_error"}}"#.into()));
}

#[tokio::test]
async fn url_rewrites_route_the_rewritten_path_once() {
    let rule = |name: &str, pattern: &str, replacement: &str| proxy_core::http::UrlRewrite {
        name: name.into(),
        pattern: regex::Regex::new(pattern).unwrap(),
        replacement: replacement.into(),
    };
    let h = harness(ProxyOptions {
        url_rewrites: vec![
            rule("strip", "^/openai/(.*)$", "/$1"),
            // Never reached for /openai/...: only the first matching rule applies, once.
            rule("loop", "^/v1/(.*)$", "/nowhere/$1"),
        ]
        .into(),
        ..ProxyOptions::default()
    })
    .await;
    let r = h
        .client
        .post(format!("{}/openai/v1/chat/completions", h.url))
        .bearer_auth(CALLER)
        .json(&hello("gpt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        h.mock.requests().last().unwrap().path,
        "/v1/chat/completions"
    );
    // The query stays; the second rule rewrites a path the first does not match.
    let r = h
        .client
        .get(format!("{}/openai/v1/models?limit=1", h.url))
        .bearer_auth(CALLER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(CALLER)
        .json(&hello("gpt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "rewritten to /nowhere/chat/completions");
}

#[tokio::test]
async fn a_key_expires_at_its_deadline_without_a_config_change() {
    let mock = cloud_mock::provider::MockProvider::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let deadline = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let expires_at = deadline
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let docs = vec![
        (
            "provider_keys/pk1",
            json!({"display_name": "mock", "provider": "openai", "api_base": mock.url(), "api_key": "sk-up"}),
        ),
        (
            "models/m1",
            json!({"display_name": "gpt", "model_name": "up-gpt", "provider_key_id": "pk1"}),
        ),
        (
            "api_keys/k1",
            json!({"key_hash": hash(CALLER), "allowed_models": ["*"], "expires_at": expires_at}),
        ),
    ];
    let (url, _draining, _stop) =
        start_proxy(docs, ProxyOptions::default(), Hooks::default()).await;
    let chat = || {
        reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(CALLER)
            .json(&hello("gpt"))
            .send()
    };
    assert_eq!(chat().await.unwrap().status(), 200);
    while time::OffsetDateTime::now_utc() < deadline + time::Duration::milliseconds(100) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = chat().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "api_key_expired");
}

#[tokio::test]
async fn a_large_over_limit_body_gets_a_readable_413() {
    let (h, metrics) = harness_counting(ProxyOptions {
        body_limit: Some(1 << 20),
        ..ProxyOptions::default()
    })
    .await;
    // 8 MiB, declared and chunked: the caller is still sending when the limit is hit.
    let big =
        json!({"model": "gpt", "messages": [{"role": "user", "content": "x".repeat(8 << 20)}]})
            .to_string();
    let r = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(CALLER)
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .expect("the 413 is readable, not a reset");
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let chunks = futures_util::stream::iter(
        big.into_bytes()
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = h
        .client
        .post(format!("{}/v1/messages", h.url))
        .header("x-api-key", CALLER)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("the 413 is readable, not a reset");
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["type"], "error",
        "Anthropic's envelope on /v1/messages"
    );
    assert!(h.mock.requests().is_empty());
    let text = exposition(&metrics);
    for endpoint in ["/v1/chat/completions", "/v1/messages"] {
        let line = format!(
            "aisix_proxy_request_body_limit_rejections_total{{endpoint=\"{endpoint}\",outcome=\"rejected\"}} 1"
        );
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
}

#[tokio::test]
async fn an_empty_conversation_is_refused_before_any_upstream_call() {
    let h = harness(ProxyOptions::default()).await;
    let r = h
        .chat(Some(CALLER), json!({"model": "gpt", "messages": []}))
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], "messages");
    let r = h
        .client
        .post(format!("{}/v1/messages", h.url))
        .header("x-api-key", CALLER)
        .json(&json!({"model": "gpt", "max_tokens": 8, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(h.mock.requests().is_empty());
}

#[tokio::test]
async fn requests_in_flight_are_counted_by_endpoint_and_model_until_they_end() {
    let (h, metrics) = harness_counting(ProxyOptions::default()).await;
    h.mock.set_script_for(
        "up-gpt",
        Script {
            headers_delay_ms: 500,
            ..Script::default()
        },
    );
    let render = || exposition(&metrics);
    let busy = r#"aisix_proxy_in_flight_requests{endpoint="/v1/chat/completions",model="gpt"} 1"#;
    let call = tokio::spawn({
        let (client, url) = (h.client.clone(), h.url.clone());
        async move {
            client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(CALLER)
                .json(&hello("gpt"))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    let mut text = String::new();
    for _ in 0..40 {
        text = render();
        if text.contains(busy) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(text.contains(busy), "{busy} missing:\n{text}");
    assert_eq!(call.await.unwrap(), 200);
    let text = render();
    assert!(
        text.contains(
            r#"aisix_proxy_in_flight_requests{endpoint="/v1/chat/completions",model="gpt"} 0"#
        ),
        "{text}"
    );
    // Before its model was known it counted under an empty model; nothing is left there.
    assert!(
        text.contains(
            r#"aisix_proxy_in_flight_requests{endpoint="/v1/chat/completions",model=""} 0"#
        ),
        "{text}"
    );
    assert_eq!(metrics.in_flight.get(), 0);
}
