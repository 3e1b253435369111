//! The budget gate: asked, after access checks and before dispatch, whether a caller
//! key may spend more. Managed mode implements it against the control plane; without
//! a gate every request is allowed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What [`BudgetGate::check`] returns.
pub type Check<'a> = Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>;

pub trait BudgetGate: Send + Sync {
    /// The verdict for the caller key `api_key_id` (the `api_keys` resource id). Must
    /// answer within its own bound: the request waits for it.
    fn check<'a>(&'a self, api_key_id: &'a str) -> Check<'a>;
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Allow,
    Deny(Arc<BudgetDenial>),
}

/// Why a request was refused; every field but `message` and `code` is optional because
/// a denial without budget state (a key that fails closed while the control plane is
/// unreachable) has none. Rendered inside the 429 `billing_error` error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetDenial {
    pub message: String,
    /// `budget_exceeded`, or `budget_unavailable` when no decision could be obtained
    /// and the key fails closed.
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_resets_at: Option<String>,
    /// Also sent as `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
}

impl BudgetDenial {
    /// A denial with no budget fields (callers fill in what they know).
    pub fn new(message: impl Into<String>, code: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: code.into(),
            scope: None,
            scope_ref: None,
            limit_usd: None,
            spent_usd: None,
            period: None,
            period_resets_at: None,
            retry_after_seconds: None,
        }
    }
}
