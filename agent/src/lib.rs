//! agent: the AISIX edge agent process.
//!
//! `main` parses the command line and the config file and hands the config to
//! [`start`], which prepares the configuration source (loads the resources file, or
//! builds the etcd client and opens the snapshot cache, or resolves the managed-mode
//! bundle) and binds the listeners; [`Agent::serve`] then serves until shutdown.
//! SIGTERM/SIGINT starts a drain (liveness fails, requests keep being served for
//! `min_drain_secs`, then the listeners close and in-flight requests get
//! `drain_timeout_secs` to finish); background tasks then stop and flush.
//!
//! Layout:
//! - `config`: the config file, environment overrides and their validation;
//!   `validate`: the `validate` command's checks.
//! - `source`: the configuration source of each mode, prepared then started.
//! - `listeners`: the listener set of a config, bound before anything serves.
//! - `resources_file`: file mode's YAML resources document (SIGHUP reloads it).
//! - `etcd`: the etcd v3 JSON client; `watch`: the list-then-watch configuration
//!   watcher; `cache`: the sled last-good snapshot.
//! - `managed`: managed mode (bundle, mTLS client, heartbeats) over the same watcher.
//! - `admin`: the self-hosted admin listener.
//! - `status`: the metrics and status listener.
//! - `logging`: tracing setup (text or JSON); `files`: permissions of secret files.

pub mod admin;
pub use proxy_core::backoff;
pub mod cache;
pub mod config;
pub mod etcd;
pub mod files;
pub mod listeners;
pub mod logging;
pub mod managed;
pub mod memory;
pub mod resources_file;
pub mod source;
pub mod status;
pub mod validate;
pub mod watch;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use proxy_core::http::{App, ListenerOptions, ProxyOptions, ProxyState, router};
use proxy_core::observe::metrics::Metrics;
use proxy_core::observe::otlp_metrics::push_every;
use proxy_core::observe::trace::Tracing;
use proxy_core::policy::health::ModelHealth;
use proxy_core::providers::client::Upstream;
use proxy_core::snapshot::SnapshotStore;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::listeners::{Bound, Role, scheme, serve_logged};
use crate::resources_file::ResourcesFile;
use crate::source::{PREFIX, PreparedSource, Running, apply_file, resources_path};
use crate::watch::WatchStatus;

/// Signals from the outside world.
#[derive(Clone, Default)]
pub struct Controls {
    /// Cancelled to begin a graceful shutdown.
    pub shutdown: CancellationToken,
    /// Notified to reload the resources file.
    pub reload: Arc<Notify>,
}

/// What the proxy, the background tasks and the listeners share.
#[derive(Clone)]
pub struct Shared {
    pub store: Arc<SnapshotStore>,
    pub health: Arc<ModelHealth>,
    /// The configuration watch's state (unused in file mode).
    pub watch: Arc<WatchStatus>,
    pub metrics: Arc<Metrics>,
    /// File mode: how the last SIGHUP reload went.
    pub last_reload: Arc<Mutex<Option<Reload>>>,
}

/// A reload of the resources file, as `/status/config` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reload {
    pub at_unix: u64,
    pub ok: bool,
    /// Why the file was not applied (the last good snapshot kept serving).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An agent ready to serve: its source prepared and its listeners bound.
pub struct Agent {
    config: Config,
    source: PreparedSource,
    listeners: Vec<Bound>,
}

/// Prepares the source and binds the listeners; any failure stops start-up with a
/// message naming the config field.
pub async fn start(config: Config) -> anyhow::Result<Agent> {
    for key in &config.ignored {
        warn!(key, "config key accepted but not acted on by this build");
    }
    if !config.upstream.tls.verify {
        warn!(
            "upstream.tls.verify is false: provider certificates are not checked, so anyone on the path can read and answer provider calls"
        );
    }
    let status = &config.observability.metrics.prometheus;
    if status.enabled && !status.addr.ip().is_loopback() {
        warn!(
            addr = %status.addr,
            "the status listener (metrics, /status/*) has no authentication and listens beyond this host; keep the port private or set observability.metrics.prometheus.addr to 127.0.0.1"
        );
    }
    if config.etcd.is_some() && config.admin().is_none() {
        info!(
            "no admin section or admin.enabled is false: the admin API is off (resources are written to etcd directly)"
        );
    }
    let source = PreparedSource::prepare(&config)?;
    let listeners = listeners::bind(listeners::plan(&config)?).await?;
    Ok(Agent {
        config,
        source,
        listeners,
    })
}

/// Starts and serves `config` until `controls.shutdown` and the drain are done.
pub async fn run(config: Config, controls: Controls) -> anyhow::Result<()> {
    start(config).await?.serve(controls).await
}

impl Agent {
    /// Where a listener is bound (useful with port 0).
    pub fn addr(&self, role: Role) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.role == role)
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves until `controls.shutdown` is cancelled and the drain has finished.
    pub async fn serve(self, controls: Controls) -> anyhow::Result<()> {
        let Agent {
            config,
            source,
            listeners,
        } = self;
        let shared = Shared {
            store: Arc::new(SnapshotStore::new(source.prefix(&config))),
            health: Arc::default(),
            watch: Arc::default(),
            metrics: Arc::default(),
            last_reload: Arc::default(),
        };
        let background = CancellationToken::new();
        let workers = TaskTracker::new();
        let running = source.start(&config, &shared, &workers, &background);
        let serving = Serving::new(&config, &shared, running, listeners)?;
        let failed = serving.failed.clone();
        let tracing = serving.tracing.clone();
        tokio::select! {
            () = follow_controls(&config, &shared, &controls) => {}
            () = failed.cancelled() => {}
        }
        serving.drain(&config, &shared.metrics).await;
        if let Some(tracing) = tracing {
            // The last spans go out.
            tracing.flush(Duration::from_secs(5)).await;
        }
        background.cancel();
        workers.close();
        if tokio::time::timeout(Duration::from_secs(10), workers.wait())
            .await
            .is_err()
        {
            warn!("shutdown: background tasks did not stop within 10 s");
        }
        if failed.is_cancelled() {
            anyhow::bail!("a listener failed (see the log above); stopped");
        }
        Ok(())
    }
}

/// The listeners serving, and what stops them.
struct Serving {
    servers: TaskTracker,
    /// Cancelled when the drain begins: liveness fails, requests are still served.
    draining: CancellationToken,
    /// Cancelled when the listeners close.
    stop: CancellationToken,
    /// Cancelled when a listener fails: the agent drains and exits non-zero.
    failed: CancellationToken,
    /// The span exporter, flushed when the drain is over.
    tracing: Option<Tracing>,
}

impl Serving {
    fn new(
        config: &Config,
        shared: &Shared,
        running: Running,
        listeners: Vec<Bound>,
    ) -> anyhow::Result<Self> {
        let proxy = proxy_options(config)?;
        let serving = Serving {
            servers: TaskTracker::new(),
            draining: CancellationToken::new(),
            stop: CancellationToken::new(),
            failed: CancellationToken::new(),
            tracing: proxy.tracing.clone(),
        };
        let Running {
            kind,
            hooks,
            etcd,
            managed,
        } = running;
        let mut hooks = Some(hooks);
        let push = config
            .metrics_push_options()
            .map_err(|(f, m)| anyhow::anyhow!("{f}: {m}"))?;
        let status = Arc::new(status::Status {
            shared: shared.clone(),
            source: kind,
            managed,
            draining: serving.draining.clone(),
            ignored: config.ignored.clone(),
            redis: proxy.redis(),
            tracing: serving.tracing.clone(),
            metrics_push: push.as_ref().map(|_| Arc::default()),
            serving: status::ServingModel {
                thread_per_core: config.thread_per_core(),
                workers: config.workers(),
            },
        });
        if let (Some(options), Some(stats)) = (push, status.metrics_push.clone()) {
            let status = status.clone();
            serving.servers.spawn(push_every(
                options,
                move || status.render(),
                stats,
                serving.stop.clone(),
            ));
        }
        let mut proxy = Some(proxy);
        for bound in listeners {
            let addr = bound.local_addr()?;
            let mut options = ListenerOptions {
                tls: bound.tls,
                ..ListenerOptions::plain(bound.role.name())
            };
            let app: App = match bound.role {
                Role::Proxy => {
                    // Heads up to twice the limits (bytes, header lines) get the proxy's
                    // 431 envelope; hyper cuts larger.
                    options.header_read_timeout = config.head_wait();
                    options.max_connections = config.proxy.max_connections;
                    options.max_head_bytes = config.proxy.max_header_bytes.saturating_mul(2);
                    options.max_headers = Some(2 * proxy_core::http::MAX_HEADER_LINES);
                    let upstream = config
                        .upstream_options()
                        .map_err(|(f, m)| anyhow::anyhow!("{f}: {m}"))?;
                    let state = ProxyState::new(
                        shared.store.clone(),
                        Upstream::with_options(&upstream)
                            .map_err(|e| anyhow::anyhow!("upstream.tls: {e}"))?,
                        proxy.take().unwrap_or_default(),
                        serving.draining.clone(),
                        shared.health.clone(),
                        hooks.take().unwrap_or_default(),
                    );
                    if config.thread_per_core() {
                        let workers = bound.listeners.len();
                        serving.spawn_workers(bound.listeners, &state, &upstream, options)?;
                        info!(addr = %addr, workers, "proxy listener ready (a thread per core)");
                        continue;
                    }
                    router(state).into()
                }
                Role::Admin => {
                    let (Some(client), Some(section)) = (&etcd, config.admin()) else {
                        continue;
                    };
                    let admin = admin::Admin::new(
                        shared.store.clone(),
                        shared.health.clone(),
                        client.clone(),
                        shared.watch.clone(),
                        &section.admin_keys,
                        serving.draining.clone(),
                    );
                    admin::router(Arc::new(admin)).into()
                }
                Role::Metrics => status::router(
                    status.clone(),
                    &config.observability.metrics.prometheus.path,
                )
                .into(),
            };
            let scheme = scheme(&options);
            let Some(listener) = bound.listeners.into_iter().next() else {
                continue;
            };
            serving.servers.spawn(serve_logged(
                listener,
                app,
                serving.stop.clone(),
                options,
                serving.failed.clone(),
            ));
            info!(addr = %addr, scheme, "{} listener ready", bound.role.name());
        }
        Ok(serving)
    }

    /// Serves the proxy on a thread per socket, each with a current-thread runtime
    /// and an upstream pool of its own, so a request never leaves its thread; the
    /// snapshot, limits, cache and metrics stay shared. The workers count as servers:
    /// the drain waits for them.
    fn spawn_workers(
        &self,
        listeners: Vec<tokio::net::TcpListener>,
        state: &ProxyState,
        upstream: &proxy_core::providers::client::UpstreamOptions,
        mut options: ListenerOptions,
    ) -> anyhow::Result<()> {
        options.slots = Some(Arc::new(tokio::sync::Semaphore::new(
            options.max_connections.max(1),
        )));
        for (i, listener) in listeners.into_iter().enumerate() {
            let listener = listener.into_std()?;
            let state = if i == 0 {
                state.clone()
            } else {
                state.with_upstream(
                    state
                        .upstream()
                        .with_own_pool(upstream)
                        .map_err(|e| anyhow::anyhow!("upstream.tls: {e}"))?,
                )
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start a worker's runtime")?;
            let (stop, failed, options) = (self.stop.clone(), self.failed.clone(), options.clone());
            let running = self.servers.token();
            std::thread::Builder::new()
                .name(format!("aisix-worker-{i}"))
                .spawn(move || {
                    runtime.spawn(crate::memory::keep_collecting());
                    runtime.block_on(async move {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => {
                                serve_logged(listener, router(state).into(), stop, options, failed)
                                    .await;
                            }
                            Err(e) => {
                                error!(error = %e, "a proxy worker cannot listen; the agent stops");
                                failed.cancel();
                            }
                        }
                    });
                    drop(running);
                })
                .context("cannot start a proxy worker thread")?;
        }
        Ok(())
    }

    /// Fails liveness at once and keeps the listeners accepting until `min_drain_secs`
    /// has passed and no answer is in flight (a stream until its last byte), so a load
    /// balancer slower than the window never meets a refused connection while streams
    /// run; then closes them and waits for the connections. `drain_timeout_secs` bounds
    /// the whole.
    async fn drain(self, config: &Config, metrics: &proxy_core::observe::metrics::Metrics) {
        self.draining.cancel();
        let min_drain = Duration::from_secs(config.shutdown.min_drain_secs);
        let grace = Duration::from_secs(config.shutdown.drain_timeout_secs);
        let deadline = tokio::time::Instant::now() + grace.max(min_drain);
        info!(
            min_drain_secs = min_drain.as_secs(),
            drain_timeout_secs = grace.as_secs(),
            in_flight = metrics.in_flight.get(),
            "shutdown: drain started; liveness now fails, the listeners keep accepting"
        );
        tokio::time::sleep(min_drain).await;
        while metrics.in_flight.get() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info!(
            in_flight = metrics.in_flight.get(),
            "shutdown: listeners closed"
        );
        self.stop.cancel();
        self.servers.close();
        match tokio::time::timeout_at(deadline, self.servers.wait()).await {
            Ok(()) => info!(
                in_flight = metrics.in_flight.get(),
                "shutdown: drain complete"
            ),
            Err(_) => warn!(
                drain_timeout_secs = grace.as_secs(),
                in_flight = metrics.in_flight.get(),
                "shutdown: drain timeout reached; closing remaining connections"
            ),
        }
    }
}

fn proxy_options(config: &Config) -> anyhow::Result<ProxyOptions> {
    let field = |(field, message): (String, String)| anyhow::anyhow!("{field}: {message}");
    let (trusted_proxies, _, real_ip_recursive) = config.real_ip();
    Ok(ProxyOptions {
        body_limit: match config.proxy.request_body_limit_bytes {
            0 => None,
            n => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        },
        body_read_timeout: Duration::from_millis(config.proxy.body_read_timeout_ms),
        min_body_rate: config.proxy.min_body_rate_bytes_per_sec,
        max_header_bytes: config.proxy.max_header_bytes,
        request_id_headers: config.request_id_headers(),
        trusted_proxies,
        client_ip_header: config.client_ip_header(),
        real_ip_recursive,
        cache: config.cache.options().map_err(field)?,
        shared_limits: config.ratelimit.options().map_err(field)?,
        access_log: config.observability.access_log,
        url_rewrites: config.url_rewrites().into(),
        client_types: config.client_types().into(),
        sse_keepalive: config
            .downstream
            .sse_keepalive_interval_secs
            .filter(|s| *s > 0)
            .map(Duration::from_secs),
        tracing: match config.trace_options().map_err(field)? {
            Some(options) => Some(Tracing::start(&options).map_err(|e| anyhow::anyhow!(e))?),
            None => None,
        },
    })
}

/// Reloads the resources file when asked, until shutdown.
async fn follow_controls(config: &Config, shared: &Shared, controls: &Controls) {
    let path = resources_path(config);
    let mut generation = 1;
    loop {
        tokio::select! {
            () = controls.reload.notified() => {
                if config.resources_file.is_none() {
                    info!("nothing to reload: the configuration follows its source");
                    continue;
                }
                generation += 1;
                let error = match ResourcesFile::load(&path, PREFIX) {
                    Ok(file) => {
                        apply_file(&shared.store, file, generation);
                        None
                    }
                    Err(e) => {
                        error!(error = %e, "resources file not reloaded; the last good snapshot keeps serving");
                        shared.metrics.record_reload_failure();
                        Some(format!("{e:#}"))
                    }
                };
                let at_unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                *shared.last_reload.lock().unwrap_or_else(PoisonError::into_inner) = Some(Reload {
                    at_unix,
                    ok: error.is_none(),
                    error,
                });
            }
            () = controls.shutdown.cancelled() => break,
        }
    }
}
