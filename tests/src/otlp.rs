//! Reading what the agent exported over OTLP: the bodies cloud-mock's receiver kept,
//! decoded by the OpenTelemetry project's own protobuf definitions
//! (`opentelemetry-proto` from PyPI, installed by `scripts/test` into
//! `target/sdk-venv`, found through `AISIX_SDK_PYTHON`).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Every span (or metric, for `signal = "metrics"`) received by the mock at
/// `mock_url` so far, decoded (see `tests/sdk/otlp_decode.py` for the shape).
pub async fn received(mock_url: &str, signal: &str) -> Vec<Value> {
    let exports: Value = reqwest::get(format!("{mock_url}/_mock/otlp?signal={signal}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    decode(&exports, signal)
}

/// Decodes `exports` (the receiver's list) with `opentelemetry-proto`; an export that
/// is not a valid request fails the test.
pub fn decode(exports: &Value, signal: &str) -> Vec<Value> {
    let python = std::env::var("AISIX_SDK_PYTHON").unwrap_or_else(|_| {
        panic!("AISIX_SDK_PYTHON is not set: run the suite with `bash scripts/test`, which installs opentelemetry-proto into target/sdk-venv")
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/otlp_decode.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(signal)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exports.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "opentelemetry-proto refused an export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
