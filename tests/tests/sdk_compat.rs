//! Tier 4: the official OpenAI and Anthropic Python SDKs against the real agent binary,
//! in front of the mock provider speaking both APIs.
//!
//! `scripts/test` installs the pinned SDKs into `target/sdk-venv` and sets
//! `AISIX_SDK_PYTHON`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::path::Path;
use std::time::Duration;

use cloud_mock::provider::{MockProvider, Script, ToolCall, Usage};
use tests::{Process, key_hash, start_agent};

/// The models the SDK scripts use, by upstream model: what the mock answers.
fn script_mock(mock: &MockProvider) {
    let weather = || Script {
        tool_call: Some(ToolCall {
            id: "call_weather_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        }),
        ..Script::default()
    };
    let busy = || Script {
        status: 429,
        retry_after: Some("3".into()),
        ..Script::default()
    };
    mock.set_script_for("up-tools", weather());
    mock.set_script_for("claude-tools-up", weather());
    mock.set_script_for("up-busy", busy());
    mock.set_script_for("claude-busy-up", busy());
    // Streams cut after they began (the Anthropic stream's first three events carry no
    // text), and streams whose first event comes after the target's stream_timeout.
    for (model, after) in [("up-cut", 2), ("claude-cut-up", 4)] {
        let cut = Script {
            chunks: 5,
            drop_after_chunks: Some(after),
            ..Script::default()
        };
        mock.set_script_for(model, cut);
    }
    // Answers read partly from the provider's prompt cache.
    for model in ["up-cached", "claude-cached-up"] {
        let cached = Script {
            usage: Some(Usage {
                prompt_tokens: 2006,
                completion_tokens: 300,
                cache_read_tokens: 1920,
                cache_write_tokens: 0,
            }),
            ..Script::default()
        };
        mock.set_script_for(model, cached);
    }
    for model in ["up-late", "claude-late-up"] {
        let late = Script {
            chunk_interval_ms: 2_000,
            ..Script::default()
        };
        mock.set_script_for(model, late);
    }
    mock.set_script_for(
        "up-broken",
        Script {
            status: 500,
            error_body: Some("private upstream detail".into()),
            ..Script::default()
        },
    );
}

/// Runs `script` (in `tests/sdk/`) against an agent in front of the mock; it must exit 0
/// and say its checks passed.
async fn run_sdk_script(script: &str) {
    let python = std::env::var("AISIX_SDK_PYTHON").unwrap_or_else(|_| {
        panic!("AISIX_SDK_PYTHON is not set: run the suite with `bash scripts/test`, which installs the official OpenAI and Anthropic SDKs into target/sdk-venv")
    });
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    script_mock(&mock);
    let dir = tempfile::tempdir().unwrap();
    let resources = format!(
        r#"
provider_keys:
  - {{id: pk1, display_name: mock, provider: openai, api_base: "{base}", api_key: sk-sdk-upstream}}
  - {{id: pk2, display_name: mock-anthropic, provider: anthropic, api_base: "{base}", api_key: sk-ant-sdk-upstream}}
models:
  - {{id: m1, display_name: gpt-4o-mini, model_name: up-gpt, provider_key_id: pk1}}
  - {{id: m2, display_name: restricted, model_name: up-restricted, provider_key_id: pk1}}
  - {{id: m3, display_name: gpt-tools, model_name: up-tools, provider_key_id: pk1}}
  - {{id: m4, display_name: busy, model_name: up-busy, provider_key_id: pk1}}
  - {{id: m5, display_name: broken, model_name: up-broken, provider_key_id: pk1}}
  - {{id: a1, display_name: claude, model_name: claude-up, provider_key_id: pk2}}
  - {{id: a2, display_name: claude-tools, model_name: claude-tools-up, provider_key_id: pk2}}
  - {{id: a3, display_name: claude-busy, model_name: claude-busy-up, provider_key_id: pk2}}
  - {{id: c1, display_name: cut, model_name: up-cut, provider_key_id: pk1}}
  - {{id: c2, display_name: claude-cut, model_name: claude-cut-up, provider_key_id: pk2}}
  - {{id: l1, display_name: late, model_name: up-late, provider_key_id: pk1, stream_timeout: 300}}
  - {{id: l2, display_name: claude-late, model_name: claude-late-up, provider_key_id: pk2, stream_timeout: 300}}
  - {{id: p1, display_name: gpt-cached, model_name: up-cached, provider_key_id: pk1}}
  - {{id: p2, display_name: claude-cached, model_name: claude-cached-up, provider_key_id: pk2}}
  - {{id: r1, display_name: resumable, routing: {{resume_streams: true, targets: [{{model: cut}}, {{model: gpt-4o-mini}}]}}}}
  - {{id: r2, display_name: claude-resumable, routing: {{resume_streams: true, targets: [{{model: claude-cut}}, {{model: claude}}]}}}}
  - {{id: f1, display_name: first-byte, routing: {{targets: [{{model: late}}, {{model: gpt-4o-mini}}]}}}}
  - {{id: f2, display_name: claude-first-byte, routing: {{targets: [{{model: claude-late}}, {{model: claude}}]}}}}
  - {{id: g1, display_name: guarded, model_name: up-gpt, provider_key_id: pk1}}
  - {{id: g2, display_name: claude-guarded, model_name: claude-up, provider_key_id: pk2}}
guardrails:
  - {{id: gr1, name: no-secrets, hook_point: input, patterns: [{{value: forbidden-word}}]}}
  - {{id: gr2, name: no-vendor, kind: pii, hook_point: output, window_size: 20, window_overlap_size: 16,
      custom_patterns: [{{name: vendor, regex: "mock\\s+provider"}}]}}
guardrail_attachments:
  - {{id: ga1, guardrail_id: gr1, scope_type: model, scope_id: guarded}}
  - {{id: ga2, guardrail_id: gr1, scope_type: model, scope_id: claude-guarded}}
  - {{id: ga3, guardrail_id: gr2, scope_type: model, scope_id: guarded}}
  - {{id: ga4, guardrail_id: gr2, scope_type: model, scope_id: claude-guarded}}
api_keys:
  - {{id: k1, key_hash: {wide}, allowed_models: ["*"]}}
  - {{id: k2, key_hash: {narrow}, allowed_models: ["gpt-4o-mini"]}}
"#,
        base = mock.url(),
        wide = key_hash("sdk-wide-key"),
        narrow = key_hash("sdk-narrow-key"),
    );
    std::fs::write(dir.path().join("resources.yaml"), resources).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "resources_file: {}\nproxy:\n  addr: 127.0.0.1:0\nshutdown:\n  min_drain_secs: 0\n",
            dir.path().join("resources.yaml").display()
        ),
    )
    .unwrap();
    let (_agent, url) = start_agent(&config).await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sdk")
        .join(script);
    let mut sdk = Process::start(
        Path::new(&python),
        &[script.to_str().unwrap()],
        &[
            ("AISIX_BASE_URL", &url),
            ("AISIX_API_KEY", "sdk-wide-key"),
            ("AISIX_NARROW_KEY", "sdk-narrow-key"),
        ],
    );
    let status = sdk.wait_exit(Duration::from_secs(120)).await;
    let output = sdk.output();
    assert!(status.success(), "{script:?} failed:\n{output}");
    assert!(output.contains("checks passed"), "{output}");
    println!("{}", output.trim());
    // The upstream never saw a caller key.
    for request in mock.requests() {
        assert!(
            !request.headers.values().any(|v| v.contains("sdk-wide-key")),
            "{request:?}"
        );
    }
}

#[tokio::test]
async fn official_openai_sdk_works_against_the_agent() {
    run_sdk_script("openai_sdk.py").await;
}

#[tokio::test]
async fn official_anthropic_sdk_works_against_the_agent() {
    run_sdk_script("anthropic_sdk.py").await;
}

/// Google's Gen AI SDK against cloud-mock's Gemini mock: paths, the key header, answers,
/// the event stream, function calls, safety stops and throttling as Google's own
/// library reads them.
#[tokio::test]
async fn the_gemini_mock_answers_googles_own_sdk() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    mock.set_script_for(
        "gemini-sdk-tools",
        Script {
            tool_call: Some(ToolCall {
                id: "unused".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            }),
            ..Script::default()
        },
    );
    mock.set_script_for(
        "gemini-sdk-safety",
        Script {
            finish_reason: Some("SAFETY".into()),
            ..Script::default()
        },
    );
    mock.set_script_for(
        "gemini-sdk-busy",
        Script {
            status: 429,
            ..Script::default()
        },
    );
    run_against_mock("gemini_mock.py", &mock).await;
    let requests = mock.requests();
    let first = &requests[0];
    assert_eq!(first.path, "/v1beta/models/gemini-sdk:generateContent");
    assert_eq!(first.headers["x-goog-api-key"], "gemini-sdk-key");
    assert!(
        requests.iter().any(
            |r| r.path == "/v1beta/models/gemini-sdk:streamGenerateContent"
                && r.query.as_deref() == Some("alt=sse")
        ),
        "{requests:?}"
    );
}

/// Scripts for every provider's `-tools` and `-busy` upstream models: a get_weather
/// call, and a 429; and a Bedrock stream that breaks.
fn script_providers(mock: &MockProvider) {
    let weather = Script {
        tool_call: Some(ToolCall {
            id: "tooluse_sdk".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        }),
        ..Script::default()
    };
    let busy = Script {
        status: 429,
        ..Script::default()
    };
    for provider in ["bedrock", "gemini", "vertex", "claude-vertex", "claude"] {
        mock.set_script_for(&format!("{provider}-sdk-tools"), weather.clone());
        mock.set_script_for(&format!("{provider}-sdk-busy"), busy.clone());
    }
    mock.set_script_for(
        "bedrock-sdk-broken",
        Script {
            error_after_chunks: Some(2),
            ..Script::default()
        },
    );
    mock.set_script_for(
        "vertex-sdk-down",
        Script {
            status: 503,
            ..Script::default()
        },
    );
}

/// An agent in front of `mock` with models of every translated provider, named as
/// `provider_callers.py` expects: `{provider}-chat`, `-tools`, `-busy`, `-embed`.
async fn provider_agent(mock: &MockProvider, dir: &Path) -> (Process, String) {
    use cloud_mock::provider::bedrock::{ACCESS_KEY_ID, SECRET_ACCESS_KEY};
    let aws = serde_json::json!({"access_key_id": ACCESS_KEY_ID, "secret_access_key": SECRET_ACCESS_KEY,
                                 "region": "us-east-1", "session_token": "caller-session-token"});
    let vertex = serde_json::json!({"project": "sdk-project", "region": "us-central1",
                                    "access_token": "ya29.sdk-token"});
    let mut models = String::new();
    for (provider, key, chat, embed) in [
        (
            "bedrock",
            "br",
            "anthropic.claude-3-5-haiku-20241022-v1:0",
            Some("amazon.titan-embed-text-v2:0"),
        ),
        (
            "gemini",
            "gm",
            "gemini-2.0-flash",
            Some("text-embedding-004"),
        ),
        (
            "vertex",
            "vx",
            "gemini-2.0-flash",
            Some("text-embedding-005"),
        ),
        ("vclaude", "vx", "claude-sonnet-4-5", None),
        ("anthropic", "an", "claude-up", None),
    ] {
        let upstream = match provider {
            "vclaude" => "claude-vertex",
            "anthropic" => "claude",
            other => other,
        };
        models.push_str(&format!(
            "  - {{id: {provider}-chat, display_name: {provider}-chat, model_name: \"{chat}\", provider_key_id: {key}}}\n\
             \x20 - {{id: {provider}-tools, display_name: {provider}-tools, model_name: {upstream}-sdk-tools, provider_key_id: {key}}}\n\
             \x20 - {{id: {provider}-busy, display_name: {provider}-busy, model_name: {upstream}-sdk-busy, provider_key_id: {key}}}\n"
        ));
        if let Some(embed) = embed {
            models.push_str(&format!(
                "  - {{id: {provider}-embed, display_name: {provider}-embed, model_name: \"{embed}\", provider_key_id: {key}}}\n"
            ));
        }
    }
    // A Vertex AI model that is down, and a routing model failing over from it to
    // Bedrock.
    models.push_str(
        "  - {id: vertex-down, display_name: vertex-down, model_name: vertex-sdk-down, provider_key_id: vx}\n\
         \x20 - {id: vertex-failover, display_name: vertex-failover, routing: {targets: [{model: vertex-down}, {model: bedrock-chat}]}}\n",
    );
    let resources = format!(
        r#"
provider_keys:
  - {{id: br, display_name: bedrock, provider: bedrock, api_base: "{base}", api_key: '{aws}'}}
  - {{id: gm, display_name: gemini, provider: gemini, api_base: "{base}", api_key: gm-sdk-key}}
  - {{id: vx, display_name: vertex, provider: vertex, api_base: "{base}", api_key: '{vertex}'}}
  - {{id: an, display_name: anthropic, provider: anthropic, api_base: "{base}", api_key: sk-ant-sdk}}
models:
{models}api_keys:
  - {{id: k1, key_hash: {wide}, allowed_models: ["*"]}}
"#,
        base = mock.url(),
        wide = key_hash("sdk-wide-key"),
    );
    std::fs::write(dir.join("resources.yaml"), resources).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "resources_file: {}\nproxy:\n  addr: 127.0.0.1:0\nshutdown:\n  min_drain_secs: 0\n",
            dir.join("resources.yaml").display()
        ),
    )
    .unwrap();
    start_agent(&config).await
}

/// AWS's botocore against cloud-mock's Bedrock mock (paths, Signature V4 verification,
/// answers, the binary event stream, tool use, throttling and stream exceptions as
/// AWS's own library reads them); then the official SDKs call Bedrock models through
/// the agent and botocore recomputes every signature the agent sent.
#[tokio::test]
async fn bedrock_is_checked_by_botocore_and_its_signatures_by_botocore_too() {
    use cloud_mock::provider::bedrock::{ACCESS_KEY_ID, SECRET_ACCESS_KEY};
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    script_providers(&mock);
    let aws = [
        ("AISIX_AWS_ACCESS_KEY_ID", ACCESS_KEY_ID),
        ("AISIX_AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY),
    ];
    run_against_mock_with("bedrock_mock.py", &mock, &aws).await;
    let requests = mock.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/model/anthropic.claude-sdk-v1%3A0/converse-stream"),
        "{requests:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let (_agent, url) = provider_agent(&mock, dir.path()).await;
    let before = mock.requests().len();
    run_callers(&url, "bedrock", "1", true).await;
    let sent: Vec<_> = mock.requests().into_iter().skip(before).collect();
    assert!(sent.len() >= 10, "{sent:?}");
    assert!(
        sent.iter()
            .all(|r| r.headers["x-amz-security-token"] == "caller-session-token")
    );
    let checked = tests::metrics::sdk_python(
        "bedrock_signature.py",
        &[SECRET_ACCESS_KEY],
        &serde_json::to_vec(&sent).unwrap(),
        "botocore's SigV4",
    );
    let checked = String::from_utf8_lossy(&checked);
    assert_eq!(checked.trim(), format!("{} signatures checked", sent.len()));
}

/// The official OpenAI and Anthropic SDKs as callers of every translated provider
/// (Gemini, Vertex AI, Claude on Vertex AI, Anthropic; Bedrock above): chat
/// completions, messages and the Responses API, whole and streamed, with tools and the
/// tool-result turn, throttling, and embeddings where the provider has them; and a
/// routing model failing over from one provider to another.
#[tokio::test]
async fn every_translated_provider_is_reached_from_both_sdks() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    script_providers(&mock);
    let dir = tempfile::tempdir().unwrap();
    let (_agent, url) = provider_agent(&mock, dir.path()).await;
    for (provider, embeddings) in [
        ("gemini", true),
        ("vertex", true),
        ("vclaude", false),
        ("anthropic", false),
    ] {
        run_callers(&url, provider, "", embeddings).await;
    }
    // Failover across providers: Vertex AI down, Bedrock answers.
    let r = tests::http_client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth("sdk-wide-key")
        .json(&serde_json::json!({"model": "vertex-failover",
                                  "messages": [{"role": "user", "content": "Say hello."}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aisix-served-by"], "bedrock-chat");
    let paths: Vec<String> = mock.requests().into_iter().map(|r| r.path).collect();
    for expected in [
        "/v1beta/models/gemini-sdk-tools:streamGenerateContent",
        "/v1/projects/sdk-project/locations/us-central1/publishers/google/models/text-embedding-005:predict",
        "/v1/projects/sdk-project/locations/us-central1/publishers/anthropic/models/claude-vertex-sdk-tools:streamRawPredict",
        "/v1/messages",
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} not in {paths:?}"
        );
    }
}

/// Runs `provider_callers.py` for `provider`'s models through the agent at `url`.
async fn run_callers(url: &str, provider: &str, retry_hint: &str, embeddings: bool) {
    run_sdk_against(
        "provider_callers.py",
        url,
        &[
            ("AISIX_API_KEY", "sdk-wide-key"),
            ("AISIX_NARROW_KEY", "unused"),
            ("AISIX_PROVIDER", provider),
            ("AISIX_RETRY_HINT", retry_hint),
            ("AISIX_EMBEDDINGS", if embeddings { "1" } else { "0" }),
        ],
    )
    .await;
}

/// Runs `script` (in `tests/sdk/`) against `mock` alone; it must exit 0 and say its
/// checks passed.
async fn run_against_mock(script: &str, mock: &MockProvider) {
    run_against_mock_with(script, mock, &[]).await;
}

async fn run_against_mock_with(script: &str, mock: &MockProvider, env: &[(&str, &str)]) {
    let url = mock.url();
    let mut all = vec![("AISIX_API_KEY", "unused"), ("AISIX_NARROW_KEY", "unused")];
    all.extend_from_slice(env);
    run_sdk_against(script, &url, &all).await;
}

/// Runs `script` (in `tests/sdk/`) with `AISIX_BASE_URL=url` and `env`; it must exit 0
/// and say its checks passed.
async fn run_sdk_against(script: &str, url: &str, env: &[(&str, &str)]) {
    let python = std::env::var("AISIX_SDK_PYTHON").unwrap_or_else(|_| {
        panic!("AISIX_SDK_PYTHON is not set: run the suite with `bash scripts/test`, which installs the providers' SDKs into target/sdk-venv")
    });
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sdk")
        .join(script);
    let mut all = vec![("AISIX_BASE_URL", url)];
    all.extend_from_slice(env);
    let mut sdk = Process::start(Path::new(&python), &[path.to_str().unwrap()], &all);
    let status = sdk.wait_exit(Duration::from_secs(60)).await;
    let output = sdk.output();
    assert!(status.success(), "{script} failed:\n{output}");
    assert!(output.contains("checks passed"), "{output}");
}

/// The official OpenAI SDK's `AzureOpenAI` client against cloud-mock's Azure mock: the
/// mock answers the URLs, versions and credentials the SDK builds, so it cannot simply
/// agree with our own adapter's mistakes.
#[tokio::test]
async fn the_azure_mock_answers_the_official_azure_openai_client() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    run_against_mock("azure_mock.py", &mock).await;
    let requests = mock.requests();
    let chat = requests
        .iter()
        .find(|r| r.path == "/openai/deployments/sdk-deployment/chat/completions")
        .unwrap_or_else(|| panic!("the SDK called other paths: {requests:?}"));
    assert_eq!(chat.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(chat.headers["api-key"], "azure-sdk-key");
    assert_eq!(mock.entra_tokens_minted(), 1);
}

/// The guardrail detector mocks against the services' own clients: the OpenAI SDK's
/// moderations and Microsoft's azure-ai-contentsafety.
#[tokio::test]
async fn the_detector_mocks_answer_the_official_moderation_and_content_safety_clients() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    run_against_mock("detectors_mock.py", &mock).await;
    let requests = mock.requests();
    assert!(
        requests.is_empty(),
        "detector calls are not chat requests: {requests:?}"
    );
}

/// Vertex AI through the agent: a service account's RS256 JWT, exchanged at the
/// account's token endpoint (verified with Google's own google-auth, not by us), a
/// token reused across calls, a key whose access token is sent as it is, and Claude
/// on Vertex from both caller formats.
#[tokio::test]
async fn vertex_ai_models_are_reached_with_a_service_account_or_an_access_token() {
    let python = std::env::var("AISIX_SDK_PYTHON").unwrap_or_else(|_| {
        panic!("AISIX_SDK_PYTHON is not set: run the suite with `bash scripts/test`, which installs google-auth into target/sdk-venv")
    });
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/vertex_jwt.py");
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().to_str().unwrap().to_owned();
    let mut keygen = Process::start(
        Path::new(&python),
        &[helper.to_str().unwrap(), "keygen", &keys],
        &[],
    );
    assert!(
        keygen.wait_exit(Duration::from_secs(60)).await.success(),
        "{}",
        keygen.output()
    );
    let private_key = std::fs::read_to_string(dir.path().join("key.pem")).unwrap();

    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let token_uri = format!("{}/token", mock.url());
    let email = "gateway@proj-1.iam.gserviceaccount.com";
    let account = serde_json::json!({"project": "proj-1", "region": "us-central1",
        "service_account_json": {"type": "service_account", "client_email": email,
            "private_key": private_key, "private_key_id": "kid-1", "token_uri": token_uri}});
    let access = serde_json::json!({"project": "proj-2", "region": "global",
        "access_token": "ya29.static-token"});
    // JSON is YAML: the resources file carries the credentials as JSON strings.
    let resources = serde_json::json!({
        "provider_keys": [
            {"id": "vx", "display_name": "vx", "provider": "vertex", "api_base": mock.url(), "api_key": account.to_string()},
            {"id": "vt", "display_name": "vt", "provider": "vertex", "api_base": mock.url(), "api_key": access.to_string()}],
        "models": [
            {"id": "m1", "display_name": "vx-flash", "model_name": "gemini-2.0-flash", "provider_key_id": "vx"},
            {"id": "m2", "display_name": "vt-flash", "model_name": "gemini-2.0-flash", "provider_key_id": "vt"},
            {"id": "m3", "display_name": "vt-claude", "model_name": "claude-sonnet-4-5", "provider_key_id": "vt"}],
        "api_keys": [{"id": "k1", "key_hash": key_hash("vertex-caller"), "allowed_models": ["*"]}]});
    std::fs::write(dir.path().join("resources.yaml"), resources.to_string()).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "resources_file: {}\nproxy:\n  addr: 127.0.0.1:0\nshutdown:\n  min_drain_secs: 0\n",
            dir.path().join("resources.yaml").display()
        ),
    )
    .unwrap();
    let (mut agent, url) = start_agent(&config).await;
    let client = reqwest::Client::new();
    let chat = |model: &str, stream: bool| {
        client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth("vertex-caller")
            .json(&serde_json::json!({"model": model, "stream": stream,
                "messages": [{"role": "user", "content": "Say hello."}]}))
            .send()
    };
    for stream in [false, true] {
        let r = chat("vx-flash", stream).await.unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.contains("Hello from"), "{text}");
    }
    let requests = mock.requests();
    let calls: Vec<_> = requests
        .iter()
        .filter(|r| r.path.contains("/publishers/"))
        .collect();
    assert_eq!(
        calls[0].path,
        "/v1/projects/proj-1/locations/us-central1/publishers/google/models/gemini-2.0-flash:generateContent"
    );
    assert_eq!(calls[0].headers["authorization"], "Bearer ya29.mock-1");
    assert_eq!(
        calls[1].headers["authorization"], "Bearer ya29.mock-1",
        "the token is reused"
    );
    let assertions = mock.google_assertions();
    assert_eq!(assertions.len(), 1);
    let mut verify = Process::start(
        Path::new(&python),
        &[
            helper.to_str().unwrap(),
            "verify",
            dir.path().join("pub.pem").to_str().unwrap(),
            &token_uri,
            email,
            "kid-1",
            &assertions[0],
        ],
        &[],
    );
    assert!(
        verify.wait_exit(Duration::from_secs(60)).await.success(),
        "{}",
        verify.output()
    );
    assert!(verify.output().contains("jwt ok"));

    let r = chat("vt-flash", false).await.unwrap();
    assert_eq!(r.status(), 200);
    let last = mock.requests().last().unwrap().clone();
    assert_eq!(
        last.path,
        "/v1/projects/proj-2/locations/global/publishers/google/models/gemini-2.0-flash:generateContent"
    );
    assert_eq!(last.headers["authorization"], "Bearer ya29.static-token");

    // Claude on Vertex AI: Anthropic's messages at rawPredict, native and translated.
    let messages = |stream: bool| {
        client
            .post(format!("{url}/v1/messages"))
            .header("x-api-key", "vertex-caller")
            .header("anthropic-version", "2023-06-01")
            .json(
                &serde_json::json!({"model": "vt-claude", "max_tokens": 64, "stream": stream,
                "messages": [{"role": "user", "content": "Say hello."}]}),
            )
            .send()
    };
    let r = messages(false).await.unwrap();
    assert_eq!(r.status(), 200);
    let message: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        message["content"][0]["text"],
        "Hello from the mock provider."
    );
    let last = mock.requests().last().unwrap().clone();
    assert_eq!(
        last.path,
        "/v1/projects/proj-2/locations/global/publishers/anthropic/models/claude-sonnet-4-5:rawPredict"
    );
    let sent = last.json();
    assert_eq!(sent["anthropic_version"], "vertex-2023-10-16");
    assert!(sent.get("model").is_none(), "{sent}");
    let r = messages(true).await.unwrap();
    let text = r.text().await.unwrap();
    assert!(text.contains("event: message_stop"), "{text}");
    assert!(
        mock.requests()
            .last()
            .unwrap()
            .path
            .ends_with(":streamRawPredict")
    );
    let r = chat("vt-claude", false).await.unwrap();
    assert_eq!(r.status(), 200);
    let answer: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Hello from the mock provider."
    );
    // The private key is nowhere in the agent's output.
    agent.signal("TERM");
    agent.wait_exit(Duration::from_secs(10)).await;
    let output = agent.output();
    assert!(
        !output.contains("PRIVATE KEY") && !output.contains("ya29."),
        "{output}"
    );
}
