//! The real `aisix-agent` binary in managed mode against cloud-mock's control plane
//! (in this process, over real mutual TLS, with a state directory), the mock provider,
//! and a real sled cache on disk.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cloud_mock::cp::{Options, Running, start_with};
use cloud_mock::provider::MockProvider;
use serde_json::{Value, json};
use tests::cloud::Console;
use tests::metrics::sample;
use tests::{Process, eventually, http_client, key_hash};

const CALLER: &str = "e2e-managed-caller";
const UPSTREAM_SECRET: &str = "sk-e2e-managed-upstream-secret";
const WITHIN: Duration = Duration::from_secs(30);
const ENV: &str = "prod";

/// A control plane in this process, restartable on the same port with its state.
struct Cp {
    running: Option<Running>,
    state: PathBuf,
    addr: std::net::SocketAddr,
    console: Console,
}

impl Cp {
    async fn start(dir: &Path) -> Cp {
        let state = dir.join("cp-state");
        let running = start_with(Options {
            state_dir: Some(state.clone()),
            ..Options::default()
        })
        .await
        .unwrap();
        running.cp.set_progress_interval(Duration::from_millis(500));
        let console = Console::new(&running.console_url, &running.console_token);
        let (status, _) = console
            .call("POST", "/console/v1/environments", Some(json!({"id": ENV})))
            .await;
        assert!(status == 201 || status == 409);
        Cp {
            addr: running.dp_addr,
            running: Some(running),
            state,
            console,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    /// Starts again on the same data-plane port, with the same state.
    async fn restart(&mut self) {
        self.stop().await;
        let running = start_with(Options {
            dp_addr: self.addr,
            state_dir: Some(self.state.clone()),
            ..Options::default()
        })
        .await
        .unwrap();
        running.cp.set_progress_interval(Duration::from_millis(500));
        self.console = Console::new(&running.console_url, &running.console_token);
        self.running = Some(running);
    }

    async fn put(&self, kind: &str, id: &str, doc: Value) -> i64 {
        self.console
            .ok(
                "PUT",
                &format!("/console/v1/environments/{ENV}/resources/{kind}/{id}"),
                Some(doc),
            )
            .await["revision"]
            .as_i64()
            .unwrap()
    }

    async fn seed(&self, mock: &MockProvider) {
        self.put(
            "provider_keys",
            "pk1",
            json!({"display_name": "mock", "provider": "openai", "api_base": mock.url(), "api_key": UPSTREAM_SECRET}),
        )
        .await;
        self.put("models", "m1", model("gpt")).await;
        self.put(
            "api_keys",
            "k1",
            json!({"display_name": "e2e", "key_hash": key_hash(CALLER), "allowed_models": ["*"]}),
        )
        .await;
    }

    async fn budget(&self, api_key_id: &str, budget: Value) {
        self.console
            .ok(
                "PUT",
                &format!("/console/v1/environments/{ENV}/budgets/{api_key_id}"),
                Some(budget),
            )
            .await;
    }

    /// Writes a bundle for `dp` to `dir` (cert.pem, key.pem, ca.pem).
    async fn bundle_files(&self, dir: &Path, dp: &str, extra: Value) -> PathBuf {
        let mut request = json!({"dp_id": dp});
        if let (Some(r), Some(e)) = (request.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        let bundle = self
            .console
            .ok(
                "POST",
                &format!("/console/v1/environments/{ENV}/bundles"),
                Some(request),
            )
            .await;
        let out = dir.join(format!("bundle-{dp}"));
        std::fs::create_dir_all(&out).unwrap();
        for (file, field) in [
            ("cert.pem", "cert_pem"),
            ("key.pem", "key_pem"),
            ("ca.pem", "ca_pem"),
        ] {
            std::fs::write(out.join(file), bundle[field].as_str().unwrap()).unwrap();
        }
        out
    }

    async fn heartbeat_of(&self, dp: &str) -> Option<Value> {
        let listed = self
            .console
            .ok(
                "GET",
                &format!("/console/v1/environments/{ENV}/gateways"),
                None,
            )
            .await;
        listed["gateways"]
            .as_array()?
            .iter()
            .find(|g| g["dp_id"] == dp)?["instances"]
            .as_array()?
            .iter()
            .max_by_key(|i| i["last_seen_unix_ms"].as_i64())
            .map(|i| i["last_heartbeat"].clone())
    }
}

/// A temporary directory, a mock provider, and a control plane whose environment has
/// a provider key for the mock, model `gpt` and the caller key.
async fn seeded() -> (tempfile::TempDir, MockProvider, Cp) {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockProvider::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let cp = Cp::start(dir.path()).await;
    cp.seed(&mock).await;
    (dir, mock, cp)
}

fn model(name: &str) -> Value {
    json!({"display_name": name, "model_name": format!("up-{name}"), "provider_key_id": "pk1"})
}

/// An agent for gateway `gw-1` with `managed_extra` config lines, serving `gpt`.
async fn gateway(dir: &Path, cp: &Cp, managed_extra: &str) -> Agent {
    let bundle = cp.bundle_files(dir, "gw-1", json!({})).await;
    let agent = Agent::start(&write_config_with(
        dir,
        &cp.url(),
        Some(&bundle),
        managed_extra,
    ))
    .await;
    agent.wait_model("gpt").await;
    agent
}

async fn set_faults(cp: &Cp, faults: Value) {
    cp.console
        .ok("PUT", "/console/v1/faults", Some(faults))
        .await;
}

fn write_config(dir: &Path, cp_url: &str, bundle: Option<&Path>) -> PathBuf {
    write_config_with(dir, cp_url, bundle, "")
}

/// `managed_extra`: more lines of the `managed` section, indented by two spaces.
fn write_config_with(
    dir: &Path,
    cp_url: &str,
    bundle: Option<&Path>,
    managed_extra: &str,
) -> PathBuf {
    let bundle_lines = bundle.map_or(String::new(), |b| {
        format!(
            "  cp_cert_file: {}\n  cp_key_file: {}\n  cp_ca_file: {}\n",
            b.join("cert.pem").display(),
            b.join("key.pem").display(),
            b.join("ca.pem").display()
        )
    });
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "managed:\n  enabled: true\n  cp_base_url: {cp_url}\n{bundle_lines}{managed_extra}  state_dir: {}\n  heartbeat_interval_secs: 1\n  connect_timeout_ms: 500\n  request_timeout_ms: 2000\nproxy:\n  addr: 127.0.0.1:0\nshutdown:\n  min_drain_secs: 0\n  drain_timeout_secs: 5\n",
            dir.join("agent-state").display()
        ),
    )
    .unwrap();
    config
}

struct Agent {
    process: Process,
    url: String,
    http: reqwest::Client,
}

impl Agent {
    async fn start(config: &Path) -> Agent {
        let (process, url) = tests::start_agent(config).await;
        Agent {
            process,
            url,
            http: http_client(),
        }
    }

    async fn models(&self) -> Vec<String> {
        let Ok(response) = self
            .http
            .get(format!("{}/v1/models", self.url))
            .bearer_auth(CALLER)
            .send()
            .await
        else {
            return Vec::new();
        };
        let body: Value = response.json().await.unwrap_or_default();
        body["data"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn wait_model(&self, name: &str) {
        eventually(&format!("model {name} is served"), WITHIN, || async {
            self.models().await.iter().any(|m| m == name)
        })
        .await;
    }

    async fn chat(&self, model: &str) -> u16 {
        self.chat_as(CALLER, model, false).await.status().as_u16()
    }

    async fn chat_as(&self, caller: &str, model: &str, stream: bool) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(caller)
            .json(&json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
    }

    async fn readyz(&self) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}/readyz?verbose=1", self.url))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn stop(mut self) {
        self.process.signal("TERM");
        assert!(self.process.wait_exit(WITHIN).await.success());
    }
}

#[tokio::test]
async fn console_writes_reach_the_proxy_and_heartbeats_report_the_snapshot() {
    let (dir, mock, cp) = seeded().await;
    let bundle = cp.bundle_files(dir.path(), "gw-1", json!({})).await;
    let agent = Agent::start(&write_config(dir.path(), &cp.url(), Some(&bundle))).await;
    agent.wait_model("gpt").await;
    assert_eq!(agent.chat("gpt").await, 200);
    assert_eq!(mock.requests()[0].json()["model"], "up-gpt");
    let (status, body) = agent.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("source control_plane"), "{body}");

    // A bad resource is rejected alone; the next write still applies.
    cp.put("models", "bad", json!({"display_name": "bad"}))
        .await;
    let revision = cp.put("models", "m2", model("gpt-2")).await;
    agent.wait_model("gpt-2").await;
    assert!(!agent.models().await.contains(&"bad".to_owned()));
    // A guardrail attached to one model through the console: that model refuses the
    // word, the others do not.
    cp.put(
        "guardrails",
        "g1",
        json!({"name": "no-hi", "hook_point": "input", "patterns": [{"value": "hi"}]}),
    )
    .await;
    cp.put(
        "guardrail_attachments",
        "ga1",
        json!({"guardrail_id": "g1", "scope_type": "model", "scope_id": "gpt-2"}),
    )
    .await;
    // Until its attachment lands the guardrail has no scope and applies to every model,
    // so wait for both halves of the attached state.
    eventually(
        "the attached guardrail applies to its model alone",
        WITHIN,
        || async { agent.chat("gpt-2").await == 422 && agent.chat("gpt").await == 200 },
    )
    .await;

    // The heartbeat reports what is applied, what was rejected, and the certificate.
    eventually("a heartbeat reports the rejection", WITHIN, || async {
        cp.heartbeat_of("gw-1").await.is_some_and(|h| {
            h["config"]["applied_revision"].as_i64() >= Some(revision)
                && h["rejected_resources"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|x| x["key"] == "/aisix/prod/models/bad"))
        })
    })
    .await;
    let beat = cp.heartbeat_of("gw-1").await.unwrap();
    assert_eq!(beat["dp_id"], "gw-1");
    assert_eq!(beat["contract_version"], 1);
    assert_eq!(beat["config"]["source"], "control_plane");
    assert_eq!(beat["config"]["connected"], true);
    assert_eq!(beat["config"]["config_hash"].as_str().unwrap().len(), 64);
    assert_eq!(beat["rejected_resources"][0]["kind"], "models");
    assert!(beat["certificate"]["days_left"].as_i64().unwrap() >= 29);
    let names: Vec<&str> = beat["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["gpt", "gpt-2"]);
    assert!(!beat.to_string().contains(UPSTREAM_SECRET));

    // Compaction forces a re-list; no update is lost.
    cp.console.ok("POST", "/console/v1/compact", None).await;
    cp.put("models", "m3", model("gpt-3")).await;
    agent.wait_model("gpt-3").await;
    // A cut watch reconnects.
    cp.console
        .ok("POST", "/console/v1/faults/cut-watches", None)
        .await;
    cp.put("models", "m4", model("gpt-4")).await;
    agent.wait_model("gpt-4").await;
    // A stalled watch (open, silent, dropping changes) is given up and re-established;
    // the change made while it stalled is replayed from the next revision. The agent
    // notices silence once two progress notifications (every 500 ms here) have shown
    // their interval: give the quiet watch that long first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    set_faults(&cp, json!({"stall_watches": true})).await;
    cp.put("models", "m5", model("gpt-5")).await;
    eventually("the stalled watch is noticed", WITHIN, || async {
        agent.process.output().contains("watch idle")
    })
    .await;
    set_faults(&cp, json!({})).await;
    agent.wait_model("gpt-5").await;
    // A delete is seen too.
    cp.console
        .ok(
            "DELETE",
            &format!("/console/v1/environments/{ENV}/resources/models/m4"),
            None,
        )
        .await;
    eventually("model gpt-4 is gone", WITHIN, || async {
        !agent.models().await.contains(&"gpt-4".to_owned())
    })
    .await;
    assert!(!agent.process.output().contains(UPSTREAM_SECRET));
    agent.stop().await;
}

#[tokio::test]
async fn with_the_control_plane_down_the_cache_serves_and_the_agent_converges_later() {
    let (dir, _mock, mut cp) = seeded().await;
    let bundle = cp.bundle_files(dir.path(), "gw-1", json!({})).await;
    let config = write_config(dir.path(), &cp.url(), Some(&bundle));
    let agent = Agent::start(&config).await;
    agent.wait_model("gpt").await;
    // Let the cache writer catch up, then kill -9: nothing is flushed at exit.
    eventually("the snapshot is cached", WITHIN, || async {
        agent.process.output().contains("snapshot cache written")
    })
    .await;
    agent.process.signal("KILL");
    drop(agent);
    cp.stop().await;

    // Control plane down: the cached snapshot serves at once.
    let agent = Agent::start(&config).await;
    assert_eq!(agent.chat("gpt").await, 200);
    let (status, body) = agent.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("source cache"), "{body}");

    // The control plane returns with a change: the agent converges.
    cp.restart().await;
    cp.put("models", "m2", model("gpt-2")).await;
    agent.wait_model("gpt-2").await;
    let (_, body) = agent.readyz().await;
    assert!(body.contains("source control_plane"), "{body}");
    agent.stop().await;
}

#[tokio::test]
async fn without_a_cache_readyz_fails_until_the_control_plane_answers() {
    let (dir, _mock, mut cp) = seeded().await;
    let bundle = cp.bundle_files(dir.path(), "gw-1", json!({})).await;
    cp.stop().await;

    let agent = Agent::start(&write_config(dir.path(), &cp.url(), Some(&bundle))).await;
    let (status, body) = agent.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no configuration loaded yet"), "{body}");
    assert_eq!(
        agent.chat("gpt").await,
        503,
        "no snapshot: not ready (rather than a 401 for a key it cannot check)"
    );

    cp.restart().await;
    agent.wait_model("gpt").await;
    assert_eq!(agent.readyz().await.0, 200);
    assert_eq!(agent.chat("gpt").await, 200);
    agent.stop().await;
}

#[tokio::test]
async fn revoked_or_forgotten_gateways_keep_serving_their_snapshot() {
    let (dir, _mock, cp) = seeded().await;
    let bundle = cp.bundle_files(dir.path(), "gw-1", json!({})).await;
    let mut agent = Agent::start(&write_config(dir.path(), &cp.url(), Some(&bundle))).await;
    agent.wait_model("gpt").await;
    cp.console
        .ok(
            "POST",
            &format!("/console/v1/environments/{ENV}/gateways/gw-1/revoke"),
            None,
        )
        .await;
    agent
        .process
        .wait_for_line("heartbeat refused", WITHIN)
        .await;
    assert_eq!(agent.chat("gpt").await, 200);
    agent.stop().await;

    // A gateway the control plane forgot (404) is told apart, and keeps serving too.
    let second = dir.path().join("second");
    std::fs::create_dir_all(&second).unwrap();
    let bundle = cp.bundle_files(&second, "gw-2", json!({})).await;
    let mut agent = Agent::start(&write_config(&second, &cp.url(), Some(&bundle))).await;
    agent.wait_model("gpt").await;
    cp.console
        .ok(
            "DELETE",
            &format!("/console/v1/environments/{ENV}/gateways/gw-2"),
            None,
        )
        .await;
    agent
        .process
        .wait_for_line("does not know this gateway", WITHIN)
        .await;
    assert_eq!(agent.chat("gpt").await, 200);
    agent.stop().await;
}

fn run_agent(config: &Path) -> (bool, String) {
    let output = std::process::Command::new(tests::binary("aisix-agent"))
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_bad_or_missing_bundle_stops_start_up_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Cp::start(dir.path()).await;

    let (ok, stderr) = run_agent(&write_config(dir.path(), &cp.url(), None));
    assert!(!ok);
    assert!(stderr.contains("no certificate bundle"), "{stderr}");

    let (ok, stderr) = run_agent(&write_config(dir.path(), "http://127.0.0.1:1", None));
    assert!(!ok);
    assert!(stderr.contains("managed.cp_base_url"), "{stderr}");

    let expired = cp
        .bundle_files(dir.path(), "gw-short", json!({"validity_seconds": 1}))
        .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (ok, stderr) = run_agent(&write_config(dir.path(), &cp.url(), Some(&expired)));
    assert!(!ok);
    assert!(stderr.contains("expired"), "{stderr}");

    // A key that does not belong to the certificate.
    let good = cp.bundle_files(dir.path(), "gw-1", json!({})).await;
    let other = cp.bundle_files(dir.path(), "gw-2", json!({})).await;
    std::fs::copy(other.join("key.pem"), good.join("key.pem")).unwrap();
    let (ok, stderr) = run_agent(&write_config(dir.path(), &cp.url(), Some(&good)));
    assert!(!ok);
    assert!(stderr.contains("key"), "{stderr}");
    assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
}

/// Runs `aisix-agent enroll` (off the runtime's thread: the control plane is served
/// by this process).
async fn enroll(cp_url: &str, token: &str, state_dir: &Path) -> (bool, String) {
    let mut command = std::process::Command::new(tests::binary("aisix-agent"));
    command.args([
        "enroll",
        "--cp",
        cp_url,
        "--token",
        token,
        "--state-dir",
        state_dir.to_str().unwrap(),
    ]);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test]
async fn enrollment_with_a_token_installs_a_gateway_without_moving_a_key() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, _mock, cp) = seeded().await;
    let token = cp
        .console
        .ok(
            "POST",
            &format!("/console/v1/environments/{ENV}/enrollment-tokens"),
            Some(json!({"dp_id": "gw-enrolled"})),
        )
        .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let state = dir.path().join("agent-state");

    // A token whose CA fingerprint does not match is refused before anything is sent.
    let mut forged: Vec<&str> = token.split(':').collect();
    let zeros = "0".repeat(64);
    forged[4] = &zeros;
    let (ok, text) = enroll(&cp.url(), &forged.join(":"), &state).await;
    assert!(!ok);
    assert!(text.contains("did not present the CA"), "{text}");

    let (ok, text) = enroll(&cp.url(), &token, &state).await;
    assert!(ok, "{text}");
    assert!(
        text.contains("enrolled as gateway gw-enrolled of environment prod"),
        "{text}"
    );
    let key = state.join("mtls/active/key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(state.join("mtls"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    // The token works once.
    let (ok, text) = enroll(&cp.url(), &token, &dir.path().join("other")).await;
    assert!(!ok);
    assert!(text.contains("already used"), "{text}");

    // The agent runs from the kept bundle, with no bundle in its config.
    let agent = Agent::start(&write_config(dir.path(), &cp.url(), None)).await;
    agent.wait_model("gpt").await;
    assert_eq!(agent.chat("gpt").await, 200);
    eventually("the enrolled gateway heartbeats", WITHIN, || async {
        cp.heartbeat_of("gw-enrolled").await.is_some()
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn certificates_rotate_under_traffic_without_a_failed_request() {
    let (dir, _mock, cp) = seeded().await;
    // Issuers backdate not_before by 5 minutes: with 160 s of validity, 2/3 of the
    // lifetime has passed about 7 s from now.
    let bundle = cp
        .bundle_files(dir.path(), "gw-1", json!({"validity_seconds": 160}))
        .await;
    let config = write_config(dir.path(), &cp.url(), Some(&bundle));
    let mut agent = Agent::start(&config).await;
    agent.wait_model("gpt").await;

    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = {
        let (http, url, stop) = (agent.http.clone(), agent.url.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0, 0);
            while !stop.is_cancelled() {
                let status = http
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(CALLER)
                    .json(&json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16());
                if status == 200 { ok += 1 } else { failed += 1 }
            }
            (ok, failed)
        })
    };

    let rotations = || async {
        let listed = cp
            .console
            .ok(
                "GET",
                &format!("/console/v1/environments/{ENV}/gateways"),
                None,
            )
            .await;
        listed["gateways"][0]["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["how"] == "rotation")
            .count()
    };
    // On schedule...
    agent
        .process
        .wait_for_line("gateway certificate rotated", WITHIN)
        .await;
    assert!(rotations().await >= 1);
    // ...and when the control plane asks through a heartbeat.
    let before = rotations().await;
    cp.console
        .ok(
            "POST",
            &format!("/console/v1/environments/{ENV}/gateways/gw-1/rotate"),
            None,
        )
        .await;
    eventually("a rotation the control plane asked for", WITHIN, || async {
        rotations().await > before
    })
    .await;

    // The configuration watch and heartbeats carry on with the new certificate.
    cp.put("models", "m2", model("gpt-2")).await;
    agent.wait_model("gpt-2").await;
    let listed = cp
        .console
        .ok(
            "GET",
            &format!("/console/v1/environments/{ENV}/gateways"),
            None,
        )
        .await;
    let newest = listed["gateways"][0]["certificates"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()["serial"]
        .clone();
    eventually(
        "a heartbeat presents the newest certificate",
        WITHIN,
        || async {
            cp.heartbeat_of("gw-1")
                .await
                .is_some_and(|h| h["certificate"]["serial"] == newest)
        },
    )
    .await;

    stop.cancel();
    let (ok, failed) = traffic.await.unwrap();
    assert!(ok > 0);
    assert_eq!(
        failed, 0,
        "requests failed during rotation ({ok} succeeded)"
    );

    // A restart uses the kept, rotated bundle rather than the configured original.
    agent.stop().await;
    let agent = Agent::start(&config).await;
    let output = agent.process.output();
    assert!(output.contains("using the kept bundle"), "{output}");
    agent.wait_model("gpt-2").await;
    agent.stop().await;
}

/// A successful chat completion (read to the end); its call id.
async fn served(agent: &Agent, stream: bool) -> String {
    let response = agent.chat_as(CALLER, "gpt", stream).await;
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-aisix-call-id"]
        .to_str()
        .unwrap()
        .to_owned();
    response.bytes().await.unwrap();
    id
}

/// Usage events the console has received, and how many were sent twice.
async fn received_usage(cp: &Cp) -> (Vec<Value>, u64) {
    let listed = cp
        .console
        .ok(
            "GET",
            &format!("/console/v1/environments/{ENV}/usage"),
            None,
        )
        .await;
    let events = listed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].clone())
        .collect();
    (events, listed["duplicates_received"].as_u64().unwrap())
}

#[tokio::test]
async fn spending_past_the_budget_is_a_429_billing_error_with_the_budget_fields() {
    let (dir, _mock, cp) = seeded().await;
    // 10 prompt + 3 completion tokens per mock answer: $0.016 per request.
    cp.put(
        "models",
        "m1",
        json!({"display_name": "gpt", "model_name": "up-gpt", "provider_key_id": "pk1",
               "cost": {"input_per_1k": 1.0, "output_per_1k": 2.0}}),
    )
    .await;
    // The control plane's answers hold for a minute: the gateway counts the spend it
    // serves in between itself.
    cp.budget(
        "k1",
        json!({"limit_usd": 0.05, "period": "daily", "ttl_seconds": 60}),
    )
    .await;
    let agent = gateway(dir.path(), &cp, "  usage: {flush_interval_ms: 100}\n").await;

    // The answers served are counted against the budget as they are served, and the
    // first request past it is refused, though the control plane's answer still allows.
    let mut allowed = 0;
    let denied = loop {
        let response = agent.chat_as(CALLER, "gpt", allowed % 2 == 1).await;
        if response.status() == 429 {
            break response;
        }
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        allowed += 1;
        assert!(allowed < 200, "never refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // $0.05 at $0.016 a request: the fourth crosses it, the fifth is refused (the
    // overshoot is one request's cost for a sequential client).
    assert_eq!(
        allowed, 4,
        "refused after {allowed} requests costing $0.016"
    );
    let retry_after: u64 = denied.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(denied.headers().contains_key("x-aisix-call-id"));
    assert_eq!(denied.headers()["content-type"], "application/json");
    let should_retry = denied.headers()["x-should-retry"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = denied.json().await.unwrap();
    let error = &body["error"];
    assert_eq!(error["type"], "billing_error", "{body}");
    assert_eq!(error["code"], "budget_exceeded");
    assert_eq!(error["scope"], "api_key");
    assert_eq!(error["scope_ref"], "k1");
    assert_eq!(error["limit_usd"], 0.05);
    assert!(error["spent_usd"].as_f64().unwrap() >= 0.05, "{body}");
    assert_eq!(error["period"], "daily");
    // The body has the true reset; the header is capped so no SDK sleeps for hours,
    // and says that waiting will not help.
    let reset = error["retry_after_seconds"].as_u64().unwrap();
    assert!((1..=86_400).contains(&reset));
    assert_eq!(retry_after, reset.min(60));
    assert_eq!(should_retry, "false");

    // Every allowed request was reported once, with its cost.
    eventually("every allowed request is reported", WITHIN, || async {
        received_usage(&cp).await.0.len() == allowed
    })
    .await;
    let (events, duplicates) = received_usage(&cp).await;
    assert_eq!(duplicates, 0);
    for event in &events {
        assert_eq!(event["api_key_id"], "k1");
        assert_eq!(event["model"], "gpt");
        assert_eq!(event["provider"], "openai");
        assert_eq!(event["status_code"], 200);
        assert_eq!(event["prompt_tokens"], 10);
        assert_eq!(event["completion_tokens"], 3);
        assert!((event["cost_usd"].as_f64().unwrap() - 0.016).abs() < 1e-9);
    }
    assert!(
        events
            .iter()
            .any(|e| e["stream"] == true && e["ttft_ms"].is_u64()),
        "a streamed request is reported with its time to first token"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_fail_closed_key_stays_closed_across_a_restart_while_budget_checks_fail() {
    let (dir, _mock, cp) = seeded().await;
    cp.budget(
        "k1",
        json!({"limit_usd": 100.0, "period": "monthly", "fail_mode": "closed", "ttl_seconds": 1}),
    )
    .await;
    let extra = "  budget: {default_fail_mode: open, stale_window_secs: 1, timeout_ms: 300}\n";
    let agent = gateway(dir.path(), &cp, extra).await;
    assert_eq!(agent.chat("gpt").await, 200);
    agent.stop().await;

    // Restarted while the control plane cannot answer budget checks: the key keeps its
    // last answer's fail mode (closed), not the default for keys never answered (open).
    set_faults(&cp, json!({"endpoints": {"budget_check": {"status": 503}}})).await;
    let agent = gateway(dir.path(), &cp, extra).await;
    eventually("the key's own fail mode refuses", WITHIN, || async {
        agent.chat("gpt").await == 429
    })
    .await;
    assert!(
        agent
            .process
            .output()
            .contains("budget decisions restored from the state directory")
    );
    let refused = agent.chat_as(CALLER, "gpt", false).await;
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_unavailable", "{body}");
    set_faults(&cp, json!({})).await;
    eventually("budget checks recover", WITHIN, || async {
        agent.chat("gpt").await == 200
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn with_budget_checks_failing_the_last_answer_holds_for_the_stale_window_then_the_fail_mode_applies()
 {
    let (dir, _mock, cp) = seeded().await;
    let other = "e2e-managed-second-caller";
    cp.put(
        "api_keys",
        "k2",
        json!({"display_name": "second", "key_hash": key_hash(other), "allowed_models": ["*"]}),
    )
    .await;
    cp.budget(
        "k1",
        json!({"limit_usd": 100.0, "period": "monthly", "fail_mode": "closed", "ttl_seconds": 1}),
    )
    .await;
    let agent = gateway(
        dir.path(),
        &cp,
        "  budget: {default_fail_mode: closed, stale_window_secs: 4, timeout_ms: 500}\n",
    )
    .await;
    assert_eq!(agent.chat("gpt").await, 200);

    // Concurrent first requests of one key share one check.
    let third = "e2e-managed-third-caller";
    cp.put(
        "api_keys",
        "k3",
        json!({"display_name": "third", "key_hash": key_hash(third), "allowed_models": ["*"]}),
    )
    .await;
    eventually("key k3 is known", WITHIN, || async {
        let models = agent
            .http
            .get(format!("{}/v1/models", agent.url))
            .bearer_auth(third);
        models.send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let checks = async || {
        cp.console.ok("GET", "/console/v1/calls", None).await["budget_check"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = checks().await;
    let burst: Vec<_> = (0..20)
        .map(|_| agent.chat_as(third, "gpt", false))
        .collect();
    for response in futures_util::future::join_all(burst).await {
        assert_eq!(response.status(), 200);
    }
    assert_eq!(
        checks().await - before,
        1,
        "one check for 20 concurrent requests"
    );

    set_faults(&cp, json!({"endpoints": {"budget_check": {"status": 503}}})).await;
    let failing_since = tokio::time::Instant::now();
    // Past the 1 s TTL, inside the 4 s stale window: the last answer still allows.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(agent.chat("gpt").await, 200, "the stale answer is used");
    // A key never answered for follows the configured default (closed).
    let refused = agent.chat_as(other, "gpt", false).await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "billing_error");
    assert_eq!(body["error"]["code"], "budget_unavailable");

    // Then the key's own fail mode (closed) refuses.
    eventually("the stale window ends in a refusal", WITHIN, || async {
        agent.chat("gpt").await == 429
    })
    .await;
    let waited = failing_since.elapsed();
    assert!(
        waited >= Duration::from_secs(3),
        "refused {waited:?} after the failures began; the window is 1 s TTL + 4 s"
    );
    let refused = agent.chat_as(CALLER, "gpt", false).await;
    assert_eq!(refused.headers()["retry-after"], "5");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_unavailable", "{body}");

    // The control plane answers again: so do the keys.
    set_faults(&cp, json!({})).await;
    eventually("budget checks recover", WITHIN, || async {
        agent.chat("gpt").await == 200 && agent.chat_as(other, "gpt", false).await.status() == 200
    })
    .await;
    assert!(agent.process.output().contains("budget check failed"));
    agent.stop().await;
}

#[tokio::test]
async fn usage_survives_a_control_plane_outage_and_an_agent_restart_without_loss_or_duplicates() {
    let (dir, _mock, mut cp) = seeded().await;
    let bundle = cp.bundle_files(dir.path(), "gw-1", json!({})).await;
    let config = write_config_with(
        dir.path(),
        &cp.url(),
        Some(&bundle),
        "  usage: {flush_interval_ms: 100, batch_size: 2}\n",
    );
    let agent = Agent::start(&config).await;
    agent.wait_model("gpt").await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(served(&agent, n == 1).await);
    }
    eventually("the first events arrive", WITHIN, || async {
        received_usage(&cp).await.0.len() == 3
    })
    .await;

    // The control plane goes away: requests keep being served and accounted.
    cp.stop().await;
    for n in 0..4 {
        ids.push(served(&agent, n == 2).await);
    }
    agent.stop().await;
    // Restarted while the control plane is still away: from the cache.
    let agent = Agent::start(&config).await;
    agent.wait_model("gpt").await;
    for _ in 0..2 {
        ids.push(served(&agent, false).await);
    }
    cp.restart().await;
    eventually("every event arrives after the outage", WITHIN, || async {
        received_usage(&cp).await.0.len() == ids.len()
    })
    .await;
    // And nothing is sent again later.
    ids.push(served(&agent, false).await);
    eventually("the next event arrives", WITHIN, || async {
        received_usage(&cp).await.0.len() == ids.len()
    })
    .await;
    eventually("the heartbeat shows an empty queue", WITHIN, || async {
        cp.heartbeat_of("gw-1")
            .await
            .is_some_and(|h| h["usage_queue"]["pending"] == 0)
    })
    .await;
    let (events, duplicates) = received_usage(&cp).await;
    assert_eq!(
        duplicates, 0,
        "events were sent again after acknowledgement"
    );
    let mut received: Vec<String> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    received.sort();
    ids.sort();
    assert_eq!(received, ids, "event ids are the call ids, each once");
    assert_eq!(
        cp.heartbeat_of("gw-1").await.unwrap()["usage_queue"]["dropped"],
        0
    );
    agent.stop().await;
}

#[tokio::test]
async fn the_control_plane_sets_the_heartbeat_interval() {
    let (dir, _mock, cp) = seeded().await;
    cp.console
        .ok(
            "PUT",
            "/console/v1/settings",
            Some(json!({"heartbeat_interval_secs": 30})),
        )
        .await;
    let bundle = cp.bundle_files(dir.path(), "gw-1", json!({})).await;
    // Configured to beat every second; the control plane's answer says 30.
    let mut agent = Agent::start(&write_config(dir.path(), &cp.url(), Some(&bundle))).await;
    let line = agent
        .process
        .wait_for_line("the control plane set the heartbeat interval", WITHIN)
        .await;
    assert!(line.contains("heartbeat_interval_secs=30"), "{line}");
    let last_seen = async || {
        cp.console
            .ok(
                "GET",
                &format!("/console/v1/environments/{ENV}/gateways"),
                None,
            )
            .await["gateways"][0]["instances"][0]["last_seen_unix_ms"]
            .as_i64()
    };
    let first = last_seen().await;
    assert!(first.is_some(), "the first heartbeat arrived");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        last_seen().await,
        first,
        "no heartbeat within 3 s of a 30 s interval"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_usage_event_the_control_plane_refuses_is_dropped_alone() {
    let (dir, _mock, mut cp) = seeded().await;
    let bundle = cp.bundle_files(dir.path(), "gw-1", json!({})).await;
    let config = write_config_with(
        dir.path(),
        &cp.url(),
        Some(&bundle),
        "  usage: {flush_interval_ms: 100}\n",
    );
    let agent = Agent::start(&config).await;
    agent.wait_model("gpt").await;
    cp.stop().await;
    let mut ids = vec![served(&agent, false).await, served(&agent, false).await];
    agent.stop().await;
    // A damaged event (no api_key_id) queued after the two real ones.
    {
        let db = sled::open(dir.path().join("agent-state/usage-queue")).unwrap();
        let events = db.open_tree("events").unwrap();
        assert_eq!(events.len(), 2, "both events were kept through the stop");
        events
            .insert(
                (1u64 << 40).to_be_bytes(),
                br#"{"event_id":"planted"}"#.to_vec(),
            )
            .unwrap();
        db.flush().unwrap();
    }
    cp.restart().await;
    let agent = Agent::start(&config).await;
    eventually(
        "the refused event is dropped and counted",
        WITHIN,
        || async {
            cp.heartbeat_of("gw-1").await.is_some_and(|h| {
                h["usage_queue"]["pending"] == 0 && h["usage_queue"]["dropped"] == 1
            })
        },
    )
    .await;
    let (events, duplicates) = received_usage(&cp).await;
    let mut received: Vec<String> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    received.sort();
    ids.sort();
    assert_eq!(received, ids, "the good events of the refused batch arrive");
    assert_eq!(duplicates, 0);
    assert!(
        agent
            .process
            .output()
            .contains("usage event refused by the control plane; dropped")
    );
    agent.stop().await;
}

#[tokio::test]
async fn metrics_and_status_show_the_control_plane_link_and_no_secret_leaks() {
    let (dir, _mock, cp) = seeded().await;
    let bundle = cp.bundle_files(dir.path(), "gw-1", json!({})).await;
    let config = write_config(dir.path(), &cp.url(), Some(&bundle));
    // Debug logs, JSON: the secret scan covers everything the agent can say.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("observability:\n  log_level: debug\n  log_format: json\n");
    std::fs::write(&config, text).unwrap();
    let mut agent = Agent::start(&config).await;
    agent.wait_model("gpt").await;
    assert_eq!(agent.chat("gpt").await, 200);
    let mut seen = String::new();
    let streamed = agent.chat_as(CALLER, "gpt", true).await;
    seen.push_str(&format!("{:?}", streamed.headers()));
    seen.push_str(&streamed.text().await.unwrap());
    let line = agent
        .process
        .wait_for_line("metrics listener ready", WITHIN)
        .await;
    let base = format!("http://{}", tests::addr_in(&line));
    let metrics_url = format!("{base}/metrics");
    let scrape = || tests::metrics::scrape(&metrics_url);
    eventually("a heartbeat has been acknowledged", WITHIN, || async {
        let (families, _) = scrape().await;
        sample(&families, "aisix_heartbeats_total", &[("outcome", "ok")]).is_some()
    })
    .await;
    let (families, metrics_text) = scrape().await;
    assert_eq!(
        sample(&families, "aisix_config_source_connected", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &families,
            "aisix_config_source_info",
            &[("source", "control_plane")]
        ),
        Some(1.0)
    );
    let days = sample(&families, "aisix_certificate_remaining_days", &[]).unwrap();
    assert!((29.0..=31.0).contains(&days), "{days}");
    assert!(sample(&families, "aisix_usage_queue_events", &[]).is_some());
    assert_eq!(
        sample(&families, "aisix_usage_event_drops_total", &[]),
        Some(0.0)
    );
    // The calls above each emitted one usage event.
    assert!(
        sample(&families, "aisix_usage_events_emitted_total", &[]).is_some_and(|n| n >= 2.0),
        "{metrics_text}"
    );
    assert!(
        sample(
            &families,
            "aisix_budget_checks_total",
            &[("outcome", "allowed")]
        )
        .is_some_and(|n| n >= 1.0)
    );
    seen.push_str(&metrics_text);

    // /status/config agrees with what the heartbeats tell the control plane.
    let status = tests::get_json(&format!("{base}/status/config")).await;
    assert_eq!(status["source"], "control_plane");
    assert_eq!(status["connected"], true);
    // A quiet watch stays fresh: the control plane's progress notifications (every
    // 500 ms here) count, so the age stays near that interval, never growing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quiet = tests::get_json(&format!("{base}/status/config")).await;
    let age = quiet["snapshot_age_seconds"].as_f64().unwrap();
    assert!(
        age < 1.5,
        "snapshot_age_seconds {age} after 3 quiet seconds"
    );
    eventually(
        "the heartbeat carries the same config hash",
        WITHIN,
        || async {
            cp.heartbeat_of("gw-1").await.is_some_and(|h| {
                h["config"]["config_hash"] == status["config_hash"]
                    && h["config"]["applied_revision"] == status["applied_revision"]
            })
        },
    )
    .await;
    seen.push_str(&status.to_string());
    seen.push_str(&cp.heartbeat_of("gw-1").await.unwrap().to_string());

    // Revoked: the heartbeat outcome says so.
    cp.console
        .ok(
            "POST",
            &format!("/console/v1/environments/{ENV}/gateways/gw-1/revoke"),
            None,
        )
        .await;
    eventually("a revoked heartbeat is counted", WITHIN, || async {
        let (families, _) = scrape().await;
        sample(
            &families,
            "aisix_heartbeats_total",
            &[("outcome", "revoked")],
        )
        .is_some()
    })
    .await;

    agent.process.signal("TERM");
    agent.process.wait_exit(WITHIN).await;
    let output = agent.process.output();
    assert!(output.contains("\"level\":\"DEBUG\""), "debug logs were on");
    // The private key (every line of its PEM body), the provider key and the caller key
    // appear in no log line, response, metric, status or heartbeat.
    let key_pem = std::fs::read_to_string(bundle.join("key.pem")).unwrap();
    let key_lines: Vec<&str> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .collect();
    assert!(!key_lines.is_empty());
    for secret in key_lines.iter().copied().chain([UPSTREAM_SECRET, CALLER]) {
        assert!(!output.contains(secret), "{secret} in the log");
        assert!(!seen.contains(secret), "{secret} in an answer");
    }
}

/// Waits until the control plane holds one usage event per served call id, exactly
/// those; returns how many events it received more than once.
async fn every_call_accounted(cp: &Cp, ids: &mut [String]) -> u64 {
    eventually(
        "every served call's usage event arrives",
        WITHIN,
        || async { received_usage(cp).await.0.len() == ids.len() },
    )
    .await;
    let (events, duplicates) = received_usage(cp).await;
    let mut received: Vec<String> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    received.sort();
    ids.sort();
    assert_eq!(received, ids);
    duplicates
}

/// Whether an agent's `/status/config` says it is connected to its source.
async fn connected(status: &str) -> bool {
    tests::get_json(&format!("{status}/status/config")).await["connected"] == true
}

#[tokio::test]
async fn control_plane_faults_leave_the_last_good_snapshot_serving_and_lose_no_usage() {
    let (dir, _mock, mut cp) = seeded().await;
    let bundle = cp.bundle_files(dir.path(), "gw-1", json!({})).await;
    let config = write_config_with(
        dir.path(),
        &cp.url(),
        Some(&bundle),
        "  usage: {flush_interval_ms: 100}\n",
    );
    let mut agent = Agent::start(&config).await;
    agent.wait_model("gpt").await;
    let line = agent
        .process
        .wait_for_line("metrics listener ready", WITHIN)
        .await;
    let status = format!("http://{}", tests::addr_in(&line));
    let mut ids = vec![served(&agent, false).await];

    // Every data-plane endpoint answering 5xx, then malformed JSON; then connections
    // refused. Watches are cut so the agent has to come back through the fault.
    let every = |fault: Value| {
        let names = ["range", "watch", "heartbeat", "telemetry", "budget_check"];
        json!({"endpoints": names.iter().map(|n| (n.to_string(), fault.clone())).collect::<serde_json::Map<_, _>>()})
    };
    let faults = [
        ("5xx", every(json!({"status": 503})), true),
        ("malformed", every(json!("malformed")), true),
        ("refused", json!({"refuse_connections": true}), false),
    ];
    for (n, (name, fault, unreachable)) in faults.into_iter().enumerate() {
        set_faults(&cp, fault).await;
        cp.console
            .ok("POST", "/console/v1/faults/cut-watches", None)
            .await;
        let added = format!("during-{name}");
        cp.put("models", &format!("f{n}"), model(&added)).await;
        for stream in [false, true, false] {
            ids.push(served(&agent, stream).await);
        }
        if unreachable {
            // The watch cannot be re-established: the agent says so, and the change
            // made meanwhile has not arrived.
            eventually(
                &format!("{name}: the link is reported down"),
                WITHIN,
                || async { !connected(&status).await },
            )
            .await;
            assert!(!agent.models().await.contains(&added), "{name}");
            ids.push(served(&agent, false).await);
        }
        set_faults(&cp, json!({})).await;
        agent.wait_model(&added).await;
        assert!(connected(&status).await, "{name}");
    }

    // The control plane rotates its CA and restarts (dropping every connection): the
    // agent cannot verify the new server certificate and keeps serving what it has.
    let rotated = cp.console.ok("POST", "/console/v1/ca/rotate", None).await;
    cp.restart().await;
    cp.put("models", "f-ca", model("after-ca")).await;
    eventually(
        "the link is reported down after the CA rotation",
        WITHIN,
        || async { !connected(&status).await },
    )
    .await;
    ids.push(served(&agent, true).await);
    ids.push(served(&agent, false).await);
    assert!(!agent.models().await.contains(&"after-ca".to_owned()));
    // The operator adds the new CA and restarts the agent: it converges, and the
    // usage queued meanwhile is delivered.
    agent.stop().await;
    let extra = dir.path().join("new-ca.pem");
    std::fs::write(&extra, rotated["ca_pem"].as_str().unwrap()).unwrap();
    let config = write_config_with(
        dir.path(),
        &cp.url(),
        Some(&bundle),
        &format!(
            "  usage: {{flush_interval_ms: 100}}\n  cp_extra_ca_file: {}\n",
            extra.display()
        ),
    );
    let agent = Agent::start(&config).await;
    agent.wait_model("after-ca").await;
    ids.push(served(&agent, false).await);
    assert_eq!(every_call_accounted(&cp, &mut ids).await, 0);
    agent.stop().await;
}

#[tokio::test]
async fn kill_9_during_cache_writes_and_usage_queueing_loses_nothing_served() {
    let (dir, _mock, cp) = seeded().await;
    let bundle = cp.bundle_files(dir.path(), "gw-1", json!({})).await;
    let config = write_config_with(
        dir.path(),
        &cp.url(),
        Some(&bundle),
        "  usage: {flush_interval_ms: 100}\n",
    );
    let mut agent = Agent::start(&config).await;
    agent.wait_model("gpt").await;
    // Telemetry refused: every event stays in the durable queue.
    set_faults(&cp, json!({"endpoints": {"telemetry": {"status": 503}}})).await;
    let writes = {
        let console = cp.console.clone();
        tokio::spawn(async move {
            for n in 0..40 {
                console
                    .ok(
                        "PUT",
                        &format!("/console/v1/environments/{ENV}/resources/models/w{n}"),
                        Some(model(&format!("w{n}"))),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut ids = Vec::new();
    for n in 0..30 {
        ids.push(served(&agent, n % 3 == 0).await);
    }
    // Killed while the console is still writing (the cache writer is busy) and a
    // moment after the last answer (the group commit takes milliseconds).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!writes.is_finished(), "the writes ended before the kill");
    agent.process.signal("KILL");
    agent.process.wait_exit(WITHIN).await;
    drop(agent);
    writes.await.unwrap();

    // Restarted with the control plane unreachable: the cache is intact and serves.
    set_faults(&cp, json!({"refuse_connections": true})).await;
    let agent = Agent::start(&config).await;
    let (status, body) = agent.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("source cache"), "{body}");
    ids.push(served(&agent, false).await);
    let output = agent.process.output();
    assert!(!output.contains("moved aside"), "{output}");
    // The control plane returns: every served call is accounted once, and the
    // configuration converges to the last write.
    set_faults(&cp, json!({})).await;
    agent.wait_model("w39").await;
    assert_eq!(every_call_accounted(&cp, &mut ids).await, 0);
    agent.stop().await;
}

/// A small tmpfs, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount(8) is available");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {} (this test needs root, as scripts/test runs in CI)",
            at.display()
        );
        SmallDisk(at.to_owned())
    }

    /// Fills the disk with one file; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.write_all(&[0u8; 1]);
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_state_disk_keeps_serving_and_recovers_when_space_returns() {
    let (dir, _mock, cp) = seeded().await;
    let disk = SmallDisk::mount(&dir.path().join("disk"), "32m");
    let bundle = cp.bundle_files(dir.path(), "gw-1", json!({})).await;
    let config = write_config_with(
        dir.path(),
        &cp.url(),
        Some(&bundle),
        "  usage: {flush_interval_ms: 100}\n",
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("state_dir: {}", dir.path().join("agent-state").display()),
        &format!("state_dir: {}", disk.0.join("state").display()),
    );
    std::fs::write(&config, text).unwrap();
    let agent = Agent::start(&config).await;
    agent.wait_model("gpt").await;
    let mut ids = vec![served(&agent, false).await];
    eventually("the first event arrives", WITHIN, || async {
        received_usage(&cp).await.0.len() == 1
    })
    .await;

    // The disk fills up: callers are still served, configuration changes still apply
    // (in memory), and the agent says what it could not write (it is written to until
    // the agent meets the full disk: sled writes into space it allocated earlier).
    let filler = disk.fill();
    let mut n = 0;
    while !agent.process.output().contains("No space left on device") {
        assert!(n < 400, "the agent never met the full disk");
        cp.put("models", &format!("f{n}"), model(&format!("full-{n}")))
            .await;
        ids.push(served(&agent, n % 5 == 0).await);
        n += 1;
    }
    for n in 0..5 {
        ids.push(served(&agent, n == 2).await);
    }
    cp.put("models", "m-full", model("while-full")).await;
    agent.wait_model("while-full").await;
    ids.push(served(&agent, false).await);
    // Usage keeps flowing to the control plane while the disk is full (from memory):
    // budgets are decided on it. Calls served once the usage queue itself has met the
    // full disk are delivered before any space returns.
    let mut m = 0;
    while !agent
        .process
        .output()
        .contains("usage queue: cannot write to disk")
    {
        assert!(m < 200, "the usage queue never met the full disk");
        ids.push(served(&agent, false).await);
        m += 1;
    }
    let mut during = Vec::new();
    for n in 0..3 {
        during.push(served(&agent, n == 1).await);
    }
    ids.extend(during.iter().cloned());
    eventually(
        "usage of calls served on a full disk is delivered",
        WITHIN,
        || async {
            let (events, _) = received_usage(&cp).await;
            let received: Vec<&str> = events
                .iter()
                .filter_map(|e| e["event_id"].as_str())
                .collect();
            during.iter().all(|id| received.contains(&id.as_str()))
        },
    )
    .await;

    // Space returns: everything served is accounted, and the agent keeps working.
    std::fs::remove_file(filler).unwrap();
    cp.put("models", "m-after", model("after-full")).await;
    agent.wait_model("after-full").await;
    ids.push(served(&agent, true).await);
    // Removals of acknowledged events that the failing disk did not keep may be sent
    // again; the control plane counts each event id once.
    every_call_accounted(&cp, &mut ids).await;
    // The cache is written again (sled refuses writes after an I/O error: the agent
    // opens it afresh), so a restart with the control plane away serves the latest.
    eventually("the cache is written again", WITHIN, || async {
        agent
            .process
            .output()
            .contains("snapshot cache written again")
    })
    .await;
    agent.stop().await;
    set_faults(&cp, json!({"refuse_connections": true})).await;
    let agent = Agent::start(&config).await;
    let (status, body) = agent.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("source cache"), "{body}");
    let models = agent.models().await;
    assert!(models.contains(&"after-full".to_owned()), "{models:?}");
    agent.stop().await;
}
