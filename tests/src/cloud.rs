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
