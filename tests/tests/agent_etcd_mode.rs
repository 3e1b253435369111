//! The real `aisix-agent` binary in self-hosted mode against a real etcd (started on
//! ephemeral ports), with its admin listener and the mock provider.

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
use tests::etcd::{Etcd, Gate, PROGRESS_INTERVAL};
use tests::{Process, addr_in, binary, eventually, http_client, key_hash};

const ADMIN_KEY: &str = "e2e-admin-key";
const CALLER: &str = "e2e-etcd-caller";
const UPSTREAM_SECRET: &str = "sk-e2e-etcd-upstream-secret";
const WITHIN: Duration = Duration::from_secs(30);

struct Agent {
    process: Process,
    proxy: String,
    admin: String,
    /// The metrics and status listener.
    status: String,
    http: reqwest::Client,
}

impl Agent {
    async fn start(dir: &Path, etcd_url: &str) -> Agent {
        Self::start_with(
            dir,
            &format!("  endpoints: [\"{etcd_url}\"]\n  request_timeout_ms: 2000\n"),
        )
        .await
    }

    /// Starts the agent with `etcd_lines` (indented YAML) in its etcd section.
    async fn start_with(dir: &Path, etcd_lines: &str) -> Agent {
        let config = dir.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "etcd:\n{etcd_lines}  cache_dir: {}\n  dial_timeout_ms: 500\nproxy:\n  addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\n  admin_keys: [{ADMIN_KEY}]\nshutdown:\n  min_drain_secs: 0\n  drain_timeout_secs: 5\n",
                dir.join("state").display()
            ),
        )
        .unwrap();
        let (mut process, proxy) = tests::start_agent(&config).await;
        let line = process.wait_for_line("admin listener ready", WITHIN).await;
        let admin = format!("http://{}", addr_in(&line));
        let line = process
            .wait_for_line("metrics listener ready", WITHIN)
            .await;
        let status = format!("http://{}", addr_in(&line));
        Agent {
            process,
            proxy,
            admin,
            status,
            http: http_client(),
        }
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_KEY);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `GET /status/config`.
    async fn config_status(&self) -> Value {
        tests::get_json(&format!("{}/status/config", self.status)).await
    }

    async fn create(&self, kind: &str, body: Value) -> String {
        let (status, answer) = self
            .admin(
                reqwest::Method::POST,
                &format!("/admin/v1/{kind}"),
                Some(body),
            )
            .await;
        assert_eq!(status, 201, "{answer}");
        answer["id"].as_str().unwrap().to_owned()
    }

    async fn models(&self) -> Vec<String> {
        let Ok(response) = self
            .http
            .get(format!("{}/v1/models", self.proxy))
            .bearer_auth(CALLER)
            .send()
            .await
        else {
            return Vec::new();
        };
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let mut ids: Vec<String> = body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        ids
    }

    async fn wait_models(&self, expected: &[&str]) {
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            let seen = self.models().await;
            if seen == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/v1/models shows {seen:?}, not {expected:?}, after {WITHIN:?}; agent output:\n{}",
                self.process.output()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn health(&self) -> Value {
        let (status, body) = self
            .admin(reqwest::Method::GET, "/admin/v1/health", None)
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn chat(&self, model: &str) -> u16 {
        self.http
            .post(format!("{}/v1/chat/completions", self.proxy))
            .bearer_auth(CALLER)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

fn provider_key(api_base: &str, name: &str) -> Value {
    json!({"display_name": name, "provider": "openai", "api_base": api_base, "api_key": UPSTREAM_SECRET})
}

fn model(name: &str, provider_key_id: &str) -> Value {
    json!({"display_name": name, "model_name": format!("up-{name}"), "provider_key_id": provider_key_id})
}

/// Provider key, model `gpt` and the caller key through the admin API.
async fn seed(agent: &Agent, mock: &MockProvider) -> String {
    let pk = agent
        .create("provider_keys", provider_key(&mock.url(), "mock"))
        .await;
    agent.create("models", model("gpt", &pk)).await;
    agent
        .create(
            "api_keys",
            json!({"key": CALLER, "allowed_models": ["*"], "display_name": "e2e"}),
        )
        .await;
    pk
}

#[tokio::test]
async fn admin_writes_reach_the_proxy_and_every_error_uses_the_admin_envelope() {
    let etcd = Etcd::start().await;
    let mock = MockProvider::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), &etcd.url()).await;
    let pk = seed(&agent, &mock).await;
    agent.wait_models(&["gpt"]).await;
    assert_eq!(agent.chat("gpt").await, 200);
    assert_eq!(mock.requests()[0].json()["model"], "up-gpt");

    // Liveness needs no key; everything else does (Bearer or x-api-key).
    let http = &agent.http;
    let livez = http
        .get(format!("{}/livez", agent.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(livez.status(), 200);
    assert_eq!(livez.text().await.unwrap(), "ok");
    // Readiness too, like the proxy's; paths outside the admin API are 404 without a key.
    let readyz = http
        .get(format!("{}/readyz", agent.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 200);
    assert_eq!(readyz.text().await.unwrap(), "ok");
    let unknown = http
        .get(format!("{}/health", agent.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    for request in [
        http.get(format!("{}/admin/v1/health", agent.admin)),
        http.get(format!("{}/admin/v1/models", agent.admin))
            .bearer_auth("wrong"),
        http.get(format!("{}/admin/v1/nothing", agent.admin))
            .header("x-api-key", "wrong"),
    ] {
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"error_msg": "missing or invalid admin key"})
        );
    }
    let r = http
        .get(format!("{}/admin/v1/models", agent.admin))
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["total"], 1);

    // Provider credentials never come back.
    let (status, listed) = agent
        .admin(reqwest::Method::GET, "/admin/v1/provider_keys", None)
        .await;
    assert_eq!(status, 200);
    assert!(!listed.to_string().contains(UPSTREAM_SECRET), "{listed}");
    assert_eq!(listed["list"][0]["value"]["api_key"], "******");
    // PUT with the redacted value (a GET round trip) keeps the stored credential.
    let mut doc = listed["list"][0]["value"].clone();
    doc["display_name"] = json!("mock-renamed");
    let (status, _) = agent
        .admin(
            reqwest::Method::PUT,
            &format!("/admin/v1/provider_keys/{pk}"),
            Some(doc),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        etcd.etcdctl(&[
            "get",
            &format!("/aisix/provider_keys/{pk}"),
            "--print-value-only"
        ])
        .contains(UPSTREAM_SECRET)
    );
    let (status, one) = agent
        .admin(
            reqwest::Method::GET,
            &format!("/admin/v1/provider_keys/{pk}"),
            None,
        )
        .await;
    assert_eq!(
        (status, &one["value"]["display_name"]),
        (200, &json!("mock-renamed"))
    );
    // Caller keys are stored as hashes only.
    let stored = etcd.etcdctl(&["get", "/aisix/api_keys/", "--prefix", "--print-value-only"]);
    assert!(
        stored.contains(&key_hash(CALLER)) && !stored.contains(CALLER),
        "{stored}"
    );

    // 400: invalid JSON, not an object, each invalid field named, dangling reference.
    let raw = http
        .post(format!("{}/admin/v1/models", agent.admin))
        .bearer_auth(ADMIN_KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let body: Value = raw.json().await.unwrap();
    assert!(
        body["error_msg"]
            .as_str()
            .unwrap()
            .starts_with("the body is not valid JSON"),
        "{body}"
    );
    let cases = [
        ("models", json!([1]), "the body must be a JSON object"),
        (
            "models",
            json!({"model_name": "x", "provider_key_id": pk, "allowed_cidrs": ["nope"]}),
            "display_name: required",
        ),
        (
            "models",
            json!({"display_name": "x", "model_name": "x", "provider_key_id": "missing"}),
            "provider_key_id: provider key 'missing' does not exist",
        ),
        (
            "models",
            json!({"display_name": "r", "routing": {"targets": [{"model": "gpt"}, {"model": "ghost"}]}}),
            "routing.targets[1].model: 'ghost' is not a direct model",
        ),
        (
            "provider_keys",
            json!({"display_name": "p", "provider": "custom"}),
            "api_base",
        ),
        (
            "api_keys",
            json!({"allowed_models": ["*"]}),
            "key_hash: required",
        ),
        (
            "guardrails",
            json!({"name": "g", "patterns": [{"kind": "regex", "value": "("}]}),
            "patterns[0].value: invalid regex",
        ),
    ];
    for (kind, body, expected) in cases {
        let (status, answer) = agent
            .admin(
                reqwest::Method::POST,
                &format!("/admin/v1/{kind}"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, 400, "{kind} {body} -> {answer}");
        let message = answer["error_msg"].as_str().unwrap();
        assert!(message.contains(expected), "{kind} {body}: {message}");
    }
    let (status, answer) = agent
        .admin(
            reqwest::Method::POST,
            "/admin/v1/models",
            Some(json!({"model_name": "x", "allowed_cidrs": ["nope"], "provider_key_id": pk})),
        )
        .await;
    assert_eq!(status, 400);
    let message = answer["error_msg"].as_str().unwrap();
    assert!(
        message.contains("display_name") && message.contains("allowed_cidrs[0]"),
        "{message}"
    );

    // 409: duplicate display names (and guardrail names).
    let (status, answer) = agent
        .admin(
            reqwest::Method::POST,
            "/admin/v1/models",
            Some(model("gpt", &pk)),
        )
        .await;
    assert_eq!(status, 409);
    assert!(
        answer["error_msg"]
            .as_str()
            .unwrap()
            .starts_with("display_name: 'gpt' is already used by models/")
    );
    let no_pii = agent
        .create(
            "guardrails",
            json!({"name": "no-pii", "patterns": [{"kind": "literal", "value": "ssn"}]}),
        )
        .await;
    // An attachment must name a guardrail that exists.
    let (status, answer) = agent
        .admin(
            reqwest::Method::POST,
            "/admin/v1/guardrail_attachments",
            Some(json!({"guardrail_id": "ghost", "scope_type": "env"})),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        answer["error_msg"],
        "guardrail_id: guardrail 'ghost' does not exist"
    );
    let attached = agent
        .create(
            "guardrail_attachments",
            json!({"guardrail_id": no_pii, "scope_type": "model", "scope_id": "nobody"}),
        )
        .await;
    let (status, _) = agent
        .admin(
            reqwest::Method::POST,
            "/admin/v1/guardrails",
            Some(json!({"name": "no-pii", "patterns": [{"value": "x"}]})),
        )
        .await;
    assert_eq!(status, 409);
    // The troubleshooting guide's guardrail test endpoint: what a rule does to a text.
    let trial = json!({"text": "my SSN is secret", "policy": "no-pii"});
    let mut answer = Value::Null;
    for _ in 0..100 {
        let (status, found) = agent
            .admin(
                reqwest::Method::POST,
                "/api/v1/admin/guardrails/test",
                Some(trial.clone()),
            )
            .await;
        answer = found;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answer["allowed"], false, "{answer}");
    assert_eq!(
        answer["error"],
        "the input was blocked by guardrail 'no-pii'"
    );
    assert_eq!(answer["verdicts"][0]["outcome"], "blocked");
    let (status, answer) = agent
        .admin(
            reqwest::Method::POST,
            "/api/v1/admin/guardrails/test",
            Some(json!({"text": "fine", "policy": "nope"})),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    let unauthorized = http_client()
        .post(format!("{}/api/v1/admin/guardrails/test", agent.admin))
        .json(&trial)
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);

    let (status, answer) = agent
        .admin(reqwest::Method::PATCH, "/admin/v1/models", None)
        .await;
    assert_eq!(status, 405, "{answer}");
    assert!(answer["error_msg"].is_string());
    // 404: unknown id, unknown kind, unknown route; DELETE then 404.
    for path in [
        "/admin/v1/models/no-such-id",
        "/admin/v1/widgets",
        "/admin/v2/models",
    ] {
        let (status, answer) = agent.admin(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 404, "{path}");
        assert!(answer["error_msg"].is_string(), "{path}: {answer}");
    }
    let id = agent.create("models", model("temp", &pk)).await;
    agent.wait_models(&["gpt", "temp"]).await;
    let path = format!("/admin/v1/models/{id}");
    assert_eq!(
        agent.admin(reqwest::Method::DELETE, &path, None).await.0,
        200
    );
    assert_eq!(
        agent.admin(reqwest::Method::DELETE, &path, None).await.0,
        404
    );
    agent.wait_models(&["gpt"]).await;

    // 409 when a delete would leave something silently unable to serve: a guardrail
    // still attached, a provider key still used by a model, a model still named by a
    // routing model.
    let routed = agent
        .create(
            "models",
            json!({"display_name": "auto", "routing": {"targets": [{"model": "gpt"}]}}),
        )
        .await;
    agent.wait_models(&["auto", "gpt"]).await;
    let gpt = agent.health().await["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "gpt")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually("the attachment is served", WITHIN, || async {
        agent.config_status().await["resources"]["guardrail_attachments"] == 1
    })
    .await;
    for (path, dependent) in [
        (
            format!("/admin/v1/guardrails/{no_pii}"),
            format!("guardrail_attachments/{attached}"),
        ),
        (
            format!("/admin/v1/provider_keys/{pk}"),
            format!("models/{gpt} (gpt)"),
        ),
        (
            format!("/admin/v1/models/{gpt}"),
            format!("models/{routed} (auto)"),
        ),
    ] {
        let (status, answer) = agent.admin(reqwest::Method::DELETE, &path, None).await;
        assert_eq!(status, 409, "{path}: {answer}");
        let message = answer["error_msg"].as_str().unwrap();
        assert!(message.contains(&dependent), "{path}: {message}");
    }
    assert_eq!(
        agent
            .admin(
                reqwest::Method::DELETE,
                &format!("/admin/v1/models/{routed}"),
                None
            )
            .await
            .0,
        200
    );
    agent.wait_models(&["gpt"]).await;

    // 500 while etcd is down; health still answers from memory and the proxy serves.
    let mut etcd = etcd;
    etcd.kill().await;
    let (status, answer) = agent
        .admin(reqwest::Method::GET, "/admin/v1/models", None)
        .await;
    assert_eq!(status, 500);
    assert!(
        answer["error_msg"]
            .as_str()
            .unwrap()
            .starts_with("configuration store unavailable"),
        "{answer}"
    );
    let health = agent.health().await;
    assert_eq!(health["models"][0]["name"], "gpt");
    assert_eq!(agent.chat("gpt").await, 200);

    let logs = agent.process.output();
    assert!(!logs.contains(UPSTREAM_SECRET) && !logs.contains(CALLER) && !logs.contains(ADMIN_KEY));
    agent.process.signal("TERM");
    assert!(agent.process.wait_exit(WITHIN).await.success());
}

#[tokio::test]
async fn direct_etcd_writes_converge_in_any_order_and_survive_an_etcd_restart() {
    let mut etcd = Etcd::start().await;
    let mock = MockProvider::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &etcd.url()).await;
    // "degraded" until the watch is established, then "ok".
    eventually("the admin health says ok", WITHIN, || async {
        agent.health().await["status"] == "ok"
    })
    .await;
    let health = agent.health().await;
    assert_eq!(health["source_connected"], true);
    assert_eq!(health["models"], json!([]));

    // The model arrives before its provider key: rejected alone, then served.
    etcd.etcdctl(&[
        "put",
        "/aisix/models/m1",
        &model("early", "pk1").to_string(),
    ]);
    etcd.etcdctl(&[
        "put",
        "/aisix/api_keys/k1",
        &json!({"key_hash": key_hash(CALLER), "allowed_models": ["*"]}).to_string(),
    ]);
    eventually("the caller key applies", WITHIN, || async {
        agent
            .http
            .get(format!("{}/v1/models", agent.proxy))
            .bearer_auth(CALLER)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert_eq!(agent.models().await, Vec::<String>::new());
    etcd.etcdctl(&[
        "put",
        "/aisix/provider_keys/pk1",
        &provider_key(&mock.url(), "mock").to_string(),
    ]);
    agent.wait_models(&["early"]).await;
    assert_eq!(agent.chat("early").await, 200);

    let status = agent.config_status().await;
    assert_eq!(
        (&status["source"], &status["connected"]),
        (&json!("etcd"), &json!(true))
    );

    // etcd dies: the snapshot keeps serving, status and metrics say the watch is down;
    // it comes back: the watch recovers.
    etcd.kill().await;
    assert_eq!(agent.chat("early").await, 200);
    assert_eq!(agent.health().await["models"][0]["name"], "early");
    eventually("/status/config shows the watch down", WITHIN, || async {
        agent.config_status().await["connected"] == false
    })
    .await;
    let (families, _) = tests::metrics::scrape(&format!("{}/metrics", agent.status)).await;
    assert_eq!(
        tests::metrics::sample(&families, "aisix_config_source_connected", &[]),
        Some(0.0)
    );
    etcd.restart().await;
    etcd.etcdctl(&["put", "/aisix/models/m2", &model("late", "pk1").to_string()]);
    agent.wait_models(&["early", "late"]).await;
    assert_eq!(agent.config_status().await["connected"], true);
    etcd.etcdctl(&["del", "/aisix/models/m1"]);
    agent.wait_models(&["late"]).await;

    // A quiet watch stays fresh through progress notifications.
    let before = agent.health().await["config"]["snapshot_revision"].clone();
    tokio::time::sleep(PROGRESS_INTERVAL * 4).await;
    let health = agent.health().await;
    let age = health["config"]["snapshot_age_seconds"].as_u64().unwrap();
    assert!(
        age <= 2,
        "snapshot_age_seconds {age} after a quiet spell: {health}"
    );
    assert!(health["config"]["snapshot_revision"].as_i64() >= before.as_i64());

    // A provider key deleted in etcd directly (the admin API would refuse with 409):
    // the model that used it is rejected and reported by name, never silently gone.
    etcd.etcdctl(&["del", "/aisix/provider_keys/pk1"]);
    agent.wait_models(&[]).await;
    let status = agent.config_status().await;
    let rejected = status["rejected_resources"].as_array().unwrap();
    let model = rejected
        .iter()
        .find(|r| r["key"] == "/aisix/models/m2")
        .unwrap_or_else(|| panic!("the orphaned model is not reported: {status}"));
    let reason = model["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("provider key 'pk1' does not exist"),
        "{model}"
    );
}

#[tokio::test]
async fn compaction_while_disconnected_lists_again_without_losing_updates() {
    let etcd = Etcd::start().await;
    let gate = Gate::start(etcd.port()).await;
    let mock = MockProvider::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), &gate.url()).await;
    let pk = seed(&agent, &mock).await;
    agent.wait_models(&["gpt"]).await;

    gate.cut();
    // While the agent cannot see etcd: one model added, one removed, history compacted.
    let gpt_key = etcd.etcdctl(&["get", "/aisix/models/", "--prefix", "--keys-only"]);
    let gpt_key = gpt_key.lines().next().unwrap().to_owned();
    etcd.put(
        "/aisix/models/m-new",
        &model("added-offline", &pk).to_string(),
    )
    .await;
    etcd.delete(&gpt_key).await;
    let compacted = etcd.compact().await;
    assert_eq!(
        agent.models().await,
        ["gpt"],
        "still serving the last good snapshot"
    );

    gate.restore();
    agent.wait_models(&["added-offline"]).await;
    agent
        .process
        .wait_for_line("watch start revision was compacted", WITHIN)
        .await;
    let revision = agent.health().await["config"]["snapshot_revision"]
        .as_i64()
        .unwrap();
    assert!(revision >= compacted, "revision {revision} < {compacted}");
}

#[tokio::test]
async fn starts_from_the_cache_with_etcd_down_and_converges_when_it_returns() {
    let mut etcd = Etcd::start().await;
    let mock = MockProvider::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A cache directory open to others is closed at start (it holds provider keys).
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let mode = |path: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    };
    std::fs::set_permissions(
        dir.path().join("state"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut agent = Agent::start(dir.path(), &etcd.url()).await;
    assert_eq!(mode(&dir.path().join("state")), 0o700);
    assert!(agent.process.output().contains("setting it to 0700"));
    let pk = seed(&agent, &mock).await;
    agent.wait_models(&["gpt"]).await;
    let revision = agent.health().await["config"]["snapshot_revision"].clone();
    // Killed without warning once the cache holds this revision.
    agent
        .process
        .wait_for_line(
            &format!("snapshot cache written revision={revision}"),
            WITHIN,
        )
        .await;
    agent.process.signal("KILL");
    agent.process.wait_exit(WITHIN).await;
    etcd.kill().await;
    // The cached data ages while the agent is down.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let agent = Agent::start(dir.path(), &etcd.url()).await;
    assert_eq!(
        agent.models().await,
        ["gpt"],
        "served from the cache at once"
    );
    assert_eq!(agent.chat("gpt").await, 200);
    assert_eq!(
        agent.health().await["config"]["snapshot_revision"],
        revision
    );
    // Status says where the snapshot came from and that etcd is not reached.
    let status = agent.config_status().await;
    assert_eq!(status["source"], "etcd");
    assert_eq!(status["loaded_from"], "cache");
    assert_eq!(status["connected"], false);
    assert_eq!(status["applied_revision"], revision);
    // The admin API says so too, rather than "ok"; the snapshot is as old as the cache.
    let health = agent.health().await;
    let age = health["config"]["snapshot_age_seconds"].as_u64().unwrap();
    assert!(
        age >= 2,
        "the cached data is reported {age} s old: {health}"
    );
    assert_eq!(
        (&health["status"], &health["source_connected"]),
        (&json!("degraded"), &json!(false)),
        "{health}"
    );

    etcd.restart().await;
    etcd.etcdctl(&["del", "/aisix/models/", "--prefix"]);
    agent.wait_models(&[]).await;
    let health = agent.health().await;
    assert_eq!(
        (&health["status"], &health["source_connected"]),
        (&json!("ok"), &json!(true)),
        "{health}"
    );
    let status = agent.config_status().await;
    assert_eq!(
        (&status["loaded_from"], &status["connected"]),
        (&json!("etcd"), &json!(true))
    );
    drop(agent);

    // A damaged cache is reported and ignored: the agent starts and follows etcd.
    let cache = dir.path().join("state/snapshot-cache");
    for entry in std::fs::read_dir(&cache).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::write(&path, vec![0x5a; 512]).unwrap();
        }
    }
    etcd.put("/aisix/models/m3", &model("after-damage", &pk).to_string())
        .await;
    let mut agent = Agent::start(dir.path(), &etcd.url()).await;
    agent.wait_models(&["after-damage"]).await;
    let logs = agent.process.output();
    assert!(
        logs.contains("snapshot cache unreadable")
            || logs.contains("snapshot cache generation ignored"),
        "{logs}"
    );
    agent.process.signal("TERM");
    assert!(agent.process.wait_exit(WITHIN).await.success());
}

#[tokio::test]
async fn model_health_follows_consecutive_upstream_failures() {
    let etcd = Etcd::start().await;
    let mock = MockProvider::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &etcd.url()).await;
    seed(&agent, &mock).await;
    agent.wait_models(&["gpt"]).await;
    let level = || async {
        let health = agent.health().await;
        (
            health["models"][0]["health"].as_u64().unwrap(),
            health["status"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(level().await, (0, "ok".to_owned()));

    mock.set_script(Script {
        status: 500,
        ..Script::default()
    });
    let mut seen = Vec::new();
    for _ in 0..9 {
        assert_eq!(agent.chat("gpt").await, 502);
        seen.push(level().await);
    }
    let levels: Vec<u64> = seen.iter().map(|(l, _)| *l).collect();
    assert_eq!(levels, [0, 0, 0, 1, 1, 1, 1, 2, 2]);
    // The top-level status follows the worst model: degraded, then unhealthy.
    let statuses: Vec<&str> = seen.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "ok",
            "ok",
            "ok",
            "degraded",
            "degraded",
            "degraded",
            "degraded",
            "unhealthy",
            "unhealthy"
        ]
    );
    mock.set_script(Script::default());
    assert_eq!(agent.chat("gpt").await, 200);
    assert_eq!(level().await, (0, "ok".to_owned()));
}

#[tokio::test]
async fn etcd_mode_start_up_problems_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let cases = [
        (
            "etcd:\n  endpoints: [\"https://127.0.0.1:1\"]\n",
            "etcd.tls.ca_file",
        ),
        (
            "etcd:\n  endpoints: [\"http://127.0.0.1:1\"]\n  tls: {ca_file: /nonexistent/ca.pem}\n",
            "etcd.tls.ca_file: cannot read /nonexistent/ca.pem",
        ),
        (
            "etcd:\n  endpoints: []\n",
            "etcd.endpoints: at least one endpoint is required",
        ),
    ];
    // `validate` of `text`: it must pass; its output.
    let valid = |text: &str| {
        std::fs::write(&config, text).unwrap();
        let out = std::process::Command::new(binary("aisix-agent"))
            .args(["validate", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stdout}");
        stdout
    };
    let stdout = valid(
        "etcd:\n  endpoints: [\"http://127.0.0.1:2379\"]\n  prefix: /gw\nadmin:\n  admin_keys: [k]\n",
    );
    assert!(
        stdout.contains("ok (self-hosted: resources are watched under /gw"),
        "{stdout}"
    );
    assert!(stdout.contains("the admin API listens on"), "{stdout}");
    // Without an admin section validate says the admin API is off.
    let stdout = valid("etcd:\n  endpoints: [\"http://127.0.0.1:2379\"]\n");
    assert!(
        stdout.contains("no admin section (or admin.enabled is false), so the admin API is off"),
        "{stdout}"
    );
    for (text, expected) in cases {
        std::fs::write(&config, text).unwrap();
        let out = std::process::Command::new(binary("aisix-agent"))
            .args(["--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(stderr.contains(expected), "{text}: {stderr}");
    }
}

/// Puts a provider key `pk1` for `mock`, model `gpt` and the caller key with etcdctl.
fn seed_with_etcdctl(etcd: &Etcd, mock: &MockProvider) {
    etcd.etcdctl(&[
        "put",
        "/aisix/provider_keys/pk1",
        &provider_key(&mock.url(), "mock").to_string(),
    ]);
    etcd.etcdctl(&["put", "/aisix/models/m1", &model("gpt", "pk1").to_string()]);
    etcd.etcdctl(&[
        "put",
        "/aisix/api_keys/k1",
        &json!({"key_hash": key_hash(CALLER), "allowed_models": ["*"]}).to_string(),
    ]);
}

#[tokio::test]
async fn tls_with_client_certificates_and_endpoint_failover() {
    let dir = tempfile::tempdir().unwrap();
    let tls = tests::TlsFiles::generate(dir.path(), "etcd test CA");
    let etcd = Etcd::start_with(Some(tls.clone()), &[]).await;
    let mock = MockProvider::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    seed_with_etcdctl(&etcd, &mock);

    // The first endpoint refuses connections; the agent fails over to the second.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let endpoints = format!("  endpoints: [\"https://{dead}\", \"{}\"]\n", etcd.url());
    let tls_lines = format!(
        "  tls:\n    ca_file: {}\n    cert_file: {}\n    key_file: {}\n",
        tls.ca.display(),
        tls.client_cert.display(),
        tls.client_key.display()
    );
    let state = tempfile::tempdir().unwrap();
    let mut agent = Agent::start_with(state.path(), &format!("{endpoints}{tls_lines}")).await;
    agent.wait_models(&["gpt"]).await;
    assert_eq!(agent.chat("gpt").await, 200);
    // Admin writes go through the same TLS client.
    agent.create("models", model("second", "pk1")).await;
    agent.wait_models(&["gpt", "second"]).await;
    agent.process.signal("TERM");
    assert!(agent.process.wait_exit(WITHIN).await.success());

    // Without a client certificate etcd refuses the agent, which says so and serves nothing.
    let no_client_cert = format!("{endpoints}  tls:\n    ca_file: {}\n", tls.ca.display());
    let fresh = tempfile::tempdir().unwrap();
    let mut agent = Agent::start_with(fresh.path(), &no_client_cert).await;
    agent
        .process
        .wait_for_line("configuration watch interrupted", WITHIN)
        .await;
    assert_eq!(agent.models().await, Vec::<String>::new());
}

#[tokio::test]
async fn password_authentication_with_token_renewal() {
    const PASSWORD: &str = "e2e-etcd-password";
    // Tokens live one second, so the agent's admin calls must renew theirs.
    let mut etcd = Etcd::start_with(None, &["--auth-token-ttl", "1"]).await;
    etcd.etcdctl(&["user", "add", &format!("root:{PASSWORD}")]);
    etcd.etcdctl(&["auth", "enable"]);
    etcd.user = Some(format!("root:{PASSWORD}"));
    let mock = MockProvider::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    seed_with_etcdctl(&etcd, &mock);

    let lines = format!(
        "  endpoints: [\"{}\"]\n  username: root\n  password: {PASSWORD}\n",
        etcd.url()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start_with(dir.path(), &lines).await;
    agent.wait_models(&["gpt"]).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    agent.create("models", model("after-expiry", "pk1")).await;
    agent.wait_models(&["after-expiry", "gpt"]).await;
    agent.process.signal("TERM");
    assert!(agent.process.wait_exit(WITHIN).await.success());
    assert!(!agent.process.output().contains(PASSWORD));

    // A wrong password: nothing is served and the logs say why, without the password.
    let wrong = lines.replace(PASSWORD, "not-the-password");
    let fresh = tempfile::tempdir().unwrap();
    let mut agent = Agent::start_with(fresh.path(), &wrong).await;
    let line = agent
        .process
        .wait_for_line("configuration watch interrupted", WITHIN)
        .await;
    assert!(line.contains("authentication failed"), "{line}");
    assert!(!agent.process.output().contains("not-the-password"));
    assert_eq!(agent.models().await, Vec::<String>::new());
}

#[tokio::test]
async fn request_timeout_bounds_every_etcd_call() {
    // A server that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(
        dir.path(),
        &format!("  endpoints: [\"http://{addr}\"]\n  request_timeout_ms: 300\n"),
    )
    .await;
    let started = std::time::Instant::now();
    let (status, answer) = agent
        .admin(reqwest::Method::GET, "/admin/v1/models", None)
        .await;
    assert_eq!(status, 500);
    assert!(
        answer["error_msg"].as_str().unwrap().contains("timed out"),
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let health = agent.health().await;
    assert_eq!(
        health["config"]["snapshot_age_seconds"],
        Value::Null,
        "{health}"
    );
    assert_eq!(health["config"]["snapshot_revision"], 0);
}

/// An AISIX operator's config file, in AISIX's spellings, against a real etcd with TLS
/// (checked for `domain_name`, not the IP address dialled) and the environment's folder
/// (`env_id`); then `user` and `password_env` against an etcd with password auth (etcd
/// refuses password auth over its HTTP gateway beside client certificates).
#[tokio::test]
async fn an_aisix_config_file_runs_unchanged_against_etcd() {
    const PASSWORD: &str = "aisix-etcd-password";
    let dir = tempfile::tempdir().unwrap();
    let tls = tests::TlsFiles::generate_for(dir.path(), "aisix etcd CA", &["etcd.internal"]);
    let etcd = Etcd::start_with(Some(tls.clone()), &[]).await;
    let mock = MockProvider::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // Resources of the `prod` environment, and one of another environment.
    let put = |key: &str, value: Value| etcd.etcdctl(&["put", key, &value.to_string()]);
    put(
        "/aisix/prod/provider_keys/pk1",
        provider_key(&mock.url(), "mock"),
    );
    put(
        "/aisix/prod/models/m1",
        json!({"display_name": "gpt", "model_name": "up-gpt", "provider_key_id": "pk1",
               "allowed_cidrs": ["192.0.2.0/24"]}),
    );
    put(
        "/aisix/prod/api_keys/k1",
        json!({"key_hash": key_hash(CALLER), "allowed_models": ["*"]}),
    );
    put("/aisix/staging/models/m2", model("staging-only", "pk1"));
    let config = |domain: &str| {
        format!(
            r#"etcd:
  endpoints: ["{endpoint}"]
  prefix: /aisix
  env_id: prod
  dial_timeout_ms: 500
  request_timeout_ms: 2000
  tls:
    ca_cert_file: {ca}
    client_cert_file: {cert}
    client_key_file: {key}
    domain_name: {domain}
proxy:
  addr: 127.0.0.1:0
  real_ip: {{trusted_proxies: ["127.0.0.1/32"], recursive: false, header: x-real-ip}}
  request_id: {{accept_headers: ["x-request-id"]}}
  thread_per_core: true
  workers: 2
admin: {{enabled: true, addr: "127.0.0.1:0", admin_keys: ["{ADMIN_KEY}"]}}
observability:
  service_name: aisix-gateway
  access_log: true
  metrics:
    client_type_rules: [{{pattern: "^OpenAI/Python", client: openai-python}}]
upstream: {{timeout_ms: 30000, connect_timeout_ms: 2000, pool_idle_timeout_secs: 30, retries: 1}}
downstream: {{idle_timeout_secs: 120, sse_keepalive_interval_secs: 15}}
shutdown: {{min_drain_secs: 0}}
managed: {{snapshot_cache_path: {snapshot}}}
"#,
            endpoint = etcd.url(),
            ca = tls.ca.display(),
            cert = tls.client_cert.display(),
            key = tls.client_key.display(),
            snapshot = dir.path().join("snapshot").display(),
        )
    };
    let path = dir.path().join("aisix.yaml");
    std::fs::write(&path, config("etcd.internal")).unwrap();
    let (mut process, proxy) = tests::start_agent(&path).await;
    let line = process
        .wait_for_line("metrics listener ready", WITHIN)
        .await;
    let status = format!("http://{}", addr_in(&line));
    process.wait_for_line("admin listener ready", WITHIN).await;
    let http = http_client();
    let chat = |ip: Option<&'static str>| {
        let mut request = http
            .post(format!("{proxy}/v1/chat/completions"))
            .bearer_auth(CALLER)
            .json(&json!({"model": "gpt", "messages": [{"role": "user", "content": "Hi"}]}));
        if let Some(ip) = ip {
            request = request.header("x-real-ip", ip);
        }
        request.send()
    };
    tests::eventually("the prod environment is served", WITHIN, || async {
        chat(Some("192.0.2.9"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    // The client address comes from the trusted proxy's header: the model's
    // allowed_cidrs admit 192.0.2.0/24 only.
    assert_eq!(chat(None).await.unwrap().status(), 403);
    assert_eq!(chat(Some("198.51.100.1")).await.unwrap().status(), 403);
    let models: Value = http
        .get(format!("{proxy}/v1/models"))
        .bearer_auth(CALLER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(names, ["gpt"], "another environment's models stay out");
    // What this build does not act on is reported, by key.
    let config_status: Value = http
        .get(format!("{status}/status/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ignored = config_status["ignored"].to_string();
    assert_eq!(
        config_status["serving"],
        json!({"thread_per_core": true, "workers": 2})
    );
    // The operator's keys are acted on.
    for key in [
        "proxy.thread_per_core",
        "proxy.workers",
        "downstream.idle_timeout_secs",
        "observability.metrics.client_type_rules",
        "upstream.retries",
    ] {
        assert!(!ignored.contains(key), "{key} in {ignored}");
    }
    process.signal("TERM");
    assert!(process.wait_exit(WITHIN).await.success());
    let output = process.output();
    assert!(output.contains("client_ip=192.0.2.9"), "{output}");
    assert!(
        dir.path().join("snapshot").is_dir(),
        "the last good snapshot is kept at managed.snapshot_cache_path"
    );

    // etcd's certificate is checked for domain_name: another name is refused.
    let wrong = dir.path().join("wrong.yaml");
    std::fs::write(
        &wrong,
        config("other.internal").replace("/snapshot", "/snapshot-2"),
    )
    .unwrap();
    let (mut process, _proxy) = tests::start_agent(&wrong).await;
    process
        .wait_for_line("configuration watch interrupted", WITHIN)
        .await;
    drop(process);

    // `user` and the password from the variable `password_env` names.
    let mut etcd = Etcd::start().await;
    etcd.etcdctl(&["user", "add", &format!("root:{PASSWORD}")]);
    etcd.etcdctl(&["auth", "enable"]);
    etcd.user = Some(format!("root:{PASSWORD}"));
    etcd.etcdctl(&[
        "put",
        "/aisix/provider_keys/pk1",
        &provider_key(&mock.url(), "mock").to_string(),
    ]);
    etcd.etcdctl(&["put", "/aisix/models/m1", &model("gpt", "pk1").to_string()]);
    let auth = dir.path().join("auth.yaml");
    std::fs::write(
        &auth,
        format!(
            "etcd: {{endpoints: [\"{}\"], user: root, password_env: ETCD_PASSWORD}}\nproxy: {{addr: \"127.0.0.1:0\"}}\nshutdown: {{min_drain_secs: 0}}\n",
            etcd.url()
        ),
    )
    .unwrap();
    let (mut process, _proxy) =
        tests::start_agent_with(&auth, &[("ETCD_PASSWORD", PASSWORD)]).await;
    let listed = process.wait_for_line("configuration listed", WITHIN).await;
    assert!(listed.contains("keys=2"), "{listed}");
    process.signal("TERM");
    assert!(process.wait_exit(WITHIN).await.success());
    let output = process.output();
    assert!(!output.contains(PASSWORD), "{output}");
    assert!(!output.contains("watch interrupted"), "{output}");
    // Without the variable the agent does not start, and says which variable.
    let mut unset = Process::start(
        &binary("aisix-agent"),
        &["--config", auth.to_str().unwrap()],
        &[],
    );
    assert_eq!(unset.wait_exit(WITHIN).await.code(), Some(2));
    assert!(
        unset.output().contains("etcd.password_env"),
        "{}",
        unset.output()
    );
    assert!(unset.output().contains("ETCD_PASSWORD"));
}

/// With etcd's default flags (progress notifications every ten minutes), a healthy
/// quiet watch keeps `snapshot_age_seconds` at a few seconds; writes elsewhere in etcd
/// do not change that; a cut watch ages.
#[tokio::test]
async fn a_quiet_watch_stays_fresh_without_etcd_flags_and_a_cut_one_ages() {
    let etcd = Etcd::start_with_defaults().await;
    let gate = Gate::start(etcd.port()).await;
    let mock = MockProvider::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    seed_with_etcdctl(&etcd, &mock);
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &gate.url()).await;
    agent.wait_models(&["gpt"]).await;
    let age = || async {
        agent.health().await["config"]["snapshot_age_seconds"]
            .as_u64()
            .unwrap()
    };
    // Quiet for longer than the check interval, twice over, with writes outside the
    // prefix moving etcd's revision on.
    let mut ages = Vec::new();
    for i in 0..8 {
        if i % 2 == 0 {
            etcd.put(&format!("/elsewhere/{i}"), "x").await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        ages.push(age().await);
    }
    assert!(ages.iter().all(|a| *a <= 4), "ages {ages:?}");
    let health = agent.health().await;
    assert_eq!(health["status"], "ok", "{health}");
    // A change under the prefix still arrives through the watch.
    etcd.etcdctl(&[
        "put",
        "/aisix/models/m2",
        &model("second", "pk1").to_string(),
    ]);
    agent.wait_models(&["gpt", "second"]).await;

    // Cut: nothing confirms the snapshot any more; it ages and health says so.
    gate.cut();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let health = agent.health().await;
    assert!(
        health["config"]["snapshot_age_seconds"].as_u64().unwrap() >= 6,
        "{health}"
    );
    assert_eq!(health["status"], "degraded", "{health}");
}
