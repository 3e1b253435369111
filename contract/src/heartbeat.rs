//! `POST /dp/heartbeat`: what a gateway reports, and what the control plane answers.

use serde::{Deserialize, Serialize};

/// One heartbeat. The control plane requires `dp_id` (matching the certificate) and
/// `instance_id`; the other sections are reported by every agent and read leniently.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub dp_id: String,
    /// Random per process start: separates replicas sharing a certificate.
    pub instance_id: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub contract_version: u32,
    #[serde(default)]
    pub uptime_seconds: u64,
    #[serde(default)]
    pub config: ConfigStatus,
    #[serde(default)]
    pub rejected_resources: Vec<RejectedResource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
    #[serde(default)]
    pub models: Vec<ModelStatus>,
    #[serde(default)]
    pub usage_queue: UsageQueue,
}

/// Where the gateway's configuration stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// `control_plane`, `cache` or `none`.
    pub source: String,
    pub applied_revision: i64,
    pub config_hash: String,
    pub snapshot_age_seconds: Option<u64>,
    pub connected: bool,
}

/// A resource the gateway refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RejectedResource {
    pub key: String,
    pub kind: String,
    pub error: String,
    pub since_unix: u64,
    /// The previous good version is still served.
    pub serving_previous: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CertificateStatus {
    pub serial: String,
    pub not_after_unix: i64,
    pub days_left: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    pub id: String,
    pub name: String,
    /// 0 healthy, 1 degraded, 2 down.
    pub health: u8,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageQueue {
    pub pending: u64,
    pub dropped: u64,
}

/// The control plane's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    pub server_time_unix: i64,
    /// A new heartbeat interval, when the control plane sets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_secs: Option<u64>,
    /// Ask the gateway to rotate its certificate now.
    #[serde(default)]
    pub rotate_certificate: bool,
}
