//! Attacks from the security review, each reproduced against the in-process proxy:
//! guardrails bypassed by nesting, upstream redirects, non-JSON success answers, and
//! passthrough skipping the access rules and guardrails of the models that grant it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use cloud_mock::provider::MockProvider;
use common::{CALLER, hash, start_proxy};
use proxy_core::http::{Hooks, ProxyOptions};
use serde_json::{Value, json};
use tokio::net::TcpListener;

async fn serve(router: Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// A client that does not follow redirects either, so what the proxy answers is seen.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn caller_key() -> (&'static str, Value) {
    (
        "api_keys/k1",
        json!({"key_hash": hash(CALLER), "allowed_models": ["*"]}),
    )
}

async fn chat(url: &str, body: Value) -> (u16, String) {
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(CALLER)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn upstream_redirects_are_relayed_or_refused_never_followed() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let internal = serve(Router::new().fallback(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async { "internal secret" }
    }))
    .await;
    let target = format!("{internal}/internal");
    let location = target.clone();
    let redirector = serve(Router::new().fallback(move || {
        let location = location.clone();
        async move { (StatusCode::FOUND, [(header::LOCATION, location)]) }
    }))
    .await;
    let docs = vec![
        (
            "provider_keys/hop",
            json!({"display_name": "hop", "provider": "openai", "api_base": format!("{redirector}/v1"), "api_key": "sk-hop"}),
        ),
        (
            "models/m1",
            json!({"display_name": "hop", "model_name": "up", "provider_key_id": "hop"}),
        ),
        caller_key(),
    ];
    let (url, _, _) = start_proxy(docs, ProxyOptions::default(), Hooks::default()).await;

    for stream in [false, true] {
        let (status, body) = chat(
            &url,
            json!({"model": "hop", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(status, 502, "stream {stream}: {body}");
        assert!(!body.contains("internal secret"), "{body}");
    }
    let relayed = client()
        .get(format!("{url}/passthrough/openai/v1/models"))
        .bearer_auth(CALLER)
        .send()
        .await
        .unwrap();
    assert_eq!(relayed.status(), 302);
    assert_eq!(relayed.headers()["location"], target.as_str());
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
}

#[tokio::test]
async fn success_answers_that_are_not_json_are_upstream_errors() {
    let upstream = serve(Router::new().fallback(|body: String| async move {
        let asked: Value = serde_json::from_str(&body).unwrap_or_default();
        match asked["model"].as_str() {
            Some("html") => (
                [(header::CONTENT_TYPE, "text/html")],
                "<html>secret page</html>",
            )
                .into_response(),
            Some("cut") => (
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"id":"x","choices":[{"message":"#,
            )
                .into_response(),
            // Asked to stream, answers one JSON document.
            _ => (
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"secret":"page"}"#,
            )
                .into_response(),
        }
    }))
    .await;
    let mut docs = vec![
        (
            "provider_keys/odd",
            json!({"display_name": "odd", "provider": "openai", "api_base": format!("{upstream}/v1"), "api_key": "sk-odd"}),
        ),
        caller_key(),
    ];
    for (id, alias) in [
        ("models/a", "html"),
        ("models/b", "cut"),
        ("models/c", "json"),
    ] {
        docs.push((
            id,
            json!({"display_name": alias, "model_name": alias, "provider_key_id": "odd"}),
        ));
    }
    let (url, _, _) = start_proxy(docs, ProxyOptions::default(), Hooks::default()).await;
    for (model, stream) in [("html", false), ("cut", false), ("json", true)] {
        let (status, body) = chat(
            &url,
            json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(status, 502, "{model}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"]["type"], "upstream_error", "{body}");
        assert!(!body.contains("secret"), "{body}");
    }
}

/// A provider reached two ways: a model fenced to 10.0.0.0/8, and (optionally) an
/// open one; a guardrail on the fenced model.
async fn passthrough_proxy(open_model: bool) -> (String, MockProvider) {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let mut docs = vec![
        (
            "provider_keys/pk",
            json!({"display_name": "acme", "provider": "acme", "adapter": "openai", "api_base": format!("{}/v1", mock.url()), "api_key": "sk-acme"}),
        ),
        (
            "models/fenced",
            json!({"display_name": "fenced", "model_name": "up", "provider_key_id": "pk", "allowed_cidrs": ["10.0.0.0/8"]}),
        ),
        (
            "guardrails/g",
            json!({"name": "no-secrets", "hook_point": "input", "models": ["open"],
                   "patterns": [{"kind": "literal", "value": "Forbidden-Word"}]}),
        ),
        caller_key(),
    ];
    if open_model {
        docs.push((
            "models/open",
            json!({"display_name": "open", "model_name": "up", "provider_key_id": "pk"}),
        ));
    }
    let (url, _, _) = start_proxy(docs, ProxyOptions::default(), Hooks::default()).await;
    (url, mock)
}

async fn passthrough_chat(url: &str, body: &str) -> (u16, Value) {
    let r = client()
        .post(format!("{url}/passthrough/acme/v1/chat/completions"))
        .bearer_auth(CALLER)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test]
async fn passthrough_honours_the_client_address_rules_of_its_grant() {
    let (url, mock) = passthrough_proxy(false).await;
    let hello = json!({"model": "up", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let (status, error) = passthrough_chat(&url, &hello).await;
    assert_eq!(status, 403, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("client address 127.0.0.1"),
        "{error}"
    );
    assert!(mock.requests().is_empty(), "the upstream was reached");
    // A model of the same provider open to every address grants it.
    let (url, mock) = passthrough_proxy(true).await;
    let (status, _) = passthrough_chat(&url, &hello).await;
    assert_eq!(status, 200);
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test]
async fn passthrough_bodies_pass_the_granting_models_input_guardrails() {
    let (url, mock) = passthrough_proxy(true).await;
    // The word deep inside a field chat's own scan would not read.
    let nested = json!({"model": "up", "messages": [{"role": "user", "content": "hi"}],
        "metadata": {"a": [[{"b": "a Forbidden-Word here"}]]}});
    let (status, error) = passthrough_chat(&url, &nested.to_string()).await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["type"], "content_filter", "{error}");
    // Not JSON: the body is read as text.
    let (status, _) = passthrough_chat(&url, "plain Forbidden-Word text").await;
    assert_eq!(status, 422);
    // Nested past the limit: refused, not scanned in part.
    let deep = format!(
        r#"{{"model":"up","x":{}1{},"y":"Forbidden-Word"}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let (status, error) = passthrough_chat(&url, &deep).await;
    assert_eq!(status, 400, "{error}");
    assert!(mock.requests().is_empty(), "the upstream was reached");
    let clean = json!({"model": "up", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(passthrough_chat(&url, &clean.to_string()).await.0, 200);
}

#[tokio::test]
async fn a_forbidden_word_beside_a_deeply_nested_field_is_never_forwarded() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let docs = vec![
        (
            "provider_keys/pk",
            json!({"display_name": "mock", "provider": "openai", "api_base": format!("{}/v1", mock.url()), "api_key": "sk-x"}),
        ),
        (
            "models/m",
            json!({"display_name": "guarded", "model_name": "up", "provider_key_id": "pk"}),
        ),
        (
            "guardrails/g",
            json!({"name": "no-secrets", "hook_point": "input", "models": ["guarded"],
                   "patterns": [{"kind": "literal", "value": "Forbidden-Word"}]}),
        ),
        caller_key(),
    ];
    let (url, _, _) = start_proxy(docs, ProxyOptions::default(), Hooks::default()).await;
    for depth in [10, 60, 125, 126, 127, 1_000] {
        let body = format!(
            r#"{{"model":"guarded","messages":[{{"role":"user","content":"say Forbidden-Word","x":{}1{}}}]}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let r = client()
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(CALLER)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert!(
            status == 422 || status == 400,
            "depth {depth}: {status} {}",
            r.text().await.unwrap()
        );
    }
    assert!(mock.requests().is_empty(), "a request reached the upstream");
}

/// Sends a head that promises `length` body bytes, then nothing; returns what came
/// back and when.
async fn stalled_body(url: &str, path: &str, length: usize) -> (String, std::time::Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CALLER}\r\nx-api-key: {CALLER}\r\n\
         content-type: application/json\r\ncontent-length: {length}\r\n\r\n{{\"model\""
    );
    let started = std::time::Instant::now();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut answer),
    )
    .await;
    assert!(read.is_ok(), "the connection stayed open");
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn a_body_that_never_arrives_is_cut_with_408_in_the_routes_envelope() {
    let options = ProxyOptions {
        body_read_timeout: std::time::Duration::from_millis(300),
        min_body_rate: 1_000_000,
        ..ProxyOptions::default()
    };
    let docs = vec![caller_key()];
    let (url, _, _) = start_proxy(docs, options, Hooks::default()).await;
    let (answer, took) = stalled_body(&url, "/v1/chat/completions", 1_000).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains(r#"{"error":{"message":"the request body did not arrive within 300 ms","type":"invalid_request_error"}}"#),
        "{answer}"
    );
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    let (answer, _) = stalled_body(&url, "/v1/messages", 1_000).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""type":"timeout_error""#), "{answer}");
    // A large declared body gets its length's worth of time on top (2 MB at 1 MB/s).
    let (answer, took) = stalled_body(&url, "/v1/chat/completions", 2_000_000).await;
    assert!(answer.contains("within 2300 ms"), "{answer}");
    assert!(took >= std::time::Duration::from_millis(2_300), "{took:?}");
}

#[tokio::test]
async fn before_the_first_snapshot_callers_get_503_not_ready_not_401() {
    use proxy_core::http::{ListenerOptions, ProxyState, router, serve};
    use proxy_core::providers::client::Upstream;
    use proxy_core::snapshot::SnapshotStore;
    use tokio_util::sync::CancellationToken;

    // A store no source has filled yet.
    let store = Arc::new(SnapshotStore::new("/aisix"));
    let state = ProxyState::new(
        store,
        Upstream::new().unwrap(),
        ProxyOptions::default(),
        CancellationToken::new(),
        Default::default(),
        Hooks::default(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(
        listener,
        router(state),
        CancellationToken::new(),
        ListenerOptions::plain("proxy"),
    ));
    let hello =
        json!({"model": "gpt", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    for (path, kind) in [
        ("/v1/chat/completions", r#""type":"not_ready""#),
        ("/v1/messages", r#""type":"overloaded_error""#),
    ] {
        let r = client()
            .post(format!("{url}{path}"))
            .bearer_auth(CALLER)
            .json(&hello)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{path}");
        assert_eq!(r.headers()["retry-after"], "1");
        assert!(r.headers().get("x-should-retry").is_none());
        let body = r.text().await.unwrap();
        assert!(body.contains(kind), "{path}: {body}");
        assert!(
            body.contains("has not loaded its configuration yet"),
            "{body}"
        );
    }
    let models = client()
        .get(format!("{url}/v1/models"))
        .bearer_auth(CALLER)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 503);
}

#[tokio::test]
async fn a_large_body_reaches_every_attempt_whole_with_its_length_declared() {
    // The caller's prompt is not copied into each upstream body but referred to; each
    // attempt still sends all of it, as one body with a Content-Length.
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    mock.set_script_for(
        "first",
        cloud_mock::provider::Script {
            status: 500,
            ..Default::default()
        },
    );
    let key = json!({"display_name": "mock", "provider": "openai", "api_base": format!("{}/v1", mock.url()), "api_key": "sk-m"});
    let docs = vec![
        ("provider_keys/mock", key),
        (
            "models/first",
            json!({"display_name": "first", "model_name": "first", "provider_key_id": "mock"}),
        ),
        (
            "models/second",
            json!({"display_name": "second", "model_name": "second", "provider_key_id": "mock"}),
        ),
        (
            "models/both",
            json!({"display_name": "both", "routing": {"targets": [{"model": "first"}, {"model": "second"}]}}),
        ),
        caller_key(),
    ];
    let (url, _, _) = start_proxy(docs, ProxyOptions::default(), Hooks::default()).await;
    let prompt = "p".repeat(3 * 1024 * 1024);
    let (status, body) = chat(
        &url,
        json!({"model": "both", "messages": [{"role": "user", "content": prompt}], "temperature": 0.5}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    for (request, model) in seen.iter().zip(["first", "second"]) {
        let sent = request.json();
        assert_eq!(sent["model"], model);
        assert_eq!(
            sent["messages"][0]["content"].as_str(),
            Some(prompt.as_str())
        );
        assert_eq!(sent["temperature"], 0.5);
        assert_eq!(
            request.headers.get("content-length"),
            Some(&request.body.len().to_string()),
            "{:?}",
            request.headers
        );
        assert!(!request.headers.contains_key("transfer-encoding"));
    }
}
