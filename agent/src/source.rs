//! Where the configuration comes from: the resources file, etcd (with its sled cache),
//! or the control plane. Prepared before any port is bound, so a broken resources
//! file, TLS file or cache directory stops start-up with a message naming the field;
//! started once the process serves.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use proxy_core::http::Hooks;
use proxy_core::snapshot::{SnapshotStore, Source, SourceEvent};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::Shared;
use crate::backoff::BackoffPolicy;
use crate::cache::{self, SnapshotCache};
use crate::config::{Config, EtcdSection};
use crate::etcd::{EtcdClient, EtcdOptions};
use crate::files;
use crate::managed::{self, ManagedStatus};
use crate::resources_file::ResourcesFile;
use crate::watch::Watcher;

/// The key prefix of file mode.
pub const PREFIX: &str = "/aisix";

/// How long a watch may stay silent before it is re-established, until progress
/// notifications reveal the server's interval (etcd's default interval is 10 minutes).
const INITIAL_WATCH_IDLE: Duration = Duration::from_secs(11 * 60);

/// A configuration source, ready to start.
pub enum PreparedSource {
    File(ResourcesFile),
    Etcd {
        client: Arc<EtcdClient>,
        cache: Option<SnapshotCache>,
    },
    Managed(Box<managed::Managed>),
}

/// A started source: what the proxy and the other listeners need from it.
pub struct Running {
    pub kind: Source,
    pub hooks: Hooks,
    /// Self-hosted mode's etcd client, which the admin API writes through.
    pub etcd: Option<Arc<EtcdClient>>,
    pub managed: Option<ManagedStatus>,
}

impl PreparedSource {
    /// Reads and checks what the config names for its mode.
    pub fn prepare(config: &Config) -> anyhow::Result<Self> {
        if let Some(section) = config.managed() {
            return Ok(Self::Managed(Box::new(managed::prepare(section)?)));
        }
        let Some(etcd) = &config.etcd else {
            return Ok(Self::File(load_resources(config)?));
        };
        let client = Arc::new(etcd_client(etcd)?);
        let cache = match &config.etcd_cache_dir() {
            // The cache holds provider credentials: the directory is kept 0700.
            Some(dir) => Some(
                files::private_dir(dir)
                    .and_then(|()| Ok(SnapshotCache::open(dir, &config.prefix())?))
                    .with_context(|| {
                        format!(
                            "etcd.cache_dir / managed.snapshot_cache_path: {}",
                            dir.display()
                        )
                    })?,
            ),
            None => None,
        };
        Ok(Self::Etcd { client, cache })
    }

    /// The storage prefix resources live under, without a trailing slash.
    pub fn prefix(&self, config: &Config) -> String {
        match self {
            Self::Managed(m) => m.prefix.clone(),
            Self::File(_) => PREFIX.to_owned(),
            Self::Etcd { .. } => config.prefix(),
        }
    }

    /// Restores the cached snapshot, if any, and starts the watch (or applies the file)
    /// into the shared store; background tasks run on `workers` until `stop`.
    pub fn start(
        self,
        config: &Config,
        shared: &Shared,
        workers: &TaskTracker,
        stop: &CancellationToken,
    ) -> Running {
        let hooks = Hooks {
            metrics: shared.metrics.clone(),
            ..Hooks::default()
        };
        let store = &shared.store;
        match self {
            Self::File(resources) => {
                apply_file(store, resources, 1);
                Running {
                    kind: Source::File,
                    hooks,
                    etcd: None,
                    managed: None,
                }
            }
            Self::Etcd { client, cache } => {
                if let Some(cache) = cache {
                    let cache = Arc::new(cache);
                    cache::restore_into(&cache, store);
                    workers.spawn(cache::run_writer(cache, store.clone(), stop.clone()));
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
                workers.spawn(watcher.run(stop.clone()));
                Running {
                    kind: Source::Etcd,
                    hooks,
                    etcd: Some(client),
                    managed: None,
                }
            }
            Self::Managed(managed) => {
                shared.metrics.expect_managed_mode();
                let (hooks, status) = managed.start(shared, workers, stop, INITIAL_WATCH_IDLE);
                Running {
                    kind: Source::ControlPlane,
                    hooks,
                    etcd: None,
                    managed: Some(status),
                }
            }
        }
    }
}

/// Loads the resources file (file mode).
pub fn load_resources(config: &Config) -> anyhow::Result<ResourcesFile> {
    Ok(ResourcesFile::load(&resources_path(config), PREFIX)?)
}

pub fn resources_path(config: &Config) -> PathBuf {
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
            let config = certs::tls::plain_client_config_for(
                &ca,
                client.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
                tls.domain_name.as_deref(),
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

/// Applies a (re)loaded resources file as generation `generation` of the snapshot.
pub fn apply_file(store: &SnapshotStore, file: ResourcesFile, generation: i64) {
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
