//! agent: the AISIX edge agent process.
//!
//! `main` parses the command line and the config file, prepares the configuration
//! source (loads the resources file, or builds the etcd client and opens the snapshot
//! cache), binds the listeners, and calls [`run`], which serves until shutdown.
//! SIGTERM/SIGINT starts a drain (liveness fails, requests keep being served for
//! `min_drain_secs`, then the listeners close and in-flight requests get
//! `drain_timeout_secs` to finish); background tasks then stop and flush.
//!
//! Layout:
//! - `config`: the config file, environment overrides and their validation.
//! - `resources_file`: file mode's YAML resources document (SIGHUP reloads it).
//! - `etcd`: the etcd v3 JSON client; `watch`: the list-then-watch configuration
//!   watcher; `backoff`: retry pacing; `cache`: the sled last-good snapshot.
//! - `managed`: managed mode (bundle, mTLS client, heartbeats) over the same watcher.
//! - `admin`: the self-hosted admin listener.
//! - `status`: the metrics and status listener.
//! - `logging`: tracing setup (text or JSON); `files`: permissions of secret files.

pub mod admin;
pub mod backoff;
pub mod cache;
pub mod config;
pub mod etcd;
pub mod files;
pub mod logging;
pub mod managed;
pub mod resources_file;
pub mod status;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use proxy_core::http::{Hooks, ListenerOptions, ProxyOptions, ProxyState, router, serve};
use proxy_core::observe::metrics::Metrics;
use proxy_core::policy::health::ModelHealth;
use proxy_core::providers::client::Upstream;
use proxy_core::snapshot::{SnapshotStore, Source, SourceEvent};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::backoff::BackoffPolicy;
use crate::cache::SnapshotCache;
use crate::config::{Config, EtcdSection, ListenerTlsSection};
use crate::etcd::{EtcdClient, EtcdOptions};
use crate::resources_file::ResourcesFile;
use crate::watch::{WatchStatus, Watcher};

/// The key prefix of file mode.
pub const PREFIX: &str = "/aisix";

/// How long a watch may stay silent before it is re-established, until progress
/// notifications reveal the server's interval (etcd's default interval is 10 minutes).
const INITIAL_WATCH_IDLE: Duration = Duration::from_secs(11 * 60);

/// Signals from the outside world.
#[derive(Clone, Default)]
pub struct Controls {
    /// Cancelled to begin a graceful shutdown.
    pub shutdown: CancellationToken,
    /// Notified to reload the resources file.
    pub reload: Arc<Notify>,
}

/// Where the configuration comes from, ready to use.
pub enum PreparedSource {
    File(ResourcesFile),
    Etcd {
        client: Arc<EtcdClient>,
        cache: Option<SnapshotCache>,
    },
    Managed(Box<managed::Managed>),
}

impl PreparedSource {
    /// The storage prefix resources live under, without a trailing slash.
    pub fn prefix(&self, config: &Config) -> String {
        match self {
            PreparedSource::Managed(m) => m.prefix.clone(),
            _ => config.prefix(),
        }
    }
}

/// Everything `run` needs that `main` prepared and validated.
pub struct Prepared {
    pub config: Config,
    pub source: PreparedSource,
    pub proxy_listener: TcpListener,
    /// Self-hosted mode's admin listener, when an `admin` section is configured.
    pub admin_listener: Option<TcpListener>,
    /// The metrics and status listener, unless disabled.
    pub metrics_listener: Option<TcpListener>,
    pub tls: ListenerTls,
}

/// HTTPS settings of the listeners that have them configured.
#[derive(Default)]
pub struct ListenerTls {
    pub proxy: Option<Arc<rustls::ServerConfig>>,
    pub admin: Option<Arc<rustls::ServerConfig>>,
}

impl ListenerTls {
    /// Reads `proxy.tls`, and `admin.tls` in self-hosted mode (the only one with an
    /// admin listener); key files are made private first.
    pub fn prepare(config: &Config) -> anyhow::Result<Self> {
        let load = |section: &Option<ListenerTlsSection>, name: &str| {
            let Some(tls) = section else {
                return Ok(None);
            };
            let cert = std::fs::read_to_string(&tls.cert_file).with_context(|| {
                format!(
                    "{name}.tls.cert_file: cannot read {}",
                    tls.cert_file.display()
                )
            })?;
            let key = files::read_private(&tls.key_file, &format!("{name}.tls.key_file"))?;
            let config =
                certs::tls::listener_config(&cert, &key).with_context(|| format!("{name}.tls"))?;
            anyhow::Ok(Some(Arc::new(config)))
        };
        Ok(Self {
            proxy: load(&config.proxy.tls, "proxy")?,
            admin: match (&config.etcd, &config.admin) {
                (Some(_), Some(admin)) => load(&admin.tls, "admin")?,
                _ => None,
            },
        })
    }
}

/// What the proxy, the background tasks and the listeners share.
#[derive(Clone)]
pub struct Shared {
    pub store: Arc<SnapshotStore>,
    pub health: Arc<ModelHealth>,
    /// The configuration watch's state (unused in file mode).
    pub watch: Arc<WatchStatus>,
    pub metrics: Arc<Metrics>,
}

/// Prepares the configuration source before any port is bound, so a broken resources
/// file, TLS file or cache directory stops start-up with a clear message.
pub fn prepare_source(config: &Config) -> anyhow::Result<PreparedSource> {
    if let Some(section) = config.managed() {
        return Ok(PreparedSource::Managed(Box::new(managed::prepare(
            section,
        )?)));
    }
    match (&config.etcd, &config.resources_file) {
        (Some(etcd), _) => {
            let client = Arc::new(etcd_client(etcd)?);
            let cache = match &etcd.cache_dir {
                // The cache holds provider credentials: the directory is kept 0700.
                Some(dir) => Some(
                    files::private_dir(dir)
                        .and_then(|()| Ok(SnapshotCache::open(dir, &config.prefix())?))
                        .with_context(|| format!("etcd.cache_dir: {}", dir.display()))?,
                ),
                None => None,
            };
            Ok(PreparedSource::Etcd { client, cache })
        }
        (None, _) => Ok(PreparedSource::File(prepare_resources(config)?)),
    }
}

/// Loads the resources file (file mode).
pub fn prepare_resources(config: &Config) -> anyhow::Result<ResourcesFile> {
    Ok(ResourcesFile::load(&resources_path(config), PREFIX)?)
}

fn resources_path(config: &Config) -> PathBuf {
    config.resources_file.clone().unwrap_or_default()
}

/// Builds the etcd client from the `etcd` section (reading its TLS files).
pub fn etcd_client(etcd: &EtcdSection) -> anyhow::Result<EtcdClient> {
    let read = |field: &str, path: &PathBuf| {
        std::fs::read_to_string(path)
            .with_context(|| format!("etcd.tls.{field}: cannot read {}", path.display()))
    };
    let tls = match &etcd.tls {
        None => None,
        Some(tls) => {
            let ca = match &tls.ca_file {
                Some(path) => read("ca_file", path)?,
                None => anyhow::bail!(
                    "etcd.tls.ca_file: required with TLS (this build trusts only the CA you name)"
                ),
            };
            let client = match (&tls.cert_file, &tls.key_file) {
                (Some(c), Some(k)) => Some((
                    read("cert_file", c)?,
                    files::read_private(k, "etcd.tls.key_file")?,
                )),
                _ => None,
            };
            let config = certs::tls::plain_client_config(
                &ca,
                client.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
            )
            .context("etcd.tls")?;
            Some(config)
        }
    };
    if tls.is_none() && etcd.endpoints.iter().any(|e| e.starts_with("https://")) {
        anyhow::bail!(
            "etcd.tls.ca_file: https endpoints need the CA that signed etcd's certificate"
        );
    }
    let options = EtcdOptions {
        endpoints: etcd.endpoints.clone(),
        dial_timeout: Duration::from_millis(etcd.dial_timeout_ms),
        request_timeout: Duration::from_millis(etcd.request_timeout_ms),
        credentials: etcd.username.clone().zip(etcd.password.clone()),
        tls,
    };
    Ok(EtcdClient::new(options)?)
}

/// Serves until `controls.shutdown` is cancelled and the drain has finished.
pub async fn run(prepared: Prepared, controls: Controls) -> anyhow::Result<()> {
    let Prepared {
        config,
        source,
        proxy_listener,
        admin_listener,
        metrics_listener,
        tls,
    } = prepared;
    for section in &config.ignored {
        warn!(
            section,
            "config section is not implemented by this build; ignored"
        );
    }
    let shared = Shared {
        store: Arc::new(SnapshotStore::new(source.prefix(&config))),
        health: Arc::default(),
        watch: Arc::default(),
        metrics: Arc::default(),
    };
    let store = &shared.store;
    let background = CancellationToken::new();
    let workers = TaskTracker::new();
    let mut generation = 1;
    let mut hooks = Hooks {
        metrics: shared.metrics.clone(),
        ..Hooks::default()
    };
    let mut managed_status = None;
    let (etcd, source_kind) = match source {
        PreparedSource::File(resources) => {
            apply_file(store, resources, generation);
            (None, Source::File)
        }
        PreparedSource::Etcd { client, cache } => {
            if let Some(cache) = cache {
                let cache = Arc::new(cache);
                cache::restore_into(&cache, store);
                workers.spawn(cache::run_writer(cache, store.clone(), background.clone()));
            } else {
                info!("etcd.cache_dir is not set: nothing is served until etcd answers");
            }
            let watcher = Watcher {
                client: client.clone(),
                prefix: config.prefix(),
                store: store.clone(),
                source: Source::Etcd,
                backoff: BackoffPolicy::default(),
                idle_timeout: INITIAL_WATCH_IDLE,
                status: shared.watch.clone(),
            };
            workers.spawn(watcher.run(background.clone()));
            (Some(client), Source::Etcd)
        }
        PreparedSource::Managed(managed) => {
            let (managed_hooks, status) =
                managed.start(&shared, &workers, &background, INITIAL_WATCH_IDLE);
            hooks = managed_hooks;
            managed_status = Some(status);
            (None, Source::ControlPlane)
        }
    };

    let draining = CancellationToken::new();
    let stop = CancellationToken::new();
    let options = ProxyOptions {
        body_limit: match config.proxy.request_body_limit_bytes {
            0 => None,
            n => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        },
        max_header_bytes: config.proxy.max_header_bytes,
        request_id_headers: config.request_id_headers(),
        trusted_proxies: config.proxy.trusted_proxies.clone(),
        client_ip_header: config.client_ip_header(),
        cache: config.cache.options(),
        access_log: config.observability.access_log,
    };
    let state = ProxyState::new(
        store.clone(),
        Upstream::new()?,
        options,
        draining.clone(),
        shared.health.clone(),
        hooks,
    );
    let servers = TaskTracker::new();
    let addr = proxy_listener.local_addr()?;
    let proxy_options = ListenerOptions {
        tls: tls.proxy,
        header_read_timeout: Duration::from_millis(config.proxy.header_read_timeout_ms),
        max_connections: config.proxy.max_connections,
        // Heads up to twice the limit get the proxy's 431 envelope; hyper cuts larger.
        max_head_bytes: config.proxy.max_header_bytes.saturating_mul(2),
        ..ListenerOptions::plain("proxy")
    };
    let proxy_scheme = scheme(&proxy_options);
    servers.spawn(serve_logged(
        proxy_listener,
        router(state),
        stop.clone(),
        proxy_options,
    ));
    info!(addr = %addr, scheme = proxy_scheme, "proxy listener ready");
    if let (Some(listener), Some(client), Some(section)) = (admin_listener, etcd, &config.admin) {
        let admin = admin::Admin::new(
            store.clone(),
            shared.health.clone(),
            client,
            &section.admin_keys,
            draining.clone(),
        );
        let addr = listener.local_addr()?;
        let options = ListenerOptions {
            tls: tls.admin,
            ..ListenerOptions::plain("admin")
        };
        let scheme = scheme(&options);
        servers.spawn(serve_logged(
            listener,
            admin::router(Arc::new(admin)),
            stop.clone(),
            options,
        ));
        info!(addr = %addr, scheme, "admin listener ready");
    }

    if let Some(listener) = metrics_listener {
        let status = status::Status {
            shared: shared.clone(),
            source: source_kind,
            managed: managed_status,
            draining: draining.clone(),
            ignored: config.ignored.clone(),
        };
        let path = &config.observability.metrics.prometheus.path;
        let addr = listener.local_addr()?;
        servers.spawn(serve_logged(
            listener,
            status::router(Arc::new(status), path),
            stop.clone(),
            ListenerOptions::plain("metrics"),
        ));
        info!(addr = %addr, path, "metrics listener ready");
    }

    let path = resources_path(&config);
    loop {
        tokio::select! {
            () = controls.reload.notified() => {
                if config.resources_file.is_none() {
                    info!("nothing to reload: the configuration follows its source");
                    continue;
                }
                generation += 1;
                match ResourcesFile::load(&path, PREFIX) {
                    Ok(file) => apply_file(store, file, generation),
                    Err(e) => error!(error = %e, "resources file not reloaded; the last good snapshot keeps serving"),
                }
            }
            () = controls.shutdown.cancelled() => break,
        }
    }

    draining.cancel();
    let min_drain = Duration::from_secs(config.shutdown.min_drain_secs);
    info!(
        min_drain_secs = min_drain.as_secs(),
        "shutdown: liveness now fails; draining"
    );
    tokio::time::sleep(min_drain).await;
    stop.cancel();
    servers.close();
    let grace = Duration::from_secs(config.shutdown.drain_timeout_secs);
    match tokio::time::timeout(grace, servers.wait()).await {
        Ok(()) => info!("shutdown: all requests finished"),
        Err(_) => warn!(
            drain_timeout_secs = grace.as_secs(),
            "shutdown: drain timeout reached; closing remaining connections"
        ),
    }
    background.cancel();
    workers.close();
    if tokio::time::timeout(Duration::from_secs(10), workers.wait())
        .await
        .is_err()
    {
        warn!("shutdown: background tasks did not stop within 10 s");
    }
    Ok(())
}

async fn serve_logged(
    listener: TcpListener,
    router: axum::Router,
    stop: CancellationToken,
    options: ListenerOptions,
) {
    let name = options.name;
    if let Err(e) = serve(listener, router, stop, options).await {
        error!(listener = name, error = %e, "listener failed");
    }
}

fn scheme(options: &ListenerOptions) -> &'static str {
    if options.tls.is_some() {
        "https"
    } else {
        "http"
    }
}

fn apply_file(store: &SnapshotStore, file: ResourcesFile, generation: i64) {
    for problem in &file.problems {
        warn!(problem, "resources file entry skipped");
    }
    let report = store.apply(
        Source::File,
        [SourceEvent::Reset {
            entries: file.entries,
            revision: generation,
        }],
    );
    let snapshot = store.load();
    let (provider_keys, models, api_keys) = snapshot.counts();
    info!(
        revision = generation,
        provider_keys,
        models,
        api_keys,
        rejected = snapshot.rejections().count(),
        changed = report.changed_keys,
        "resources file applied"
    );
}
