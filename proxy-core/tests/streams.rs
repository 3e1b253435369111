//! How streams end: at every cut point, in both caller formats, native and translated.
//!
//! Before the first event a failing target is retried or failed over and the caller
//! sees the backup's stream as if nothing happened. After it, the caller's stream ends
//! with an error event in its format and the response is aborted (no terminating
//! chunk), never with a closing event the upstream did not send; the break is in the
//! access record, the metrics and the usage event.

#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

mod common;

use std::sync::Arc;

use cloud_mock::provider::{MockProvider, Script};
use common::{CALLER, Recorder, harness, hash, read_stream, start_proxy, stream_hello};
use proxy_core::formats::sse;
use proxy_core::http::{Hooks, ProxyOptions};
use serde_json::{Value, json};

/// The caller formats.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Caller {
    Chat,
    Messages,
}

/// The upstream formats: the alias prefix of the models speaking them.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Upstream {
    OpenAi,
    Anthropic,
}

impl Upstream {
    fn prefix(self) -> &'static str {
        match self {
            Upstream::OpenAi => "o",
            Upstream::Anthropic => "a",
        }
    }
}

struct Setup {
    url: String,
    mock: MockProvider,
    usage: Arc<Recorder>,
    metrics: Arc<proxy_core::observe::metrics::Metrics>,
}

/// A proxy with, per upstream format, a direct model `<p>-first` (stream timeout
/// 300 ms), a backup `<p>-backup`, a routing model `<p>-failover` over the two, and
/// resumable routing models from each first target to each backup.
async fn setup() -> Setup {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let mut docs = vec![
        (
            "provider_keys/o",
            json!({"display_name": "o", "provider": "openai", "api_base": format!("{}/v1", mock.url()), "api_key": "sk-o"}),
        ),
        (
            "provider_keys/a",
            json!({"display_name": "a", "provider": "anthropic", "api_base": mock.url(), "api_key": "sk-a"}),
        ),
        (
            "api_keys/k1",
            json!({"key_hash": hash(CALLER), "allowed_models": ["*"]}),
        ),
    ];
    for p in ["o", "a"] {
        docs.push((
            leak(format!("models/{p}-first")),
            json!({"display_name": format!("{p}-first"), "model_name": format!("{p}-up-first"),
                   "provider_key_id": p, "stream_timeout": 300}),
        ));
        docs.push((
            leak(format!("models/{p}-backup")),
            json!({"display_name": format!("{p}-backup"), "model_name": format!("{p}-up-backup"),
                   "provider_key_id": p}),
        ));
        docs.push((
            leak(format!("models/{p}-failover")),
            json!({"display_name": format!("{p}-failover"),
                   "routing": {"targets": [{"model": format!("{p}-first")}, {"model": format!("{p}-backup")}]}}),
        ));
    }
    // Resumable: each format to itself, and across formats.
    for (name, first, backup) in [
        ("o-resume", "o-first", "o-backup"),
        ("a-resume", "a-first", "a-backup"),
        ("oa-resume", "o-first", "a-backup"),
        ("ao-resume", "a-first", "o-backup"),
    ] {
        docs.push((
            leak(format!("models/{name}")),
            json!({"display_name": name, "routing": {"resume_streams": true,
                   "targets": [{"model": first}, {"model": backup}]}}),
        ));
    }
    let usage = Arc::new(Recorder::default());
    let hooks = Hooks {
        usage: Some(usage.clone()),
        ..Hooks::default()
    };
    let metrics = hooks.metrics.clone();
    let (url, ..) = start_proxy(docs, ProxyOptions::default(), hooks).await;
    Setup {
        url,
        mock,
        usage,
        metrics,
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

impl Setup {
    async fn stream(&self, caller: Caller, model: &str) -> reqwest::Response {
        let client = reqwest::Client::new();
        let request = match caller {
            Caller::Chat => client
                .post(format!("{}/v1/chat/completions", self.url))
                .bearer_auth(CALLER)
                .json(&json!({"model": model, "stream": true,
                              "messages": [{"role": "user", "content": "Say hello."}]})),
            Caller::Messages => client
                .post(format!("{}/v1/messages", self.url))
                .header("x-api-key", CALLER)
                .header("anthropic-version", "2023-06-01")
                .json(&json!({"model": model, "stream": true, "max_tokens": 64,
                              "messages": [{"role": "user", "content": "Say hello."}]})),
        };
        request.send().await.unwrap()
    }

    fn tried(&self) -> Vec<String> {
        self.mock
            .requests()
            .iter()
            .map(|r| r.json()["model"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

/// The events of a body: (name, JSON data or the raw text).
fn events(text: &str) -> Vec<(String, Value)> {
    sse::events(text.as_bytes())
        .map(|e| {
            let data = serde_json::from_slice(&e.data)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&e.data).into()));
            (e.name.unwrap_or_default(), data)
        })
        .collect()
}

fn closing(caller: Caller) -> &'static str {
    match caller {
        Caller::Chat => "[DONE]",
        Caller::Messages => "message_stop",
    }
}

/// The streamed text of a body in the caller's format.
fn text_of(caller: Caller, events: &[(String, Value)]) -> String {
    let pointer = match caller {
        Caller::Chat => "/choices/0/delta/content",
        Caller::Messages => "/delta/text",
    };
    events
        .iter()
        .filter_map(|(_, data)| data.pointer(pointer).and_then(Value::as_str))
        .collect()
}

const CALLERS: [Caller; 2] = [Caller::Chat, Caller::Messages];
const UPSTREAMS: [Upstream; 2] = [Upstream::OpenAi, Upstream::Anthropic];

/// Cuts after the stream began: (name, script, the code our error event carries, or
/// `None` when the upstream's own error event reaches the caller on a native stream).
fn cuts_after_the_first_event() -> Vec<(&'static str, Script, &'static str)> {
    let base = Script {
        chunks: 6,
        ..Script::default()
    };
    vec![
        (
            "between events",
            Script {
                drop_after_chunks: Some(4),
                ..base.clone()
            },
            "stream_cut",
        ),
        (
            "mid-event",
            Script {
                drop_after_chunks: Some(4),
                drop_mid_event: true,
                ..base.clone()
            },
            "stream_cut",
        ),
        (
            "stall",
            Script {
                pause_after_chunks: Some(4),
                pause_ms: 3_000,
                ..base.clone()
            },
            "stream_stalled",
        ),
        (
            "clean end without the closing event",
            Script {
                end_after_chunks: Some(4),
                ..base.clone()
            },
            "stream_truncated",
        ),
        (
            "upstream error event",
            Script {
                error_after_chunks: Some(4),
                ..base
            },
            "upstream_stream_error",
        ),
    ]
}

#[tokio::test]
async fn a_stream_cut_after_its_first_event_ends_with_an_error_event_and_an_abort() {
    for (cut, script, code) in cuts_after_the_first_event() {
        for caller in CALLERS {
            for upstream in UPSTREAMS {
                let case = format!("{cut}, {caller:?} caller, {upstream:?} upstream");
                let s = setup().await;
                s.mock.set_script(script.clone());
                let started = std::time::Instant::now();
                let r = s
                    .stream(caller, &format!("{}-first", upstream.prefix()))
                    .await;
                assert_eq!(r.status(), 200, "{case}");
                let (body, aborted) = read_stream(r).await;
                assert!(aborted, "{case}: the response ended cleanly:\n{body}");
                assert!(!body.contains(closing(caller)), "{case}:\n{body}");
                let evs = events(&body);
                assert!(
                    !text_of(caller, &evs).is_empty(),
                    "{case}: no text before the cut"
                );
                let (name, last) = evs.last().unwrap();
                let native_error = code == "upstream_stream_error"
                    && matches!(
                        (caller, upstream),
                        (Caller::Chat, Upstream::OpenAi) | (Caller::Messages, Upstream::Anthropic)
                    );
                match caller {
                    Caller::Chat => {
                        assert!(last["error"].is_object(), "{case}: {body}");
                        if !native_error {
                            assert_eq!(last["error"]["type"], "stream_error", "{case}");
                            assert_eq!(last["error"]["code"], code, "{case}");
                        }
                    }
                    Caller::Messages => {
                        assert_eq!(name, "error", "{case}: {body}");
                        assert_eq!(last["type"], "error", "{case}");
                        if !native_error {
                            assert_eq!(last["error"]["type"], "api_error", "{case}");
                        }
                    }
                }
                assert!(
                    started.elapsed() < std::time::Duration::from_millis(2_500),
                    "{case}: took {:?}",
                    started.elapsed()
                );
                // The break is recorded (the usage event is written when the body is
                // dropped, which it now is).
                let usage = s.usage.0.lock().unwrap().clone();
                assert_eq!(usage.len(), 1, "{case}");
                assert_eq!(usage[0].finish_reason.as_deref(), Some(code), "{case}");
                assert!(usage[0].completion_tokens > 0, "{case}: {:?}", usage[0]);
                let metrics = s.metrics.render(Default::default());
                assert!(
                    metrics.contains("kind=\"stream_break\""),
                    "{case}: {metrics}"
                );
                assert_eq!(
                    s.tried().len(),
                    1,
                    "{case}: no failover after the first byte"
                );
            }
        }
    }
}

/// Failures before the first event: (name, script for the first target).
fn failures_before_the_first_event() -> Vec<(&'static str, Script)> {
    vec![
        (
            "5xx",
            Script {
                status: 500,
                ..Script::default()
            },
        ),
        (
            "cut after the head",
            Script {
                drop_after_chunks: Some(0),
                ..Script::default()
            },
        ),
        (
            "cut mid-way through the first event",
            Script {
                drop_after_chunks: Some(0),
                drop_mid_event: true,
                ..Script::default()
            },
        ),
        (
            "first event later than stream_timeout",
            Script {
                chunk_interval_ms: 2_000,
                ..Script::default()
            },
        ),
        (
            "clean end before any event",
            Script {
                end_after_chunks: Some(0),
                ..Script::default()
            },
        ),
        (
            "an error event first",
            Script {
                error_after_chunks: Some(0),
                ..Script::default()
            },
        ),
    ]
}

#[tokio::test]
async fn a_stream_failing_before_its_first_event_fails_over_to_the_backup() {
    for (failure, script) in failures_before_the_first_event() {
        for caller in CALLERS {
            for upstream in UPSTREAMS {
                let case = format!("{failure}, {caller:?} caller, {upstream:?} upstream");
                let s = setup().await;
                let p = upstream.prefix();
                s.mock
                    .set_script_for(&format!("{p}-up-first"), script.clone());
                let started = std::time::Instant::now();
                let r = s.stream(caller, &format!("{p}-failover")).await;
                assert_eq!(r.status(), 200, "{case}");
                assert_eq!(
                    r.headers()["x-aisix-served-by"],
                    format!("{p}-backup").as_str(),
                    "{case}"
                );
                let (body, aborted) = read_stream(r).await;
                assert!(!aborted, "{case}: {body}");
                let evs = events(&body);
                assert_eq!(
                    text_of(caller, &evs),
                    "Hello from the mock provider.",
                    "{case}: {body}"
                );
                assert!(body.contains(closing(caller)), "{case}: {body}");
                assert!(!body.contains("error"), "{case}: {body}");
                assert_eq!(
                    s.tried(),
                    [format!("{p}-up-first"), format!("{p}-up-backup")],
                    "{case}"
                );
                assert!(
                    started.elapsed() < std::time::Duration::from_millis(1_500),
                    "{case}: took {:?}",
                    started.elapsed()
                );
            }
        }
    }
}

#[tokio::test]
async fn a_single_target_failing_before_its_first_event_answers_an_error_response() {
    let s = setup().await;
    s.mock.set_script(Script {
        chunk_interval_ms: 2_000,
        ..Script::default()
    });
    let r = s.stream(Caller::Chat, "o-first").await;
    assert_eq!(r.status(), 504);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "timeout");
    s.mock.set_script(Script {
        drop_after_chunks: Some(0),
        ..Script::default()
    });
    let r = s.stream(Caller::Messages, "a-first").await;
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "api_error");
}

#[tokio::test]
async fn a_whole_stream_ends_cleanly_with_its_closing_event() {
    for caller in CALLERS {
        for upstream in UPSTREAMS {
            let case = format!("{caller:?} caller, {upstream:?} upstream");
            let s = setup().await;
            let r = s
                .stream(caller, &format!("{}-first", upstream.prefix()))
                .await;
            let (body, aborted) = read_stream(r).await;
            assert!(!aborted, "{case}: {body}");
            assert!(body.contains(closing(caller)), "{case}: {body}");
            let usage = s.usage.0.lock().unwrap().clone();
            assert_eq!(usage[0].finish_reason, None, "{case}");
        }
    }
}

/// A script cutting the first target after two pieces of text ("Hello", " from"): the
/// Anthropic stream has three events before its first text.
fn cut_after_two_pieces(upstream: Upstream) -> Script {
    let preamble = match upstream {
        Upstream::OpenAi => 0,
        Upstream::Anthropic => 3,
    };
    Script {
        chunks: 6,
        drop_after_chunks: Some(preamble + 2),
        ..Script::default()
    }
}

#[tokio::test]
async fn a_resumable_stream_cut_mid_answer_reaches_the_caller_whole_from_the_next_target() {
    let routes = [
        ("o-resume", Upstream::OpenAi, Upstream::OpenAi),
        ("a-resume", Upstream::Anthropic, Upstream::Anthropic),
        ("oa-resume", Upstream::OpenAi, Upstream::Anthropic),
        ("ao-resume", Upstream::Anthropic, Upstream::OpenAi),
    ];
    for (model, first, backup) in routes {
        for caller in CALLERS {
            let case = format!("{model}, {caller:?} caller");
            let s = setup().await;
            s.mock.set_script_for(
                &format!("{}-up-first", first.prefix()),
                cut_after_two_pieces(first),
            );
            let r = s.stream(caller, model).await;
            assert_eq!(r.status(), 200, "{case}");
            let (body, aborted) = read_stream(r).await;
            assert!(!aborted, "{case}: {body}");
            let evs = events(&body);
            assert_eq!(
                text_of(caller, &evs),
                "Hello from the mock provider.",
                "{case}: {body}"
            );
            assert!(body.contains(closing(caller)), "{case}: {body}");
            assert!(!body.contains("error"), "{case}: {body}");
            // One answer: one id, one start.
            match caller {
                Caller::Chat => {
                    let ids: std::collections::BTreeSet<&str> =
                        evs.iter().filter_map(|(_, c)| c["id"].as_str()).collect();
                    assert_eq!(ids.len(), 1, "{case}: {body}");
                    let roles = evs
                        .iter()
                        .filter(|(_, c)| c.pointer("/choices/0/delta/role").is_some())
                        .count();
                    assert_eq!(roles, 1, "{case}: {body}");
                }
                Caller::Messages => {
                    let starts = evs.iter().filter(|(n, _)| n == "message_start").count();
                    assert_eq!(starts, 1, "{case}: {body}");
                    let blocks = evs
                        .iter()
                        .filter(|(n, _)| n == "content_block_start")
                        .count();
                    assert_eq!(blocks, 1, "{case}: the text stays in one block: {body}");
                }
            }
            // The backup was asked to continue the text the caller already had.
            let requests = s.mock.requests();
            assert_eq!(requests.len(), 2, "{case}");
            let sent = requests[1].json();
            let last = sent["messages"].as_array().unwrap().last().unwrap().clone();
            assert_eq!(last["role"], "assistant", "{case}: {sent}");
            let prefix = match &last["content"] {
                Value::String(t) => t.clone(),
                blocks => blocks[0]["text"].as_str().unwrap().to_owned(),
            };
            assert_eq!(prefix, "Hello from", "{case}");
            assert_eq!(
                sent["model"],
                format!("{}-up-backup", backup.prefix()),
                "{case}"
            );
            // One usage event: both upstreams' tokens, the break named.
            let usage = s.usage.0.lock().unwrap().clone();
            assert_eq!(usage.len(), 1, "{case}");
            assert_eq!(
                usage[0].finish_reason.as_deref(),
                Some("stream_cut_resumed"),
                "{case}"
            );
            // Two streamed deltas before the cut, three reported by the backup.
            assert_eq!(usage[0].completion_tokens, 5, "{case}: {:?}", usage[0]);
            assert!(usage[0].prompt_tokens >= 10, "{case}: {:?}", usage[0]);
        }
    }
}

#[tokio::test]
async fn a_resumable_stream_with_no_target_left_ends_broken() {
    let s = setup().await;
    for model in ["o-up-first", "o-up-backup"] {
        s.mock
            .set_script_for(model, cut_after_two_pieces(Upstream::OpenAi));
    }
    let r = s.stream(Caller::Chat, "o-resume").await;
    let (body, aborted) = read_stream(r).await;
    assert!(aborted, "{body}");
    let evs = events(&body);
    let (_, last) = evs.last().unwrap();
    assert_eq!(last["error"]["code"], "stream_cut", "{body}");
    // What both targets said reached the caller, as one answer.
    assert!(
        text_of(Caller::Chat, &evs).starts_with("Hello from"),
        "{body}"
    );
    assert_eq!(s.tried(), ["o-up-first", "o-up-backup"]);
    let usage = s.usage.0.lock().unwrap().clone();
    assert_eq!(usage[0].finish_reason.as_deref(), Some("stream_cut"));
}

#[tokio::test]
async fn a_quiet_stream_gets_keep_alive_comments_that_readers_skip() {
    let h = harness(ProxyOptions {
        sse_keepalive: Some(std::time::Duration::from_millis(100)),
        ..ProxyOptions::default()
    })
    .await;
    h.mock.set_script_for(
        "up-gpt",
        Script {
            chunks: 2,
            chunk_interval_ms: 350,
            ..Script::default()
        },
    );
    let (text, aborted) = read_stream(h.chat(Some(CALLER), stream_hello("gpt")).await).await;
    assert!(!aborted, "{text}");
    assert!(text.matches(": keep-alive\n\n").count() >= 4, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let content: String = proxy_core::formats::sse::events(text.as_bytes())
        .filter_map(|e| serde_json::from_slice::<Value>(&e.data).ok())
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")?
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, "Hello from the mock provider.");
}
