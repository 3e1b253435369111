//! The bundled control plane: the server side of the managed-mode contract
//! (`../shared/design/CONTROL_PLANE.md`), with fault injection.
//!
//! Layout:
//! - `kv`: the revisioned key-value store behind the etcd v3 JSON subset.
//! - `etcd_api`: `/v3/kv/range` and `/v3/watch`, confined to the caller's environment.
//! - `dataplane`: the mutual-TLS listener gateways talk to.
//! - `faults`: fault injection knobs.
//! - `console`: the console API (plain HTTP, bearer token).

pub mod console;
pub mod dataplane;
pub mod etcd_api;
pub mod faults;
pub mod kv;

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use certs::{CertificateAuthority, GatewayIdentity, Issued};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::faults::Faults;
use self::kv::{Kv, KvImage};

const DAY: Duration = Duration::from_secs(86_400);

/// The shared state of one control plane.
pub struct ControlPlane {
    pub kv: Kv,
    pub faults: Faults,
    progress_ms: AtomicU64,
    revoked: RwLock<HashSet<(String, String)>>,
    environments: RwLock<BTreeSet<String>>,
    ca: RwLock<Arc<CertificateAuthority>>,
    /// Cancelled when the control plane stops: open watch streams end.
    pub stopping: CancellationToken,
    /// Signalled on every revocation, so open watches of the revoked gateway end.
    pub revocations: tokio::sync::broadcast::Sender<()>,
}

impl ControlPlane {
    pub fn new(ca: CertificateAuthority, image: KvImage) -> Self {
        Self {
            kv: Kv::new(image),
            faults: Faults::default(),
            progress_ms: AtomicU64::new(
                u64::try_from(etcd_api::DEFAULT_PROGRESS_INTERVAL.as_millis()).unwrap_or(5000),
            ),
            revoked: RwLock::new(HashSet::new()),
            environments: RwLock::new(BTreeSet::new()),
            ca: RwLock::new(Arc::new(ca)),
            stopping: CancellationToken::new(),
            revocations: tokio::sync::broadcast::channel(16).0,
        }
    }

    pub fn progress_interval(&self) -> Duration {
        Duration::from_millis(self.progress_ms.load(Ordering::Relaxed).max(10))
    }

    pub fn set_progress_interval(&self, interval: Duration) {
        self.progress_ms.store(
            u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub fn ca(&self) -> Arc<CertificateAuthority> {
        self.ca.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Issues a gateway certificate for `env`/`dp` with a new key.
    pub fn issue_gateway(&self, env: &str, dp: &str, validity: Duration) -> anyhow::Result<Issued> {
        Ok(self
            .ca()
            .issue_gateway(&GatewayIdentity::new(env, dp)?, validity)?)
    }

    /// Refuses `env`/`dp` from now on: new handshakes fail, requests on its open
    /// connections answer 403 and its open watches end.
    pub fn revoke(&self, env: &str, dp: &str) {
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert((env.to_owned(), dp.to_owned()));
        let _ = self.revocations.send(());
    }

    /// Adds an environment; false when it already exists.
    pub fn add_environment(&self, id: &str) -> bool {
        self.environments
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned())
    }

    pub fn has_environment(&self, id: &str) -> bool {
        self.environments
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    pub fn environments(&self) -> Vec<String> {
        self.environments
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn is_revoked(&self, identity: &GatewayIdentity) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(identity.env_id.clone(), identity.dp_id.clone()))
    }
}

/// A control plane started in this process (tests, the demo).
pub struct Running {
    pub cp: Arc<ControlPlane>,
    /// `https://127.0.0.1:PORT`
    pub dp_url: String,
    pub dp_addr: SocketAddr,
    /// `http://127.0.0.1:PORT` of the console API.
    pub console_url: String,
    /// The console's bearer token.
    pub console_token: String,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Running {
    pub async fn shutdown(self) {
        self.cp.stopping.cancel();
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Starts a control plane with a fresh CA: the data plane on `dp_addr` and the console
/// on `127.0.0.1`, port 0 (see [`start_with`]).
pub async fn start(dp_addr: SocketAddr) -> anyhow::Result<Running> {
    start_with(dp_addr, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

/// Starts a control plane with a fresh CA (port 0 picks free ports).
pub async fn start_with(dp_addr: SocketAddr, console_addr: SocketAddr) -> anyhow::Result<Running> {
    let ca = CertificateAuthority::generate("cloud-mock CA", DAY * 3650)?;
    let cp = Arc::new(ControlPlane::new(ca, KvImage::default()));
    let listener = TcpListener::bind(dp_addr).await?;
    let dp_addr = listener.local_addr()?;
    let tls = Arc::new(ArcSwap::from_pointee(server_tls(&cp, dp_addr)?));
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(dataplane::serve(cp.clone(), listener, tls, stop.clone()));
    let console_listener = TcpListener::bind(console_addr).await?;
    let console_addr = console_listener.local_addr()?;
    let console_token = uuid::Uuid::new_v4().simple().to_string();
    let app = console::router(cp.clone(), console_token.clone());
    let console_stop = stop.clone();
    tasks.spawn(async move {
        let served = axum::serve(console_listener, app)
            .with_graceful_shutdown(console_stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "console listener failed");
        }
    });
    Ok(Running {
        cp,
        dp_url: format!("https://{dp_addr}"),
        dp_addr,
        console_url: format!("http://{console_addr}"),
        console_token,
        stop,
        tasks,
    })
}

/// The data-plane TLS config: a server certificate for localhost and the listener's
/// address, client certificates from the CA, revoked identities refused.
fn server_tls(cp: &Arc<ControlPlane>, addr: SocketAddr) -> anyhow::Result<rustls::ServerConfig> {
    let ca = cp.ca();
    let mut ips = vec![addr.ip()];
    if !addr.ip().is_loopback() {
        ips.push(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let server = ca.issue_server(&["localhost".to_owned()], &ips, DAY * 365)?;
    let weak = Arc::downgrade(cp);
    let refuse: certs::tls::Refuse =
        Arc::new(move |id: &GatewayIdentity| weak.upgrade().is_none_or(|cp| cp.is_revoked(id)));
    Ok(certs::tls::gateway_server_config(
        &server.cert_pem,
        server.key_pem.expose(),
        ca.cert_pem(),
        refuse,
    )?)
}
