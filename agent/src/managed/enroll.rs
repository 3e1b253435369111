//! `aisix-agent enroll --cp URL --token T --state-dir DIR`: installs a gateway with a
//! one-time token instead of a copied private key. The key is generated here and never
//! leaves the host; the control plane is trusted through the CA fingerprint in the
//! token; the signed bundle is kept in `DIR/mtls` like any other bundle.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use certs::Bundle;
use certs::enrollment::EnrollmentToken;
use contract::certificate::RegisterRequest;
use serde_json::Value;

use super::bundle::{BundlePems, BundleStore};
use super::client::error_chain;

/// Enrolls and keeps the bundle; returns it.
pub async fn enroll(cp_url: &str, token: &str, state_dir: &Path) -> anyhow::Result<Bundle> {
    let url = reqwest::Url::parse(cp_url).with_context(|| format!("--cp: '{cp_url}'"))?;
    anyhow::ensure!(
        url.scheme() == "https",
        "--cp: '{cp_url}': the control plane is reached over TLS only; use https://"
    );
    let token = EnrollmentToken::parse(token).context("--token")?;
    let csr = certs::generate_csr(&token.identity)?;
    proxy_core::install_crypto_provider();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(certs::tls::enrollment_client_config(&token.ca_sha256)?)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("aisix-agent/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let endpoint = url.join("/dp/register")?;
    let response = http
        .post(endpoint)
        .json(&RegisterRequest {
            token: token.expose().to_owned(),
            csr_pem: csr.csr_pem,
        })
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the control plane at {cp_url}: {}",
                error_chain(&e)
            )
        })?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let reason = body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no reason given");
        anyhow::bail!("the control plane refused the enrollment ({status}): {reason}");
    }
    let bundle = super::bundle::signed(&body, csr.key_pem.expose(), &token.identity)?;
    crate::files::private_dir(state_dir)?;
    BundleStore::new(state_dir)
        .save(&BundlePems::from(&bundle))
        .with_context(|| {
            format!(
                "--state-dir: cannot keep the bundle in {}",
                state_dir.display()
            )
        })?;
    Ok(bundle)
}
