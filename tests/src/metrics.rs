//! Reading the agent's metrics: the exposition parsed by the Prometheus project's own
//! OpenMetrics parser (`prometheus-client` from PyPI, installed by `scripts/test` into
//! `target/sdk-venv`, found through `AISIX_SDK_PYTHON`).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Parses an exposition with `prometheus_client.openmetrics.parser` (strict: a format
/// error fails the test). Returns the families as JSON.
pub fn parse_openmetrics(text: &str) -> Vec<Value> {
    let out = sdk_python(
        "openmetrics_parse.py",
        &[],
        text.as_bytes(),
        "the OpenMetrics parser",
    );
    serde_json::from_slice(&out).unwrap()
}

/// Runs `tests/sdk/SCRIPT ARGS` with the suite's Python (`AISIX_SDK_PYTHON`, the venv
/// `scripts/test` installs the official packages into), `input` on its stdin; its
/// stdout. A failure fails the test, naming `what` refused and why.
pub fn sdk_python(script: &str, args: &[&str], input: &[u8], what: &str) -> Vec<u8> {
    let python = std::env::var("AISIX_SDK_PYTHON").unwrap_or_else(|_| {
        panic!("AISIX_SDK_PYTHON is not set: run the suite with `bash scripts/test`, which installs the Python packages into target/sdk-venv")
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sdk")
        .join(script);
    let mut child = Command::new(python)
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} refused its input: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(input)
    );
    out.stdout
}

/// The value of the sample `name` whose labels include `labels`.
pub fn sample(families: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    families
        .iter()
        .flat_map(|f| f["samples"].as_array().unwrap())
        .find(|s| {
            s["name"] == name
                && labels
                    .iter()
                    .all(|(k, v)| s["labels"][*k].as_str() == Some(*v))
        })
        .and_then(|s| s["value"].as_f64())
}

pub fn family<'a>(families: &'a [Value], name: &str) -> &'a Value {
    families
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no family {name}"))
}

/// Fetches `url` (a metrics endpoint) and parses it; also returns the raw text.
pub async fn scrape(url: &str) -> (Vec<Value>, String) {
    let response = crate::http_client().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    let text = response.text().await.unwrap();
    (parse_openmetrics(&text), text)
}
