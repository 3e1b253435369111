//! agent: the AISIX edge agent process.
//!
//! `main` parses the command line and the config file, loads the resources file,
//! binds the proxy listener, and calls [`run`], which serves until shutdown:
//! SIGHUP reloads the resources file; SIGTERM/SIGINT starts a drain (liveness fails,
//! requests keep being served for `min_drain_secs`, then the listener closes and
//! in-flight requests get `drain_timeout_secs` to finish).
//!
//! Layout:
//! - `config`: the config file, environment overrides and their validation.
//! - `resources_file`: file mode's YAML resources document.
//! - `logging`: tracing setup (text or JSON).

pub mod backoff;
pub mod cache;
pub mod config;
pub mod etcd;
pub mod logging;
pub mod resources_file;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proxy_core::http::{ProxyOptions, ProxyState, router, serve};
use proxy_core::snapshot::{SnapshotStore, Source, SourceEvent};
use proxy_core::upstream::Upstream;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::resources_file::ResourcesFile;

/// The key prefix resources live under.
pub const PREFIX: &str = "/aisix";

/// Signals from the outside world.
#[derive(Clone, Default)]
pub struct Controls {
    /// Cancelled to begin a graceful shutdown.
    pub shutdown: CancellationToken,
    /// Notified to reload the resources file.
    pub reload: Arc<Notify>,
}

/// Everything `run` needs that `main` prepared and validated.
pub struct Prepared {
    pub config: Config,
    pub resources: ResourcesFile,
    pub proxy_listener: TcpListener,
}

/// Loads the resources file once, before any port is bound, so a broken file stops
/// start-up with a clear message.
pub fn prepare_resources(config: &Config) -> anyhow::Result<ResourcesFile> {
    let path = resources_path(config);
    Ok(ResourcesFile::load(&path, PREFIX)?)
}

fn resources_path(config: &Config) -> PathBuf {
    config.resources_file.clone().unwrap_or_default()
}

/// Serves until `controls.shutdown` is cancelled and the drain has finished.
pub async fn run(prepared: Prepared, controls: Controls) -> anyhow::Result<()> {
    let Prepared {
        config,
        resources,
        proxy_listener,
    } = prepared;
    for section in &config.ignored {
        warn!(
            section,
            "config section is not implemented by this build; ignored"
        );
    }
    let store = Arc::new(SnapshotStore::new(PREFIX));
    let mut generation = 1;
    apply_file(&store, resources, generation);

    let draining = CancellationToken::new();
    let stop = CancellationToken::new();
    let options = ProxyOptions {
        body_limit: match config.proxy.request_body_limit_bytes {
            0 => None,
            n => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        },
        request_id_headers: config.request_id_headers(),
        access_log: config.observability.access_log,
    };
    let state = ProxyState::new(store.clone(), Upstream::new()?, options, draining.clone());
    let addr = proxy_listener.local_addr()?;
    let tasks = TaskTracker::new();
    let server = tasks.spawn(serve(proxy_listener, router(state), stop.clone()));
    info!(addr = %addr, "proxy listener ready");

    let path = resources_path(&config);
    loop {
        tokio::select! {
            () = controls.reload.notified() => {
                generation += 1;
                match ResourcesFile::load(&path, PREFIX) {
                    Ok(file) => apply_file(&store, file, generation),
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
    tasks.close();
    let grace = Duration::from_secs(config.shutdown.drain_timeout_secs);
    match tokio::time::timeout(grace, server).await {
        Ok(Ok(Ok(()))) => info!("shutdown: all requests finished"),
        Ok(Ok(Err(e))) => error!(error = %e, "proxy listener failed"),
        Ok(Err(e)) => error!(error = %e, "proxy listener task failed"),
        Err(_) => warn!(
            drain_timeout_secs = grace.as_secs(),
            "shutdown: drain timeout reached; closing remaining connections"
        ),
    }
    Ok(())
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
