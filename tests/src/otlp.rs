//! Reading what the agent exported over OTLP: the bodies cloud-mock's receiver kept,
//! decoded by the OpenTelemetry project's own protobuf definitions
//! (`opentelemetry-proto` from PyPI, installed by `scripts/test` into
//! `target/sdk-venv`, found through `AISIX_SDK_PYTHON`).

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
    let out = crate::metrics::sdk_python(
        "otlp_decode.py",
        &[signal],
        exports.to_string().as_bytes(),
        "opentelemetry-proto",
    );
    serde_json::from_slice(&out).unwrap()
}
