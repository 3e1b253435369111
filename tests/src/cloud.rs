//! Talking to cloud-mock as tests do: its console API, and its data plane as a gateway
//! holding a certificate bundle.

use std::time::Duration;

use certs::tls::{SwappableIdentity, client_config};
use certs::{Bundle, PemSource};
use serde_json::Value;

/// The console API of a running cloud-mock.
#[derive(Clone)]
pub struct Console {
    pub http: reqwest::Client,
    pub url: String,
    pub token: String,
}

impl Console {
    pub fn new(url: &str, token: &str) -> Self {
        Self {
            http: crate::http_client(),
            url: url.to_owned(),
            token: token.to_owned(),
        }
    }

    /// Sends a console request; `(status, JSON body or null)`.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Like [`Console::call`], asserting a 2xx answer.
    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, answer) = self.call(method, path, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {answer}"
        );
        answer
    }
}

/// A gateway's mTLS HTTP client built from a console bundle
/// (`{cert_pem, key_pem, ca_pem}`).
pub fn gateway_http(bundle: &Value) -> reqwest::Client {
    let src = |field: &str| PemSource::Inline(bundle[field].as_str().unwrap().to_owned());
    let loaded = Bundle::load(
        &src("cert_pem"),
        &src("key_pem"),
        &src("ca_pem"),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let tls = client_config(
        bundle["ca_pem"].as_str().unwrap(),
        None,
        SwappableIdentity::new(&loaded).unwrap(),
    )
    .unwrap();
    mtls_http(tls)
}

/// An HTTP client over a prepared rustls config.
pub fn mtls_http(tls: rustls::ClientConfig) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Sends a JSON request with `http`; `(status, JSON body or null)`.
pub async fn send(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), reqwest::Error> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = http.request(method, url);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// `cloud-mock serve` running as a process, with what it printed at start.
pub struct CloudMockProcess {
    pub process: crate::Process,
    pub dp_url: String,
    pub console: Console,
    pub provider_url: String,
    /// The directory holding the demo bundle (`cert.pem`, `key.pem`, `ca.pem`).
    pub bundle_dir: std::path::PathBuf,
}

/// Starts `cloud-mock provider` on an ephemeral port; returns it and its base URL.
pub async fn start_provider() -> (crate::Process, String) {
    let mut process = crate::Process::start(
        &crate::binary("cloud-mock"),
        &["provider", "--addr", "127.0.0.1:0"],
        &[],
    );
    let line = process
        .wait_for_line("mock provider listening on", Duration::from_secs(30))
        .await;
    let url = after(&line, "listening on ").to_owned();
    (process, url)
}

fn after<'a>(line: &'a str, marker: &str) -> &'a str {
    line.split(marker)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {marker:?} in {line:?}"))
}

impl CloudMockProcess {
    /// Starts `cloud-mock serve --state STATE` on ephemeral ports (or the given data
    /// plane address, to restart on the same port) and waits for its start lines.
    pub async fn start(state: &std::path::Path, dp_addr: Option<&str>) -> Self {
        let state = state.to_str().unwrap();
        let mut process = crate::Process::start(
            &crate::binary("cloud-mock"),
            &[
                "serve",
                "--state",
                state,
                "--dp-addr",
                dp_addr.unwrap_or("127.0.0.1:0"),
                "--console-addr",
                "127.0.0.1:0",
                "--provider-addr",
                "127.0.0.1:0",
            ],
            &[],
        );
        let within = Duration::from_secs(30);
        let dp = process
            .wait_for_line("control plane (mTLS) listening on", within)
            .await;
        let console = process.wait_for_line("console listening on", within).await;
        let token = process.wait_for_line("console token:", within).await;
        let bundle = process.wait_for_line("demo bundle for", within).await;
        let provider = process
            .wait_for_line("mock provider listening on", within)
            .await;
        let bundle_dir = bundle
            .split_whitespace()
            .find(|w| w.ends_with("demo-bundle"))
            .unwrap_or_else(|| panic!("no bundle path in {bundle:?}"));
        Self {
            dp_url: after(&dp, "listening on ").to_owned(),
            console: Console::new(after(&console, "listening on "), after(&token, "token: ")),
            provider_url: after(&provider, "listening on ").to_owned(),
            bundle_dir: bundle_dir.into(),
            process,
        }
    }

    /// The `host:port` of the data plane.
    pub fn dp_addr(&self) -> &str {
        self.dp_url.trim_start_matches("https://")
    }

    /// The demo bundle as the console would answer it.
    pub fn demo_bundle(&self) -> Value {
        let read = |f: &str| std::fs::read_to_string(self.bundle_dir.join(f)).unwrap();
        serde_json::json!({
            "cert_pem": read("cert.pem"),
            "key_pem": read("key.pem"),
            "ca_pem": read("ca.pem"),
        })
    }
}
