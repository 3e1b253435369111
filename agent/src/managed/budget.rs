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
//!
//! Spend is counted here between checks: the cost of each answer served is added to
//! the control plane's figure (less what the control plane has counted since), and a
//! key whose budget that reaches is refused at once, whatever the answer's TTL. So a
//! budget is overshot by at most the requests in flight when it is crossed (one for a
//! sequential client) and what other replicas served since their last check.
//!
//! Each answer is kept beside the usage queue, so after a restart with the control
//! plane away a key keeps its last answer and then its own fail mode.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use contract::budget::{BudgetAnswer, BudgetReason, BudgetState, FailMode};
use proxy_core::hooks::{BudgetDenial, BudgetGate, Check, UsageEvent, UsageSink, Verdict};
use proxy_core::observe::metrics::Metrics;
use tokio::time::Instant;
use tracing::{info, warn};

use super::client::{CpClient, CpError};
use super::usage::UsageQueue;
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
    /// The key's budget as the control plane counted it.
    budget: Option<BudgetState>,
}

/// An answer as kept on disk: what the control plane said, and when.
#[derive(serde::Serialize, serde::Deserialize)]
struct Kept {
    answer: BudgetAnswer,
    at_unix_ms: u64,
}

/// A key's spend served here that the control plane has not counted yet.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Ledger {
    uncounted_usd: f64,
    /// The control plane's figure in its last answer.
    counted_usd: Option<f64>,
}

impl Ledger {
    fn charge(&mut self, usd: f64) {
        if usd.is_finite() && usd > 0.0 {
            self.uncounted_usd += usd;
        }
    }

    /// A new answer: what the control plane's figure grew by since the last one is
    /// taken as counted (a figure that fell is a new period: nothing is uncounted).
    fn answered(&mut self, state: &BudgetState) {
        match self.counted_usd {
            Some(before) if state.spent_usd < before => self.uncounted_usd = 0.0,
            Some(before) => {
                self.uncounted_usd = (self.uncounted_usd - (state.spent_usd - before)).max(0.0);
            }
            None => {}
        }
        self.counted_usd = Some(state.spent_usd);
    }

    /// The spend the key is at: the control plane's figure and what it has not seen.
    fn spent(&self, state: &BudgetState) -> f64 {
        state.spent_usd + self.uncounted_usd
    }
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
    /// Spend served since the control plane's last figure, per key.
    ledgers: Mutex<HashMap<Arc<str>, Ledger>>,
    /// Where answers are kept across restarts.
    queue: Arc<UsageQueue>,
    /// Whether the last ask failed (to log outages once, not per request).
    failing: AtomicBool,
    metrics: Arc<Metrics>,
}

impl BudgetChecker {
    /// The checker, with the answers an earlier run kept beside `queue`.
    pub fn new(
        cp: Arc<CpClient>,
        options: BudgetSection,
        metrics: Arc<Metrics>,
        queue: Arc<UsageQueue>,
    ) -> Self {
        let (now, now_unix) = (Instant::now(), unix_ms());
        let mut keys = HashMap::new();
        for (api_key_id, bytes) in queue.kept_decisions() {
            let Ok(kept) = serde_json::from_slice::<Kept>(&bytes) else {
                continue;
            };
            let age = Duration::from_millis(now_unix.saturating_sub(kept.at_unix_ms));
            let Some(at) = now.checked_sub(age) else {
                continue;
            };
            let entry = Entry {
                answer: Some(answer(kept.answer, &api_key_id, at)),
                failed_at: None,
            };
            keys.insert(
                Arc::from(api_key_id),
                Arc::new(tokio::sync::Mutex::new(entry)),
            );
        }
        if !keys.is_empty() {
            info!(
                keys = keys.len(),
                "budget decisions restored from the state directory"
            );
        }
        Self {
            cp,
            options,
            keys: Mutex::new(keys),
            ledgers: Mutex::default(),
            queue,
            failing: AtomicBool::new(false),
            metrics,
        }
    }

    /// Counts an answer served to `api_key_id` against its budget.
    fn charge(&self, api_key_id: &str, usd: f64) {
        let mut ledgers = self.ledgers.lock().unwrap_or_else(PoisonError::into_inner);
        match ledgers.get_mut(api_key_id) {
            Some(ledger) => ledger.charge(usd),
            None => ledgers.entry(api_key_id.into()).or_default().charge(usd),
        }
    }

    /// `verdict`, taken from `answer`, refused when the spend served since has used up
    /// the budget the answer reported.
    fn counted(&self, api_key_id: &str, answer: &Answer, verdict: Verdict) -> Verdict {
        let (Verdict::Allow, Some(state)) = (&verdict, &answer.budget) else {
            return verdict;
        };
        let ledger = (self.ledgers.lock().unwrap_or_else(PoisonError::into_inner))
            .get(api_key_id)
            .copied()
            .unwrap_or_default();
        let spent = ledger.spent(state);
        if spent < state.limit_usd {
            return verdict;
        }
        let since = answer.at.elapsed().as_secs() as i64;
        Verdict::Deny(Arc::new(spent_here(api_key_id, state, spent, since)))
    }

    /// A fresh answer: the ledger takes the new figure, and the answer is kept.
    fn answered(&self, api_key_id: &str, wire: &BudgetAnswer) {
        if let Some(state) = &wire.budget {
            let mut ledgers = self.ledgers.lock().unwrap_or_else(PoisonError::into_inner);
            ledgers
                .entry(api_key_id.into())
                .or_default()
                .answered(state);
        }
        let kept = Kept {
            answer: wire.clone(),
            at_unix_ms: unix_ms(),
        };
        if let Ok(bytes) = serde_json::to_vec(&kept) {
            self.queue.keep_decision(api_key_id, &bytes);
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
            return self.counted(api_key_id, answer, answer.verdict.clone());
        }
        let held = entry
            .failed_at
            .is_some_and(|at| now.duration_since(at) < RETRY_HOLD);
        if !held {
            match self.ask(api_key_id).await {
                Ok(wire) => {
                    self.answered(api_key_id, &wire);
                    let answer = answer(wire, api_key_id, Instant::now());
                    self.metrics.record_budget_check(match answer.verdict {
                        Verdict::Allow => "allowed",
                        Verdict::Deny(_) => "denied",
                    });
                    let verdict = self.counted(api_key_id, &answer, answer.verdict.clone());
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
        match (
            fallback(&self.options, entry.answer.as_ref(), now),
            &entry.answer,
        ) {
            (Some(decided), _) => decided,
            (None, Some(last)) => self.counted(api_key_id, last, last.verdict.clone()),
            (None, None) => unavailable(),
        }
    }

    async fn ask(&self, api_key_id: &str) -> Result<BudgetAnswer, CpError> {
        let timeout = Duration::from_millis(self.options.timeout_ms);
        let value = self
            .cp
            .get("/dp/budget_check", &[("api_key_id", api_key_id)], timeout)
            .await?;
        serde_json::from_value(value).map_err(|e| CpError::Malformed(e.to_string()))
    }
}

/// The refusal of a key whose spend here reached its budget before the control plane
/// said so: the control plane's figures with the spend it has not counted yet.
fn spent_here(api_key_id: &str, state: &BudgetState, spent: f64, since: i64) -> BudgetDenial {
    let reset = state.reset_seconds.map(|s| (s - since).max(1));
    let resets_at = reset.and_then(|s| {
        (time::OffsetDateTime::now_utc() + time::Duration::seconds(s))
            .format(&time::format_description::well_known::Rfc3339)
            .ok()
    });
    let spent = (spent * 1e6).round() / 1e6;
    BudgetDenial {
        scope: Some("api_key".to_owned()),
        scope_ref: Some(api_key_id.to_owned()),
        limit_usd: Some(state.limit_usd),
        spent_usd: Some(spent),
        period: state.period.clone(),
        period_resets_at: resets_at,
        retry_after_seconds: reset.and_then(|s| u64::try_from(s).ok()),
        ..BudgetDenial::new(
            format!(
                "Budget exceeded for API key {api_key_id}: spent ${spent} of ${} (counted by this gateway since the control plane's last figure).",
                state.limit_usd
            ),
            "budget_exceeded",
        )
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Managed mode's usage sink: each answer's cost is counted against its key's budget,
/// then the event is queued for the control plane.
pub struct Charged {
    pub budget: Arc<BudgetChecker>,
    pub queue: Arc<UsageQueue>,
}

impl UsageSink for Charged {
    fn record(&self, event: UsageEvent) {
        self.budget.charge(&event.api_key_id, event.cost_usd);
        self.queue.record(event);
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
        budget: wire.budget,
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

/// The decision when the control plane could not answer now; `None`: the last answer
/// stands (within the stale window, or sticky).
fn fallback(options: &BudgetSection, last: Option<&Answer>, now: Instant) -> Option<Verdict> {
    let Some(last) = last else {
        return Some(match options.default_fail_mode {
            DefaultFailMode::Open => Verdict::Allow,
            DefaultFailMode::Closed => unavailable(),
        });
    };
    let stale_window = Duration::from_secs(options.stale_window_secs);
    if now.duration_since(last.at) < last.ttl + stale_window {
        return None;
    }
    match last.fail_mode {
        FailMode::Open => Some(Verdict::Allow),
        FailMode::Closed => Some(unavailable()),
        FailMode::Sticky => None,
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
        fallback(&options, last, now).unwrap_or_else(|| last.unwrap().verdict.clone())
    }

    fn state(limit: f64, spent: f64) -> BudgetState {
        BudgetState {
            limit_usd: limit,
            spent_usd: spent,
            remaining_usd: (limit - spent).max(0.0),
            reset_seconds: Some(3_600),
            period: Some("daily".to_owned()),
        }
    }

    #[test]
    fn spend_served_here_counts_until_the_control_plane_has_counted_it() {
        let mut ledger = Ledger::default();
        let first = state(0.10, 0.0);
        ledger.answered(&first);
        // A sequential client at $0.04 a call: the third call's answer crosses $0.10.
        for _ in 0..3 {
            ledger.charge(0.04);
        }
        assert!((ledger.spent(&first) - 0.12).abs() < 1e-9);
        // The control plane has counted two of them: one is still uncounted.
        let next = state(0.10, 0.08);
        ledger.answered(&next);
        assert!((ledger.uncounted_usd - 0.04).abs() < 1e-9);
        assert!((ledger.spent(&next) - 0.12).abs() < 1e-9);
        // It counted more than was served here (another replica): nothing uncounted.
        ledger.answered(&state(0.10, 0.30));
        assert_eq!(ledger.uncounted_usd, 0.0);
        // A new period: its figure falls, and nothing served before counts.
        ledger.charge(0.05);
        ledger.answered(&state(0.10, 0.0));
        assert_eq!(ledger.uncounted_usd, 0.0);
        // Nonsense costs count nothing.
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            ledger.charge(bad);
        }
        assert_eq!(ledger.uncounted_usd, 0.0);
    }

    #[test]
    fn a_refusal_made_here_has_the_budget_fields_and_the_time_left() {
        let denial = spent_here("k", &state(0.10, 0.08), 0.1200001, 600);
        assert_eq!(denial.code, "budget_exceeded");
        assert_eq!(denial.scope.as_deref(), Some("api_key"));
        assert_eq!(denial.scope_ref.as_deref(), Some("k"));
        assert_eq!(denial.limit_usd, Some(0.10));
        assert_eq!(denial.spent_usd, Some(0.12));
        assert_eq!(denial.period.as_deref(), Some("daily"));
        // 3,600 s to the reset when answered, 600 s ago.
        assert_eq!(denial.retry_after_seconds, Some(3_000));
        assert!(denial.period_resets_at.is_some());
        assert!(
            denial.message.contains("spent $0.12 of $0.1"),
            "{}",
            denial.message
        );
    }

    #[test]
    fn a_kept_answer_reads_back() {
        let kept = Kept {
            answer: wire(true, FailMode::Closed),
            at_unix_ms: 1_700_000_000_000,
        };
        let back: Kept = serde_json::from_slice(&serde_json::to_vec(&kept).unwrap()).unwrap();
        assert_eq!(back.answer, kept.answer);
        assert_eq!(back.at_unix_ms, kept.at_unix_ms);
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
