//! The agent library run in-process, on port 0: the same steps as the binary (config,
//! source, listeners, serve, drain) without a process boundary, so a test can reach
//! every listener and watch the drain end.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use agent::Controls;
use agent::config::Config;
use agent::listeners::Role;
use cloud_mock::provider::MockProvider;
use serde_json::{Value, json};
use tests::{http_client, key_hash};

const CALLER: &str = "in-process-caller";

fn config(dir: &Path, api_base: &str) -> Config {
    let resources = dir.join("resources.yaml");
    std::fs::write(
        &resources,
        format!(
            "provider_keys:\n  - {{id: pk1, display_name: mock, provider: openai, api_base: {api_base}/v1, api_key: sk-in-process}}\n\
             models:\n  - {{id: m1, display_name: gpt, model_name: mock-gpt, provider_key_id: pk1}}\n\
             api_keys:\n  - {{id: k1, key_hash: {}, allowed_models: [\"*\"]}}\n",
            key_hash(CALLER)
        ),
    )
    .unwrap();
    let text = format!(
        "resources_file: {}\nproxy: {{addr: 127.0.0.1:0}}\n\
         observability: {{metrics: {{prometheus: {{addr: 127.0.0.1:0}}}}}}\n\
         shutdown: {{min_drain_secs: 0, drain_timeout_secs: 5}}\n",
        resources.display()
    );
    Config::parse(&dir.join("config.yaml"), &text, std::iter::empty()).unwrap()
}

#[tokio::test]
async fn the_library_serves_reloads_and_drains_in_process() {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = agent::start(config(dir.path(), &mock.url())).await.unwrap();
    let proxy = agent.addr(Role::Proxy).unwrap();
    let metrics = agent.addr(Role::Metrics).unwrap();
    assert_ne!(proxy.port(), 0);
    assert_eq!(agent.addr(Role::Admin), None, "file mode has no admin API");
    let controls = Controls::default();
    let serving = tokio::spawn(agent.serve(controls.clone()));
    let client = http_client();

    let answer = client
        .post(format!("http://{proxy}/v1/chat/completions"))
        .bearer_auth(CALLER)
        .json(&json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["x-aisix-served-by"], "gpt");
    let seen = &mock.requests()[0];
    assert_eq!(seen.json()["model"], "mock-gpt");

    let status: Value = client
        .get(format!("http://{metrics}/status/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["source"], "file", "{status}");

    // SIGHUP's path: the reloaded file's new model is served.
    let resources = dir.path().join("resources.yaml");
    let text = std::fs::read_to_string(&resources).unwrap().replace(
        "models:\n",
        "models:\n  - {id: m2, display_name: gpt-two, model_name: mock-gpt-2, provider_key_id: pk1}\n",
    );
    std::fs::write(&resources, text).unwrap();
    controls.reload.notify_one();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client
            .post(format!("http://{proxy}/v1/chat/completions"))
            .bearer_auth(CALLER)
            .json(&json!({"model": "gpt-two", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reload not applied: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Shutdown: the run returns, and the listeners are closed.
    let asked = Instant::now();
    controls.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the drain ends")
        .unwrap()
        .unwrap();
    assert!(asked.elapsed() < Duration::from_secs(10));
    assert!(
        tokio::net::TcpStream::connect(proxy).await.is_err(),
        "the proxy listener is closed after the drain"
    );
}

#[tokio::test]
async fn a_port_in_use_stops_start_up_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = config(dir.path(), "http://127.0.0.1:9");
    config.observability.metrics.prometheus.addr = taken.local_addr().unwrap();
    let error = match agent::start(config).await {
        Ok(_) => panic!("start-up should fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.starts_with("observability.metrics.prometheus.addr: cannot listen on"),
        "{error}"
    );
}

#[tokio::test]
async fn a_listener_that_dies_stops_the_agent_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), "http://127.0.0.1:9");
    // Past what validation allows: the proxy listener's task panics on it. The agent
    // must not stay up (and ready) without its proxy listener.
    config.proxy.max_connections = usize::MAX;
    let agent = agent::start(config).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), agent.serve(Controls::default()))
        .await
        .expect("the agent stops on its own");
    let error = format!("{:#}", outcome.unwrap_err());
    assert!(error.contains("a listener failed"), "{error}");
}

#[tokio::test]
async fn probes_on_the_status_listener_answer_when_the_proxy_is_at_its_connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), "http://127.0.0.1:9");
    config.proxy.max_connections = 2;
    let agent = agent::start(config).await.unwrap();
    let (proxy, status) = (
        agent.addr(Role::Proxy).unwrap(),
        agent.addr(Role::Metrics).unwrap(),
    );
    let controls = Controls::default();
    let serving = tokio::spawn(agent.serve(controls.clone()));
    // Two connections that never send a request fill the proxy listener.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(proxy).await.unwrap());
    }
    let client = http_client();
    let full = tokio::time::timeout(
        Duration::from_millis(500),
        client.get(format!("http://{proxy}/livez")).send(),
    )
    .await;
    assert!(full.is_err(), "the proxy listener should be full");
    for path in ["/livez", "/status/ready"] {
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            client.get(format!("http://{status}{path}")).send(),
        )
        .await
        .expect("the status listener answers at once")
        .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    drop(held);
    controls.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), serving).await;
}

#[tokio::test]
async fn the_listen_backlog_holds_hundreds_of_waiting_connections() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), "http://127.0.0.1:9");
    config.proxy.max_connections = 1;
    let agent = agent::start(config).await.unwrap();
    let proxy = agent.addr(Role::Proxy).unwrap();
    let controls = Controls::default();
    let serving = tokio::spawn(agent.serve(controls.clone()));
    // Past `max_connections` connections wait in the kernel's queue: 300 of them (more
    // than the standard library's 128) all connect at once.
    let mut waiting = Vec::new();
    for n in 0..300 {
        let connected = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(proxy),
        )
        .await;
        assert!(
            matches!(connected, Ok(Ok(_))),
            "connection {n} was not queued"
        );
        waiting.push(connected);
    }
    drop(waiting);
    controls.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), serving).await;
}
