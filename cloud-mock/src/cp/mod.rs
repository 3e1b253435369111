//! The bundled control plane: the server side of the managed-mode contract
//! (`docs/control-plane.md`), with fault injection and a console.
//!
//! Layout:
//! - `kv`: the revisioned key-value store behind the etcd v3 JSON subset.
//! - `etcd_api`: `/v3/kv/range` and `/v3/watch`, confined to the caller's environment.
//! - `dp_api`: `/dp/heartbeat`, `/dp/budget_check`, `/dp/telemetry`, `/dp/rotate-cert`,
//!   `/dp/register`.
//! - `budget`: budget periods and answers.
//! - `dataplane`: the mutual-TLS listener gateways talk to.
//! - `faults`: fault injection knobs.
//! - `console`: the console API (plain HTTP, bearer token).
//! - `state`: what is remembered, and the state directory that keeps it.

pub mod budget;
pub mod console;
pub mod dataplane;
pub mod dp_api;
pub mod etcd_api;
pub mod faults;
pub mod kv;
pub mod state;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use certs::{CertificateAuthority, GatewayIdentity, inspect_pem};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::faults::Faults;
use self::kv::Kv;
use self::state::{
    CertRecord, Gateway, Persisted, Registry, StateDir, StoredCert, UsageLog, scoped,
};

const DAY: Duration = Duration::from_secs(86_400);
const CA_VALIDITY: Duration = Duration::from_secs(86_400 * 3650);
const SERVER_VALIDITY: Duration = Duration::from_secs(86_400 * 365);
/// A stored server certificate closer than this to expiry is replaced at start.
const SERVER_RENEW_BEFORE: Duration = Duration::from_secs(86_400 * 30);

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub fn unix_now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(i64::MAX)
}

/// The shared state of one control plane.
pub struct ControlPlane {
    pub kv: Kv,
    pub faults: Faults,
    registry: Mutex<Registry>,
    cas: RwLock<CaSet>,
    server: Mutex<Option<StoredCert>>,
    /// The data-plane TLS config; replaced when the CA rotates.
    pub tls: ArcSwapOption<ServerConfig>,
    server_ips: Mutex<Vec<IpAddr>>,
    pub usage: Mutex<UsageLog>,
    dir: Option<StateDir>,
    save: Mutex<()>,
    pub console_token: String,
    /// Cancelled when the control plane stops: open watch streams end.
    pub stopping: CancellationToken,
    /// Signalled on every revocation, so open watches of the revoked gateway end.
    pub revocations: tokio::sync::broadcast::Sender<()>,
}

impl ControlPlane {
    /// A control plane kept in `dir` (loaded if it holds one), or in memory only.
    pub fn open(dir: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let (dir, persisted, usage) = match dir {
            Some(path) => {
                let (dir, persisted) = StateDir::open(path)?;
                let usage = UsageLog::open(path)?;
                (Some(dir), persisted, usage)
            }
            None => (None, None, UsageLog::default()),
        };
        let persisted = match persisted {
            Some(p) => p,
            None => {
                let ca = CertificateAuthority::generate("cloud-mock CA", CA_VALIDITY)?;
                Persisted::new(
                    uuid::Uuid::new_v4().simple().to_string(),
                    StoredCert {
                        cert_pem: ca.cert_pem().to_owned(),
                        key_pem: ca.key_pem().expose().to_owned(),
                    },
                )
            }
        };
        let mut previous = persisted
            .cas
            .iter()
            .map(|c| CertificateAuthority::from_pem(&c.cert_pem, &c.key_pem).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let current = previous
            .pop()
            .ok_or_else(|| anyhow::anyhow!("the state holds no CA"))?;
        let cas = CaSet { current, previous };
        let cp = Self {
            kv: Kv::new(persisted.kv),
            faults: Faults::default(),
            registry: Mutex::new(persisted.registry),
            cas: RwLock::new(cas),
            server: Mutex::new(persisted.server),
            tls: ArcSwapOption::empty(),
            server_ips: Mutex::new(Vec::new()),
            usage: Mutex::new(usage),
            dir,
            save: Mutex::new(()),
            console_token: persisted.console_token,
            stopping: CancellationToken::new(),
            revocations: tokio::sync::broadcast::channel(16).0,
        };
        cp.persist()?;
        Ok(cp)
    }

    /// Writes the state file (no-op in memory). Serialised so the last write wins with
    /// the latest state.
    pub fn persist(&self) -> anyhow::Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let _saving = lock(&self.save);
        let state = Persisted {
            format: 1,
            console_token: self.console_token.clone(),
            cas: self
                .cas_all()
                .iter()
                .map(|ca| StoredCert {
                    cert_pem: ca.cert_pem().to_owned(),
                    key_pem: ca.key_pem().expose().to_owned(),
                })
                .collect(),
            server: lock(&self.server).clone(),
            registry: self.registry().clone(),
            kv: self.kv.image(),
        };
        dir.save(&state)
    }

    /// Runs `change` on the registry and persists the result.
    pub fn update<T>(&self, change: impl FnOnce(&mut Registry) -> T) -> anyhow::Result<T> {
        let out = change(&mut lock(&self.registry));
        self.persist()?;
        Ok(out)
    }

    /// Runs `change` on the registry without writing the state file: for records that
    /// need not survive a crash (heartbeats); they are saved with the next durable change
    /// or at shutdown.
    pub fn observe<T>(&self, change: impl FnOnce(&mut Registry) -> T) -> T {
        change(&mut lock(&self.registry))
    }

    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        lock(&self.registry)
    }

    pub fn progress_interval(&self) -> Duration {
        Duration::from_millis(self.registry().settings.progress_interval_ms.max(10))
    }

    pub fn set_progress_interval(&self, interval: Duration) {
        self.registry().settings.progress_interval_ms =
            u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    }

    /// Every CA used so far, the current one last.
    fn cas_all(&self) -> Vec<Arc<CertificateAuthority>> {
        let cas = self.cas.read().unwrap_or_else(|p| p.into_inner());
        let mut all = cas.previous.clone();
        all.push(cas.current.clone());
        all
    }

    /// The CA that issues certificates now.
    pub fn ca(&self) -> Arc<CertificateAuthority> {
        self.cas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .current
            .clone()
    }

    /// Every trusted CA certificate, PEM, the current one first.
    pub fn trusted_ca_pem(&self) -> String {
        self.cas_all()
            .iter()
            .rev()
            .map(|ca| ca.cert_pem())
            .collect::<Vec<_>>()
            .join("")
    }

    /// Issues a gateway certificate for `env`/`dp` with a new key and registers it.
    pub fn issue_gateway(
        &self,
        env: &str,
        dp: &str,
        validity: Duration,
    ) -> anyhow::Result<certs::Issued> {
        let issued = self
            .ca()
            .issue_gateway(&GatewayIdentity::new(env, dp)?, validity)?;
        self.record_certificate(env, dp, &issued.cert_pem, validity, "bundle")?;
        Ok(issued)
    }

    /// Signs a CSR that must ask for exactly `env`/`dp` and registers the certificate.
    pub fn sign_csr(
        &self,
        env: &str,
        dp: &str,
        csr_pem: &str,
        validity: Duration,
        how: &str,
    ) -> anyhow::Result<String> {
        let cert_pem =
            self.ca()
                .sign_gateway_csr(csr_pem, &GatewayIdentity::new(env, dp)?, validity)?;
        self.record_certificate(env, dp, &cert_pem, validity, how)?;
        Ok(cert_pem)
    }

    fn record_certificate(
        &self,
        env: &str,
        dp: &str,
        cert_pem: &str,
        validity: Duration,
        how: &str,
    ) -> anyhow::Result<()> {
        let info = inspect_pem("issued certificate", cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no certificate issued"))?;
        self.update(|r| {
            let gateway = r
                .gateways
                .entry(scoped(env, dp))
                .or_insert_with(|| Gateway::new(env, dp, validity.as_secs()));
            gateway.validity_secs = validity.as_secs();
            if how == "rotation" {
                gateway.rotate_requested = false;
            }
            gateway.certificates.push(CertRecord {
                serial: info.serial,
                issued_unix: unix_now(),
                not_after_unix: info.not_after.unix_timestamp(),
                how: how.to_owned(),
            });
        })
    }

    /// Refuses `env`/`dp` from now on: new handshakes fail, requests on its open
    /// connections answer 403 and its open watches end.
    pub fn revoke(&self, env: &str, dp: &str) -> anyhow::Result<()> {
        self.update(|r| {
            r.gateways
                .entry(scoped(env, dp))
                .or_insert_with(|| Gateway::new(env, dp, DAY.as_secs() * 30))
                .revoked = true;
        })?;
        let _ = self.revocations.send(());
        Ok(())
    }

    pub fn is_revoked(&self, identity: &GatewayIdentity) -> bool {
        self.registry()
            .gateways
            .get(&scoped(&identity.env_id, &identity.dp_id))
            .is_some_and(|g| g.revoked)
    }

    /// Adds an environment; false when it already exists.
    pub fn add_environment(&self, id: &str) -> anyhow::Result<bool> {
        self.update(|r| r.environments.insert(id.to_owned()))
    }

    pub fn has_environment(&self, id: &str) -> bool {
        self.registry().environments.contains(id)
    }

    pub fn environments(&self) -> Vec<String> {
        self.registry().environments.iter().cloned().collect()
    }

    /// Starts using a new CA: it signs everything from now on and a new server
    /// certificate; client certificates of the old CAs stay trusted. Gateways that
    /// trust only the old CA can no longer verify this control plane.
    pub fn rotate_ca(self: &Arc<Self>) -> anyhow::Result<String> {
        let ca = Arc::new(CertificateAuthority::generate(
            "cloud-mock CA",
            CA_VALIDITY,
        )?);
        let pem = ca.cert_pem().to_owned();
        {
            let mut cas = self.cas.write().unwrap_or_else(|p| p.into_inner());
            let old = std::mem::replace(&mut cas.current, ca);
            cas.previous.push(old);
        }
        // No server certificate from the new CA yet: installing issues one and saves.
        *lock(&self.server) = None;
        self.install_tls(None)?;
        Ok(pem)
    }

    /// Builds the data-plane TLS config, reusing the stored server certificate when the
    /// current CA issued it, it covers the listener's addresses and is not near expiry.
    pub fn install_tls(self: &Arc<Self>, addr: Option<SocketAddr>) -> anyhow::Result<()> {
        if let Some(addr) = addr {
            let mut ips = vec![addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST)];
            if addr.ip().is_unspecified() {
                ips.truncate(1);
                ips[0] = IpAddr::V4(Ipv4Addr::LOCALHOST);
            }
            ips.dedup();
            *lock(&self.server_ips) = ips;
        }
        let ca = self.ca();
        let ips = lock(&self.server_ips).clone();
        let reusable = lock(&self.server).clone().filter(|s| {
            certs::verify_certificate(&s.cert_pem, ca.cert_pem(), time::OffsetDateTime::now_utc())
                .is_ok()
                && inspect_pem("server certificate", &s.cert_pem)
                    .ok()
                    .and_then(|infos| infos.into_iter().next())
                    .is_some_and(|info| {
                        ips.iter().all(|ip| info.ip_addresses.contains(ip))
                            && (info.not_after - time::OffsetDateTime::now_utc())
                                > SERVER_RENEW_BEFORE
                    })
        });
        let server = match reusable {
            Some(s) => s,
            None => {
                let issued = ca.issue_server(&["localhost".to_owned()], &ips, SERVER_VALIDITY)?;
                let s = StoredCert {
                    cert_pem: issued.cert_pem,
                    key_pem: issued.key_pem.expose().to_owned(),
                };
                *lock(&self.server) = Some(s.clone());
                self.persist()?;
                s
            }
        };
        let weak = Arc::downgrade(self);
        let refuse: certs::tls::Refuse =
            Arc::new(move |id: &GatewayIdentity| weak.upgrade().is_none_or(|cp| cp.is_revoked(id)));
        // The chain carries the CA so enrolling agents can check it against the
        // fingerprint in their token.
        let chain = format!("{}{}", server.cert_pem, ca.cert_pem());
        let config = certs::tls::gateway_server_config(
            &chain,
            &server.key_pem,
            &self.trusted_ca_pem(),
            refuse,
            certs::tls::Anonymous::Admitted,
        )?;
        self.tls.store(Some(Arc::new(config)));
        Ok(())
    }
}

/// The issuing CA and the ones it replaced (still trusted for client certificates).
struct CaSet {
    current: Arc<CertificateAuthority>,
    previous: Vec<Arc<CertificateAuthority>>,
}

/// Where and how to run a control plane.
#[derive(Debug, Clone)]
pub struct Options {
    pub dp_addr: SocketAddr,
    pub console_addr: SocketAddr,
    /// Keeps state across restarts when set; in memory otherwise.
    pub state_dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            dp_addr: local,
            console_addr: local,
            state_dir: None,
        }
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
        if let Err(e) = self.cp.persist() {
            tracing::error!(error = %e, "cannot save the control plane's state");
        }
    }
}

/// Starts an in-memory control plane with a fresh CA: the data plane on `dp_addr` and
/// the console on `127.0.0.1`, port 0.
pub async fn start(dp_addr: SocketAddr) -> anyhow::Result<Running> {
    start_with(Options {
        dp_addr,
        ..Options::default()
    })
    .await
}

/// Starts a control plane (port 0 picks free ports).
pub async fn start_with(options: Options) -> anyhow::Result<Running> {
    let cp = Arc::new(ControlPlane::open(options.state_dir.as_deref())?);
    let listener = TcpListener::bind(options.dp_addr).await?;
    let dp_addr = listener.local_addr()?;
    cp.install_tls(Some(dp_addr))?;
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(dataplane::serve(cp.clone(), listener, stop.clone()));
    let console_listener = TcpListener::bind(options.console_addr).await?;
    let console_addr = console_listener.local_addr()?;
    let app = console::router(cp.clone());
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
        console_token: cp.console_token.clone(),
        cp,
        dp_url: format!("https://{dp_addr}"),
        dp_addr,
        console_url: format!("http://{console_addr}"),
        stop,
        tasks,
    })
}
