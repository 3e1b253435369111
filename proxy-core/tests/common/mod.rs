//! The in-process proxy every integration test drives: the proxy listener on an
//! ephemeral port, fed a fixed set of resources, in front of the mock provider.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: each test file uses part of the harness"
)]

use std::sync::Arc;

use bytes::Bytes;
use cloud_mock::provider::{MockProvider, Script};
use proxy_core::hooks::{UsageEvent, UsageSink};
use proxy_core::http::{Hooks, ListenerOptions, ProxyOptions, ProxyState, router, serve};
use proxy_core::observe::metrics::Metrics;
use proxy_core::providers::client::Upstream;
use proxy_core::resources::KeyHash;
use proxy_core::snapshot::{SnapshotStore, Source, SourceEvent};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const CALLER: &str = "caller-key-1";
pub const UPSTREAM_SECRET: &str = "sk-upstream-secret";

pub struct Harness {
    pub url: String,
    pub mock: MockProvider,
    pub client: reqwest::Client,
    pub draining: CancellationToken,
    pub stop: CancellationToken,
}

pub fn hash(k: &str) -> String {
    hex::encode(KeyHash::of_plaintext(k).0)
}

pub async fn harness(options: ProxyOptions) -> Harness {
    harness_with(options, Hooks::default()).await
}

/// The harness with its own metrics, to read what the requests recorded.
pub async fn harness_counting(options: ProxyOptions) -> (Harness, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let hooks = Hooks {
        metrics: metrics.clone(),
        ..Hooks::default()
    };
    (harness_with(options, hooks).await, metrics)
}

/// The metrics' exposition, events only.
pub fn exposition(metrics: &Metrics) -> String {
    metrics.render(proxy_core::observe::metrics::Readings::default())
}

/// The harness with the given budget and usage hooks.
pub async fn harness_with(options: ProxyOptions, hooks: Hooks) -> Harness {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let docs = vec![
        (
            "provider_keys/pk1",
            json!({"display_name": "mock", "provider": "openai", "api_base": format!("{}/v1", mock.url()), "api_key": UPSTREAM_SECRET}),
        ),
        (
            "provider_keys/ds",
            json!({"display_name": "deepseek", "provider": "deepseek", "api_base": mock.url(), "api_key": "sk-deepseek"}),
        ),
        (
            "provider_keys/custom",
            json!({"display_name": "custom", "provider": "acme-llm", "adapter": "openai", "api_base": format!("{}/v1/", mock.url()), "secret": "sk-custom"}),
        ),
        (
            "provider_keys/dead",
            json!({"display_name": "dead", "provider": "acme", "api_base": format!("http://{closed}"), "secret": "x"}),
        ),
        (
            "provider_keys/anth",
            json!({"display_name": "anth", "provider": "anthropic", "api_base": mock.url(), "api_key": "sk-ant-upstream"}),
        ),
        (
            "provider_keys/odd",
            json!({"display_name": "odd", "provider": "sagemaker", "adapter": "sagemaker", "api_base": "http://127.0.0.1:9", "api_key": "x"}),
        ),
        (
            "models/m1",
            json!({"display_name": "gpt", "model_name": "up-gpt", "provider_key_id": "pk1"}),
        ),
        (
            "models/m2",
            json!({"display_name": "slow", "model_name": "up-slow", "provider_key_id": "pk1", "timeout": 300}),
        ),
        (
            "models/m3",
            json!({"display_name": "broken", "model_name": "up-broken", "provider_key_id": "pk1"}),
        ),
        (
            "models/m4",
            json!({"display_name": "unreachable", "model_name": "x", "provider_key_id": "dead"}),
        ),
        (
            "models/m5",
            json!({"display_name": "other", "model_name": "up-other", "provider_key_id": "pk1"}),
        ),
        (
            "models/m6",
            json!({"display_name": "fenced", "model_name": "up-gpt", "provider_key_id": "pk1", "allowed_cidrs": ["10.0.0.0/8"]}),
        ),
        (
            "models/m7",
            json!({"display_name": "claude", "model_name": "claude-x", "provider_key_id": "anth"}),
        ),
        (
            "models/pc1",
            json!({"display_name": "claude-auto-cache", "model_name": "claude-x", "provider_key_id": "anth",
                   "prompt_cache": {"auto": true, "ttl": "5m"}}),
        ),
        (
            "models/m8",
            json!({"display_name": "odd", "model_name": "x", "provider_key_id": "odd"}),
        ),
        (
            "models/m9",
            json!({"display_name": "stalls", "model_name": "up-stalls", "provider_key_id": "pk1", "stream_timeout": 200}),
        ),
        (
            "models/d1",
            json!({"display_name": "ds-chat", "provider": "deepseek", "model_name": "deepseek-chat", "provider_key_id": "ds"}),
        ),
        (
            "models/c1",
            json!({"display_name": "custom", "model_name": "acme-1", "provider_key_id": "custom"}),
        ),
        (
            "models/r1",
            json!({"display_name": "auto", "routing": {"targets": [{"model": "gpt"}, {"model": "broken", "priority": 5}]}}),
        ),
        (
            "models/m10",
            json!({"display_name": "limited", "model_name": "up-limited", "provider_key_id": "pk1"}),
        ),
        (
            "models/m11",
            json!({"display_name": "picky", "model_name": "up-picky", "provider_key_id": "pk1"}),
        ),
        (
            "models/r2",
            json!({"display_name": "spread", "routing": {"strategy": "round_robin", "targets": [{"model": "gpt", "weight": 3}, {"model": "other"}]}}),
        ),
        (
            "models/r3",
            json!({"display_name": "persistent", "routing": {"retries": 2, "targets": [{"model": "broken"}, {"model": "gpt"}]}}),
        ),
        (
            "models/r4",
            json!({"display_name": "resilient", "routing": {"targets": [{"model": "slow"}, {"model": "unreachable"}, {"model": "picky"}, {"model": "gpt"}], "fallback_on_statuses": [404]}}),
        ),
        (
            "models/r5",
            json!({"display_name": "patient", "routing": {"retries": 1, "retry_on_429": true, "targets": [{"model": "limited"}, {"model": "gpt"}]}}),
        ),
        (
            "models/r6",
            json!({"display_name": "impatient", "routing": {"retries": 1, "targets": [{"model": "limited"}, {"model": "gpt"}]}}),
        ),
        (
            "models/r7",
            json!({"display_name": "fragile", "routing": {"targets": [{"model": "broken"}]}}),
        ),
        (
            "models/r8",
            json!({"display_name": "stubborn", "routing": {"targets": [{"model": "broken"}], "when_all_unavailable": "try_anyway"}}),
        ),
        (
            "models/r9",
            json!({"display_name": "bounded", "routing": {"targets": [{"model": "broken"}, {"model": "unreachable"}, {"model": "gpt"}], "max_fallbacks": 1}}),
        ),
        (
            "api_keys/k1",
            json!({"key_hash": hash(CALLER), "allowed_models": ["*"]}),
        ),
        (
            "api_keys/k5",
            json!({"key_hash": hash("limited-key"), "allowed_models": ["*"], "rate_limit": {"rpm": 2, "tpm": 100}}),
        ),
        (
            "api_keys/k6",
            json!({"key_hash": hash("token-key"), "allowed_models": ["*"], "rate_limit": {"tpm": 20}}),
        ),
        (
            "models/m12",
            json!({"display_name": "single", "model_name": "up-single", "provider_key_id": "pk1", "rate_limit": {"concurrency": 1}}),
        ),
        (
            "models/g1",
            json!({"display_name": "guarded-in", "model_name": "up-gpt", "provider_key_id": "pk1"}),
        ),
        (
            "models/g2",
            json!({"display_name": "guarded-out", "model_name": "up-gpt", "provider_key_id": "pk1"}),
        ),
        (
            "models/g3",
            json!({"display_name": "guarded-watch", "model_name": "up-gpt", "provider_key_id": "pk1"}),
        ),
        (
            "guardrails/gr1",
            json!({"name": "no-secrets", "hook_point": "input", "models": ["guarded-in"],
                   "patterns": [{"kind": "literal", "value": "Forbidden-Word"}]}),
        ),
        (
            "guardrails/gr2",
            json!({"name": "no-mocks", "hook_point": "output", "models": ["guarded-out"],
                   "patterns": [{"kind": "regex", "value": "mock\\s+provider"}]}),
        ),
        (
            "models/g4",
            json!({"display_name": "guarded-pii", "model_name": "up-gpt", "provider_key_id": "pk1"}),
        ),
        (
            "guardrails/gr4",
            json!({"name": "pii", "kind": "pii", "window_size": 20, "window_overlap_size": 16,
                   "detectors": [{"type": "email"}],
                   "custom_patterns": [{"name": "vendor", "regex": "mock\\s+provider"}]}),
        ),
        (
            "guardrail_attachments/ga4",
            json!({"guardrail_id": "gr4", "scope_type": "model", "scope_id": "guarded-pii"}),
        ),
        (
            "guardrails/gr3",
            json!({"name": "watcher", "enforcement_mode": "monitor", "models": ["guarded-watch"],
                   "patterns": [{"kind": "literal", "value": "forbidden-word"}, {"kind": "literal", "value": "mock provider"}]}),
        ),
        (
            "api_keys/k2",
            json!({"key_hash": hash("disabled-key"), "allowed_models": ["*"], "disabled": true}),
        ),
        (
            "api_keys/k3",
            json!({"key_hash": hash("expired-key"), "allowed_models": ["*"], "expires_at": "2020-01-01T00:00:00Z"}),
        ),
        (
            "api_keys/k4",
            json!({"key_hash": hash("narrow-key"), "allowed_models": ["o*"]}),
        ),
    ];
    mock.set_script_for(
        "up-broken",
        Script {
            status: 500,
            error_body: Some("internal secret detail".into()),
            ..Script::default()
        },
    );

    let (url, draining, stop) = start_proxy(docs, options, hooks).await;
    Harness {
        url,
        mock,
        client: reqwest::Client::new(),
        draining,
        stop,
    }
}

/// A proxy on an ephemeral port serving exactly `docs` (`<kind>/<id>` and the
/// document); every document must be accepted.
pub async fn start_proxy(
    docs: Vec<(&str, Value)>,
    options: ProxyOptions,
    hooks: Hooks,
) -> (String, CancellationToken, CancellationToken) {
    let store = Arc::new(SnapshotStore::new("/aisix"));
    start_proxy_on(store, docs, options, hooks).await
}

/// [`start_proxy`] on `store`, which the test may change afterwards.
pub async fn start_proxy_on(
    store: Arc<SnapshotStore>,
    docs: Vec<(&str, Value)>,
    options: ProxyOptions,
    hooks: Hooks,
) -> (String, CancellationToken, CancellationToken) {
    let entries = docs
        .into_iter()
        .map(|(k, v)| (format!("/aisix/{k}"), Bytes::from(v.to_string())))
        .collect();
    let report = store.apply(
        Source::File,
        [SourceEvent::Reset {
            entries,
            revision: 1,
        }],
    );
    assert!(
        report.newly_rejected.is_empty(),
        "{:?}",
        report.newly_rejected
    );
    let draining = CancellationToken::new();
    let stop = CancellationToken::new();
    let state = ProxyState::new(
        store,
        Upstream::new().unwrap(),
        options,
        draining.clone(),
        Default::default(),
        hooks,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(
        listener,
        router(state),
        stop.clone(),
        ListenerOptions::plain("proxy"),
    ));
    (url, draining, stop)
}

impl Harness {
    /// The upstream model of every request the mock received, in order.
    pub fn tried(&self) -> Vec<String> {
        self.mock
            .requests()
            .iter()
            .map(|r| r.json()["model"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    pub async fn chat(&self, key: Option<&str>, body: Value) -> reqwest::Response {
        let mut r = self
            .client
            .post(format!("{}/v1/chat/completions", self.url))
            .json(&body);
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        r.send().await.unwrap()
    }
}

pub fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hello."}]})
}

pub fn stream_hello(model: &str) -> Value {
    json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "Say hello."}]})
}

/// A streamed body read to its end: the text, and whether the response was aborted
/// (the connection closed without the terminating chunk).
pub async fn read_stream(r: reqwest::Response) -> (String, bool) {
    use futures_util::StreamExt;
    let mut body = r.bytes_stream();
    let mut text = Vec::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => text.extend_from_slice(&chunk),
            Err(_) => return (String::from_utf8_lossy(&text).into_owned(), true),
        }
    }
    (String::from_utf8_lossy(&text).into_owned(), false)
}

/// The text an OpenAI chat stream's deltas put together.
pub fn chat_deltas(stream: &str) -> String {
    stream
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// The harness with a usage sink that keeps every event.
pub async fn harness_recording(options: ProxyOptions) -> (Harness, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let hooks = Hooks {
        usage: Some(recorder.clone()),
        ..Hooks::default()
    };
    (harness_with(options, hooks).await, recorder)
}

pub async fn status_and_body(r: reqwest::Response) -> (u16, String) {
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Collects usage events.
#[derive(Default)]
pub struct Recorder(pub std::sync::Mutex<Vec<UsageEvent>>);

impl UsageSink for Recorder {
    fn record(&self, event: UsageEvent) {
        self.0.lock().unwrap().push(event);
    }
}
