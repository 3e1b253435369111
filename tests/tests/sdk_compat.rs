//! Tier 4: the official OpenAI Python SDK against the real agent binary.
//!
//! `scripts/test` installs the SDK into `target/sdk-venv` and sets `AISIX_SDK_PYTHON`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::path::Path;
use std::time::Duration;

use cloud_mock::provider::MockProvider;
use tests::{Process, key_hash, start_agent};

#[tokio::test]
async fn official_openai_sdk_works_against_the_agent() {
    let python = std::env::var("AISIX_SDK_PYTHON").unwrap_or_else(|_| {
        panic!("AISIX_SDK_PYTHON is not set: run the suite with `bash scripts/test`, which installs the official OpenAI SDK into target/sdk-venv")
    });
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let resources = format!(
        r#"
provider_keys:
  - {{id: pk1, display_name: mock, provider: openai, api_base: "{base}", api_key: sk-sdk-upstream}}
models:
  - {{id: m1, display_name: gpt-4o-mini, model_name: up-gpt, provider_key_id: pk1}}
  - {{id: m2, display_name: restricted, model_name: up-restricted, provider_key_id: pk1}}
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

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/openai_sdk.py");
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
    assert!(status.success(), "the OpenAI SDK checks failed:\n{output}");
    assert!(output.contains("checks passed"), "{output}");
    assert_eq!(
        mock.requests().len(),
        2,
        "one non-streaming and one streaming upstream call"
    );
}
