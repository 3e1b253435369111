//! Cloud provider adapters against their mocks in cloud-mock: Azure OpenAI (deployment
//! URLs, `api-version`, `api-key` and Entra ID tokens, content filter, failover) and
//! Gemini (generateContent both ways, streams, tools, safety stops, cached tokens) and
//! Bedrock (Converse signed with Signature V4, event-stream streams, tools, stops,
//! cached tokens, throttling).

#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

mod common;

use cloud_mock::provider::azure::REFUSED_CLIENT_SECRET;
use cloud_mock::provider::bedrock::{ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use cloud_mock::provider::{MockProvider, Script};
use common::{CALLER, Recorder, hash, read_stream, start_proxy};
use proxy_core::http::{Hooks, ProxyOptions};
use serde_json::{Value, json};

const AZURE_KEY: &str = "azure-key-0123456789";
const ENTRA_SECRET: &str = "entra-client-secret-9876";
const BEDROCK_CLAUDE: &str = "anthropic.claude-3-5-sonnet-20240620-v1:0";
const WRONG_SECRET: &str = "planted-wrong-aws-secret-0000000000000000";

/// A Bedrock key's credential for the mock's access key.
fn aws(secret: &str, session_token: Option<&str>) -> String {
    let mut credential = json!({"access_key_id": ACCESS_KEY_ID, "secret_access_key": secret,
                                "region": "us-east-1"});
    if let Some(token) = session_token {
        credential["session_token"] = token.into();
    }
    credential.to_string()
}

struct Setup {
    url: String,
    mock: MockProvider,
}

async fn setup() -> Setup {
    setup_with(Hooks::default()).await
}

async fn setup_with(hooks: Hooks) -> Setup {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let entra = |secret: &str| {
        json!({"tenant_id": "tenant-1", "client_id": "client-1", "client_secret": secret,
               "authority_host": mock.url()})
        .to_string()
    };
    let docs = vec![
        (
            "provider_keys/az",
            json!({"display_name": "az", "provider": "azure", "api_base": mock.url(), "api_key": AZURE_KEY}),
        ),
        (
            "provider_keys/az-v",
            json!({"display_name": "az-v", "provider": "azure-openai", "api_base": mock.url(),
                   "api_key": AZURE_KEY, "api_version": "2025-01-01-preview"}),
        ),
        (
            "provider_keys/az-entra",
            json!({"display_name": "az-entra", "provider": "azure", "api_base": mock.url(), "api_key": entra(ENTRA_SECRET)}),
        ),
        (
            "provider_keys/az-refused",
            json!({"display_name": "az-refused", "provider": "azure", "api_base": mock.url(), "api_key": entra(REFUSED_CLIENT_SECRET)}),
        ),
        (
            "provider_keys/oa",
            json!({"display_name": "oa", "provider": "openai", "api_base": mock.url(), "api_key": "sk-oa"}),
        ),
        (
            "models/az-gpt",
            json!({"display_name": "az-gpt", "model_name": "gpt-4o deploy", "provider_key_id": "az"}),
        ),
        (
            "models/az-versioned",
            json!({"display_name": "az-versioned", "model_name": "dep-v", "provider_key_id": "az-v"}),
        ),
        (
            "models/az-entra",
            json!({"display_name": "az-entra", "model_name": "dep-entra", "provider_key_id": "az-entra"}),
        ),
        (
            "models/az-refused",
            json!({"display_name": "az-refused", "model_name": "dep-refused", "provider_key_id": "az-refused"}),
        ),
        (
            "models/az-broken",
            json!({"display_name": "az-broken", "model_name": "dep-broken", "provider_key_id": "az"}),
        ),
        (
            "models/oa-gpt",
            json!({"display_name": "oa-gpt", "model_name": "up-gpt", "provider_key_id": "oa"}),
        ),
        (
            "models/az-failover",
            json!({"display_name": "az-failover", "routing": {"targets": [{"model": "az-broken"}, {"model": "oa-gpt"}]}}),
        ),
        (
            "provider_keys/gm",
            json!({"display_name": "gm", "provider": "gemini", "api_base": format!("{}/v1beta", mock.url()), "api_key": "gm-key"}),
        ),
        (
            "models/gm-flash",
            json!({"display_name": "gm-flash", "model_name": "gemini-2.0-flash", "provider_key_id": "gm"}),
        ),
        (
            "models/gm-broken",
            json!({"display_name": "gm-broken", "model_name": "gemini-broken", "provider_key_id": "gm"}),
        ),
        (
            "models/gm-failover",
            json!({"display_name": "gm-failover", "routing": {"targets": [{"model": "gm-broken"}, {"model": "oa-gpt"}]}}),
        ),
        (
            "provider_keys/br",
            json!({"display_name": "br", "provider": "bedrock", "api_base": mock.url(),
                   "api_key": aws(SECRET_ACCESS_KEY, None)}),
        ),
        (
            "provider_keys/br-temp",
            json!({"display_name": "br-temp", "provider": "bedrock", "api_base": mock.url(),
                   "api_key": aws(SECRET_ACCESS_KEY, Some("session-token-1"))}),
        ),
        (
            "provider_keys/br-wrong",
            json!({"display_name": "br-wrong", "provider": "bedrock", "api_base": mock.url(),
                   "api_key": aws(WRONG_SECRET, None)}),
        ),
        (
            "models/br-claude",
            json!({"display_name": "br-claude", "model_name": BEDROCK_CLAUDE, "provider_key_id": "br"}),
        ),
        (
            "models/br-temp",
            json!({"display_name": "br-temp", "model_name": "amazon.nova-lite-v1:0", "provider_key_id": "br-temp"}),
        ),
        (
            "models/br-wrong",
            json!({"display_name": "br-wrong", "model_name": "amazon.nova-lite-v1:0", "provider_key_id": "br-wrong"}),
        ),
        (
            "models/br-broken",
            json!({"display_name": "br-broken", "model_name": "bedrock-broken", "provider_key_id": "br"}),
        ),
        (
            "models/br-failover",
            json!({"display_name": "br-failover", "routing": {"targets": [{"model": "br-broken"}, {"model": "gm-flash"}]}}),
        ),
        (
            "models/gm-embed",
            json!({"display_name": "gm-embed", "model_name": "text-embedding-004", "provider_key_id": "gm"}),
        ),
        (
            "models/br-titan",
            json!({"display_name": "br-titan", "model_name": "amazon.titan-embed-text-v2:0", "provider_key_id": "br"}),
        ),
        (
            "models/br-cohere",
            json!({"display_name": "br-cohere", "model_name": "cohere.embed-english-v3", "provider_key_id": "br"}),
        ),
        (
            "api_keys/k1",
            json!({"key_hash": hash(CALLER), "allowed_models": ["*"]}),
        ),
    ];
    for broken in ["dep-broken", "gemini-broken", "bedrock-broken"] {
        mock.set_script_for(
            broken,
            Script {
                status: 503,
                ..Script::default()
            },
        );
    }
    let (url, ..) = start_proxy(docs, ProxyOptions::default(), hooks).await;
    Setup { url, mock }
}

impl Setup {
    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .bearer_auth(CALLER)
            .header("x-api-key", CALLER)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    fn last(&self) -> cloud_mock::provider::Recorded {
        self.mock.requests().last().unwrap().clone()
    }
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hello."}]})
}

#[tokio::test]
async fn azure_chat_goes_to_the_deployment_with_api_version_and_api_key() {
    let s = setup().await;
    let r = s.post("/v1/chat/completions", chat("az-gpt")).await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Hello from the mock provider."
    );
    let sent = s.last();
    // The deployment name is one path segment, encoded.
    assert_eq!(
        sent.path,
        "/openai/deployments/gpt-4o%20deploy/chat/completions"
    );
    assert_eq!(sent.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(sent.headers["api-key"], AZURE_KEY);
    assert!(!sent.headers.contains_key("authorization"));

    // Streamed, and from an Anthropic caller (translated).
    let mut streamed = chat("az-gpt");
    streamed["stream"] = json!(true);
    let (body, aborted) = read_stream(s.post("/v1/chat/completions", streamed).await).await;
    assert!(!aborted && body.ends_with("data: [DONE]\n\n"), "{body}");
    let r = s
        .post(
            "/v1/messages",
            json!({"model": "az-gpt", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let message: Value = r.json().await.unwrap();
    assert_eq!(
        message["content"][0]["text"],
        "Hello from the mock provider."
    );
    assert!(s.last().path.ends_with("/chat/completions"));

    // The key's own api-version.
    s.post("/v1/chat/completions", chat("az-versioned")).await;
    assert_eq!(
        s.last().query.as_deref(),
        Some("api-version=2025-01-01-preview")
    );
}

#[tokio::test]
async fn azure_serves_the_openai_routes_it_has_and_refuses_the_rest() {
    let s = setup().await;
    let r = s
        .post("/v1/embeddings", json!({"model": "az-gpt", "input": "x"}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        s.last().path,
        "/openai/deployments/gpt-4o%20deploy/embeddings"
    );
    // Responses: the deployment in the body, a preview api-version.
    let r = s
        .post("/v1/responses", json!({"model": "az-gpt", "input": "Hi"}))
        .await;
    assert_eq!(r.status(), 200);
    let sent = s.last();
    assert_eq!(sent.path, "/openai/responses");
    assert_eq!(
        sent.query.as_deref(),
        Some("api-version=2025-04-01-preview")
    );
    assert_eq!(sent.json()["model"], "gpt-4o deploy");
    for (path, body) in [
        (
            "/v1/rerank",
            json!({"model": "az-gpt", "query": "q", "documents": ["a"]}),
        ),
        (
            "/v1/messages/count_tokens",
            json!({"model": "az-gpt", "messages": [{"role": "user", "content": "Hi"}]}),
        ),
    ] {
        let r = s.post(path, body).await;
        assert_eq!(r.status(), 501, "{path}");
        let text = r.text().await.unwrap();
        assert!(text.contains("azure-openai"), "{path}: {text}");
    }
}

#[tokio::test]
async fn entra_tokens_are_minted_once_shared_and_refreshed_before_expiry() {
    let s = setup().await;
    s.mock.set_entra_token_life(2);
    let calls = (0..20).map(|_| s.post("/v1/chat/completions", chat("az-entra")));
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        s.mock.entra_tokens_minted(),
        1,
        "one mint for 20 concurrent calls"
    );
    let sent = s.last();
    assert_eq!(sent.headers["authorization"], "Bearer mock-entra-token-1");
    assert!(!sent.headers.contains_key("api-key"));
    // Past the token's life (less the margin), a new one is minted.
    tokio::time::sleep(std::time::Duration::from_millis(2_000)).await;
    assert_eq!(
        s.post("/v1/chat/completions", chat("az-entra"))
            .await
            .status(),
        200
    );
    assert_eq!(s.mock.entra_tokens_minted(), 2);
    assert_eq!(
        s.last().headers["authorization"],
        "Bearer mock-entra-token-2"
    );
}

#[tokio::test]
async fn a_refused_entra_credential_is_a_503_that_shows_no_secret() {
    let s = setup().await;
    let r = s.post("/v1/chat/completions", chat("az-refused")).await;
    assert_eq!(r.status(), 503);
    let text = r.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["type"], "provider_unavailable");
    assert!(!text.contains(REFUSED_CLIENT_SECRET), "{text}");
    // The deployment was never called without a token.
    assert!(
        s.mock
            .requests()
            .iter()
            .all(|r| !r.path.contains("dep-refused"))
    );
}

#[tokio::test]
async fn azure_content_filter_refusals_are_content_filter_errors() {
    let s = setup().await;
    s.mock.set_script_for(
        "gpt-4o deploy",
        Script {
            status: 400,
            error_body: Some(
                json!({"error": {"message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
                    "type": null, "param": "prompt", "code": "content_filter", "status": 400}})
                .to_string(),
            ),
            ..Script::default()
        },
    );
    let r = s.post("/v1/chat/completions", chat("az-gpt")).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "content_filter");
    assert_eq!(body["error"]["code"], "content_filter");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("content management policy")
    );
}

#[tokio::test]
async fn a_routing_model_fails_over_from_azure_to_another_provider() {
    let s = setup().await;
    let r = s.post("/v1/chat/completions", chat("az-failover")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aisix-served-by"], "oa-gpt");
    let paths: Vec<String> = s.mock.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/openai/deployments/dep-broken/chat/completions",
            "/v1/chat/completions"
        ]
    );
}

#[test]
fn azure_retry_after_ms_is_read_as_seconds() {
    let mut headers = http::HeaderMap::new();
    headers.insert("retry-after-ms", http::HeaderValue::from_static("1500"));
    assert_eq!(
        proxy_core::providers::client::retry_after(&headers),
        Some(2)
    );
    headers.insert("retry-after", http::HeaderValue::from_static("7"));
    assert_eq!(
        proxy_core::providers::client::retry_after(&headers),
        Some(7)
    );
}

fn messages(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 64, "stream": stream, "system": "Be brief.",
           "messages": [{"role": "user", "content": "Say hello."}]})
}

#[tokio::test]
async fn gemini_answers_chat_and_messages_whole_and_streamed() {
    let s = setup().await;
    let mut body = chat("gm-flash");
    body["messages"] = json!([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Say hello."}]);
    body["max_tokens"] = json!(64);
    let r = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Hello from the mock provider."
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["usage"]["prompt_tokens"], 10);
    assert_eq!(answer["usage"]["completion_tokens"], 3);
    let sent = s.last();
    assert_eq!(sent.path, "/v1beta/models/gemini-2.0-flash:generateContent");
    assert_eq!(sent.headers["x-goog-api-key"], "gm-key");
    let request = sent.json();
    assert_eq!(
        request["contents"],
        json!([{"role": "user", "parts": [{"text": "Say hello."}]}])
    );
    assert_eq!(
        request["systemInstruction"],
        json!({"parts": [{"text": "Be brief."}]})
    );
    assert_eq!(request["generationConfig"]["maxOutputTokens"], 64);

    // Streamed (Google's CRLF events) to both caller formats.
    body["stream"] = json!(true);
    let (text, aborted) = read_stream(s.post("/v1/chat/completions", body).await).await;
    assert!(!aborted, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let streamed: String = proxy_core::formats::sse::events(text.as_bytes())
        .filter_map(|e| serde_json::from_slice::<Value>(&e.data).ok())
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")?
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(streamed, "Hello from the mock provider.");
    let sent = s.last();
    assert_eq!(
        sent.path,
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    );
    assert_eq!(sent.query.as_deref(), Some("alt=sse"));

    let r = s.post("/v1/messages", messages("gm-flash", false)).await;
    let message: Value = r.json().await.unwrap();
    assert_eq!(
        message["content"][0]["text"],
        "Hello from the mock provider."
    );
    assert_eq!(message["stop_reason"], "end_turn");
    let (text, aborted) =
        read_stream(s.post("/v1/messages", messages("gm-flash", true)).await).await;
    assert!(!aborted && text.contains("event: message_stop"), "{text}");
}

#[tokio::test]
async fn gemini_tools_go_both_ways() {
    let s = setup().await;
    s.mock.set_script_for(
        "gemini-2.0-flash",
        Script {
            tool_call: Some(cloud_mock::provider::ToolCall {
                id: "unused".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            }),
            ..Script::default()
        },
    );
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "additionalProperties": false,
                       "properties": {"city": {"type": "string"}, "strict": {"type": "boolean"}}}}}]);
    let mut body = chat("gm-flash");
    body["tools"] = tools.clone();
    let answer: Value = s
        .post("/v1/chat/completions", body.clone())
        .await
        .json()
        .await
        .unwrap();
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap(),
        json!({"city": "Paris"})
    );
    let declaration = &s.last().json()["tools"][0]["functionDeclarations"][0];
    assert_eq!(declaration["name"], "get_weather");
    // Keywords Gemini refuses are gone; a property that happens to share a name stays.
    assert!(
        declaration["parameters"]
            .get("additionalProperties")
            .is_none()
    );
    assert_eq!(
        declaration["parameters"]["properties"]["strict"]["type"],
        "boolean"
    );

    // The tool-result turn: the call and its result, under the call's name.
    let id = call["id"].as_str().unwrap();
    body["messages"] = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": id, "content": "{\"temp_c\": 21}"}]);
    s.mock.set_script_for("gemini-2.0-flash", Script::default());
    let r = s.post("/v1/chat/completions", body).await;
    assert_eq!(r.status(), 200);
    let contents = &s.last().json()["contents"];
    assert_eq!(
        contents[1],
        json!({"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]})
    );
    assert_eq!(
        contents[2],
        json!({"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}]})
    );
    // Streamed tool calls, and an Anthropic caller.
    s.mock.set_script_for(
        "gemini-2.0-flash",
        Script {
            tool_call: Some(cloud_mock::provider::ToolCall {
                id: "unused".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            }),
            ..Script::default()
        },
    );
    let mut anthropic = messages("gm-flash", true);
    anthropic["tools"] = json!([{"name": "get_weather", "input_schema": {"type": "object"}}]);
    let (text, aborted) = read_stream(s.post("/v1/messages", anthropic).await).await;
    assert!(!aborted, "{text}");
    assert!(
        text.contains("\"tool_use\"") && text.contains("\"stop_reason\":\"tool_use\""),
        "{text}"
    );
    assert!(text.contains("Paris"), "{text}");
}

#[tokio::test]
async fn gemini_safety_stops_cached_tokens_and_throttling_read_as_the_gateways() {
    let s = setup().await;
    s.mock.set_script_for(
        "gemini-2.0-flash",
        Script {
            finish_reason: Some("SAFETY".into()),
            usage: Some(cloud_mock::provider::Usage {
                prompt_tokens: 2006,
                completion_tokens: 300,
                cache_read_tokens: 1920,
                cache_write_tokens: 0,
            }),
            ..Script::default()
        },
    );
    let answer: Value = s
        .post("/v1/chat/completions", chat("gm-flash"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(answer["usage"]["prompt_tokens"], 2006);
    assert_eq!(
        answer["usage"]["prompt_tokens_details"]["cached_tokens"],
        1920
    );
    let message: Value = s
        .post("/v1/messages", messages("gm-flash", false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(message["stop_reason"], "refusal");
    assert_eq!(message["usage"]["cache_read_input_tokens"], 1920);
    assert_eq!(message["usage"]["input_tokens"], 2006 - 1920);

    s.mock.set_script_for(
        "gemini-2.0-flash",
        Script {
            status: 429,
            retry_after: Some("3".into()),
            ..Script::default()
        },
    );
    let r = s.post("/v1/chat/completions", chat("gm-flash")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    let r = s.post("/v1/chat/completions", chat("gm-failover")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aisix-served-by"], "oa-gpt");
}

#[tokio::test]
async fn usage_events_and_metrics_count_cloud_providers_as_any_other() {
    let usage = std::sync::Arc::new(Recorder::default());
    let hooks = Hooks {
        usage: Some(usage.clone()),
        ..Hooks::default()
    };
    let metrics = hooks.metrics.clone();
    let s = setup_with(hooks).await;
    for model in ["az-gpt", "gm-flash", "br-claude"] {
        assert_eq!(
            s.post("/v1/chat/completions", chat(model)).await.status(),
            200
        );
        let mut streamed = chat(model);
        streamed["stream"] = json!(true);
        let (_, aborted) = read_stream(s.post("/v1/chat/completions", streamed).await).await;
        assert!(!aborted);
    }
    let events = usage.0.lock().unwrap().clone();
    let seen: Vec<(&str, &str, u64, u64, bool)> = events
        .iter()
        .map(|e| {
            (
                e.provider.as_str(),
                e.served_by.as_str(),
                e.prompt_tokens,
                e.completion_tokens,
                e.stream,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("azure", "az-gpt", 10, 3, false),
            ("azure", "az-gpt", 10, 3, true),
            ("gemini", "gm-flash", 10, 3, false),
            ("gemini", "gm-flash", 10, 3, true),
            ("bedrock", "br-claude", 10, 3, false),
            ("bedrock", "br-claude", 10, 3, true),
        ]
    );
    let exposition = metrics.render(proxy_core::observe::metrics::Readings::default());
    for (model, provider) in [
        ("az-gpt", "azure"),
        ("gm-flash", "gemini"),
        ("br-claude", "bedrock"),
    ] {
        for (family, n) in [("input", 20), ("output", 6), ("total", 26)] {
            let line = format!(
                "aisix_llm_{family}_tokens_total{{model=\"{model}\",provider=\"{provider}\"}} {n}"
            );
            assert!(exposition.contains(&line), "{line} in\n{exposition}");
        }
    }
}

#[tokio::test]
async fn azure_images_and_audio_forms_go_to_the_deployment() {
    let s = setup().await;
    let r = s
        .post(
            "/v1/images/generations",
            json!({"model": "az-gpt", "prompt": "a cat", "n": 1}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        s.last().path,
        "/openai/deployments/gpt-4o%20deploy/images/generations"
    );
    let form = reqwest::multipart::Form::new()
        .text("model", "az-gpt")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"RIFF-fake-wave".to_vec())
                .file_name("hello.wav")
                .mime_str("audio/wav")
                .unwrap(),
        );
    let r = reqwest::Client::new()
        .post(format!("{}/v1/audio/transcriptions", s.url))
        .bearer_auth(CALLER)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"text": "Hello from the mock provider."})
    );
    let sent = s.last();
    assert_eq!(
        sent.path,
        "/openai/deployments/gpt-4o%20deploy/audio/transcriptions"
    );
    assert_eq!(sent.query.as_deref(), Some("api-version=2024-10-21"));
    // The form's model field names the deployment.
    assert!(
        sent.body
            .contains("name=\"model\"\r\n\r\ngpt-4o deploy\r\n"),
        "{}",
        sent.body
    );
}

// Bedrock

fn streamed_text(text: &str) -> String {
    proxy_core::formats::sse::events(text.as_bytes())
        .filter_map(|e| serde_json::from_slice::<Value>(&e.data).ok())
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")
                .or_else(|| c.pointer("/delta/text"))?
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn bedrock_answers_chat_and_messages_whole_and_streamed_signed_with_sigv4() {
    let s = setup().await;
    let mut body = chat("br-claude");
    body["messages"] = json!([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Say hello."}]);
    body["max_tokens"] = json!(64);
    let r = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status(), 200, "the mock checked the signature");
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Hello from the mock provider."
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["usage"]["prompt_tokens"], 10);
    assert_eq!(answer["usage"]["completion_tokens"], 3);
    assert_eq!(answer["model"], "br-claude", "Bedrock names no model");
    let sent = s.last();
    assert_eq!(
        sent.path,
        "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    );
    let authorization = &sent.headers["authorization"];
    assert!(
        authorization.starts_with(&format!("AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/"))
            && authorization.contains("/us-east-1/bedrock/aws4_request"),
        "{authorization}"
    );
    assert!(!authorization.contains(SECRET_ACCESS_KEY));
    let request = sent.json();
    assert_eq!(
        request["messages"],
        json!([{"role": "user", "content": [{"text": "Say hello."}]}])
    );
    assert_eq!(request["system"], json!([{"text": "Be brief."}]));
    assert_eq!(request["inferenceConfig"]["maxTokens"], 64);

    // Streamed: the event stream becomes each caller's server-sent events.
    body["stream"] = json!(true);
    let r = s.post("/v1/chat/completions", body).await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let (text, aborted) = read_stream(r).await;
    assert!(!aborted, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(streamed_text(&text), "Hello from the mock provider.");
    assert!(s.last().path.ends_with("/converse-stream"));

    let r = s.post("/v1/messages", messages("br-claude", false)).await;
    assert_eq!(r.status(), 200);
    let message: Value = r.json().await.unwrap();
    assert_eq!(
        message["content"][0]["text"],
        "Hello from the mock provider."
    );
    assert_eq!(message["stop_reason"], "end_turn");
    let (text, aborted) =
        read_stream(s.post("/v1/messages", messages("br-claude", true)).await).await;
    assert!(!aborted && text.contains("event: message_stop"), "{text}");
    assert!(text.contains(r#""model":"br-claude""#), "{text}");
    assert_eq!(streamed_text(&text), "Hello from the mock provider.");

    // Temporary credentials send and sign their session token.
    let r = s.post("/v1/chat/completions", chat("br-temp")).await;
    assert_eq!(r.status(), 200);
    let sent = s.last();
    assert_eq!(sent.headers["x-amz-security-token"], "session-token-1");
    assert!(sent.headers["authorization"].contains("x-amz-security-token"));
}

#[tokio::test]
async fn bedrock_tools_go_both_ways_whole_and_streamed() {
    let s = setup().await;
    let tool_call = Script {
        tool_call: Some(cloud_mock::provider::ToolCall {
            id: "tooluse_abc".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        }),
        ..Script::default()
    };
    s.mock.set_script_for(BEDROCK_CLAUDE, tool_call.clone());
    let mut body = chat("br-claude");
    body["tools"] = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let answer: Value = s
        .post("/v1/chat/completions", body.clone())
        .await
        .json()
        .await
        .unwrap();
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["id"], "tooluse_abc");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
    assert_eq!(
        s.last().json()["toolConfig"]["tools"][0]["toolSpec"]["name"],
        "get_weather"
    );

    // The tool-result turn.
    s.mock.set_script_for(BEDROCK_CLAUDE, Script::default());
    body["messages"] = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "tooluse_abc", "content": "21C"}]);
    assert_eq!(
        s.post("/v1/chat/completions", body.clone()).await.status(),
        200
    );
    let messages_sent = &s.last().json()["messages"];
    assert_eq!(
        messages_sent[1],
        json!({"role": "assistant", "content": [{"toolUse": {"toolUseId": "tooluse_abc",
            "name": "get_weather", "input": {"city": "Paris"}}}]})
    );
    assert_eq!(
        messages_sent[2],
        json!({"role": "user", "content": [{"toolResult": {"toolUseId": "tooluse_abc",
            "content": [{"text": "21C"}]}}]})
    );

    // Streamed tool calls to both callers: arguments arrive in pieces.
    s.mock.set_script_for(BEDROCK_CLAUDE, tool_call);
    body["messages"] = json!([{"role": "user", "content": "Weather in Paris?"}]);
    body["stream"] = json!(true);
    let (text, aborted) = read_stream(s.post("/v1/chat/completions", body).await).await;
    assert!(!aborted, "{text}");
    let arguments: String = proxy_core::formats::sse::events(text.as_bytes())
        .filter_map(|e| serde_json::from_slice::<Value>(&e.data).ok())
        .filter_map(|c| {
            c.pointer("/choices/0/delta/tool_calls/0/function/arguments")?
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(arguments, r#"{"city":"Paris"}"#);
    assert!(text.contains(r#""finish_reason":"tool_calls""#), "{text}");
    let mut anthropic = messages("br-claude", true);
    anthropic["tools"] = json!([{"name": "get_weather", "input_schema": {"type": "object"}}]);
    let (text, aborted) = read_stream(s.post("/v1/messages", anthropic).await).await;
    assert!(!aborted, "{text}");
    assert!(
        text.contains("\"tooluse_abc\"") && text.contains("\"stop_reason\":\"tool_use\""),
        "{text}"
    );
}

#[tokio::test]
async fn bedrock_stops_cached_tokens_throttling_and_failover_read_as_the_gateways() {
    let s = setup().await;
    s.mock.set_script_for(
        BEDROCK_CLAUDE,
        Script {
            finish_reason: Some("guardrail_intervened".into()),
            usage: Some(cloud_mock::provider::Usage {
                prompt_tokens: 2006,
                completion_tokens: 300,
                cache_read_tokens: 1920,
                cache_write_tokens: 50,
            }),
            ..Script::default()
        },
    );
    let answer: Value = s
        .post("/v1/chat/completions", chat("br-claude"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(answer["usage"]["prompt_tokens"], 2006);
    assert_eq!(
        answer["usage"]["prompt_tokens_details"]["cached_tokens"],
        1920
    );
    let message: Value = s
        .post("/v1/messages", messages("br-claude", false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(message["usage"]["cache_read_input_tokens"], 1920);
    assert_eq!(message["usage"]["cache_creation_input_tokens"], 50);
    assert_eq!(message["usage"]["input_tokens"], 2006 - 1920 - 50);

    // ThrottlingException: a 429 with a retry hint, though Bedrock sends none.
    s.mock.set_script_for(
        BEDROCK_CLAUDE,
        Script {
            status: 429,
            ..Script::default()
        },
    );
    let r = s.post("/v1/chat/completions", chat("br-claude")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["message"], "mock error 429");

    // A 503 from Bedrock fails over to Gemini.
    let r = s.post("/v1/chat/completions", chat("br-failover")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aisix-served-by"], "gm-flash");

    // An exception after the first event breaks the caller's stream.
    s.mock.set_script_for(
        BEDROCK_CLAUDE,
        Script {
            error_after_chunks: Some(2),
            ..Script::default()
        },
    );
    let mut streamed = chat("br-claude");
    streamed["stream"] = json!(true);
    let (text, aborted) = read_stream(s.post("/v1/chat/completions", streamed).await).await;
    assert!(aborted, "{text}");
    assert!(text.contains("upstream_stream_error"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
}

#[tokio::test]
async fn a_bad_bedrock_signature_is_the_gateways_credential_problem_and_shows_no_secret() {
    let s = setup().await;
    let r = s.post("/v1/chat/completions", chat("br-wrong")).await;
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("upstream_authentication_failed"), "{body}");
    assert!(
        !body.contains(WRONG_SECRET) && !body.contains("signature we calculated"),
        "{body}"
    );
}

// The Responses API, bridged for providers that have none

#[tokio::test]
async fn responses_are_bridged_to_bedrock_and_gemini_whole_and_streamed() {
    let s = setup().await;
    for model in ["br-claude", "gm-flash"] {
        let r = s
            .post(
                "/v1/responses",
                json!({"model": model, "input": "Say hello.", "instructions": "Be brief."}),
            )
            .await;
        assert_eq!(r.status(), 200, "{model}");
        let response: Value = r.json().await.unwrap();
        assert_eq!(response["object"], "response", "{model}");
        assert_eq!(response["status"], "completed");
        assert_eq!(
            response["output"][0]["content"][0]["text"],
            "Hello from the mock provider."
        );
        assert_eq!(response["usage"]["input_tokens"], 10);
        let r = s
            .post(
                "/v1/responses",
                json!({"model": model, "input": "Say hello.", "stream": true}),
            )
            .await;
        let (text, aborted) = read_stream(r).await;
        assert!(!aborted, "{text}");
        assert!(text.contains("event: response.created"), "{text}");
        assert!(
            text.trim_end().ends_with('}') && text.contains("event: response.completed"),
            "{text}"
        );
        let deltas: String = proxy_core::formats::sse::events(text.as_bytes())
            .filter(|e| e.name.as_deref() == Some("response.output_text.delta"))
            .filter_map(|e| serde_json::from_slice::<Value>(&e.data).ok())
            .filter_map(|d| d["delta"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(deltas, "Hello from the mock provider.", "{model}");
    }
    // The provider was asked in its own format.
    assert!(s.last().path.ends_with(":streamGenerateContent"));
    // A stateless bridge refuses what needs stored responses.
    let r = s
        .post(
            "/v1/responses",
            json!({"model": "br-claude", "input": "Hi", "previous_response_id": "resp_1"}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "previous_response_id");
}

// Embeddings on providers without an OpenAI-shaped embeddings API

#[tokio::test]
async fn embeddings_go_to_gemini_and_bedrock_in_their_shapes() {
    use base64::Engine as _;
    let s = setup().await;
    let vectors = |body: &Value| -> Vec<Value> { body["data"].as_array().unwrap().clone() };
    let r = s
        .post(
            "/v1/embeddings",
            json!({"model": "gm-embed", "input": ["a", "b"], "dimensions": 8}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let data = vectors(&body);
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    let dimensions = data[0]["embedding"].as_array().unwrap().len();
    assert!(dimensions > 0);
    assert_eq!(body["model"], "gm-embed");
    let sent = s.last();
    assert_eq!(
        sent.path,
        "/v1beta/models/text-embedding-004:batchEmbedContents"
    );
    assert_eq!(sent.json()["requests"][0]["outputDimensionality"], 8);

    // base64, as the official Python SDK asks by default: little-endian f32s.
    let r = s
        .post(
            "/v1/embeddings",
            json!({"model": "gm-embed", "input": "a", "encoding_format": "base64"}),
        )
        .await;
    let body: Value = r.json().await.unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw.len(), dimensions * 4);
    let first = f32::from_le_bytes(raw[..4].try_into().unwrap());
    assert!((f64::from(first) - data[0]["embedding"][0].as_f64().unwrap()).abs() < 1e-6);

    // Titan embeds one input per call, signed like every Bedrock request.
    let r = s
        .post("/v1/embeddings", json!({"model": "br-titan", "input": "a"}))
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(vectors(&body).len(), 1);
    assert_eq!(body["usage"]["prompt_tokens"], 10);
    let sent = s.last();
    assert_eq!(sent.path, "/model/amazon.titan-embed-text-v2%3A0/invoke");
    assert_eq!(sent.json(), json!({"inputText": "a"}));
    let r = s
        .post(
            "/v1/embeddings",
            json!({"model": "br-titan", "input": ["a", "b"]}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "input");
    let r = s
        .post(
            "/v1/embeddings",
            json!({"model": "br-cohere", "input": ["a", "b"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(vectors(&r.json().await.unwrap()).len(), 2);
    assert_eq!(s.last().json()["texts"], json!(["a", "b"]));
    // A chat model on Bedrock has no embeddings: 501 naming why.
    let r = s
        .post(
            "/v1/embeddings",
            json!({"model": "br-claude", "input": "a"}),
        )
        .await;
    assert_eq!(r.status(), 501);
    let body = r.text().await.unwrap();
    assert!(body.contains("Titan or Cohere"), "{body}");
}

// Generic provider keys (AISIX's: no provider, no adapter)

#[tokio::test]
async fn a_generic_key_serves_each_model_in_its_providers_protocol() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let docs = vec![
        (
            "provider_keys/shared",
            json!({"display_name": "shared", "api_base": mock.url(), "api_key": "sk-shared"}),
        ),
        (
            "models/claude",
            json!({"display_name": "claude", "provider": "anthropic", "model_name": "claude-up", "provider_key_id": "shared"}),
        ),
        (
            "models/gpt",
            json!({"display_name": "gpt", "provider": "openai", "model_name": "up-gpt", "provider_key_id": "shared"}),
        ),
        (
            "models/flash",
            json!({"display_name": "flash", "provider": "gemini", "model_name": "gemini-2.0-flash", "provider_key_id": "shared"}),
        ),
        (
            "api_keys/k1",
            json!({"key_hash": hash(CALLER), "allowed_models": ["*"]}),
        ),
    ];
    let usage = std::sync::Arc::new(Recorder::default());
    let hooks = Hooks {
        usage: Some(usage.clone()),
        ..Hooks::default()
    };
    let (url, ..) = start_proxy(docs, ProxyOptions::default(), hooks).await;
    let s = Setup { url, mock };
    let r = s.post("/v1/chat/completions", chat("claude")).await;
    assert_eq!(r.status(), 200);
    let sent = s.last();
    assert_eq!(sent.path, "/v1/messages", "Anthropic's protocol");
    assert_eq!(sent.headers["x-api-key"], "sk-shared");
    let r = s.post("/v1/chat/completions", chat("gpt")).await;
    assert_eq!(r.status(), 200);
    let sent = s.last();
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.headers["authorization"], "Bearer sk-shared");
    let r = s.post("/v1/messages", messages("flash", false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        s.last().path,
        "/v1beta/models/gemini-2.0-flash:generateContent"
    );
    let providers: Vec<String> = usage
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.provider.clone())
        .collect();
    assert_eq!(providers, ["anthropic", "openai", "gemini"]);
}

#[tokio::test]
async fn bedrock_passthrough_is_signed_like_any_bedrock_call() {
    let s = setup().await;
    let r = reqwest::Client::new()
        .post(format!(
            "{}/passthrough/br/model/amazon.nova-lite-v1:0/converse",
            s.url
        ))
        .bearer_auth(CALLER)
        .header("content-type", "application/json")
        .body(r#"{"messages":[{"role":"user","content":[{"text":"Say hello."}]}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the mock checked the signature");
    let sent = s.last();
    assert!(
        sent.headers["authorization"]
            .starts_with(&format!("AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/")),
        "{sent:?}"
    );
    assert!(!sent.headers.values().any(|v| v.contains(CALLER)));
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        answer["output"]["message"]["content"][0]["text"],
        "Hello from the mock provider."
    );
}
