//! Everything cloud-mock runs, started together: the control plane (data plane and
//! console), a mock provider, and a demo environment with a gateway bundle on disk.
//! `cloud-mock serve` is this; tests and the demo can start it in-process on port 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cp::{self, Options, Running};
use crate::provider::MockProvider;

/// Where the demo bundle goes inside the state directory.
pub const DEMO_BUNDLE_DIR: &str = "demo-bundle";
/// The console token, for scripts (mode 0600).
pub const CONSOLE_TOKEN_FILE: &str = "console-token";
const DEMO_VALIDITY: Duration = Duration::from_secs(86_400 * 365);
/// A demo bundle closer than this to expiry is replaced.
const DEMO_RENEW_BEFORE: time::Duration = time::Duration::days(30);

#[derive(Debug, Clone)]
pub struct StackOptions {
    pub state_dir: PathBuf,
    pub dp_addr: SocketAddr,
    pub console_addr: SocketAddr,
    /// `None`: no mock provider.
    pub provider_addr: Option<SocketAddr>,
    pub demo_env: String,
    pub demo_dp: String,
}

impl StackOptions {
    /// Everything on 127.0.0.1 port 0, state in `state_dir`.
    pub fn ephemeral(state_dir: &Path) -> Self {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            state_dir: state_dir.to_owned(),
            dp_addr: local,
            console_addr: local,
            provider_addr: Some(local),
            demo_env: "demo".to_owned(),
            demo_dp: "demo-gw".to_owned(),
        }
    }
}

pub struct Stack {
    pub cp: Running,
    pub provider: Option<MockProvider>,
    /// Holds `cert.pem`, `key.pem` (0600) and `ca.pem` for the demo gateway.
    pub demo_bundle: PathBuf,
    /// Whether this start wrote a new demo bundle.
    pub demo_bundle_issued: bool,
}

impl Stack {
    pub async fn start(options: &StackOptions) -> anyhow::Result<Self> {
        let cp = cp::start_with(Options {
            dp_addr: options.dp_addr,
            console_addr: options.console_addr,
            state_dir: Some(options.state_dir.clone()),
        })
        .await?;
        certs::write_file_atomic(
            &options.state_dir.join(CONSOLE_TOKEN_FILE),
            cp.console_token.as_bytes(),
            0o600,
        )?;
        if !cp.cp.has_environment(&options.demo_env) {
            cp.cp.add_environment(&options.demo_env)?;
        }
        let demo_bundle = options.state_dir.join(DEMO_BUNDLE_DIR);
        let demo_bundle_issued = if demo_bundle_usable(&cp, &demo_bundle) {
            false
        } else {
            write_demo_bundle(&cp, &demo_bundle, &options.demo_env, &options.demo_dp)?;
            true
        };
        let provider = match options.provider_addr {
            Some(addr) => Some(MockProvider::start(addr).await?),
            None => None,
        };
        Ok(Self {
            cp,
            provider,
            demo_bundle,
            demo_bundle_issued,
        })
    }

    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            provider.shutdown().await;
        }
        self.cp.shutdown().await;
    }
}

/// The bundle on disk is issued by the current CA and not near expiry.
fn demo_bundle_usable(cp: &Running, dir: &Path) -> bool {
    let Ok(cert) = std::fs::read_to_string(dir.join("cert.pem")) else {
        return false;
    };
    let now = time::OffsetDateTime::now_utc();
    certs::verify_certificate(&cert, cp.cp.ca().cert_pem(), now + DEMO_RENEW_BEFORE).is_ok()
        && dir.join("key.pem").exists()
        && dir.join("ca.pem").exists()
}

fn write_demo_bundle(cp: &Running, dir: &Path, env: &str, dp: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let issued = cp.cp.issue_gateway(env, dp, DEMO_VALIDITY)?;
    certs::write_file_atomic(
        &dir.join("key.pem"),
        issued.key_pem.expose().as_bytes(),
        0o600,
    )?;
    certs::write_file_atomic(&dir.join("cert.pem"), issued.cert_pem.as_bytes(), 0o644)?;
    certs::write_file_atomic(
        &dir.join("ca.pem"),
        cp.cp.trusted_ca_pem().as_bytes(),
        0o644,
    )?;
    Ok(())
}
