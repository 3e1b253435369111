//! The usage hook: one [`UsageEvent`] per dispatched request, handed to a
//! [`UsageSink`] when the request completes. Managed mode queues them durably for the
//! control plane.

use serde::{Deserialize, Serialize};

pub trait UsageSink: Send + Sync {
    /// Takes one event; must not block the caller (it runs on the request path).
    fn record(&self, event: UsageEvent);
}

/// The control plane's `UsageEvent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// Unique per request, so replays are idempotent.
    pub event_id: String,
    pub request_id: String,
    pub api_key_id: String,
    /// The alias the caller asked for.
    pub model: String,
    /// The provider of the model that served (or last failed) the request.
    pub provider: String,
    /// The direct model that served (or last failed) the request.
    pub served_by: String,
    /// Every input token, the cached ones included.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The parts of `prompt_tokens` read from and written to the provider's prompt
    /// cache.
    #[serde(default)]
    pub cache_read_tokens: u64,
    #[serde(default)]
    pub cache_write_tokens: u64,
    pub cost_usd: f64,
    pub status_code: u16,
    pub stream: bool,
    pub latency_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u64>,
    pub timestamp_unix_ms: u64,
    /// Set when a stream broke after it began: the break's code (`stream_cut`,
    /// `stream_stalled`, `stream_truncated`, `stream_unreadable`,
    /// `upstream_stream_error`); the tokens are what did stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// What guardrails did to the request and its answer (passes are not listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guardrails: Vec<GuardrailVerdict>,
}

/// One guardrail's verdict on a request that was not a plain pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardrailVerdict {
    pub guardrail: String,
    pub kind: String,
    /// `input` or `output`.
    pub hook: String,
    /// `blocked`, `masked`, `monitored` (a monitor rule found something: it would
    /// have blocked or masked) or `bypassed` (the rule could not run and fails open).
    pub outcome: String,
    /// What was found (`keyword`, `EMAIL`, a custom pattern's name), never the text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub found: Vec<String>,
    /// Why the rule could not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
