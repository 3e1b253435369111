//! Managed mode: the agent connected to a control plane over mutual TLS.
//!
//! Start-up ([`prepare`]): the state directory (0700) is created, the certificate
//! bundle is chosen and kept under `state_dir/mtls` (see `bundle`), the mTLS client is
//! built and the snapshot cache opened, all before any port is bound or any network
//! call is made. Then ([`Managed::start`]): the cached snapshot is restored (source
//! `cache`), and background tasks run until shutdown: the configuration watch (the
//! same watcher as etcd mode, over the control plane's etcd subset, prefix
//! `/aisix/<env_id>`), the cache writer, heartbeats, certificate rotation and the
//! usage sender. The proxy gets the budget gate and the usage sink as its hooks.
//!
//! Layout:
//! - `bundle`: choosing, checking and keeping the certificate bundle.
//! - `client`: the mTLS HTTP client for control-plane calls.
//! - `enroll`: `aisix-agent enroll` (one-time token, key generated locally).
//! - `heartbeat`: `POST /dp/heartbeat`.
//! - `rotation`: certificate rotation by CSR, identity swapped in place.
//! - `budget`: budget decisions (`GET /dp/budget_check`), the proxy's budget gate.
//! - `usage`: the durable usage queue (the proxy's usage sink) and its sender.

pub mod budget;
pub mod bundle;
pub mod client;
pub mod enroll;
pub mod heartbeat;
pub mod rotation;
pub mod usage;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use certs::{Bundle, CertInfo};
use proxy_core::http::Hooks;
use proxy_core::snapshot::Source;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::Shared;
use crate::backoff::BackoffPolicy;
use crate::cache::{self, SnapshotCache};
use crate::config::ManagedSection;
use crate::etcd::EtcdClient;
use crate::watch::Watcher;

use self::budget::BudgetChecker;
use self::client::CpClient;
use self::heartbeat::Heartbeat;
use self::usage::{UsageQueue, UsageQueueStatus, UsageSender};

/// A certificate with fewer days left than this is warned about.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// Managed mode, ready to start.
pub struct Managed {
    pub section: ManagedSection,
    pub bundle: Bundle,
    pub cp: Arc<CpClient>,
    pub etcd: Arc<EtcdClient>,
    pub cache: SnapshotCache,
    pub usage: UsageQueue,
    /// `/aisix/<env_id>`.
    pub prefix: String,
}

/// Creates the state directory (0700), chooses and keeps the bundle, builds the
/// client and opens the cache. Errors name what is wrong.
pub fn prepare(section: &ManagedSection) -> anyhow::Result<Managed> {
    let dir = &section.state_dir;
    crate::files::private_dir(dir).context("managed.state_dir")?;
    let now = time::OffsetDateTime::now_utc();
    let bundle = bundle::resolve(section, now, true)?;
    let days_left = bundle.leaf.days_left(now);
    info!(
        env_id = %bundle.identity.env_id,
        dp_id = %bundle.identity.dp_id,
        serial = %bundle.leaf.serial,
        days_left,
        "gateway certificate loaded"
    );
    if days_left < EXPIRY_WARNING_DAYS {
        warn!(days_left, "the gateway certificate expires soon");
    }
    let cp = Arc::new(CpClient::new(section, &bundle)?);
    let etcd = Arc::new(EtcdClient::with_http(
        cp.http(),
        &[cp.base_url()],
        cp.request_timeout(),
        None,
    )?);
    let prefix = format!("/aisix/{}", bundle.identity.env_id);
    let cache = SnapshotCache::open(dir, &prefix)
        .with_context(|| format!("managed.state_dir: {}", dir.display()))?;
    let usage = UsageQueue::open(
        dir,
        section.usage.queue_max_events,
        section.usage.batch_size,
    )
    .with_context(|| format!("managed.state_dir: {}", dir.display()))?;
    Ok(Managed {
        section: section.clone(),
        bundle,
        cp,
        etcd,
        cache,
        usage,
        prefix,
    })
}

impl Managed {
    /// Restores the cached snapshot into the shared store and spawns the background
    /// tasks on `workers`; they stop when `shutdown` is cancelled. Returns the proxy's
    /// hooks and what the status listener reads.
    pub fn start(
        self,
        shared: &Shared,
        workers: &TaskTracker,
        shutdown: &CancellationToken,
        initial_watch_idle: Duration,
    ) -> (Hooks, ManagedStatus) {
        let store = &shared.store;
        let cache = Arc::new(self.cache);
        if !cache::restore_into(&cache, store) {
            info!("no cached snapshot: nothing is served until the control plane answers");
        }
        workers.spawn(cache::run_writer(cache, store.clone(), shutdown.clone()));
        let watcher = Watcher {
            client: self.etcd,
            prefix: self.prefix,
            store: store.clone(),
            source: Source::ControlPlane,
            backoff: BackoffPolicy::default(),
            idle_timeout: initial_watch_idle,
            status: shared.watch.clone(),
        };
        workers.spawn(watcher.run(shutdown.clone()));
        let certificate = Arc::new(ArcSwap::from_pointee(self.bundle.leaf.clone()));
        let rotate = Arc::new(Notify::new());
        let heartbeat = Heartbeat {
            cp: self.cp.clone(),
            store: store.clone(),
            health: shared.health.clone(),
            watch: shared.watch.clone(),
            metrics: shared.metrics.clone(),
            identity: self.bundle.identity.clone(),
            certificate: certificate.clone(),
            usage: self.usage.status(),
            interval: Duration::from_secs(self.section.heartbeat_interval_secs),
            rotate: rotate.clone(),
            backoff: BackoffPolicy::default(),
        };
        workers.spawn(heartbeat.run(shutdown.clone()));
        let rotation = rotation::Rotation {
            cp: self.cp.clone(),
            store: bundle::BundleStore::new(&self.section.state_dir),
            identity: self.bundle.identity,
            current: certificate.clone(),
            asked: rotate,
            backoff: BackoffPolicy::default(),
        };
        workers.spawn(rotation.run(shutdown.clone()));
        let usage = Arc::new(self.usage);
        let sender = UsageSender {
            queue: usage.clone(),
            cp: self.cp.clone(),
            interval: Duration::from_millis(self.section.usage.flush_interval_ms),
            backoff: BackoffPolicy::default(),
        };
        workers.spawn(sender.run(shutdown.clone()));
        workers.spawn(usage.clone().run_flusher(shutdown.clone()));
        let status = ManagedStatus {
            certificate,
            usage: usage.status(),
        };
        let budget = Arc::new(BudgetChecker::new(
            self.cp,
            self.section.budget.clone(),
            shared.metrics.clone(),
            usage.clone(),
        ));
        let hooks = Hooks {
            budget: Some(budget.clone()),
            usage: Some(Arc::new(budget::Charged {
                budget,
                queue: usage,
            })),
            metrics: shared.metrics.clone(),
        };
        (hooks, status)
    }
}

/// What managed mode adds to the status listener.
pub struct ManagedStatus {
    /// The certificate in use (replaced on rotation).
    pub certificate: Arc<ArcSwap<CertInfo>>,
    pub usage: Arc<UsageQueueStatus>,
}
