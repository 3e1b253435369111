//! The real `aisix-agent` binary in file mode, against the mock provider.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloud_mock::provider::{MockProvider, Script};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tests::{Process, addr_in, binary, eventually, http_client, key_hash};

const CALLER: &str = "e2e-caller-key";
const STARTUP: Duration = Duration::from_secs(20);

struct Agent {
    process: Process,
    url: String,
    dir: tempfile::TempDir,
}

fn resources(api_base: &str, extra_models: &str) -> String {
    format!(
        r#"
provider_keys:
  - id: pk1
    display_name: mock
    provider: openai
    api_base: {api_base}/v1
    api_key: sk-e2e-upstream-secret
models:
  - id: m1
    display_name: gpt-4o-mini
    model_name: mock-gpt
    provider_key_id: pk1
{extra_models}
api_keys:
  - id: k1
    key_hash: {hash}
    allowed_models: ["*"]
"#,
        hash = key_hash(CALLER)
    )
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join("config.yaml");
    let text = format!(
        "resources_file: {}\nproxy:\n  addr: 127.0.0.1:0\n  request_body_limit_bytes: 65536\nshutdown:\n  min_drain_secs: 0\n  drain_timeout_secs: 10\n{extra}",
        dir.join("resources.yaml").display()
    );
    std::fs::write(&config, text).unwrap();
    config
}

async fn start_agent(resources_text: &str, extra_config: &str) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("resources.yaml"), resources_text).unwrap();
    let config = write_config(dir.path(), extra_config);
    let (process, url) = tests::start_agent(&config).await;
    Agent { process, url, dir }
}

async fn model_ids(client: &reqwest::Client, url: &str) -> Vec<String> {
    let body: Value = client
        .get(format!("{url}/v1/models"))
        .bearer_auth(CALLER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn post_chat(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Say hello."}]})
}

#[tokio::test]
async fn serves_models_and_chat_completions() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let agent = start_agent(&resources(&mock.url(), ""), "").await;
    let client = http_client();

    let livez = client
        .get(format!("{}/livez", agent.url))
        .send()
        .await
        .unwrap();
    assert_eq!(livez.status(), 200);
    assert_eq!(livez.text().await.unwrap(), "ok");
    assert_eq!(model_ids(&client, &agent.url).await, ["gpt-4o-mini"]);

    let r = post_chat(&client, &agent.url, CALLER, &chat("gpt-4o-mini", false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aisix-served-by"], "gpt-4o-mini");
    assert!(r.headers().contains_key("x-aisix-call-id"));
    let request_id = r.headers()["x-aisix-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from the mock provider."
    );
    assert_eq!(mock.requests()[0].json()["model"], "mock-gpt");
    assert_eq!(mock.requests()[0].headers["x-aisix-request-id"], request_id);

    mock.set_script(Script {
        chunks: 3,
        chunk_interval_ms: 200,
        ..Script::default()
    });
    let started = Instant::now();
    let r = post_chat(&client, &agent.url, CALLER, &chat("gpt-4o-mini", true)).await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = started.elapsed();
    let mut text = String::from_utf8(first.to_vec()).unwrap();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(
        first_at < started.elapsed() - Duration::from_millis(400),
        "first chunk waited for the whole stream"
    );
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // Errors keep their envelope through the real binary too.
    let r = post_chat(&client, &agent.url, "nope", &chat("gpt-4o-mini", false)).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"error":{"message":"invalid API key","type":"invalid_api_key"}}"#
    );

    // The provider key never reaches the logs.
    assert!(!agent.process.output().contains("sk-e2e-upstream-secret"));
    assert!(
        agent.process.output().contains(&request_id),
        "access log carries the request id"
    );
}

#[tokio::test]
async fn sighup_reloads_and_a_broken_file_keeps_the_last_good_snapshot() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let mut agent = start_agent(&resources(&mock.url(), ""), "").await;
    let client = http_client();
    let file = agent.dir.path().join("resources.yaml");

    let added =
        "  - id: m2\n    display_name: added-model\n    model_name: x\n    provider_key_id: pk1\n";
    std::fs::write(&file, resources(&mock.url(), added)).unwrap();
    agent.process.signal("HUP");
    eventually(
        "the new alias is visible",
        Duration::from_secs(10),
        || async {
            model_ids(&client, &agent.url)
                .await
                .contains(&"added-model".to_owned())
        },
    )
    .await;

    let line = agent
        .process
        .wait_for_line("metrics listener ready", Duration::from_secs(10))
        .await;
    let status = format!("http://{}/status/config", tests::addr_in(&line));
    let last_reload = || async { tests::get_json(&status).await["last_reload"].clone() };
    assert_eq!(last_reload().await["ok"], true);

    std::fs::write(&file, "models: [\n  broken").unwrap();
    agent.process.signal("HUP");
    agent
        .process
        .wait_for_line("resources file not reloaded", Duration::from_secs(10))
        .await;
    assert_eq!(
        model_ids(&client, &agent.url).await,
        ["added-model", "gpt-4o-mini"]
    );
    // /status/config says the last reload failed, and why.
    let failed = last_reload().await;
    assert_eq!(failed["ok"], false, "{failed}");
    let why = failed["error"].as_str().unwrap_or_default();
    assert!(why.contains("resources.yaml"), "{failed}");
    assert!(
        failed["at_unix"]
            .as_u64()
            .is_some_and(|t| t > 1_700_000_000)
    );

    // A bad resource is rejected alone, and named.
    let dangling = "  - id: m3\n    display_name: orphan\n    model_name: x\n    provider_key_id: missing-pk\n";
    std::fs::write(&file, resources(&mock.url(), dangling)).unwrap();
    agent.process.signal("HUP");
    let line = agent
        .process
        .wait_for_line("resource rejected", Duration::from_secs(10))
        .await;
    assert!(
        line.contains("/aisix/models/m3")
            && line.contains("provider_key_id: provider key 'missing-pk' does not exist"),
        "{line}"
    );
    eventually(
        "the removed alias disappears",
        Duration::from_secs(10),
        || async { model_ids(&client, &agent.url).await == ["gpt-4o-mini"] },
    )
    .await;
}

#[tokio::test]
async fn sigterm_fails_liveness_drains_streams_and_exits_zero() {
    drains_streams_and_exits_zero("", 1).await;
}

/// The same with a worker thread, runtime and socket per core: every worker's
/// streams finish before the process exits.
#[tokio::test]
async fn thread_per_core_workers_drain_their_streams_and_exit_zero() {
    drains_streams_and_exits_zero("  thread_per_core: true\n  workers: 2\n", 4).await;
}

/// One worker is served by a thread of its own (a shared runtime would have nothing
/// to share, at a higher cost per request) unless the operator says otherwise;
/// `/status/config` says which, and either serves.
#[tokio::test]
async fn one_worker_gets_a_thread_of_its_own_unless_the_operator_says_otherwise() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let cases = [
        ("  workers: 1\n", true),
        ("  workers: 1\n  thread_per_core: false\n", false),
    ];
    for (proxy, thread_per_core) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "proxy:\n  addr: 127.0.0.1:0\n{proxy}observability:\n  metrics:\n    prometheus: {{addr: \"127.0.0.1:0\"}}\nshutdown:\n  min_drain_secs: 0\n"
        );
        let (_agent, url, metrics) =
            tests::start_file_agent(dir.path(), &resources(&mock.url(), ""), &config).await;
        let status = tests::get_json(&format!("{metrics}/status/config")).await;
        assert_eq!(
            status["serving"],
            json!({"thread_per_core": thread_per_core, "workers": 1}),
            "{proxy}"
        );
        let r = post_chat(&http_client(), &url, CALLER, &chat("gpt-4o-mini", false)).await;
        assert_eq!(r.status(), 200, "{proxy}");
    }
}

/// Workers share their port with `SO_REUSEPORT`; a second agent started on the same
/// port the same way must not join it and take half the connections.
#[tokio::test]
async fn a_second_thread_per_core_agent_on_a_taken_port_does_not_start() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let workers = "  thread_per_core: true\n  workers: 2\n";
    let first = start_agent(&resources(&mock.url(), ""), "").await;
    drop(first.process);
    let config = write_config(first.dir.path(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    let limit = "  request_body_limit_bytes: 65536\n";
    std::fs::write(&config, text.replace(limit, &format!("{limit}{workers}"))).unwrap();
    let (mut running, url) = tests::start_agent(&config).await;
    let port = url.rsplit(':').next().unwrap().to_owned();
    let r = post_chat(&http_client(), &url, CALLER, &chat("gpt-4o-mini", false)).await;
    assert_eq!(r.status(), 200);
    let text = std::fs::read_to_string(&config).unwrap();
    let second = first.dir.path().join("second.yaml");
    std::fs::write(
        &second,
        text.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let (started, output) = run_to_exit(&["--config", second.to_str().unwrap()]).await;
    assert!(!started, "{output}");
    assert!(
        output.contains(&format!("proxy.addr: cannot listen on 127.0.0.1:{port}")),
        "{output}"
    );
    // The first one still serves every connection.
    for _ in 0..4 {
        let r = post_chat(&http_client(), &url, CALLER, &chat("gpt-4o-mini", false)).await;
        assert_eq!(r.status(), 200);
    }
    running.signal("TERM");
    assert!(running.wait_exit(STARTUP).await.success());
}

/// SIGTERM with `streams` streams in flight, on connections of their own, with
/// `proxy` added to the proxy section.
async fn drains_streams_and_exits_zero(proxy: &str, streams: usize) {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let mut agent = start_agent(&resources(&mock.url(), ""), "").await;
    // Rewrite the drain settings for this test: restart with a 2 s minimum drain.
    drop(agent.process);
    let config = write_config(agent.dir.path(), "")
        .to_str()
        .unwrap()
        .to_owned();
    let limit = "  request_body_limit_bytes: 65536\n";
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("min_drain_secs: 0", "min_drain_secs: 2")
            .replace(limit, &format!("{limit}{proxy}")),
    )
    .unwrap();
    agent.process = Process::start(&binary("aisix-agent"), &["--config", &config], &[]);
    agent.url = format!(
        "http://{}",
        addr_in(
            &agent
                .process
                .wait_for_line("proxy listener ready", STARTUP)
                .await
        )
    );
    let client = http_client();

    mock.set_script(Script {
        chunks: 6,
        chunk_interval_ms: 500,
        ..Script::default()
    });
    let mut running = Vec::new();
    for _ in 0..streams {
        // A client each: a connection each, spread over the workers' sockets.
        let r = post_chat(
            &http_client(),
            &agent.url,
            CALLER,
            &chat("gpt-4o-mini", true),
        )
        .await;
        assert_eq!(r.status(), 200);
        running.push(tokio::spawn(r.text()));
    }

    agent.process.signal("TERM");
    eventually(
        "liveness fails during the drain",
        Duration::from_secs(5),
        || async {
            match client.get(format!("{}/livez", agent.url)).send().await {
                Ok(r) => {
                    r.status() == 500 && r.text().await.unwrap().ends_with("livez check failed")
                }
                Err(_) => false,
            }
        },
    )
    .await;
    // Readiness fails too, so load balancers stop sending traffic.
    let ready = client
        .get(format!("{}/readyz", agent.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    // Responses during the drain close their keep-alive connection.
    assert_eq!(ready.headers()["connection"], "close");
    assert_eq!(ready.text().await.unwrap(), "readyz check failed");
    for stream in running {
        let text = stream.await.unwrap().unwrap();
        assert!(
            text.ends_with("data: [DONE]\n\n"),
            "an in-flight stream was cut: {text}"
        );
    }
    let status = agent.process.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}");
}

async fn run_to_exit(args: &[&str]) -> (bool, String) {
    let mut p = Process::start(&binary("aisix-agent"), args, &[]);
    let status = p.wait_exit(STARTUP).await;
    (status.success(), p.output())
}

#[tokio::test]
async fn bad_start_up_input_stops_with_a_message_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("resources.yaml"),
        resources("http://127.0.0.1:9", ""),
    )
    .unwrap();
    let config = write_config(dir.path(), "admin_keyz: [x]\n");
    let (ok, out) = run_to_exit(&["--config", config.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(
        out.contains("(top level): unknown field `admin_keyz`"),
        "{out}"
    );

    let config = write_config(dir.path(), "");
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("request_body_limit_bytes", "request_body_limit"),
    )
    .unwrap();
    let (ok, out) = run_to_exit(&["--config", config.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(
        out.contains("proxy: unknown field `request_body_limit`"),
        "{out}"
    );

    let config = write_config(dir.path(), "");
    std::fs::write(dir.path().join("resources.yaml"), "models: {oops").unwrap();
    let (ok, out) = run_to_exit(&["--config", config.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(out.contains("resources.yaml is not valid YAML"), "{out}");

    let (ok, out) =
        run_to_exit(&["--config", dir.path().join("absent.yaml").to_str().unwrap()]).await;
    assert!(!ok);
    assert!(out.contains("cannot read config file"), "{out}");
    // The OS error is said once, not once per layer of the error.
    assert_eq!(out.matches("No such file or directory").count(), 1, "{out}");

    std::fs::remove_file(dir.path().join("resources.yaml")).unwrap();
    let (ok, out) = run_to_exit(&["validate", "--config", config.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(out.contains("cannot read resources file"), "{out}");
    assert_eq!(out.matches("No such file or directory").count(), 1, "{out}");
}

#[tokio::test]
async fn validate_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = "  - id: m2\n    display_name: orphan\n    model_name: x\n    provider_key_id: nope\n  - id: m3\n    display_name: bad\n    timeout: 0\n";
    std::fs::write(
        dir.path().join("resources.yaml"),
        resources("http://127.0.0.1:9", bad),
    )
    .unwrap();
    let config = write_config(
        dir.path(),
        "observability:\n  metrics:\n    buckets: {request_ttft: [0.5]}\n",
    );
    let (ok, out) = run_to_exit(&["validate", "--config", config.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(
        out.contains("problem: models/m2: provider_key_id: provider key 'nope' does not exist"),
        "{out}"
    );
    assert!(out.contains("problem: models/m3: model_name: required; provider_key_id: required; timeout: must be at least 1"), "{out}");
    assert!(
        out.contains("config 'observability.metrics.buckets (histograms use the built-in buckets)' is accepted but not acted on"),
        "{out}"
    );

    // Every problem of the config file itself in one run, one line each.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    let broken = write_config(
        &broken,
        "upstream: {retries: many, timeout_msec: 5}\ndownstream: {idle_timeout_secs: 99999}\n",
    );
    let out = std::process::Command::new(tests::binary("aisix-agent"))
        .args(["validate", "--config", broken.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "upstream.retries: invalid type",
        "upstream: unknown field `timeout_msec`",
        "downstream.idle_timeout_secs: must be at most 3600",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    assert_eq!(stderr.lines().count(), 3, "{stderr}");
    assert!(
        stderr
            .lines()
            .all(|l| l.starts_with("aisix-agent: config file ")),
        "{stderr}"
    );

    std::fs::write(
        dir.path().join("resources.yaml"),
        resources("http://127.0.0.1:9", ""),
    )
    .unwrap();
    let (ok, out) = run_to_exit(&["validate", "--config", config.to_str().unwrap()]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("ok (1 provider keys, 1 models, 1 api keys)"),
        "{out}"
    );

    // An invalid config file is exit status 2; a bad environment override names itself.
    let out = std::process::Command::new(binary("aisix-agent"))
        .args(["validate", "--config", config.to_str().unwrap()])
        .env("AISIX_PROXY__ADDR", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("proxy.addr"), "{err}");

    // --help says what the binary does without a command, how to override the config,
    // the signals and the exit statuses.
    let (ok, help) = run_to_exit(&["--help"]).await;
    assert!(ok);
    for needle in [
        "validate",
        "enroll",
        "AISIX_<SECTION>__<FIELD>",
        "RUST_LOG",
        "SIGHUP",
        "SIGTERM",
        "Exit status",
        "/status/config",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

#[tokio::test]
async fn json_logs_and_access_log_switch() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let agent = start_agent(
        &resources(&mock.url(), ""),
        "observability:\n  log_format: json\n  access_log: false\n  service_name: orders-gateway\n",
    )
    .await;
    let client = http_client();
    let r = post_chat(&client, &agent.url, CALLER, &chat("gpt-4o-mini", false)).await;
    assert_eq!(r.status(), 200);
    let output = agent.process.output();
    let ready = output
        .lines()
        .find(|l| l.contains("proxy listener ready"))
        .unwrap();
    let parsed: Value = serde_json::from_str(ready).unwrap();
    assert_eq!(parsed["level"], "INFO");
    assert_eq!(parsed["fields"]["message"], "proxy listener ready");
    // Every line is JSON and names the service (observability.service_name).
    assert!(
        output
            .lines()
            .all(|l| serde_json::from_str::<Value>(l)
                .is_ok_and(|v| v["service"] == "orders-gateway")),
        "{output}"
    );
    assert!(
        !output.contains("aisix::access"),
        "access log was disabled: {output}"
    );
}

/// Starts an agent whose `shutdown` section is replaced by `shutdown_yaml`.
async fn start_with_shutdown(mock: &MockProvider, shutdown_yaml: &str) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("resources.yaml"),
        resources(&mock.url(), ""),
    )
    .unwrap();
    let config = write_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    let head = &text[..text.find("shutdown:").unwrap()];
    std::fs::write(&config, format!("{head}{shutdown_yaml}")).unwrap();
    let (process, url) = tests::start_agent(&config).await;
    Agent { process, url, dir }
}

#[tokio::test]
async fn drain_timeout_bounds_shutdown() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    mock.set_script(Script {
        chunks: 20,
        chunk_interval_ms: 500,
        ..Script::default()
    });
    let mut agent = start_with_shutdown(
        &mock,
        "shutdown:\n  min_drain_secs: 0\n  drain_timeout_secs: 1\n",
    )
    .await;
    let client = http_client();
    let r = post_chat(&client, &agent.url, CALLER, &chat("gpt-4o-mini", true)).await;
    assert_eq!(r.status(), 200);
    let stream = tokio::spawn(r.text());

    let started = Instant::now();
    agent.process.signal("TERM");
    let status = agent.process.wait_exit(Duration::from_secs(10)).await;
    let elapsed = started.elapsed();
    assert!(status.success(), "{status}");
    // The 10 s stream is cut after the 1 s drain timeout, not waited for.
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    assert!(agent.process.output().contains("drain timeout reached"));
    let text = stream.await.unwrap().unwrap_or_default();
    assert!(!text.contains("[DONE]"), "{text}");
}

#[tokio::test]
async fn a_second_signal_exits_without_waiting_for_the_drain() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let mut agent = start_with_shutdown(&mock, "shutdown:\n  min_drain_secs: 60\n").await;
    agent.process.signal("TERM");
    agent
        .process
        .wait_for_line("drain started", Duration::from_secs(5))
        .await;
    let started = Instant::now();
    agent.process.signal("INT");
    let status = agent.process.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(130), "{}", agent.process.output());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(agent.process.output().contains("second signal"));
}

#[tokio::test]
async fn the_cache_section_turns_the_response_cache_on() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let agent = start_agent(
        &resources(&mock.url(), ""),
        "cache:\n  enabled: true\n  ttl_secs: 60\n",
    )
    .await;
    let client = http_client();
    let statuses: Vec<String> = {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let r = post_chat(&client, &agent.url, CALLER, &chat("gpt-4o-mini", false)).await;
            assert_eq!(r.status(), 200);
            seen.push(r.headers()["x-aisix-cache"].to_str().unwrap().to_owned());
        }
        seen
    };
    assert_eq!(statuses, ["miss", "hit"]);
    assert_eq!(mock.requests().len(), 1);
}

/// After SIGTERM the proxy keeps accepting past min_drain_secs while a stream is in
/// flight, closes its listener once the stream's last byte is out, and says so.
#[tokio::test]
async fn the_drain_keeps_accepting_until_streams_end() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    mock.set_script(Script {
        chunks: 6,
        chunk_interval_ms: 500,
        ..Script::default()
    });
    let mut agent = start_with_shutdown(
        &mock,
        "shutdown:\n  min_drain_secs: 1\n  drain_timeout_secs: 20\n",
    )
    .await;
    let client = http_client();
    let r = post_chat(&client, &agent.url, CALLER, &chat("gpt-4o-mini", true)).await;
    assert_eq!(r.status(), 200);
    let stream = tokio::spawn(r.text());
    let started = Instant::now();
    agent.process.signal("TERM");
    // Past the window, with the stream still running: a new connection is served.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let late = reqwest::Client::new()
        .get(format!("{}/v1/models", agent.url))
        .bearer_auth(CALLER)
        .send()
        .await
        .expect("the listener still accepts while a stream is in flight");
    assert_eq!(late.status(), 200);
    assert_eq!(late.headers()["connection"], "close");
    let text = stream.await.unwrap().unwrap();
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "the stream ended whole: {text}"
    );
    let status = agent.process.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    assert!(started.elapsed() >= Duration::from_millis(2_500));
    let output = agent.process.output();
    for line in [
        "shutdown: drain started",
        "shutdown: listeners closed",
        "shutdown: drain complete",
    ] {
        assert!(output.contains(line), "{line} in {output}");
    }
    assert!(output.contains("in_flight=0"), "{output}");
}

/// An AISIX-format resources file: no ids, references by name, the caller key from
/// `key_env` and the provider key from `${VAR}`; problems named by kind, entry and field.
#[tokio::test]
async fn an_aisix_format_resources_file_serves_unchanged() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = format!(
        r#"_format_version: "1"
provider_keys:
  - display_name: mock
    provider: openai
    api_base: "{base}"
    api_key: "${{UPSTREAM_KEY}}"
models:
  - display_name: gpt-4o-mini
    model_name: up-gpt
    provider_key: mock
api_keys:
  - display_name: team-a
    key_env: TEAM_A_KEY
    allowed_models: ["*"]
"#,
        base = mock.url()
    );
    std::fs::write(dir.path().join("resources.yaml"), &file).unwrap();
    let config = write_config(dir.path(), "");
    let envs = [
        ("UPSTREAM_KEY", "sk-upstream-from-env"),
        ("TEAM_A_KEY", "team-a-caller-key"),
    ];
    let (mut process, url) = tests::start_agent_with(&config, &envs).await;
    let client = http_client();
    let r = post_chat(
        &client,
        &url,
        "team-a-caller-key",
        &chat("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(r.status(), 200);
    let sent = mock.requests();
    assert_eq!(
        sent.last().unwrap().headers["authorization"],
        "Bearer sk-upstream-from-env"
    );
    process.signal("TERM");
    assert!(process.wait_exit(Duration::from_secs(10)).await.success());
    assert!(!process.output().contains("team-a-caller-key"));

    // A reference to a provider key that does not exist names the ones that do.
    std::fs::write(
        dir.path().join("resources.yaml"),
        file.replace("provider_key: mock", "provider_key: mock-eu"),
    )
    .unwrap();
    let mut validate = Process::start(
        &binary("aisix-agent"),
        &["validate", "--config", config.to_str().unwrap()],
        &envs,
    );
    let status = validate.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success());
    let out = validate.output();
    assert!(
        out.contains("models[0] ('gpt-4o-mini').provider_key: no provider key named 'mock-eu' (there are: mock)"),
        "{out}"
    );
}

/// The `upstream` section's defaults bound calls to models that set none of their own:
/// `timeout_ms` a whole answer, `stream_timeout_ms` the gap between stream events; a
/// model's own `timeout` wins.
#[tokio::test]
async fn upstream_defaults_bound_calls_of_models_without_their_own() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let own = "  - {id: m2, display_name: patient, model_name: mock-gpt, provider_key_id: pk1, timeout: 5000}\n";
    let agent = start_agent(
        &resources(&mock.url(), own),
        "upstream: {timeout_ms: 300, stream_timeout_ms: 200}\n",
    )
    .await;
    let client = http_client();
    mock.set_script(Script {
        headers_delay_ms: 1_000,
        ..Script::default()
    });
    let started = Instant::now();
    let r = post_chat(&client, &agent.url, CALLER, &chat("gpt-4o-mini", false)).await;
    assert_eq!(r.status(), 504);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let r = post_chat(&client, &agent.url, CALLER, &chat("patient", false)).await;
    assert_eq!(r.status(), 200, "the model's own timeout wins");
    // A stream that stalls past stream_timeout_ms after its first event breaks.
    mock.set_script(Script {
        chunks: 3,
        pause_after_chunks: Some(1),
        pause_ms: 1_000,
        ..Script::default()
    });
    let r = post_chat(&client, &agent.url, CALLER, &chat("gpt-4o-mini", true)).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::new();
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("stream_stalled"), "{text}");
}
