//! `GET /dp/budget_check?api_key_id=<id>`: the control plane's budget decision.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetAnswer {
    pub allow: bool,
    pub fail_mode: FailMode,
    /// How long the answer may be used; the gateway's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Why the key is refused (when `allow` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<BudgetReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetState>,
}

/// What the gateway does with a key when no fresh answer can be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    Open,
    Closed,
    Sticky,
}

/// A refusal, copied into the gateway's 429 `billing_error` envelope. Only `message`
/// and `code` are always present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetReason {
    /// `billing_error`.
    #[serde(rename = "type", default = "billing_error")]
    pub kind: String,
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub scope_ref: Option<String>,
    #[serde(default)]
    pub limit_usd: Option<f64>,
    #[serde(default)]
    pub spent_usd: Option<f64>,
    #[serde(default)]
    pub period: Option<String>,
    #[serde(default)]
    pub period_resets_at: Option<String>,
    #[serde(default)]
    pub retry_after_seconds: Option<u64>,
}

fn billing_error() -> String {
    "billing_error".to_owned()
}

/// The key's budget as the control plane counts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetState {
    pub limit_usd: f64,
    pub spent_usd: f64,
    pub remaining_usd: f64,
    /// Seconds until the period resets; `null` for a budget without periods.
    pub reset_seconds: Option<i64>,
    /// `daily`, `weekly`, `monthly` or `total` (what a refusal made by the gateway
    /// from these figures names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
}
