//! OpenTelemetry traces as an operator's collector receives them: the release binary
//! exports to cloud-mock's OTLP/HTTP receiver, and every export is decoded with the
//! OpenTelemetry project's own protobuf definitions (`opentelemetry-proto`, installed
//! by `scripts/test`). Checked: the span tree of a call with a failover, the GenAI
//! attributes, the caller's trace continued and sent upstream, one request id on
//! every span, sampling, no prompt or key in any span, and a dead or slow collector
//! changing nothing for callers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::time::{Duration, Instant};

use cloud_mock::provider::otlp::OtlpScript;
use cloud_mock::provider::{MockProvider, Script};
use serde_json::{Value, json};
use tests::metrics::{parse_openmetrics, sample};
use tests::{Process, eventually, free_port, get_json, http_client, key_hash, start_file_agent};

const CALLER: &str = "sk-otlp-caller-5c1e";
const PROVIDER_SECRET: &str = "sk-otlp-provider-secret-9a7f";
const PROMPT: &str = "the-secret-recipe-of-grandma";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

struct Agent {
    process: Process,
    proxy: String,
    metrics: String,
    _dir: tempfile::TempDir,
}

/// A file-mode agent on `mock`, exporting traces to `endpoint`.
async fn start(mock: &MockProvider, tracing: &str) -> Agent {
    mock.set_script_for(
        "up-broken",
        Script {
            status: 500,
            ..Script::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let resources = format!(
        r#"
provider_keys:
  - {{id: pk1, display_name: mock, provider: openai, api_base: "{base}", api_key: {PROVIDER_SECRET}}}
models:
  - {{id: m1, display_name: backup, model_name: up-gpt, provider_key_id: pk1}}
  - {{id: m2, display_name: primary, model_name: up-broken, provider_key_id: pk1}}
  - {{id: r1, display_name: routed, routing: {{retries: 0, targets: [{{model: primary}}, {{model: backup}}]}}}}
api_keys:
  - {{id: k1, key_hash: {caller}, allowed_models: ["*"], rate_limit: {{rpm: 1000}}}}
guardrails:
  - {{id: g1, name: no-passwords, hook_point: input, patterns: [{{kind: literal, value: password}}]}}
"#,
        base = mock.url(),
        caller = key_hash(CALLER),
    );
    let (process, proxy, metrics) = start_file_agent(
        dir.path(),
        &resources,
        &format!(
            "proxy:\n  addr: 127.0.0.1:0\nobservability:\n  log_format: json\n  service_name: orders-gateway\n  metrics:\n    prometheus: {{addr: \"127.0.0.1:0\"}}\n  tracing:\n    otlp: {tracing}\nshutdown:\n  min_drain_secs: 0\n"
        ),
    )
    .await;
    Agent {
        process,
        proxy,
        metrics,
        _dir: dir,
    }
}

async fn chat(agent: &Agent, body: Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = http_client()
        .post(format!("{}/v1/chat/completions", agent.proxy))
        .bearer_auth(CALLER)
        .json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// The spans received so far whose trace holds a span with `request_id`, once there
/// are at least `spans_at_least` of them.
async fn trace_of(mock: &MockProvider, request_id: &str, spans_at_least: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let spans = tests::otlp::received(&mock.url(), "traces").await;
        let trace = spans
            .iter()
            .find(|s| s["attributes"]["aisix.request_id"] == request_id)
            .map(|s| s["trace_id"].clone());
        if let Some(trace) = trace {
            let found: Vec<Value> = spans
                .into_iter()
                .filter(|s| s["trace_id"] == trace)
                .collect();
            if found.len() >= spans_at_least {
                return found;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the spans of {request_id} did not reach the collector"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The agent's metrics at `base` (its metrics listener), parsed.
async fn scrape(base: &str) -> Vec<Value> {
    let text = http_client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    parse_openmetrics(&text)
}

/// The longest of 20 answered calls, one after the other.
async fn slowest_of_20(agent: &Agent) -> Duration {
    let body = json!({"model": "backup", "messages": [{"role": "user", "content": "hi"}]});
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let response = chat(agent, body.clone(), &[]).await;
        assert_eq!(response.status(), 200);
        let _ = response.bytes().await.unwrap();
        slowest = slowest.max(started.elapsed());
    }
    slowest
}

fn named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

#[tokio::test]
async fn a_failed_over_call_is_one_trace_continued_from_the_caller_with_genai_attributes() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let agent = start(
        &mock,
        &format!(
            "{{enabled: true, endpoint: \"{}\", sample_ratio: 1.0}}",
            mock.url()
        ),
    )
    .await;
    let request_id = "req_abc123-orders-svc";
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let response = chat(
        &agent,
        json!({"model": "routed", "max_tokens": 50, "temperature": 0.2,
               "messages": [{"role": "user", "content": PROMPT}]}),
        &[
            ("x-aisix-request-id", request_id),
            ("traceparent", &traceparent),
            ("tracestate", "vendor=abc"),
        ],
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-aisix-request-id"].to_str().unwrap(),
        request_id
    );
    // Server span, two attempts, the rate-limit and guardrail steps.
    let spans = trace_of(&mock, request_id, 5).await;
    let exported = serde_json::to_string(&spans).unwrap();
    for secret in [CALLER, PROVIDER_SECRET, PROMPT] {
        assert!(!exported.contains(secret), "{secret} exported: {exported}");
    }
    let server = named(&spans, "POST /v1/chat/completions");
    assert_eq!(server.len(), 1, "{exported}");
    let server = server[0];
    assert_eq!(server["kind"], "SPAN_KIND_SERVER");
    assert_eq!(server["trace_id"], TRACE_ID, "the caller's trace goes on");
    assert_eq!(server["parent_span_id"], CALLER_SPAN);
    assert_eq!(server["trace_state"], "vendor=abc");
    assert_eq!(server["resource"]["service.name"], "orders-gateway");
    assert_eq!(server["content_type"], "application/x-protobuf");
    assert_eq!(server["scope"], "aisix-agent");
    assert_eq!(server["scope_version"], env!("CARGO_PKG_VERSION"));
    // Sampled, and a remote parent (the caller's), per trace.proto's `SpanFlags`.
    assert_eq!(server["flags"], 0x301, "{server}");
    let attributes = &server["attributes"];
    assert_eq!(attributes["http.response.status_code"], 200);
    assert_eq!(attributes["http.route"], "/v1/chat/completions");
    assert_eq!(attributes["aisix.api_key_id"], "k1");
    assert_eq!(attributes["aisix.model"], "routed");
    assert!(attributes["gen_ai.usage.input_tokens"].as_i64().unwrap() > 0);

    // Every span: a child of the server span (the server's is the caller's) and the
    // request's id.
    for span in &spans {
        assert_eq!(span["attributes"]["aisix.request_id"], request_id, "{span}");
        if span["span_id"] != server["span_id"] {
            assert_eq!(span["parent_span_id"], server["span_id"], "{span}");
        }
    }
    let mut attempts: Vec<&Value> = spans
        .iter()
        .filter(|s| s["kind"] == "SPAN_KIND_CLIENT")
        .collect();
    attempts.sort_by_key(|s| s["start_ns"].as_u64());
    assert_eq!(attempts.len(), 2, "{exported}");
    let (failed, answered) = (attempts[0], attempts[1]);
    assert_eq!(failed["name"], "chat up-broken");
    assert_eq!(failed["attributes"]["aisix.target"], "primary");
    assert_eq!(failed["attributes"]["aisix.next"], "failover");
    assert_eq!(failed["status"], "STATUS_CODE_ERROR");
    assert_eq!(failed["flags"], 0x101, "a local parent: {failed}");
    assert!(failed["attributes"]["error.type"].is_string());
    let a = &answered["attributes"];
    assert_eq!(answered["name"], "chat up-gpt");
    assert_eq!(answered["status"], "STATUS_CODE_UNSET");
    assert_eq!(a["aisix.target"], "backup");
    assert_eq!(a["gen_ai.operation.name"], "chat");
    assert_eq!(a["gen_ai.provider.name"], "openai");
    assert_eq!(a["gen_ai.request.model"], "up-gpt");
    assert_eq!(a["gen_ai.request.max_tokens"], 50);
    assert_eq!(a["gen_ai.request.temperature"], 0.2);
    assert_eq!(a["gen_ai.response.model"], "up-gpt");
    assert_eq!(a["gen_ai.response.finish_reasons"], json!(["stop"]));
    assert_eq!(a["http.response.status_code"], 200);
    assert_eq!(a["server.address"], "127.0.0.1");
    assert!(a["gen_ai.usage.input_tokens"].as_i64().unwrap() > 0);
    assert!(a["gen_ai.usage.output_tokens"].as_i64().unwrap() > 0);
    // The answering attempt lasts until the answer was sent.
    assert!(answered["end_ns"].as_u64() <= server["end_ns"].as_u64());
    for step in ["aisix.rate_limit", "aisix.guardrails.input"] {
        let step = named(&spans, step);
        assert_eq!(step.len(), 1, "{exported}");
        assert_eq!(step[0]["kind"], "SPAN_KIND_INTERNAL");
    }
    assert_eq!(
        named(&spans, "aisix.rate_limit")[0]["attributes"]["aisix.outcome"],
        "admitted"
    );

    // Each upstream request carried its attempt's context and the request id.
    let upstream: Vec<_> = mock
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .collect();
    assert_eq!(upstream.len(), 2);
    for (request, attempt) in upstream.iter().zip([failed, answered]) {
        let sent = &request.headers["traceparent"];
        assert_eq!(
            sent,
            &format!("00-{TRACE_ID}-{}-01", attempt["span_id"].as_str().unwrap())
        );
        assert_eq!(request.headers["tracestate"], "vendor=abc");
        assert_eq!(request.headers["x-aisix-request-id"], request_id);
    }

    // A streamed call: the attempt's span carries the streamed usage and the time to
    // the first token; a new trace without a caller's context.
    let response = chat(
        &agent,
        json!({"model": "backup", "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "hi"}]}),
        &[("x-aisix-request-id", "req-streamed-1")],
    )
    .await;
    assert_eq!(response.status(), 200);
    let _ = response.text().await.unwrap();
    let spans = trace_of(&mock, "req-streamed-1", 3).await;
    let server = named(&spans, "POST /v1/chat/completions")[0];
    assert_eq!(server["parent_span_id"], "", "a root span: {server}");
    assert_ne!(server["trace_id"], TRACE_ID);
    let attempt = spans
        .iter()
        .find(|s| s["kind"] == "SPAN_KIND_CLIENT")
        .unwrap();
    let a = &attempt["attributes"];
    assert!(
        a["gen_ai.usage.output_tokens"].as_i64().unwrap() > 0,
        "{attempt}"
    );
    assert!(a["gen_ai.server.time_to_first_token"].as_f64().unwrap() > 0.0);
    assert_eq!(a["gen_ai.response.finish_reasons"], json!(["stop"]));
    assert_eq!(a["aisix.stream"], true);

    // A refusal is traced too: the guardrail's step says so, the server span has the
    // status and no attempt was made.
    let response = chat(
        &agent,
        json!({"model": "backup", "messages": [{"role": "user", "content": "my password"}]}),
        &[("x-aisix-request-id", "req-refused-1")],
    )
    .await;
    assert_eq!(response.status(), 422);
    let spans = trace_of(&mock, "req-refused-1", 2).await;
    let server = named(&spans, "POST /v1/chat/completions")[0];
    assert_eq!(server["attributes"]["http.response.status_code"], 422);
    assert!(server["attributes"]["error.type"].is_string(), "{server}");
    assert_eq!(
        named(&spans, "aisix.guardrails.input")[0]["attributes"]["aisix.outcome"],
        "blocked"
    );
    assert!(!spans.iter().any(|s| s["kind"] == "SPAN_KIND_CLIENT"));

    // The exporter's own counts.
    let families = scrape(&agent.metrics).await;
    assert!(sample(&families, "aisix_otlp_spans_exported_total", &[]).unwrap() >= 10.0);
    assert_eq!(
        sample(
            &families,
            "aisix_otlp_spans_dropped_total",
            &[("reason", "export_failed")]
        ),
        Some(0.0)
    );
    drop(agent.process);
}

#[tokio::test]
async fn sampling_keeps_the_ratio_for_new_traces_and_the_callers_decision_for_its_own() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let agent = start(
        &mock,
        &format!(
            "{{enabled: true, endpoint: \"{}/v1/traces\", sample_ratio: 0.0}}",
            mock.url()
        ),
    )
    .await;
    let body = json!({"model": "backup", "messages": [{"role": "user", "content": "hi"}]});
    let not_sampled = format!("00-{TRACE_ID}-{CALLER_SPAN}-00");
    let sampled = format!("00-{}-{CALLER_SPAN}-01", "a".repeat(32));
    for (id, traceparent) in [
        ("req-new", None),
        ("req-caller-unsampled", Some(not_sampled.as_str())),
        ("req-caller-sampled", Some(sampled.as_str())),
    ] {
        let mut headers = vec![("x-aisix-request-id", id)];
        headers.extend(traceparent.map(|t| ("traceparent", t)));
        let response = chat(&agent, body.clone(), &headers).await;
        assert_eq!(response.status(), 200);
        let _ = response.bytes().await.unwrap();
    }
    // The caller's sampled trace arrives; by then the others would have too.
    let spans = trace_of(&mock, "req-caller-sampled", 3).await;
    assert_eq!(spans[0]["trace_id"], "a".repeat(32));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let all = tests::otlp::received(&mock.url(), "traces").await;
    for id in ["req-new", "req-caller-unsampled"] {
        assert!(
            !all.iter()
                .any(|s| s["attributes"]["aisix.request_id"] == id),
            "{id} was not to be sampled"
        );
    }
    // Not recorded here, the caller's context still goes upstream as it came.
    let upstream = mock.requests();
    assert!(
        upstream.iter().any(|r| r
            .headers
            .get("traceparent")
            .is_some_and(|t| t.starts_with(&format!("00-{TRACE_ID}-")) && t.ends_with("-00"))),
        "the unsampled context was sent on"
    );
}

#[tokio::test]
async fn a_dead_or_slow_collector_costs_callers_nothing_and_is_counted() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    // Nothing listens on this port.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let agent = start(
        &mock,
        &format!("{{enabled: true, endpoint: \"{dead}\", timeout_ms: 500}}"),
    )
    .await;
    let slowest = slowest_of_20(&agent).await;
    assert!(
        slowest < Duration::from_millis(400),
        "a call waited for the dead collector: {slowest:?}"
    );
    eventually(
        "the lost spans are counted and reported",
        Duration::from_secs(20),
        || async {
            let status = get_json(&format!("{}/status/config", agent.metrics)).await;
            status["tracing"]["spans_dropped_export_failed"]
                .as_u64()
                .is_some_and(|n| n > 0)
                && status["tracing"]["last_error"].is_string()
        },
    )
    .await;
    let families = scrape(&agent.metrics).await;
    assert!(
        sample(
            &families,
            "aisix_otlp_spans_dropped_total",
            &[("reason", "export_failed")]
        )
        .unwrap()
            > 0.0
    );
    drop(agent);

    // A collector that takes 3 s to answer each export: calls are as quick as ever.
    mock.set_otlp_script(OtlpScript {
        status: 200,
        delay_ms: 3_000,
    });
    let agent = start(
        &mock,
        &format!("{{enabled: true, endpoint: \"{}\"}}", mock.url()),
    )
    .await;
    let slowest = slowest_of_20(&agent).await;
    assert!(
        slowest < Duration::from_millis(400),
        "a call waited for the slow collector: {slowest:?}"
    );
    drop(agent);

    // A collector that refuses every export: the batches are counted as lost, and
    // /status/config says what the collector answered.
    mock.set_otlp_script(OtlpScript {
        status: 503,
        delay_ms: 0,
    });
    let agent = start(
        &mock,
        &format!("{{enabled: true, endpoint: \"{}\"}}", mock.url()),
    )
    .await;
    slowest_of_20(&agent).await;
    eventually(
        "the refused spans are counted with the collector's answer",
        Duration::from_secs(20),
        || async {
            let status = get_json(&format!("{}/status/config", agent.metrics)).await;
            let tracing = &status["tracing"];
            tracing["spans_dropped_export_failed"]
                .as_u64()
                .is_some_and(|n| n > 0)
                && tracing["last_error"] == "the collector answered 503 Service Unavailable"
        },
    )
    .await;
    let status = get_json(&format!("{}/status/config", agent.metrics)).await;
    assert_eq!(status["tracing"]["spans_exported"], 0, "{status}");
}

#[tokio::test]
async fn a_bad_tracing_setting_stops_start_up_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("r.yaml"), "provider_keys: []\n").unwrap();
    for (otlp, field) in [
        (
            "{enabled: true, endpoint: \"grpc://collector:4317\"}",
            "observability.tracing.otlp.endpoint",
        ),
        (
            "{enabled: true, sample_ratio: 1.5}",
            "observability.tracing.otlp.sample_ratio",
        ),
    ] {
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "resources_file: {}\nobservability:\n  tracing:\n    otlp: {otlp}\n",
                dir.path().join("r.yaml").display()
            ),
        )
        .unwrap();
        let mut process = Process::start(
            &tests::binary("aisix-agent"),
            &["--config", config.to_str().unwrap()],
            &[],
        );
        let status = process.wait_exit(Duration::from_secs(10)).await;
        assert!(!status.success());
        assert!(process.output().contains(field), "{}", process.output());
    }
}

/// A number of an OTLP data point as `MessageToDict` writes it (64-bit integers are
/// strings in protobuf's JSON mapping).
fn as_f64(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str()?.parse().ok())
}

#[tokio::test]
async fn metrics_are_pushed_over_otlp_as_the_families_prometheus_serves() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let resources = format!(
        r#"
provider_keys:
  - {{id: pk1, display_name: mock, provider: openai, api_base: "{base}", api_key: {PROVIDER_SECRET}}}
models:
  - {{id: m1, display_name: backup, model_name: up-gpt, provider_key_id: pk1}}
api_keys:
  - {{id: k1, key_hash: {caller}, allowed_models: ["*"]}}
"#,
        base = mock.url(),
        caller = key_hash(CALLER),
    );
    let (process, proxy, metrics) = start_file_agent(
        dir.path(),
        &resources,
        &format!(
            "proxy:\n  addr: 127.0.0.1:0\nobservability:\n  service_name: orders-gateway\n  metrics:\n    prometheus: {{addr: \"127.0.0.1:0\"}}\n    otlp: {{enabled: true, endpoint: \"{}\", interval_secs: 1}}\nshutdown:\n  min_drain_secs: 0\n",
            mock.url()
        ),
    )
    .await;
    let agent = Agent {
        process,
        proxy,
        metrics,
        _dir: dir,
    };
    for _ in 0..3 {
        let response = chat(
            &agent,
            json!({"model": "backup", "messages": [{"role": "user", "content": "hi"}]}),
            &[],
        )
        .await;
        assert_eq!(response.status(), 200);
        let _ = response.bytes().await.unwrap();
    }
    let served = scrape(&agent.metrics).await;
    let requests = sample(
        &served,
        "aisix_proxy_requests_total",
        &[("endpoint", "/v1/chat/completions"), ("status", "200")],
    )
    .unwrap();
    assert_eq!(requests, 3.0);
    // The newest push, once it counts the three requests.
    let deadline = Instant::now() + Duration::from_secs(15);
    let pushed = loop {
        let exports: Value = reqwest::get(format!("{}/_mock/otlp?signal=metrics", mock.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let newest = match exports.as_array().unwrap().last() {
            Some(last) => tests::otlp::decode(&json!([last]), "metrics"),
            None => Vec::new(),
        };
        let counted = newest
            .iter()
            .filter(|m| m["name"] == "aisix_proxy_requests")
            .flat_map(|m| m["points"].as_array().unwrap().clone())
            .any(|p| {
                p["attributes"]["endpoint"] == "/v1/chat/completions"
                    && p["attributes"]["status"] == "200"
                    && as_f64(&p["as_int"]) == Some(requests)
            });
        if counted {
            break newest;
        }
        assert!(Instant::now() < deadline, "no push counted the requests");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(pushed[0]["resource"]["service.name"], "orders-gateway");
    let pushes = scrape(&agent.metrics).await;
    assert!(
        sample(
            &pushes,
            "aisix_otlp_metric_pushes_total",
            &[("outcome", "ok")]
        )
        .unwrap()
            >= 1.0
    );
    let requests = pushed
        .iter()
        .find(|m| m["name"] == "aisix_proxy_requests")
        .unwrap();
    assert_eq!(requests["kind"], "sum");
    assert_eq!(requests["monotonic"], true);
    // 2 = AGGREGATION_TEMPORALITY_CUMULATIVE.
    assert_eq!(requests["temporality"], 2);
    // Every family Prometheus serves is pushed, by the same name (an info family
    // with its `_info` sample name).
    let names: std::collections::BTreeSet<String> = pushed
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect();
    for family in &served {
        let name = family["name"].as_str().unwrap();
        let expected = if family["type"] == "info" {
            format!("{name}_info")
        } else {
            name.to_owned()
        };
        assert!(
            names.contains(&expected),
            "{expected} not pushed: {names:?}"
        );
    }
    // Histograms keep their buckets.
    let duration = pushed
        .iter()
        .find(|m| m["name"] == "aisix_proxy_request_duration_seconds")
        .unwrap();
    assert_eq!(duration["kind"], "histogram");
    let point = &duration["points"][0];
    let bounds: Vec<f64> = point["explicit_bounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_f64().unwrap())
        .collect();
    let mut served_bounds: Vec<f64> = served
        .iter()
        .find(|f| f["name"] == "aisix_proxy_request_duration_seconds")
        .unwrap()["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["labels"]["le"].as_str())
        .filter(|le| *le != "+Inf")
        .map(|le| le.parse::<f64>().unwrap())
        .collect();
    served_bounds.sort_by(f64::total_cmp);
    served_bounds.dedup();
    assert_eq!(bounds, served_bounds);
    let counts: f64 = point["bucket_counts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(as_f64)
        .sum();
    assert_eq!(Some(counts), as_f64(&point["count"]));
}
