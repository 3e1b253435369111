//! The metrics and status listener (`observability.metrics.prometheus`).
//!
//! - `GET <path>` (default `/metrics`): every metric of [`proxy_core::observe::metrics`], in the
//!   OpenMetrics text format.
//! - `GET /status/config`: where the configuration comes from, whether the source is
//!   connected, the applied revision, the config hash, resource counts, rejected
//!   resources with their reasons, ignored config sections, and the Redis connections
//!   of the shared rate limits and cache (connected, failures, last error). JSON.
//! - `GET /status/ready`: 200 when a configuration is loaded and the process is not
//!   draining, else 503; JSON saying which.
//! - `GET /livez`: as on the proxy listener.
//!
//! Nothing here needs a key: put this listener on a private address. No secret is ever
//! part of an answer (the config hash is a digest, rejections name keys and reasons).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use proxy_core::observe::metrics::{CONTENT_TYPE, Readings};
use proxy_core::observe::otlp_metrics::PushStats;
use proxy_core::observe::trace::Tracing;
use proxy_core::resources::ModelTarget;
use proxy_core::shared::redis::{Redis, RedisStatus};
use proxy_core::snapshot::{RejectedResource, Snapshot, Source};
use serde::Serialize;
use std::sync::atomic::Ordering;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::managed::ManagedStatus;

pub struct Status {
    pub shared: Shared,
    /// The configured source (what `/status/config` reports before anything loaded).
    pub source: Source,
    pub managed: Option<ManagedStatus>,
    pub draining: CancellationToken,
    /// Config sections accepted but not implemented by this build.
    pub ignored: Vec<String>,
    /// The Redis connections of the shared rate limits and cache.
    pub redis: Vec<Redis>,
    /// The span exporter, when tracing is on.
    pub tracing: Option<Tracing>,
    /// The OTLP metrics pushes, when on.
    pub metrics_push: Option<Arc<PushStats>>,
    pub serving: ServingModel,
}

/// How the proxy listener is served (`proxy.thread_per_core`, `proxy.workers`).
#[derive(Serialize, Clone, Copy)]
pub struct ServingModel {
    /// Each worker a thread with its own runtime, socket and upstream pool.
    pub thread_per_core: bool,
    /// Worker threads (of the shared runtime, or one per socket).
    pub workers: usize,
}

pub fn router(status: Arc<Status>, metrics_path: &str) -> Router {
    Router::new()
        .route(metrics_path, get(metrics))
        .route("/status/config", get(config))
        .route("/status/ready", get(ready))
        .route(
            "/livez",
            get(
                |State(s): State<Arc<Status>>, Query(q): Query<HashMap<String, String>>| async move {
                    proxy_core::http::livez_response(s.draining.is_cancelled(), &q)
                },
            ),
        )
        .with_state(status)
}

impl Status {
    /// The watch state; `None` in file mode, which has nothing to connect to.
    fn connected(&self) -> Option<bool> {
        (self.source != Source::File).then(|| self.shared.watch.connected())
    }

    /// The metrics exposition, as served and as pushed over OTLP.
    pub fn render(&self) -> String {
        self.shared.metrics.render(self.readings())
    }

    /// Each (model, target) pair: a direct model is its own target.
    fn deployments(&self, snapshot: &Snapshot) -> Vec<(Arc<str>, Arc<str>, u8)> {
        let health = &self.shared.health;
        let mut out = Vec::new();
        for model in snapshot.models() {
            match &model.target {
                ModelTarget::Direct(_) => out.push((
                    model.name.clone(),
                    model.name.clone(),
                    health.direct(&model.name).as_u8(),
                )),
                ModelTarget::Routing(routing) => {
                    for target in &routing.targets {
                        if let Some(direct) = snapshot.model(&target.model) {
                            let state = health.direct(&direct.name).as_u8();
                            out.push((model.name.clone(), direct.name.clone(), state));
                        }
                    }
                }
            }
        }
        out
    }

    fn readings(&self) -> Readings {
        let store = &self.shared.store;
        let snapshot = store.load();
        self.shared.metrics.expect_models(
            snapshot
                .models()
                .filter(|m| matches!(m.target, ModelTarget::Direct(_)))
                .map(|m| &m.name),
        );
        let freshness = store.freshness();
        let now = time::OffsetDateTime::now_utc();
        Readings {
            source: freshness.source.map(Source::as_str),
            connected: self.connected(),
            revision: freshness.revision,
            age: freshness.age,
            applies: store.applies(),
            rejected: snapshot.rejections().count() as u64,
            resources: Resources::of(&snapshot).by_kind(),
            model_health: snapshot
                .models()
                .map(|m| (m.name.clone(), self.shared.health.of(&snapshot, m).as_u8()))
                .collect(),
            deployment_state: self.deployments(&snapshot),
            certificate_remaining_days: self.managed.as_ref().map(|m| {
                let remaining = m.certificate.load().not_after - now;
                remaining.as_seconds_f64() / 86_400.0
            }),
            usage_queue: self
                .managed
                .as_ref()
                .map(|m| (m.usage.pending(), m.usage.dropped(), m.usage.emitted())),
            redis: self.redis.iter().map(Redis::status).collect(),
            otlp: self.tracing.as_ref().map(|t| t.stats().reading()),
            metric_pushes: self.metrics_push.as_ref().map(|p| {
                (
                    p.pushed.load(Ordering::Relaxed),
                    p.failed.load(Ordering::Relaxed),
                )
            }),
        }
    }
}

async fn metrics(State(status): State<Arc<Status>>) -> Response {
    let text = status.render();
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

#[derive(Serialize)]
struct ConfigStatus {
    /// `file`, `etcd` or `control_plane`.
    source: Source,
    /// What the serving snapshot was last loaded from (`cache` after an offline start).
    loaded_from: Option<Source>,
    connected: Option<bool>,
    applied_revision: i64,
    snapshot_age_seconds: Option<f64>,
    config_hash: String,
    resources: Resources,
    rejected_resources: Vec<RejectedResource>,
    /// Config keys accepted but not acted on by this build, each with why.
    ignored: Vec<String>,
    serving: ServingModel,
    /// The shared rate limits' and cache's Redis connections; absent when neither
    /// uses Redis.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    redis: Vec<RedisStatus>,
    /// The span exporter; absent when tracing is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    tracing: Option<TracingStatus>,
    /// File mode: the last SIGHUP reload (absent before the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    last_reload: Option<crate::Reload>,
}

#[derive(Serialize)]
struct TracingStatus {
    endpoint: String,
    spans_exported: u64,
    spans_dropped_queue_full: u64,
    spans_dropped_export_failed: u64,
    last_error: Option<String>,
}

/// Resources in the snapshot, by kind.
#[derive(Serialize)]
struct Resources {
    provider_keys: usize,
    models: usize,
    api_keys: usize,
    guardrails: usize,
    guardrail_attachments: usize,
}

impl Resources {
    fn of(snapshot: &Snapshot) -> Self {
        let (provider_keys, models, api_keys) = snapshot.counts();
        Self {
            provider_keys,
            models,
            api_keys,
            guardrails: snapshot.guardrails().count(),
            guardrail_attachments: snapshot.attachment_count(),
        }
    }

    fn by_kind(&self) -> Vec<(&'static str, u64)> {
        [
            ("provider_keys", self.provider_keys),
            ("models", self.models),
            ("api_keys", self.api_keys),
            ("guardrails", self.guardrails),
            ("guardrail_attachments", self.guardrail_attachments),
        ]
        .into_iter()
        .map(|(kind, n)| (kind, n as u64))
        .collect()
    }
}

async fn config(State(status): State<Arc<Status>>) -> Json<ConfigStatus> {
    let store = &status.shared.store;
    let snapshot = store.load();
    let freshness = store.freshness();
    Json(ConfigStatus {
        source: status.source,
        loaded_from: freshness.source,
        connected: status.connected(),
        applied_revision: freshness.revision,
        snapshot_age_seconds: freshness.age.map(|a| a.as_secs_f64()),
        config_hash: store.config_hash(),
        resources: Resources::of(&snapshot),
        rejected_resources: store.rejected(),
        ignored: status.ignored.clone(),
        serving: status.serving,
        redis: status.redis.iter().map(Redis::status).collect(),
        tracing: status.tracing.as_ref().map(|t| {
            let counts = t.stats().reading();
            TracingStatus {
                endpoint: t.endpoint().to_owned(),
                spans_exported: counts.exported,
                spans_dropped_queue_full: counts.queue_full,
                spans_dropped_export_failed: counts.export_failed,
                last_error: t.stats().last_error(),
            }
        }),
        last_reload: (status.shared.last_reload.lock())
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone(),
    })
}

#[derive(Serialize)]
struct ReadyStatus {
    ready: bool,
    config_loaded: bool,
    draining: bool,
}

async fn ready(State(status): State<Arc<Status>>) -> Response {
    let config_loaded = status.shared.store.freshness().source.is_some();
    let draining = status.draining.is_cancelled();
    let ready = config_loaded && !draining;
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(ReadyStatus {
            ready,
            config_loaded,
            draining,
        }),
    )
        .into_response()
}
