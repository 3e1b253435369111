//! cloud-mock's REST endpoints of the contract (`/dp/*`) over real mutual TLS, and its
//! state directory across restarts: what a gateway and an operator observe.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::path::Path;

use cloud_mock::cp::{Options, Running, start_with};
use serde_json::{Value, json};
use tests::cloud::{Console, gateway_http, mtls_http, send};

async fn start(state_dir: Option<&Path>) -> (Running, Console) {
    let cp = start_with(Options {
        state_dir: state_dir.map(Path::to_owned),
        ..Options::default()
    })
    .await
    .unwrap();
    let console = Console::new(&cp.console_url, &cp.console_token);
    (cp, console)
}

async fn env_with_bundle(console: &Console, env: &str, dp: &str) -> Value {
    let (status, _) = console
        .call("POST", "/console/v1/environments", Some(json!({"id": env})))
        .await;
    assert!(status == 201 || status == 409);
    bundle(console, env, dp, json!({"dp_id": dp})).await
}

async fn bundle(console: &Console, env: &str, dp: &str, request: Value) -> Value {
    let _ = dp;
    console
        .ok(
            "POST",
            &format!("/console/v1/environments/{env}/bundles"),
            Some(request),
        )
        .await
}

fn heartbeat(dp: &str, instance: &str) -> Value {
    json!({
        "dp_id": dp,
        "instance_id": instance,
        "hostname": "test-host",
        "version": "0.1.0",
        "contract_version": 1,
        "uptime_seconds": 3,
        "config": {"source": "control_plane", "applied_revision": 7, "config_hash": "abc",
                   "snapshot_age_seconds": 1, "connected": true},
        "rejected_resources": [],
        "models": [],
        "usage_queue": {"pending": 0, "dropped": 0},
    })
}

fn event(id: &str, key: &str, cost: f64) -> Value {
    json!({
        "event_id": id, "request_id": format!("req-{id}"), "api_key_id": key,
        "model": "gpt-4o", "provider": "openai", "prompt_tokens": 10,
        "completion_tokens": 5, "cost_usd": cost, "status_code": 200,
        "latency_ms": 12, "timestamp_unix_ms": 1_700_000_000_000_i64,
    })
}

#[tokio::test]
async fn heartbeats_are_recorded_per_instance_and_answered_as_the_contract_says() {
    let (cp, console) = start(None).await;
    let gw = gateway_http(&env_with_bundle(&console, "prod", "dp-1").await);
    let url = format!("{}/dp/heartbeat", cp.dp_url);

    let (status, answer) = send(&gw, "POST", &url, Some(&heartbeat("dp-1", "i-1")))
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((answer["server_time_unix"].as_i64().unwrap() - now).abs() <= 5);
    assert_eq!(answer["rotate_certificate"], false);
    assert!(answer.get("heartbeat_interval_secs").is_none());
    send(&gw, "POST", &url, Some(&heartbeat("dp-1", "i-1")))
        .await
        .unwrap();
    send(&gw, "POST", &url, Some(&heartbeat("dp-1", "i-2")))
        .await
        .unwrap();

    let listed = console
        .ok("GET", "/console/v1/environments/prod/gateways", None)
        .await;
    let gateway = &listed["gateways"][0];
    assert_eq!(gateway["dp_id"], "dp-1");
    let instances = gateway["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2);
    assert_eq!(instances[0]["instance_id"], "i-1");
    assert_eq!(instances[0]["heartbeats"], 2);
    assert_eq!(instances[0]["seconds_since_last_seen"], 0);
    assert_eq!(
        instances[0]["last_heartbeat"]["config"]["applied_revision"],
        7
    );
    assert_eq!(gateway["certificates"][0]["how"], "bundle");

    // Bad heartbeats are refused with a reason.
    let (status, answer) = send(&gw, "POST", &url, Some(&heartbeat("dp-other", "i-1")))
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().contains("dp_id"));
    let (status, _) = send(&gw, "POST", &url, Some(&json!({"dp_id": "dp-1"})))
        .await
        .unwrap();
    assert_eq!(status, 400);

    // The console can ask for a rotation and set the interval.
    console
        .ok(
            "POST",
            "/console/v1/environments/prod/gateways/dp-1/rotate",
            None,
        )
        .await;
    console
        .ok(
            "PUT",
            "/console/v1/settings",
            Some(json!({"heartbeat_interval_secs": 7})),
        )
        .await;
    let (_, answer) = send(&gw, "POST", &url, Some(&heartbeat("dp-1", "i-1")))
        .await
        .unwrap();
    assert_eq!(answer["rotate_certificate"], true);
    assert_eq!(answer["heartbeat_interval_secs"], 7);

    // A gateway the control plane forgot is answered 404; a revoked one 403.
    console
        .ok(
            "DELETE",
            "/console/v1/environments/prod/gateways/dp-1",
            None,
        )
        .await;
    let (status, answer) = send(&gw, "POST", &url, Some(&heartbeat("dp-1", "i-1")))
        .await
        .unwrap();
    assert_eq!(status, 404);
    assert!(answer["error"].as_str().unwrap().contains("not known"));
    let gw2 = gateway_http(&bundle(&console, "prod", "dp-2", json!({"dp_id": "dp-2"})).await);
    let (status, _) = send(&gw2, "POST", &url, Some(&heartbeat("dp-2", "i-1")))
        .await
        .unwrap();
    assert_eq!(status, 200);
    console
        .ok(
            "POST",
            "/console/v1/environments/prod/gateways/dp-2/revoke",
            None,
        )
        .await;
    // The open connection is answered 403; a new one is refused in the handshake.
    let (status, _) = send(&gw2, "POST", &url, Some(&heartbeat("dp-2", "i-1")))
        .await
        .unwrap();
    assert_eq!(status, 403);
    let fresh = gateway_http(&bundle(&console, "prod", "dp-2", json!({"dp_id": "dp-2"})).await);
    assert!(
        send(&fresh, "POST", &url, Some(&heartbeat("dp-2", "i-1")))
            .await
            .is_err()
    );
    cp.shutdown().await;
}

#[tokio::test]
async fn budget_answers_follow_spend_and_telemetry_is_idempotent() {
    let (cp, console) = start(None).await;
    let gw = gateway_http(&env_with_bundle(&console, "prod", "dp-1").await);
    let other_env = gateway_http(&env_with_bundle(&console, "dev", "dp-1").await);
    let check = |key: &str| format!("{}/dp/budget_check?api_key_id={key}", cp.dp_url);
    let telemetry = format!("{}/dp/telemetry", cp.dp_url);

    let (status, answer) = send(&gw, "GET", &check("k1"), None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        answer,
        json!({"allow": true, "fail_mode": "open", "ttl_seconds": 5})
    );
    let (status, _) = send(&gw, "GET", &format!("{}/dp/budget_check", cp.dp_url), None)
        .await
        .unwrap();
    assert_eq!(status, 400);

    console
        .ok(
            "PUT",
            "/console/v1/environments/prod/budgets/k1",
            Some(json!({"limit_usd": 1.0, "period": "monthly", "fail_mode": "closed"})),
        )
        .await;
    let batch = json!({"events": [event("e1", "k1", 0.6), event("e2", "k1", 0.3)]});
    let (status, answer) = send(&gw, "POST", &telemetry, Some(&batch)).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(answer, json!({"accepted": 2, "duplicates": 0}));
    let (_, answer) = send(&gw, "GET", &check("k1"), None).await.unwrap();
    assert_eq!(answer["allow"], true);
    assert_eq!(answer["fail_mode"], "closed");
    assert_eq!(answer["budget"]["spent_usd"], 0.9);
    assert_eq!(answer["budget"]["remaining_usd"], 0.1);

    // A replayed batch counts once; the new event tips the key over its budget.
    let batch = json!({"events": [event("e1", "k1", 0.6), event("e2", "k1", 0.3),
                                  event("e3", "k1", 0.2), event("e3", "k1", 0.2)]});
    let (_, answer) = send(&gw, "POST", &telemetry, Some(&batch)).await.unwrap();
    assert_eq!(answer, json!({"accepted": 1, "duplicates": 3}));
    let (_, answer) = send(&gw, "GET", &check("k1"), None).await.unwrap();
    assert_eq!(answer["allow"], false);
    let reason = &answer["reason"];
    assert_eq!(reason["type"], "billing_error");
    assert_eq!(reason["code"], "budget_exceeded");
    assert_eq!(reason["scope"], "api_key");
    assert_eq!(reason["scope_ref"], "k1");
    assert_eq!(reason["limit_usd"], 1.0);
    assert_eq!(reason["spent_usd"], 1.1);
    assert_eq!(reason["period"], "monthly");
    assert!(reason["retry_after_seconds"].as_i64().unwrap() > 0);
    assert!(reason["period_resets_at"].as_str().unwrap().ends_with('Z'));
    assert!(reason["message"].as_str().unwrap().contains("k1"));

    // A bad batch is refused whole, naming the event.
    let bad = json!({"events": [event("e4", "k1", 0.1), {"api_key_id": "k1"}]});
    let (status, answer) = send(&gw, "POST", &telemetry, Some(&bad)).await.unwrap();
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("events[1].event_id")
    );
    let usage = console
        .ok(
            "GET",
            "/console/v1/environments/prod/usage?api_key_id=k1",
            None,
        )
        .await;
    let ids: Vec<&str> = usage["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["e1", "e2", "e3"]);
    assert_eq!(usage["events"][0]["dp_id"], "dp-1");

    // Environments are separate: the same event id elsewhere is new, and spends there.
    let (_, answer) = send(
        &other_env,
        "POST",
        &telemetry,
        Some(&json!({"events": [event("e1", "k1", 5.0)]})),
    )
    .await
    .unwrap();
    assert_eq!(answer["accepted"], 1);
    let (_, answer) = send(&gw, "GET", &check("k1"), None).await.unwrap();
    assert_eq!(answer["reason"]["spent_usd"], 1.1);

    // The console sets spend; the answer follows.
    console
        .ok(
            "PUT",
            "/console/v1/environments/prod/spend/k1",
            Some(json!({"spent_usd": 0.25})),
        )
        .await;
    let (_, answer) = send(&gw, "GET", &check("k1"), None).await.unwrap();
    assert_eq!(answer["allow"], true);
    assert_eq!(answer["budget"]["spent_usd"], 0.25);
    let budgets = console
        .ok("GET", "/console/v1/environments/prod/budgets", None)
        .await;
    assert_eq!(budgets["budgets"][0]["api_key_id"], "k1");
    assert_eq!(budgets["budgets"][0]["answer"]["budget"]["spent_usd"], 0.25);
    cp.shutdown().await;
}

fn csr(env: &str, dp: &str) -> certs::Csr {
    certs::generate_csr(&certs::GatewayIdentity::new(env, dp).unwrap()).unwrap()
}

fn bundle_json(answer: &Value, key_pem: &str) -> Value {
    json!({
        "cert_pem": answer["certificate_pem"],
        "key_pem": key_pem,
        "ca_pem": answer["ca_pem"],
    })
}

async fn range_status(http: &reqwest::Client, cp: &Running, env: &str) -> u16 {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let key = format!("/aisix/{env}/");
    let body = json!({"key": b64(&key), "range_end": b64(&format!("/aisix/{env}0"))});
    send(
        http,
        "POST",
        &format!("{}/v3/kv/range", cp.dp_url),
        Some(&body),
    )
    .await
    .map_or(0, |(s, _)| s)
}

#[tokio::test]
async fn certificates_rotate_by_csr_for_the_same_identity_only() {
    let (cp, console) = start(None).await;
    console
        .ok(
            "POST",
            "/console/v1/environments",
            Some(json!({"id": "prod"})),
        )
        .await;
    let first = bundle(
        &console,
        "prod",
        "dp-1",
        json!({"dp_id": "dp-1", "validity_seconds": 3600}),
    )
    .await;
    let gw = gateway_http(&first);
    let url = format!("{}/dp/rotate-cert", cp.dp_url);

    let request = csr("prod", "dp-1");
    let (status, answer) = send(
        &gw,
        "POST",
        &url,
        Some(&json!({"csr_pem": request.csr_pem})),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    let info = certs::verify_certificate(
        answer["certificate_pem"].as_str().unwrap(),
        answer["ca_pem"].as_str().unwrap(),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    assert_eq!(info.identity.unwrap().dp_id, "dp-1");
    let lifetime = answer["not_after_unix"].as_i64().unwrap()
        - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((3500..=3700).contains(&lifetime), "{lifetime}");
    let rotated = gateway_http(&bundle_json(&answer, request.key_pem.expose()));
    assert_eq!(range_status(&rotated, &cp, "prod").await, 200);

    // Another identity, or garbage, is refused and says why.
    let (status, answer) = send(
        &gw,
        "POST",
        &url,
        Some(&json!({"csr_pem": csr("prod", "dp-2").csr_pem})),
    )
    .await
    .unwrap();
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().contains("does not match"));
    let (status, _) = send(&gw, "POST", &url, Some(&json!({"csr_pem": "nope"})))
        .await
        .unwrap();
    assert_eq!(status, 400);

    let listed = console
        .ok("GET", "/console/v1/environments/prod/gateways", None)
        .await;
    let hows: Vec<&str> = listed["gateways"][0]["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["how"].as_str().unwrap())
        .collect();
    assert_eq!(hows, ["bundle", "rotation"]);
    cp.shutdown().await;
}

fn anonymous(cp: &Running) -> reqwest::Client {
    let tls = certs::tls::plain_client_config(cp.cp.ca().cert_pem(), None).unwrap();
    mtls_http(tls)
}

async fn token(console: &Console, request: Value) -> String {
    console
        .ok(
            "POST",
            "/console/v1/environments/prod/enrollment-tokens",
            Some(request),
        )
        .await["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn enrollment_tokens_work_once_and_pin_the_ca() {
    let (cp, console) = start(None).await;
    console
        .ok(
            "POST",
            "/console/v1/environments",
            Some(json!({"id": "prod"})),
        )
        .await;
    let url = format!("{}/dp/register", cp.dp_url);
    let anon = anonymous(&cp);

    let t1 = token(&console, json!({"dp_id": "dp-9"})).await;
    let parsed = certs::enrollment::EnrollmentToken::parse(&t1).unwrap();
    assert_eq!(
        parsed.ca_sha256,
        certs::enrollment::ca_fingerprint(cp.cp.ca().cert_pem()).unwrap()
    );

    // A CSR for another identity is refused and does not burn the token.
    let (status, answer) = send(
        &anon,
        "POST",
        &url,
        Some(&json!({"token": t1, "csr_pem": csr("prod", "dp-x").csr_pem})),
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "{answer}");

    let request = csr("prod", "dp-9");
    let body = json!({"token": t1, "csr_pem": request.csr_pem});
    let (status, answer) = send(&anon, "POST", &url, Some(&body)).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    let enrolled = gateway_http(&bundle_json(&answer, request.key_pem.expose()));
    assert_eq!(range_status(&enrolled, &cp, "prod").await, 200);

    let (status, answer) = send(&anon, "POST", &url, Some(&body)).await.unwrap();
    assert_eq!(status, 401);
    assert!(answer["error"].as_str().unwrap().contains("already used"));

    let expired = token(&console, json!({"dp_id": "dp-8", "ttl_seconds": 0})).await;
    let (status, answer) = send(
        &anon,
        "POST",
        &url,
        Some(&json!({"token": expired, "csr_pem": csr("prod", "dp-8").csr_pem})),
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    assert!(answer["error"].as_str().unwrap().contains("expired"));

    let (status, _) = send(
        &anon,
        "POST",
        &url,
        Some(&json!({"token": "et1.nope", "csr_pem": "x"})),
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    // Without a certificate nothing else answers.
    assert_eq!(range_status(&anon, &cp, "prod").await, 401);
    let (status, _) = send(
        &anon,
        "GET",
        &format!("{}/dp/budget_check?api_key_id=k", cp.dp_url),
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    cp.shutdown().await;
}

#[tokio::test]
async fn state_survives_a_restart_and_certificates_stay_valid() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (cp, console) = start(Some(&state)).await;
    let issued = env_with_bundle(&console, "prod", "dp-1").await;
    let gw = gateway_http(&issued);
    let unused = token(&console, json!({"dp_id": "dp-5"})).await;
    let used = token(&console, json!({"dp_id": "dp-6"})).await;
    let (status, _) = send(
        &anonymous(&cp),
        "POST",
        &format!("{}/dp/register", cp.dp_url),
        Some(&json!({"token": used, "csr_pem": csr("prod", "dp-6").csr_pem})),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let put = console
        .ok(
            "PUT",
            "/console/v1/environments/prod/resources/models/m1",
            Some(json!({"name": "m1"})),
        )
        .await;
    console
        .ok(
            "PUT",
            "/console/v1/environments/prod/budgets/k1",
            Some(json!({"limit_usd": 1.0, "period": "total"})),
        )
        .await;
    let telemetry = format!("{}/dp/telemetry", cp.dp_url);
    send(
        &gw,
        "POST",
        &telemetry,
        Some(&json!({"events": [event("e1", "k1", 0.5)]})),
    )
    .await
    .unwrap();
    let token_before = cp.console_token.clone();
    cp.shutdown().await;

    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("state.json")), 0o600);

    let (cp, console) = start(Some(&state)).await;
    assert_eq!(cp.console_token, token_before);
    // The certificate issued before the restart still works, for a new connection.
    let gw = gateway_http(&issued);
    let listed = console
        .ok("GET", "/console/v1/environments/prod/resources", None)
        .await;
    assert_eq!(listed["resources"][0]["key"], "/aisix/prod/models/m1");
    assert_eq!(listed["resources"][0]["mod_revision"], put["revision"]);
    assert_eq!(range_status(&gw, &cp, "prod").await, 200);
    let (status, _) = send(
        &gw,
        "POST",
        &format!("{}/dp/heartbeat", cp.dp_url),
        Some(&heartbeat("dp-1", "i-1")),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    // Telemetry stays idempotent and spend is kept.
    let telemetry = format!("{}/dp/telemetry", cp.dp_url);
    let (_, answer) = send(
        &gw,
        "POST",
        &telemetry,
        Some(&json!({"events": [event("e1", "k1", 0.5)]})),
    )
    .await
    .unwrap();
    assert_eq!(answer, json!({"accepted": 0, "duplicates": 1}));
    let (_, answer) = send(
        &gw,
        "GET",
        &format!("{}/dp/budget_check?api_key_id=k1", cp.dp_url),
        None,
    )
    .await
    .unwrap();
    assert_eq!(answer["budget"]["spent_usd"], 0.5);
    // Tokens keep their state.
    let register = |t: &str, dp: &str| json!({"token": t, "csr_pem": csr("prod", dp).csr_pem});
    let url = format!("{}/dp/register", cp.dp_url);
    let anon = anonymous(&cp);
    let (status, _) = send(&anon, "POST", &url, Some(&register(&used, "dp-6")))
        .await
        .unwrap();
    assert_eq!(status, 401);
    let (status, _) = send(&anon, "POST", &url, Some(&register(&unused, "dp-5")))
        .await
        .unwrap();
    assert_eq!(status, 200);
    cp.shutdown().await;
}

#[tokio::test]
async fn a_rotated_ca_signs_new_certificates_and_still_trusts_old_ones() {
    let (cp, console) = start(None).await;
    let old = env_with_bundle(&console, "prod", "dp-1").await;
    let rotated = console.ok("POST", "/console/v1/ca/rotate", None).await;
    assert_ne!(rotated["ca_pem"], old["ca_pem"]);

    // A gateway trusting only the old CA cannot verify the control plane any more.
    assert_eq!(range_status(&gateway_http(&old), &cp, "prod").await, 0);
    // With the new trust bundle, its old certificate is still accepted.
    let mut retrusted = old.clone();
    retrusted["ca_pem"] = rotated["trusted_ca_pem"].clone();
    let src = |v: &Value| certs::PemSource::Inline(v.as_str().unwrap().to_owned());
    let loaded = certs::Bundle::load(
        &src(&old["cert_pem"]),
        &src(&old["key_pem"]),
        &src(&old["ca_pem"]),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let tls = certs::tls::client_config(
        rotated["trusted_ca_pem"].as_str().unwrap(),
        None,
        certs::tls::SwappableIdentity::new(&loaded).unwrap(),
    )
    .unwrap();
    assert_eq!(range_status(&mtls_http(tls), &cp, "prod").await, 200);
    // New bundles come from the new CA and work.
    let new = bundle(&console, "prod", "dp-2", json!({"dp_id": "dp-2"})).await;
    assert!(
        certs::verify_certificate(
            new["cert_pem"].as_str().unwrap(),
            rotated["ca_pem"].as_str().unwrap(),
            time::OffsetDateTime::now_utc()
        )
        .is_ok()
    );
    assert_eq!(range_status(&gateway_http(&new), &cp, "prod").await, 200);
    cp.shutdown().await;
}

#[tokio::test]
async fn endpoint_faults_are_observable_on_the_rest_endpoints() {
    let (cp, console) = start(None).await;
    let gw = gateway_http(&env_with_bundle(&console, "prod", "dp-1").await);
    console
        .ok(
            "PUT",
            "/console/v1/faults",
            Some(json!({"endpoints": {"heartbeat": {"status": 503}, "budget_check": "malformed"}})),
        )
        .await;
    let (status, _) = send(
        &gw,
        "POST",
        &format!("{}/dp/heartbeat", cp.dp_url),
        Some(&heartbeat("dp-1", "i-1")),
    )
    .await
    .unwrap();
    assert_eq!(status, 503);
    let response = gw
        .get(format!("{}/dp/budget_check?api_key_id=k", cp.dp_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
    console
        .ok("PUT", "/console/v1/faults", Some(json!({})))
        .await;
    let (status, _) = send(
        &gw,
        "POST",
        &format!("{}/dp/heartbeat", cp.dp_url),
        Some(&heartbeat("dp-1", "i-1")),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    cp.shutdown().await;
}
