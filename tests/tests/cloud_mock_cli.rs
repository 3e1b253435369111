//! `cloud-mock serve` as an operator runs it: what it prints, the demo bundle it
//! writes, the state it keeps across restarts, and a clean stop.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::json;
use tests::cloud::{CloudMockProcess, gateway_http, send};

#[tokio::test]
async fn serve_prints_its_endpoints_writes_a_demo_bundle_and_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("cm");
    let mut cm = CloudMockProcess::start(&state, None).await;

    // The console answers with the printed token; the demo environment exists.
    let envs = cm.console.ok("GET", "/console/v1/environments", None).await;
    assert_eq!(envs["environments"], json!(["demo"]));
    assert_eq!(
        std::fs::read_to_string(state.join("console-token")).unwrap(),
        cm.console.token
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cm.bundle_dir.join("key.pem")), 0o600);
    assert_eq!(mode(&state.join("console-token")), 0o600);

    // The demo bundle is a working gateway identity.
    let gw = gateway_http(&cm.demo_bundle());
    let beat = json!({"dp_id": "demo-gw", "instance_id": "i-1"});
    let (status, _) = send(
        &gw,
        "POST",
        &format!("{}/dp/heartbeat", cm.dp_url),
        Some(&beat),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    // The mock provider answers.
    let (status, models) = send(
        &tests::http_client(),
        "GET",
        &format!("{}/v1/models", cm.provider_url),
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "mock-model");
    cm.console
        .ok(
            "PUT",
            "/console/v1/environments/demo/resources/models/m1",
            Some(json!({"name": "m1"})),
        )
        .await;

    cm.process.signal("TERM");
    assert!(
        cm.process
            .wait_exit(Duration::from_secs(10))
            .await
            .success()
    );
    let bundle_before = cm.demo_bundle();
    let token_before = cm.console.token.clone();

    // A restart keeps the token, the bundle, the resources and the gateway's trust.
    let cm = CloudMockProcess::start(&state, None).await;
    assert!(
        cm.process.output().contains("kept in"),
        "{}",
        cm.process.output()
    );
    assert_eq!(cm.console.token, token_before);
    assert_eq!(cm.demo_bundle(), bundle_before);
    let listed = cm
        .console
        .ok("GET", "/console/v1/environments/demo/resources", None)
        .await;
    assert_eq!(listed["resources"][0]["key"], "/aisix/demo/models/m1");
    let gw = gateway_http(&cm.demo_bundle());
    let (status, _) = send(
        &gw,
        "POST",
        &format!("{}/dp/heartbeat", cm.dp_url),
        Some(&beat),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn serve_help_names_every_option() {
    let output = std::process::Command::new(tests::binary("cloud-mock"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for option in [
        "--state",
        "--dp-addr",
        "--console-addr",
        "--provider-addr",
        "--no-provider",
        "--demo-env",
        "--demo-dp",
    ] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
}
