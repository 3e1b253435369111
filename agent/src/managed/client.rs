//! The HTTP client every control-plane call goes through: mutual TLS with the gateway
//! identity (swappable on rotation), the bundle's CA (plus an optional extra CA),
//! connect and request timeouts, `User-Agent: aisix-agent/<version>`.

use std::sync::Arc;
use std::time::Duration;

use certs::Bundle;
use certs::tls::SwappableIdentity;
use reqwest::{Method, Url};
use serde_json::Value;

use crate::config::ManagedSection;

/// Why a control-plane call failed.
#[derive(Debug, thiserror::Error)]
pub enum CpError {
    #[error("control plane unreachable: {0}")]
    Transport(String),
    #[error("control plane answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("control plane answered something that is not the expected JSON: {0}")]
    Malformed(String),
}

pub struct CpClient {
    http: reqwest::Client,
    base: Url,
    pub identity: Arc<SwappableIdentity>,
    request_timeout: Duration,
}

impl CpClient {
    pub fn new(section: &ManagedSection, bundle: &Bundle) -> anyhow::Result<Self> {
        proxy_core::install_crypto_provider();
        let extra = match &section.cp_extra_ca_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!(
                    "managed.cp_extra_ca_file: cannot read {}: {e}",
                    path.display()
                )
            })?),
            None => None,
        };
        let identity = SwappableIdentity::new(bundle)?;
        let tls = certs::tls::client_config(&bundle.ca_pem, extra.as_deref(), identity.clone())?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_millis(section.connect_timeout_ms))
            .tcp_keepalive(Duration::from_secs(30))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("aisix-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let base = Url::parse(section.cp_base_url.trim_end_matches('/'))?;
        Ok(Self {
            http,
            base,
            identity,
            request_timeout: Duration::from_millis(section.request_timeout_ms),
        })
    }

    /// The HTTP client (for the configuration watch).
    pub fn http(&self) -> reqwest::Client {
        self.http.clone()
    }

    pub fn base_url(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_owned()
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Sends a JSON request to `path` and reads a JSON answer.
    pub async fn call<B: serde::Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Value, CpError> {
        let mut request = self.http.request(method, self.url(path)?);
        if let Some(body) = body {
            request = request.json(body);
        }
        self.send(request, self.request_timeout).await
    }

    /// `GET path?query` within `timeout`.
    pub async fn get(
        &self,
        path: &str,
        query: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Value, CpError> {
        let mut url = self.url(path)?;
        url.query_pairs_mut().extend_pairs(query);
        self.send(self.http.get(url), timeout).await
    }

    fn url(&self, path: &str) -> Result<Url, CpError> {
        self.base
            .join(path)
            .map_err(|e| CpError::Transport(format!("{path}: {e}")))
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Value, CpError> {
        let exchange = async {
            let response = request
                .send()
                .await
                .map_err(|e| CpError::Transport(error_chain(&e)))?;
            let status = response.status().as_u16();
            let bytes = response
                .bytes()
                .await
                .map_err(|e| CpError::Transport(error_chain(&e)))?;
            Ok::<_, CpError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| {
                CpError::Transport(format!("no answer within {} ms", timeout.as_millis()))
            })??;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            return Err(CpError::Status { status, message });
        }
        serde_json::from_slice(&bytes).map_err(|e| CpError::Malformed(e.to_string()))
    }
}

/// An error and its causes on one line (reqwest hides the TLS reason in the sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
