//! What an operator sees: metrics (parsed by the Prometheus project's own OpenMetrics
//! parser), `/status/config` and `/status/ready`, the JSON access log, and planted
//! secrets that must never appear in any of them or in any response.
//!
//! `scripts/test` installs the parser (`prometheus-client` from PyPI) into
//! `target/sdk-venv` and sets `AISIX_SDK_PYTHON`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::path::Path;
use std::time::Duration;

use cloud_mock::provider::{MockProvider, Script};
use serde_json::{Value, json};
use tests::metrics::{family, parse_openmetrics, sample};
use tests::{Process, addr_in, http_client, key_hash, start_agent, start_file_agent};

const PROVIDER_SECRET: &str = "sk-planted-provider-secret-7f3a9c";
const CALLER_SECRET: &str = "sk-planted-caller-secret-41d7e2";
const WRONG_SECRET: &str = "sk-planted-wrong-secret-93b0aa";

struct Agent {
    process: Process,
    proxy: String,
    metrics: String,
    mock: MockProvider,
    _dir: tempfile::TempDir,
}

async fn start() -> Agent {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    mock.set_script_for(
        "up-broken",
        Script {
            status: 500,
            error_body: Some(format!("upstream saw key {PROVIDER_SECRET}")),
            ..Script::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let resources = format!(
        r#"
provider_keys:
  - {{id: pk1, display_name: mock, provider: openai, api_base: "{base}", api_key: {PROVIDER_SECRET}}}
models:
  - {{id: m1, display_name: gpt, model_name: up-gpt, provider_key_id: pk1}}
  - {{id: m2, display_name: limited, model_name: up-gpt, provider_key_id: pk1, rate_limit: {{rpm: 1}}}}
  - {{id: m3, display_name: broken, model_name: up-broken, provider_key_id: pk1}}
  - {{id: m4, display_name: orphan, model_name: up-gpt, provider_key_id: pk-missing}}
api_keys:
  - {{id: k1, key_hash: {caller}, allowed_models: ["*"]}}
guardrails:
  - {{id: g1, name: no-passwords, hook_point: input, patterns: [{{kind: literal, value: password}}]}}
"#,
        base = mock.url(),
        caller = key_hash(CALLER_SECRET),
    );
    let (process, proxy, metrics) = start_file_agent(
        dir.path(),
        &resources,
        "proxy:\n  addr: 127.0.0.1:0\nobservability:\n  log_level: debug\n  log_format: json\n  metrics:\n    prometheus: {path: /prom}\n    client_type_rules: [{pattern: \"^OpenAI/Python\", client: openai-python}]\n    buckets: {request_ttft: [0.1, 1]}\ndownstream: {idle_timeout_secs: 60}\nshutdown:\n  min_drain_secs: 0\n",
    )
    .await;
    Agent {
        process,
        proxy,
        metrics,
        mock,
        _dir: dir,
    }
}

/// Everything a caller received: status, headers and body, for the secret scan.
async fn call(agent: &Agent, key: &str, id: &str, body: Value, seen: &mut String) -> u16 {
    let response = http_client()
        .post(format!("{}/v1/chat/completions", agent.proxy))
        .bearer_auth(key)
        .header("x-aisix-request-id", id)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    seen.push_str(&format!("{:?}", response.headers()));
    seen.push_str(&response.text().await.unwrap());
    status
}

fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// The JSON access-log line of request `id`.
fn access_line(output: &str, id: &str) -> Value {
    output
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["target"] == "aisix::access" && l["fields"]["request_id"] == id)
        .unwrap_or_else(|| panic!("no access-log line for {id} in\n{output}"))["fields"]
        .clone()
}

#[tokio::test]
async fn metrics_status_and_access_log_tell_what_happened_and_no_secret_leaks() {
    let mut agent = start().await;
    let mut seen = String::new();
    let key = CALLER_SECRET;
    assert_eq!(
        call(&agent, key, "obs-ok", chat("gpt", "hi"), &mut seen).await,
        200
    );
    let mut stream = chat("gpt", "hi");
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    assert_eq!(
        call(&agent, key, "obs-stream", stream, &mut seen).await,
        200
    );
    assert_eq!(
        call(
            &agent,
            WRONG_SECRET,
            "obs-badkey",
            chat("gpt", "hi"),
            &mut seen
        )
        .await,
        401
    );
    assert_eq!(
        call(
            &agent,
            key,
            "obs-nomodel",
            chat("no-such-model-xyz", "hi"),
            &mut seen
        )
        .await,
        404
    );
    assert_eq!(
        call(&agent, key, "obs-lim1", chat("limited", "hi"), &mut seen).await,
        200
    );
    assert_eq!(
        call(&agent, key, "obs-lim2", chat("limited", "hi"), &mut seen).await,
        429
    );
    assert_eq!(
        call(
            &agent,
            key,
            "obs-guard",
            chat("gpt", "my password is x"),
            &mut seen
        )
        .await,
        422
    );
    assert_eq!(
        call(&agent, key, "obs-broken", chat("broken", "hi"), &mut seen).await,
        502
    );

    // Metrics: valid OpenMetrics, and they say what happened.
    let http = http_client();
    let response = http
        .get(format!("{}/prom", agent.metrics))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();
    let families = parse_openmetrics(&text);
    for f in &families {
        let name = f["name"].as_str().unwrap();
        assert!(
            name.starts_with("aisix_") && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{name}"
        );
    }
    let chat_route = ("endpoint", "/v1/chat/completions");
    // Callers without a matching User-Agent are `other` (client_type_rules are set).
    let requests = |model: &str, status: &str| {
        sample(
            &families,
            "aisix_proxy_requests_total",
            &[
                chat_route,
                ("model", model),
                ("status", status),
                ("client_type", "other"),
            ],
        )
    };
    assert_eq!(requests("gpt", "200"), Some(2.0));
    assert_eq!(requests("", "401"), Some(1.0));
    // A model name nobody configured is not a label value (labels stay bounded).
    assert_eq!(requests("", "404"), Some(1.0));
    assert!(!text.contains("no-such-model-xyz"), "{text}");
    assert_eq!(requests("limited", "429"), Some(1.0));
    assert_eq!(requests("gpt", "422"), Some(1.0));
    assert_eq!(requests("broken", "502"), Some(1.0));
    for (policy, n) in [("rate_limit", 1.0), ("guardrail", 1.0)] {
        assert_eq!(
            sample(
                &families,
                "aisix_policy_rejections_total",
                &[("policy", policy)]
            ),
            Some(n)
        );
    }
    let tokens = |family: &str| {
        sample(
            &families,
            &format!("aisix_llm_{family}_tokens_total"),
            &[("model", "gpt"), ("provider", "openai")],
        )
    };
    assert_eq!(
        (tokens("input"), tokens("output"), tokens("total")),
        (Some(20.0), Some(6.0), Some(26.0))
    );
    assert_eq!(
        sample(
            &families,
            "aisix_upstream_failures_total",
            &[("model", "broken"), ("kind", "server_error")]
        ),
        Some(1.0)
    );
    assert_eq!(
        family(&families, "aisix_proxy_request_duration_seconds")["type"],
        "histogram"
    );
    assert_eq!(
        sample(
            &families,
            "aisix_proxy_request_duration_seconds_count",
            &[chat_route, ("model", "gpt"), ("status", "200")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &families,
            "aisix_llm_time_to_first_token_seconds_count",
            &[("model", "gpt"), ("provider", "openai"), ("status", "200")]
        ),
        Some(1.0)
    );
    // AISIX's failure and deployment families: the broken model's one failed call.
    assert_eq!(
        sample(
            &families,
            "aisix_proxy_failed_requests_total",
            &[chat_route, ("model", "broken")]
        ),
        Some(1.0)
    );
    let broken = [("model", "broken"), ("deployment", "broken")];
    for (name, expected) in [
        ("aisix_deployment_requests_total", 1.0),
        ("aisix_deployment_failure_responses_total", 1.0),
        ("aisix_deployment_state", 0.0),
    ] {
        assert_eq!(sample(&families, name, &broken), Some(expected), "{name}");
    }
    assert_eq!(
        sample(
            &families,
            "aisix_deployment_success_responses_total",
            &[("model", "gpt"), ("deployment", "gpt")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &families,
            "aisix_ratelimit_rejections_total",
            &[("scope", "api_key")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&families, "aisix_config_reload_failures_total", &[]),
        Some(0.0)
    );
    let gpt_attempts = [("model", "gpt"), ("provider", "openai"), ("status", "200")];
    assert_eq!(
        sample(
            &families,
            "aisix_llm_request_duration_seconds_count",
            &gpt_attempts
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(&families, "aisix_llm_requests_total", &gpt_attempts),
        Some(2.0)
    );
    // A failed attempt counts under the status it came to.
    assert_eq!(
        sample(
            &families,
            "aisix_llm_requests_total",
            &[("model", "broken"), ("status", "502")]
        ),
        Some(1.0)
    );
    assert_eq!(family(&families, "aisix_config_source")["type"], "info");
    assert_eq!(
        sample(&families, "aisix_config_source_info", &[("source", "file")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&families, "aisix_config_applied_revision", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&families, "aisix_config_reloads_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&families, "aisix_config_rejected_resources", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&families, "aisix_snapshot_resources", &[("kind", "models")]),
        Some(3.0)
    );
    assert_eq!(
        sample(&families, "aisix_model_health", &[("model", "broken")]),
        Some(0.0)
    );
    assert!(sample(&families, "aisix_snapshot_age_seconds", &[]).is_some());
    // File mode has no watch to be connected, and no certificate or usage queue.
    for absent in [
        "aisix_config_source_connected",
        "aisix_certificate_remaining_days",
        "aisix_usage_queue_events",
    ] {
        assert!(families.iter().all(|f| f["name"] != absent), "{absent}");
    }
    seen.push_str(&text);

    // A caller whose User-Agent matches a rule is counted under that rule's client.
    let r = http
        .post(format!("{}/v1/chat/completions", agent.proxy))
        .bearer_auth(CALLER_SECRET)
        .header("user-agent", "OpenAI/Python 1.52.0")
        .json(&chat("gpt", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let (families, _) = tests::metrics::scrape(&format!("{}/prom", agent.metrics)).await;
    let labels = [
        chat_route,
        ("model", "gpt"),
        ("status", "200"),
        ("client_type", "openai-python"),
    ];
    assert_eq!(
        sample(&families, "aisix_proxy_requests_total", &labels),
        Some(1.0)
    );

    // /status/config and /status/ready.
    let status = tests::get_json(&format!("{}/status/config", agent.metrics)).await;
    assert_eq!(status["source"], "file");
    assert_eq!(status["loaded_from"], "file");
    assert_eq!(status["connected"], Value::Null);
    assert_eq!(status["applied_revision"], 1);
    assert_eq!(status["config_hash"].as_str().unwrap().len(), 64);
    assert_eq!(
        status["resources"],
        json!({"provider_keys": 1, "models": 3, "api_keys": 1, "guardrails": 1, "guardrail_attachments": 0})
    );
    let rejected = &status["rejected_resources"][0];
    assert_eq!(rejected["key"], "/aisix/models/m4");
    assert!(
        rejected["error"].as_str().unwrap().contains("pk-missing"),
        "{rejected}"
    );
    assert_eq!(
        status["ignored"],
        json!(["observability.metrics.buckets (histograms use the built-in buckets)"])
    );
    seen.push_str(&status.to_string());
    let ready = http
        .get(format!("{}/status/ready", agent.metrics))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<Value>().await.unwrap(),
        json!({"ready": true, "config_loaded": true, "draining": false})
    );

    // One access-log line per request, with what happened.
    let output = agent.process.output();
    let ok = access_line(&output, "obs-ok");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["api_key_id"], "k1");
    assert_eq!(ok["model"], "gpt");
    assert_eq!(ok["served_by"], "gpt");
    assert_eq!(
        (ok["input_tokens"].as_u64(), ok["output_tokens"].as_u64()),
        (Some(10), Some(3))
    );
    assert!(ok["latency_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(ok["error_type"], Value::Null);
    let streamed = access_line(&output, "obs-stream");
    assert_eq!(streamed["output_tokens"], 3);
    assert!(streamed["ttft_ms"].as_f64().is_some(), "{streamed}");
    let limited = access_line(&output, "obs-lim2");
    assert_eq!(limited["status"], 429);
    assert_eq!(limited["error_type"], "rate_limit_exceeded");
    let bad = access_line(&output, "obs-badkey");
    assert_eq!(bad["error_type"], "invalid_api_key");
    assert_eq!(bad["api_key_id"], Value::Null);
    assert_eq!(
        access_line(&output, "obs-guard")["error_type"],
        "content_filter"
    );
    assert_eq!(
        access_line(&output, "obs-broken")["error_type"],
        "upstream_error"
    );
    assert_eq!(
        output.matches("\"target\":\"aisix::access\"").count(),
        9,
        "one line per request: the eight calls and the one with a client's User-Agent (start-up's /livez probe is not logged, scrapes are on another listener)"
    );

    // The planted secrets reached the upstream (that is their job) and nowhere else:
    // not the log (at debug), not a response, not metrics or status.
    assert!(
        agent
            .mock
            .requests()
            .iter()
            .any(|r| r.headers.values().any(|v| v.contains(PROVIDER_SECRET))),
        "the provider key is what the upstream receives"
    );
    agent.process.signal("TERM");
    agent.process.wait_exit(Duration::from_secs(10)).await;
    let output = agent.process.output();
    assert!(output.contains("\"level\":\"DEBUG\""), "debug logs were on");
    for secret in [PROVIDER_SECRET, CALLER_SECRET, WRONG_SECRET] {
        assert!(!output.contains(secret), "{secret} in the log:\n{output}");
        assert!(!seen.contains(secret), "{secret} in a response:\n{seen}");
    }
}

/// Starts an agent with an empty resources file and `observability` settings.
async fn start_plain(observability: &str, dir: &Path) -> (Process, String) {
    std::fs::write(dir.join("r.yaml"), "models: []\n").unwrap();
    let config = dir.join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "resources_file: {}\nproxy:\n  addr: 127.0.0.1:0\nobservability:\n{observability}shutdown:\n  min_drain_secs: 3\n",
            dir.join("r.yaml").display()
        ),
    )
    .unwrap();
    start_agent(&config).await
}

#[tokio::test]
async fn status_ready_fails_while_draining() {
    let dir = tempfile::tempdir().unwrap();
    let (mut process, _) = start_plain("  log_level: info\n", dir.path()).await;
    let line = process
        .wait_for_line("metrics listener ready", Duration::from_secs(10))
        .await;
    let url = format!("http://{}/status/ready", addr_in(&line));
    let http = http_client();
    let get = || async {
        let r = http.get(&url).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(get().await.0, 200);
    process.signal("TERM");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let answer = loop {
        let answer = get().await;
        if answer.0 == 503 || tokio::time::Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(
        answer,
        (
            503,
            json!({"ready": false, "config_loaded": true, "draining": true})
        )
    );
    assert!(process.wait_exit(Duration::from_secs(15)).await.success());
}

#[tokio::test]
async fn metrics_listener_can_be_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let (process, proxy) =
        start_plain("  metrics:\n    prometheus: {enabled: false}\n", dir.path()).await;
    let ok = http_client()
        .get(format!("{proxy}/livez"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let output = process.output();
    assert!(output.contains("proxy listener ready"), "{output}");
    assert!(!output.contains("metrics listener ready"), "{output}");
}

#[tokio::test]
async fn rust_log_overrides_the_configured_level() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("r.yaml"), "models: []\n").unwrap();
    // A known port, so readiness can be polled without a log line.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "resources_file: {}\nproxy:\n  addr: 127.0.0.1:{port}\nobservability:\n  log_level: error\nshutdown:\n  min_drain_secs: 0\n",
            dir.path().join("r.yaml").display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let run = |envs: &'static [(&'static str, &'static str)]| async move {
        let mut agent = Process::start(&tests::binary("aisix-agent"), &["--config", config], envs);
        let url = format!("http://127.0.0.1:{port}/livez");
        tests::eventually("the agent answers", Duration::from_secs(10), || async {
            http_client()
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        agent.signal("TERM");
        assert!(agent.wait_exit(Duration::from_secs(10)).await.success());
        agent.output()
    };
    // The configured level: nothing below ERROR.
    let output = run(&[]).await;
    assert!(!output.contains("INFO"), "{output}");
    // RUST_LOG wins: INFO lines, minus the access log it turned off.
    let output = run(&[("RUST_LOG", "info,aisix::access=off")]).await;
    assert!(output.contains("proxy listener ready"), "{output}");
    assert!(!output.contains("aisix::access"), "{output}");
}

#[tokio::test]
async fn a_status_listener_beyond_loopback_is_warned_about_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("r.yaml"), "models: []\n").unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "resources_file: {}\nproxy:\n  addr: 127.0.0.1:0\n",
            dir.path().join("r.yaml").display()
        ),
    )
    .unwrap();
    for (addr, warned) in [("0.0.0.0:0", true), ("127.0.0.1:0", false)] {
        let mut process = tests::Process::start(
            &tests::binary("aisix-agent"),
            &["--config", config.to_str().unwrap()],
            &[("AISIX_OBSERVABILITY__METRICS__PROMETHEUS__ADDR", addr)],
        );
        process
            .wait_for_line("metrics listener ready", Duration::from_secs(20))
            .await;
        let output = process.output();
        assert_eq!(
            output.contains("has no authentication and listens beyond this host"),
            warned,
            "{addr}: {output}"
        );
    }
}

#[tokio::test]
async fn a_stream_broken_mid_answer_is_in_the_access_log_and_the_metrics() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    mock.set_script(Script {
        chunks: 5,
        drop_after_chunks: Some(2),
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let resources = format!(
        "provider_keys:\n  - {{id: pk1, display_name: mock, provider: openai, api_base: \"{}\", api_key: {PROVIDER_SECRET}}}\nmodels:\n  - {{id: m1, display_name: gpt, model_name: up-gpt, provider_key_id: pk1}}\napi_keys:\n  - {{id: k1, key_hash: {}, allowed_models: [\"*\"]}}\n",
        mock.url(),
        key_hash(CALLER_SECRET)
    );
    std::fs::write(dir.path().join("r.yaml"), resources).unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "resources_file: {}\nproxy:\n  addr: 127.0.0.1:0\nobservability:\n  log_format: json\n  metrics:\n    prometheus: {{path: /prom}}\nshutdown:\n  min_drain_secs: 0\n",
            dir.path().join("r.yaml").display()
        ),
    )
    .unwrap();
    let (mut process, proxy) = start_agent(&config).await;
    let line = process
        .wait_for_line("metrics listener ready", Duration::from_secs(10))
        .await;
    let metrics = format!("http://{}/prom", addr_in(&line));
    let response = http_client()
        .post(format!("{proxy}/v1/chat/completions"))
        .bearer_auth(CALLER_SECRET)
        .header("x-aisix-request-id", "obs-cut")
        .json(&json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The body ends in an abort, after the gateway's error event.
    let body = response.bytes().await;
    assert!(body.is_err(), "the broken stream ended cleanly: {body:?}");

    let text = http_client()
        .get(&metrics)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let families = parse_openmetrics(&text);
    assert_eq!(
        sample(
            &families,
            "aisix_upstream_failures_total",
            &[("model", "gpt"), ("kind", "stream_break")]
        ),
        Some(1.0)
    );
    process.signal("TERM");
    process.wait_exit(Duration::from_secs(10)).await;
    let output = process.output();
    let access = access_line(&output, "obs-cut");
    assert_eq!(access["status"], 200);
    assert_eq!(access["error_type"], "stream_error");
    // Two content deltas streamed before the cut.
    assert_eq!(access["output_tokens"], 2);
    assert!(output.contains("upstream stream broke"), "{output}");
    assert!(!output.contains(PROVIDER_SECRET) && !output.contains(CALLER_SECRET));
}
