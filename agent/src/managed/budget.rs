//! Budget decisions from the control plane (`GET /dp/budget_check`), as the proxy's
//! [`BudgetGate`].
//!
//! Per caller key: an answer is used for its `ttl_seconds`; one request at a time asks
//! for a key (concurrent lookups wait for it and share its answer); each ask is
//! bounded by `managed.budget.timeout_ms`. When the control plane fails, the last answer
//! keeps being used for `stale_window_secs` past its TTL, then its `fail_mode` decides:
//! `open` allows, `closed` refuses, `sticky` repeats the last answer. A key never
//! answered for follows `default_fail_mode`. After a failure the control plane is not
//! asked again for that key for [`RETRY_HOLD`], so an outage costs each key at most one
//! timeout per hold instead of one per request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use contract::budget::{BudgetAnswer, BudgetReason, FailMode};
use proxy_core::hooks::{BudgetDenial, BudgetGate, Check, Verdict};
use proxy_core::observe::metrics::Metrics;
use tokio::time::Instant;
use tracing::{info, warn};

use super::client::{CpClient, CpError};
use crate::config::{BudgetSection, DefaultFailMode};

/// How long after a failed ask a key is not asked again.
pub const RETRY_HOLD: Duration = Duration::from_secs(1);
/// Used when an answer carries no `ttl_seconds`.
const DEFAULT_TTL: Duration = Duration::from_secs(5);
/// The retry hint of a refusal made without budget state (closed, control plane away).
const UNAVAILABLE_RETRY_SECONDS: u64 = 5;

/// One answer of `/dp/budget_check`, as kept.
#[derive(Debug, Clone)]
struct Answer {
    verdict: Verdict,
    fail_mode: FailMode,
    ttl: Duration,
    at: Instant,
}

#[derive(Debug, Default)]
struct Entry {
    answer: Option<Answer>,
    failed_at: Option<Instant>,
}

pub struct BudgetChecker {
    cp: Arc<CpClient>,
    options: BudgetSection,
    keys: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<Entry>>>>,
    /// Whether the last ask failed (to log outages once, not per request).
    failing: AtomicBool,
    metrics: Arc<Metrics>,
}

impl BudgetChecker {
    pub fn new(cp: Arc<CpClient>, options: BudgetSection, metrics: Arc<Metrics>) -> Self {
        Self {
            cp,
            options,
            keys: Mutex::default(),
            failing: AtomicBool::new(false),
            metrics,
        }
    }

    async fn verdict(&self, api_key_id: &str) -> Verdict {
        let slot = {
            let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
            match keys.get(api_key_id) {
                Some(slot) => slot.clone(),
                None => keys.entry(api_key_id.into()).or_default().clone(),
            }
        };
        // Held across the ask: this is the single flight.
        let mut entry = slot.lock().await;
        let now = Instant::now();
        if let Some(answer) = &entry.answer
            && now.duration_since(answer.at) < answer.ttl
        {
            return answer.verdict.clone();
        }
        let held = entry
            .failed_at
            .is_some_and(|at| now.duration_since(at) < RETRY_HOLD);
        if !held {
            match self.ask(api_key_id).await {
                Ok(answer) => {
                    let verdict = answer.verdict.clone();
                    self.metrics.record_budget_check(match verdict {
                        Verdict::Allow => "allowed",
                        Verdict::Deny(_) => "denied",
                    });
                    entry.answer = Some(answer);
                    entry.failed_at = None;
                    if self.failing.swap(false, Ordering::Relaxed) {
                        info!("budget checks answered again");
                    }
                    return verdict;
                }
                Err(e) => {
                    self.metrics.record_budget_check("failed");
                    entry.failed_at = Some(Instant::now());
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        warn!(error = %e, "budget check failed; using cached decisions, then fail modes");
                    }
                }
            }
        }
        fallback(&self.options, entry.answer.as_ref(), now)
    }

    async fn ask(&self, api_key_id: &str) -> Result<Answer, CpError> {
        let timeout = Duration::from_millis(self.options.timeout_ms);
        let value = self
            .cp
            .get("/dp/budget_check", &[("api_key_id", api_key_id)], timeout)
            .await?;
        let wire: BudgetAnswer =
            serde_json::from_value(value).map_err(|e| CpError::Malformed(e.to_string()))?;
        Ok(answer(wire, api_key_id, Instant::now()))
    }
}

fn answer(wire: BudgetAnswer, api_key_id: &str, at: Instant) -> Answer {
    let verdict = if wire.allow {
        Verdict::Allow
    } else {
        let denial = wire.reason.map(denial).unwrap_or_else(|| BudgetDenial {
            scope: Some("api_key".to_owned()),
            scope_ref: Some(api_key_id.to_owned()),
            ..BudgetDenial::new(
                format!("Budget exceeded for API key {api_key_id}."),
                "budget_exceeded",
            )
        });
        Verdict::Deny(Arc::new(denial))
    };
    Answer {
        verdict,
        fail_mode: wire.fail_mode,
        ttl: wire.ttl_seconds.map_or(DEFAULT_TTL, Duration::from_secs),
        at,
    }
}

/// The decision when the control plane could not answer now.
/// The proxy's denial from the control plane's reason: every field carried over.
fn denial(reason: BudgetReason) -> BudgetDenial {
    BudgetDenial {
        message: reason.message,
        code: reason.code,
        scope: reason.scope,
        scope_ref: reason.scope_ref,
        limit_usd: reason.limit_usd,
        spent_usd: reason.spent_usd,
        period: reason.period,
        period_resets_at: reason.period_resets_at,
        retry_after_seconds: reason.retry_after_seconds,
    }
}

fn fallback(options: &BudgetSection, last: Option<&Answer>, now: Instant) -> Verdict {
    let Some(last) = last else {
        return match options.default_fail_mode {
            DefaultFailMode::Open => Verdict::Allow,
            DefaultFailMode::Closed => unavailable(),
        };
    };
    let stale_window = Duration::from_secs(options.stale_window_secs);
    if now.duration_since(last.at) < last.ttl + stale_window {
        return last.verdict.clone();
    }
    match last.fail_mode {
        FailMode::Open => Verdict::Allow,
        FailMode::Closed => unavailable(),
        FailMode::Sticky => last.verdict.clone(),
    }
}

fn unavailable() -> Verdict {
    Verdict::Deny(Arc::new(BudgetDenial {
        retry_after_seconds: Some(UNAVAILABLE_RETRY_SECONDS),
        ..BudgetDenial::new(
            "No budget decision is available for this API key (the control plane cannot be reached) and its budget fails closed.",
            "budget_unavailable",
        )
    }))
}

impl BudgetGate for BudgetChecker {
    fn check<'a>(&'a self, api_key_id: &'a str) -> Check<'a> {
        Box::pin(self.verdict(api_key_id))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn wire(allow: bool, fail_mode: FailMode) -> BudgetAnswer {
        serde_json::from_value(serde_json::json!({
            "allow": allow,
            "fail_mode": fail_mode,
            "ttl_seconds": 2,
            "reason": if allow { serde_json::Value::Null } else { serde_json::json!({
                "type": "billing_error", "code": "budget_exceeded", "message": "over",
                "scope": "api_key", "scope_ref": "k", "limit_usd": 1.0, "spent_usd": 2.0,
                "period": "daily", "period_resets_at": "2026-11-22T00:00:00Z",
                "retry_after_seconds": 60
            })},
        }))
        .unwrap()
    }

    fn decide(default: DefaultFailMode, last: Option<&Answer>, now: Instant) -> Verdict {
        let options = BudgetSection {
            default_fail_mode: default,
            timeout_ms: 100,
            stale_window_secs: 10,
        };
        fallback(&options, last, now)
    }

    #[test]
    fn a_denial_keeps_every_field_of_the_reason() {
        let a = answer(wire(false, FailMode::Closed), "k", Instant::now());
        let Verdict::Deny(denial) = a.verdict else {
            panic!("allowed")
        };
        assert_eq!(denial.limit_usd, Some(1.0));
        assert_eq!(denial.spent_usd, Some(2.0));
        assert_eq!(denial.period.as_deref(), Some("daily"));
        assert_eq!(denial.retry_after_seconds, Some(60));
        assert_eq!(a.ttl, Duration::from_secs(2));
    }

    #[test]
    fn without_an_answer_the_stale_window_then_the_fail_mode_decides() {
        let at = Instant::now();
        let later = |secs| at + Duration::from_secs(secs);
        let open = answer(wire(true, FailMode::Closed), "k", at);
        // Within TTL + stale window (2 + 10 s): the last answer.
        assert_eq!(
            decide(DefaultFailMode::Open, Some(&open), later(11)),
            Verdict::Allow
        );
        // Past it: closed refuses without budget state.
        let Verdict::Deny(d) = decide(DefaultFailMode::Open, Some(&open), later(13)) else {
            panic!("allowed")
        };
        assert_eq!(d.code, "budget_unavailable");
        // Sticky repeats the last answer, open allows.
        let denied = answer(wire(false, FailMode::Sticky), "k", at);
        assert!(matches!(
            decide(DefaultFailMode::Open, Some(&denied), later(60)),
            Verdict::Deny(d) if d.code == "budget_exceeded"
        ));
        let denied_open = answer(wire(false, FailMode::Open), "k", at);
        assert_eq!(
            decide(DefaultFailMode::Closed, Some(&denied_open), later(60)),
            Verdict::Allow
        );
        // Never answered: the configured default.
        assert_eq!(decide(DefaultFailMode::Open, None, at), Verdict::Allow);
        assert!(matches!(
            decide(DefaultFailMode::Closed, None, at),
            Verdict::Deny(_)
        ));
    }
}
