//! Load from wrk (Debian's package): one thread, a fixed number of keep-alive
//! connections, each in a closed loop. A Lua `done` hook prints the summary as JSON,
//! with latency percentiles read from wrk's own histogram (microsecond resolution).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

/// What one wrk run reports.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Run {
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Writes the request script: a chat completion for `model` with the caller key.
pub fn script(dir: &Path, model: &str, caller_key: &str) -> PathBuf {
    script_closing(dir, model, caller_key, false)
}

/// [`script`], each request with `Connection: close` when `close` (a new connection,
/// and handshake, per request).
pub fn script_closing(dir: &Path, model: &str, caller_key: &str, close: bool) -> PathBuf {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
    })
    .to_string();
    let connection = if close {
        "wrk.headers[\"Connection\"] = \"close\"\n"
    } else {
        ""
    };
    let lua = format!(
        r#"wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {caller_key}"
{connection}done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nWRK-JSON {{"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%f,"p99_us":%f}}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#
    );
    let path = dir.join(format!("chat-{model}-{caller_key}-{close}.lua"));
    std::fs::write(&path, lua).expect("write the wrk script");
    path
}

/// Runs wrk for `duration` with `connections` against `url` (blocking).
pub fn wrk(url: &str, connections: usize, duration: Duration, script: &Path) -> Run {
    let output = Command::new("wrk")
        .args(["-t1", "-c", &connections.to_string()])
        .args(["-d", &format!("{}s", duration.as_secs().max(1))])
        .args(["--timeout", "5s", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .expect("wrk runs (scripts/bench installs Debian's wrk package)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json = stdout
        .lines()
        .find_map(|l| l.strip_prefix("WRK-JSON "))
        .unwrap_or_else(|| {
            panic!(
                "wrk printed no summary for {url}:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let v: Value = serde_json::from_str(json).expect("wrk summary is JSON");
    let num = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Run {
        requests: num("requests") as u64,
        errors: num("errors") as u64,
        rps: num("requests") / (num("duration_us") / 1e6),
        p50_us: num("p50_us"),
        p99_us: num("p99_us"),
    }
}
