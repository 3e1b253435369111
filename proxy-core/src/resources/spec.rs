//! Wire types: the JSON documents stored under `<prefix>/<kind>/<id>`, exactly as the
//! AISIX resource conventions name their fields. Validation lives in `validate.rs`.
//!
//! Unknown fields are tolerated (a newer control plane may add some) and collected in
//! `unknown`, so they can be counted and reported.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::secret::Secret;

#[derive(Debug, Deserialize)]
pub struct ProviderKeySpec {
    pub display_name: Option<String>,
    pub provider: Option<String>,
    pub adapter: Option<String>,
    pub api_base: Option<String>,
    pub api_key: Option<Secret>,
    pub secret: Option<Secret>,
    /// Azure OpenAI's `api-version`.
    pub api_version: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct ModelSpec {
    pub display_name: Option<String>,
    // Direct form.
    pub provider: Option<String>,
    pub model_name: Option<String>,
    pub provider_key_id: Option<String>,
    // Routing form.
    pub routing: Option<RoutingSpec>,
    // Shared.
    pub timeout: Option<u64>,
    pub stream_timeout: Option<u64>,
    pub retries: Option<u32>,
    pub allowed_cidrs: Option<Vec<String>>,
    pub rate_limit: Option<RateLimitSpec>,
    pub cost: Option<CostSpec>,
    pub cooldown: Option<CooldownSpec>,
    pub prompt_cache: Option<PromptCacheSpec>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct PromptCacheSpec {
    pub auto: Option<bool>,
    pub ttl: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct RoutingSpec {
    #[serde(default)]
    pub targets: Vec<TargetSpec>,
    pub strategy: Option<String>,
    pub retries: Option<u32>,
    pub max_fallbacks: Option<u32>,
    pub retry_on_429: Option<bool>,
    pub fallback_on_statuses: Option<Vec<u16>>,
    pub when_all_unavailable: Option<String>,
    pub resume_streams: Option<bool>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct TargetSpec {
    pub model: Option<String>,
    pub weight: Option<u32>,
    pub priority: Option<i32>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RateLimitSpec {
    pub rps: Option<u64>,
    pub rpm: Option<u64>,
    pub rph: Option<u64>,
    pub rpd: Option<u64>,
    pub tpm: Option<u64>,
    pub tpd: Option<u64>,
    pub concurrency: Option<u64>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct CostSpec {
    pub input_per_1k: Option<f64>,
    pub output_per_1k: Option<f64>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct CooldownSpec {
    pub enabled: Option<bool>,
    pub default_seconds: Option<u64>,
    pub max_seconds: Option<u64>,
    pub honor_retry_after: Option<bool>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct ApiKeySpec {
    pub key_hash: Option<String>,
    pub allowed_models: Option<Vec<String>>,
    #[serde(default)]
    pub disabled: bool,
    pub expires_at: Option<String>,
    pub rate_limit: Option<RateLimitSpec>,
    pub display_name: Option<String>,
    pub team_id: Option<String>,
    pub user_id: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct GuardrailSpec {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub patterns: Option<Vec<PatternSpec>>,
    pub hook_point: Option<String>,
    pub enabled: Option<bool>,
    pub enforcement_mode: Option<String>,
    pub fail_open: Option<bool>,
    pub output_fail_open: Option<bool>,
    pub mandatory: Option<bool>,
    pub timeout_ms: Option<u64>,
    /// RFC 3339 text or Unix seconds: the evaluation order (oldest first).
    pub created_at: Option<Value>,
    /// An attachment hint only (`hook_point` governs); accepted and not used.
    pub direction: Option<String>,
    pub stream_processing_mode: Option<String>,
    pub window_size: Option<u64>,
    pub window_overlap_size: Option<u64>,
    pub max_buffer_bytes: Option<u64>,
    pub on_buffer_exceeded: Option<String>,
    /// `pii`: built-in detectors, custom patterns and the action of both by default.
    pub detectors: Option<Vec<PiiDetectorSpec>>,
    pub custom_patterns: Option<Vec<CustomPatternSpec>>,
    pub default_action: Option<String>,
    /// Remote detectors: where they are and how they answer.
    pub endpoint: Option<String>,
    pub api_key: Option<Secret>,
    /// `presidio`.
    pub analyzer_url: Option<String>,
    pub anonymizer_url: Option<String>,
    pub entities: Option<Vec<PiiDetectorSpec>>,
    pub language: Option<String>,
    pub score_threshold: Option<f64>,
    pub operator: Option<String>,
    /// `openai_moderation`.
    pub model: Option<String>,
    pub category_thresholds: Option<BTreeMap<String, f64>>,
    /// `lakera`.
    pub project_id: Option<String>,
    /// `azure_content_safety_text_moderation`.
    pub categories: Option<Vec<String>>,
    pub blocklist_names: Option<Vec<String>>,
    pub halt_on_blocklist_hit: Option<bool>,
    pub output_type: Option<String>,
    pub severity_threshold: Option<u32>,
    pub severity_threshold_by_category: Option<BTreeMap<String, u32>>,
    pub text_source: Option<String>,
    /// `bedrock`.
    pub guardrail_id: Option<String>,
    pub guardrail_version: Option<String>,
    pub region: Option<String>,
    pub aws_credentials: Option<AwsCredentialsSpec>,
    pub latency_mode: Option<LatencyModeSpec>,
    /// Scope: model display names (globs allowed) and caller key ids; empty means all.
    pub models: Option<Vec<String>>,
    pub api_keys: Option<Vec<String>>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct AwsCredentialsSpec {
    pub kind: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
}

#[derive(Debug, Deserialize)]
pub struct LatencyModeSpec {
    pub kind: Option<String>,
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct PiiDetectorSpec {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub action: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct CustomPatternSpec {
    pub name: Option<String>,
    pub regex: Option<String>,
    pub action: Option<String>,
    pub replacement: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// A `guardrail_attachments` document: which requests a guardrail applies to.
#[derive(Debug, Deserialize)]
pub struct AttachmentSpec {
    pub guardrail_id: Option<String>,
    pub scope_type: Option<String>,
    pub scope_id: Option<String>,
    pub priority: Option<i64>,
    pub enabled: Option<bool>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct PatternSpec {
    pub kind: Option<String>,
    pub value: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}
