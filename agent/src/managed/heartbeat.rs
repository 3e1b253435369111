//! `POST /dp/heartbeat`: at start, then every interval (the control plane may change
//! it) with ±10 % jitter; after a failure, retried with capped exponential backoff.
//! 403 and 404 mean the control plane has revoked or does not know this gateway: that
//! is logged as such, and the agent keeps serving its snapshot and keeps trying.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use certs::{CertInfo, GatewayIdentity};
use contract::CONTRACT_VERSION;
use contract::heartbeat::{
    self as wire, CertificateStatus, ConfigStatus, HeartbeatAnswer, ModelStatus, RejectedResource,
    UsageQueue,
};
use proxy_core::observe::metrics::Metrics;
use proxy_core::policy::health::ModelHealth;
use proxy_core::snapshot::SnapshotStore;
use reqwest::Method;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::client::{CpClient, CpError};
use super::usage::UsageQueueStatus;
use crate::backoff::{Backoff, BackoffPolicy};
use crate::watch::WatchStatus;

pub struct Heartbeat {
    pub cp: Arc<CpClient>,
    pub store: Arc<SnapshotStore>,
    pub health: Arc<ModelHealth>,
    pub watch: Arc<WatchStatus>,
    pub metrics: Arc<Metrics>,
    pub identity: GatewayIdentity,
    /// The certificate in use (replaced on rotation).
    pub certificate: Arc<ArcSwap<CertInfo>>,
    pub usage: Arc<UsageQueueStatus>,
    pub interval: Duration,
    /// Notified when a heartbeat answer asks for a certificate rotation.
    pub rotate: Arc<Notify>,
    pub backoff: BackoffPolicy,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

impl Heartbeat {
    fn body(&self, instance_id: &str, started: Instant) -> wire::Heartbeat {
        let snapshot = self.store.load();
        let freshness = self.store.freshness();
        let mut models: Vec<ModelStatus> = snapshot
            .models()
            .map(|m| ModelStatus {
                id: m.id.to_string(),
                name: m.name.to_string(),
                health: self.health.of(&snapshot, m).as_u8(),
            })
            .collect();
        models.sort_by(|a, b| a.name.cmp(&b.name));
        let cert = self.certificate.load();
        let now = time::OffsetDateTime::now_utc();
        let rejected_resources = self
            .store
            .rejected()
            .into_iter()
            .map(|r| RejectedResource {
                key: r.key,
                kind: r.kind.to_owned(),
                error: r.error,
                since_unix: r.since_unix,
                serving_previous: r.serving_previous,
            })
            .collect();
        wire::Heartbeat {
            dp_id: self.identity.dp_id.clone(),
            instance_id: instance_id.to_owned(),
            hostname: hostname(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            contract_version: CONTRACT_VERSION,
            uptime_seconds: started.elapsed().as_secs(),
            config: ConfigStatus {
                source: freshness.source.map_or("none", |s| s.as_str()).to_owned(),
                applied_revision: freshness.revision,
                config_hash: self.store.config_hash(),
                snapshot_age_seconds: freshness.age.map(|a| a.as_secs()),
                connected: self.watch.connected(),
            },
            rejected_resources,
            certificate: Some(CertificateStatus {
                serial: cert.serial.clone(),
                not_after_unix: cert.not_after.unix_timestamp(),
                days_left: cert.days_left(now),
            }),
            models,
            usage_queue: UsageQueue {
                pending: self.usage.pending(),
                dropped: self.usage.dropped(),
            },
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let instance_id = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let mut failures = Backoff::new(self.backoff);
        info!(instance_id, "heartbeats start");
        loop {
            let body = self.body(&instance_id, started);
            let wait = match self
                .cp
                .call(Method::POST, "/dp/heartbeat", Some(&body))
                .await
            {
                Ok(answer) => {
                    self.metrics.record_heartbeat("ok");
                    failures.reset();
                    match serde_json::from_value::<HeartbeatAnswer>(answer) {
                        Ok(answer) => self.accept(&answer),
                        Err(e) => warn!(error = %e, "heartbeat answer not understood; ignored"),
                    }
                    jittered(self.interval)
                }
                Err(e) => {
                    self.metrics.record_heartbeat(match &e {
                        CpError::Status { status: 403, .. } => "revoked",
                        CpError::Status { status: 404, .. } => "unknown_gateway",
                        _ => "failed",
                    });
                    match &e {
                        CpError::Status { status: 403, .. } => warn!(
                            error = %e,
                            "heartbeat refused: the control plane has revoked this gateway; serving the current snapshot"
                        ),
                        CpError::Status { status: 404, .. } => warn!(
                            error = %e,
                            "heartbeat refused: the control plane does not know this gateway; serving the current snapshot"
                        ),
                        _ => warn!(error = %e, "heartbeat failed; will retry"),
                    }
                    failures.next_delay().min(self.interval)
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn accept(&mut self, answer: &HeartbeatAnswer) {
        debug!(?answer, "heartbeat acknowledged");
        if let Some(secs) = answer.heartbeat_interval_secs.filter(|s| *s > 0) {
            let interval = Duration::from_secs(secs);
            if interval != self.interval {
                info!(
                    heartbeat_interval_secs = secs,
                    "the control plane set the heartbeat interval"
                );
                self.interval = interval;
            }
        }
        if answer.rotate_certificate {
            info!("the control plane asks for a certificate rotation");
            self.rotate.notify_one();
        }
    }
}

/// `interval` ± 10 %.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + fastrand::f64() * 0.2)
}
