//! `POST /dp/telemetry`: usage events in batches, idempotent by `event_id`.

use serde::{Deserialize, Serialize};

/// One batch. The agent sends events as it stored them (`E` = raw JSON); the control
/// plane reads each one as a [`UsageEvent`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch<E> {
    pub events: Vec<E>,
}

/// The usage of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// Unique per request, so replays are idempotent.
    pub event_id: String,
    #[serde(default)]
    pub request_id: String,
    /// The caller key's resource id (never the key).
    pub api_key_id: String,
    /// The alias the caller asked for.
    #[serde(default)]
    pub model: String,
    /// The provider of the model that served (or last failed) the request.
    #[serde(default)]
    pub provider: String,
    /// The direct model that served (or last failed) the request.
    #[serde(default)]
    pub served_by: String,
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    /// The parts of `prompt_tokens` read from and written to the provider's prompt
    /// cache.
    #[serde(default)]
    pub cache_read_tokens: u64,
    #[serde(default)]
    pub cache_write_tokens: u64,
    #[serde(default)]
    pub cost_usd: f64,
    #[serde(default)]
    pub status_code: u16,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub latency_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u64>,
    #[serde(default)]
    pub timestamp_unix_ms: u64,
    /// Set when a stream broke after it began: why (`stream_cut`, `stream_stalled`,
    /// `stream_truncated`, `stream_unreadable`, `upstream_stream_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Guardrail verdicts other than passes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guardrails: Vec<GuardrailVerdict>,
}

/// What one guardrail did to a request or its answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardrailVerdict {
    pub guardrail: String,
    #[serde(default)]
    pub kind: String,
    /// `input` or `output`.
    #[serde(default)]
    pub hook: String,
    /// `blocked`, `masked`, `monitored` or `bypassed`.
    pub outcome: String,
    /// What was found (a detector's label), never the text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub found: Vec<String>,
    /// Why the rule could not run (`bypassed`, or `blocked` failing closed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryAnswer {
    pub accepted: usize,
    pub duplicates: usize,
}
