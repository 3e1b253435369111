//! Which direct models a request tries, in which order, and how often.
//!
//! A direct model is its own single candidate. A routing model's targets are tried by
//! `priority` tier (higher first); within a tier `failover` keeps the listed order and
//! `round_robin` starts at a smooth weighted round-robin pick (nginx's algorithm: each
//! pick adds every weight to its target's credit, takes the highest credit and removes
//! the tier's total from it), then the others as listed. Targets cooling down after
//! failures are left out; when that leaves none, `when_all_unavailable` says whether to
//! answer 503 `all_candidates_unavailable` or to try them all anyway. `max_fallbacks`
//! bounds how many candidates follow the first.
//!
//! Each candidate gets `retries` more attempts after a retryable failure (5xx, timeout,
//! transport; 429 when `retry_on_429`), spaced by exponential backoff with full jitter
//! or by the upstream's `Retry-After` when it is at most [`RETRY_AFTER_CAP`]. A
//! candidate given up after a retryable failure cools down (its `cooldown` settings),
//! then the next is tried; statuses in `fallback_on_statuses` move to the next at once;
//! any other 4xx is the answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::failure::{Class, ProxyError, Recovery};
use crate::resources::{Model, ModelTarget, Strategy, WhenAllUnavailable};
use crate::snapshot::Snapshot;

/// First retry backoff step; doubles per retry.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest backoff step.
pub const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// An upstream asking for a longer wait than this is not retried: the next candidate
/// is tried instead (and the target cools down for what it asked).
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(5);

/// A routing model's priority tier (model id, priority), whose targets share credits.
type Tier = (Arc<str>, i32);

/// Round-robin credits (per tier, one per target) and cooldowns, shared by all
/// requests.
#[derive(Debug, Default)]
pub struct RoutingState {
    credits: Mutex<HashMap<Tier, Vec<i64>>>,
    /// Direct model name -> end of its cooldown.
    cooldowns: RwLock<HashMap<Arc<str>, Instant>>,
    /// Retries of a model that sets none (`upstream.retries`).
    default_retries: u32,
}

/// What one request will try.
pub struct Plan<'s> {
    /// The alias being served.
    pub model: &'s str,
    pub candidates: Vec<&'s Arc<Model>>,
    pub retries: u32,
    pub retry_on_429: bool,
    pub fallback_on_statuses: &'s [u16],
    /// A chat stream that breaks after its first byte continues on the next target.
    pub resume_streams: bool,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try the same candidate again after this wait.
    Retry(Duration),
    /// Give this candidate up (cooling it down when `cool_down`) and try the next.
    Fallback { cool_down: bool },
    /// This error is the answer.
    Answer,
}

impl Plan<'_> {
    /// The decision after attempt number `attempt` (1 = the first) failed with a
    /// failure of class `class`: its recovery, combined with this plan's settings.
    pub fn next(&self, class: &Class, attempt: u32) -> Next {
        let listed = || self.fallback_on_statuses.contains(&class.status.as_u16());
        let (retryable, fallback) = match class.recovery {
            Recovery::Transient => (true, false),
            Recovery::RateLimited => (self.retry_on_429, listed()),
            Recovery::ByStatus => (false, listed()),
            Recovery::NextTarget => (false, true),
            Recovery::Final => (false, false),
        };
        if retryable {
            if attempt <= self.retries {
                match class.upstream_retry_after.map(Duration::from_secs) {
                    Some(wait) if wait > RETRY_AFTER_CAP => {}
                    Some(wait) => return Next::Retry(wait),
                    None => return Next::Retry(backoff(attempt)),
                }
            }
            return Next::Fallback { cool_down: true };
        }
        if fallback {
            return Next::Fallback { cool_down: false };
        }
        Next::Answer
    }
}

/// The wait before retry number `retry` (1 = the first): uniform in
/// `0..=min(BACKOFF_BASE * 2^(retry-1), BACKOFF_CAP)`.
pub fn backoff(retry: u32) -> Duration {
    let step = BACKOFF_BASE
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    let millis = u64::try_from(step.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(0..=millis))
}

impl RoutingState {
    pub fn with_default_retries(default_retries: u32) -> Self {
        Self {
            default_retries,
            ..Self::default()
        }
    }

    /// The candidates for `model`, or 503 `all_candidates_unavailable`.
    pub fn plan<'s>(
        &self,
        snapshot: &'s Snapshot,
        model: &'s Arc<Model>,
    ) -> Result<Plan<'s>, ProxyError> {
        let routing = match &model.target {
            ModelTarget::Direct(_) => {
                return Ok(Plan {
                    model: &model.name,
                    candidates: vec![model],
                    retries: model.retries.unwrap_or(self.default_retries),
                    retry_on_429: false,
                    fallback_on_statuses: &[],
                    resume_streams: false,
                });
            }
            ModelTarget::Routing(routing) => routing,
        };
        let mut tiers: Vec<i32> = routing.targets.iter().map(|t| t.priority).collect();
        tiers.sort_unstable_by(|a, b| b.cmp(a));
        tiers.dedup();
        let mut ordered = Vec::with_capacity(routing.targets.len());
        for priority in tiers {
            let tier: Vec<_> = routing
                .targets
                .iter()
                .filter(|t| t.priority == priority)
                .filter_map(|t| snapshot.model(&t.model).map(|m| (m, t.weight)))
                .filter(|(m, _)| matches!(m.target, ModelTarget::Direct(_)))
                .collect();
            if tier.is_empty() {
                continue;
            }
            let first = match routing.strategy {
                Strategy::Failover => 0,
                Strategy::RoundRobin => self.pick(&model.id, priority, &tier),
            };
            ordered.push(tier[first].0);
            ordered.extend(
                tier.iter()
                    .enumerate()
                    .filter(|(i, _)| *i != first)
                    .map(|(_, (m, _))| *m),
            );
        }
        let now = Instant::now();
        let available: Vec<_> = ordered
            .iter()
            .copied()
            .filter(|m| self.cooling_until(&m.name, now).is_none())
            .collect();
        let mut candidates = if !available.is_empty() || ordered.is_empty() {
            available
        } else {
            match routing.when_all_unavailable {
                WhenAllUnavailable::TryAnyway => ordered,
                WhenAllUnavailable::Fail => {
                    let soonest = ordered
                        .iter()
                        .filter_map(|m| self.cooling_until(&m.name, now))
                        .min()
                        .map_or(Duration::ZERO, |until| until - now);
                    return Err(ProxyError::AllCandidatesUnavailable {
                        model: model.name.to_string(),
                        retry_after: ceil_secs(soonest),
                    });
                }
            }
        };
        if let Some(max) = routing.max_fallbacks {
            candidates.truncate(1 + max as usize);
        }
        Ok(Plan {
            model: &model.name,
            candidates,
            retries: routing.retries.unwrap_or(self.default_retries),
            retry_on_429: routing.retry_on_429,
            fallback_on_statuses: &routing.fallback_on_statuses,
            resume_streams: routing.resume_streams,
        })
    }

    /// Smooth weighted round robin within one tier; returns the index picked.
    fn pick(&self, routing_id: &Arc<str>, priority: i32, tier: &[(&Arc<Model>, u32)]) -> usize {
        let mut credits = self.credits.lock().unwrap_or_else(PoisonError::into_inner);
        let current = credits.entry((routing_id.clone(), priority)).or_default();
        if current.len() != tier.len() {
            *current = vec![0; tier.len()];
        }
        let total: i64 = tier.iter().map(|(_, w)| i64::from(*w)).sum();
        let mut best = 0;
        for (i, (_, weight)) in tier.iter().enumerate() {
            current[i] += i64::from(*weight);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        best
    }

    /// When `model` (a direct model name) stops cooling down, if it is cooling now.
    pub fn cooling_until(&self, model: &str, now: Instant) -> Option<Instant> {
        let cooldowns = self
            .cooldowns
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        cooldowns.get(model).copied().filter(|until| *until > now)
    }

    /// Puts `model` in cooldown after a retryable failure, per its `cooldown` settings:
    /// the upstream's `Retry-After` when honoured (capped at `max`), else `default`.
    pub fn cool_down(&self, model: &Model, retry_after: Option<u64>) {
        let settings = model.cooldown;
        if !settings.enabled {
            return;
        }
        let wait = match retry_after {
            Some(seconds) if settings.honor_retry_after => {
                Duration::from_secs(seconds).min(settings.max)
            }
            _ => settings.default.min(settings.max),
        };
        if wait.is_zero() {
            return;
        }
        let until = Instant::now() + wait;
        let mut cooldowns = self
            .cooldowns
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        cooldowns.insert(model.name.clone(), until);
    }

    /// A success ends `model`'s cooldown (it was tried anyway and answered).
    pub fn recovered(&self, model: &str) {
        let cooling = {
            let cooldowns = self
                .cooldowns
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            cooldowns.contains_key(model)
        };
        if cooling {
            let mut cooldowns = self
                .cooldowns
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            cooldowns.remove(model);
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
    use bytes::Bytes;
    use http::StatusCode;
    use serde_json::{Value, json};

    use super::*;
    use crate::failure::UpstreamErrorFields;
    use crate::snapshot::{SnapshotStore, Source, SourceEvent};

    /// A snapshot with direct models `a`, `b`, `c`, `d` (cooldown 30 s, at most 60 s;
    /// off for `d`) and a routing model `r`.
    fn snapshot(routing: Value) -> Arc<Snapshot> {
        let mut entries = vec![(
            "/aisix/provider_keys/pk".to_owned(),
            Bytes::from(r#"{"display_name":"pk","provider":"openai","api_key":"sk"}"#),
        )];
        for name in ["a", "b", "c", "d"] {
            entries.push((
                format!("/aisix/models/{name}"),
                Bytes::from(
                    json!({"display_name": name, "model_name": name, "provider_key_id": "pk",
                           "cooldown": {"enabled": name != "d", "default_seconds": 30, "max_seconds": 60}})
                    .to_string(),
                ),
            ));
        }
        entries.push((
            "/aisix/models/r".to_owned(),
            Bytes::from(json!({"display_name": "r", "routing": routing}).to_string()),
        ));
        let store = SnapshotStore::new("/aisix");
        store.apply(
            Source::File,
            [SourceEvent::Reset {
                entries,
                revision: 1,
            }],
        );
        let snapshot = store.load();
        assert_eq!(snapshot.rejections().count(), 0);
        snapshot
    }

    fn names(plan: &Plan<'_>) -> Vec<String> {
        plan.candidates.iter().map(|m| m.name.to_string()).collect()
    }

    fn order(state: &RoutingState, snapshot: &Snapshot) -> Vec<String> {
        let model = snapshot.model("r").unwrap();
        names(&state.plan(snapshot, model).unwrap())
    }

    #[test]
    fn a_model_without_retries_of_its_own_gets_the_gateway_default() {
        let unset = snapshot(json!({"targets": [{"model": "a"}]}));
        let own = snapshot(json!({"targets": [{"model": "a"}], "retries": 0}));
        let state = RoutingState::with_default_retries(2);
        let retries =
            |s: &Snapshot, alias: &str| state.plan(s, s.model(alias).unwrap()).unwrap().retries;
        assert_eq!(retries(&unset, "r"), 2);
        assert_eq!(retries(&unset, "a"), 2, "a direct model too");
        assert_eq!(
            retries(&own, "r"),
            0,
            "the model's own setting wins, 0 included"
        );
        assert_eq!(retries(&unset, "r"), 2);
        assert_eq!(
            RoutingState::default()
                .plan(&unset, unset.model("r").unwrap())
                .unwrap()
                .retries,
            0
        );
    }

    #[test]
    fn failover_keeps_the_listed_order_within_priority_tiers() {
        let s = snapshot(json!({"targets": [
            {"model": "a"}, {"model": "b", "priority": 5}, {"model": "c"}, {"model": "d", "priority": 5}
        ]}));
        let state = RoutingState::default();
        assert_eq!(order(&state, &s), ["b", "d", "a", "c"]);
        assert_eq!(order(&state, &s), ["b", "d", "a", "c"]);
    }

    #[test]
    fn round_robin_is_smooth_and_weighted() {
        let s = snapshot(json!({"strategy": "round_robin", "targets": [
            {"model": "a", "weight": 5}, {"model": "b", "weight": 1}, {"model": "c", "weight": 1}
        ]}));
        let state = RoutingState::default();
        let firsts: String = (0..7).map(|_| order(&state, &s)[0].clone()).collect();
        // nginx's smooth sequence for 5/1/1: never three of `a` in a row.
        assert_eq!(firsts, "aabacaa");
        let mut counts = HashMap::new();
        for _ in 0..700 {
            *counts.entry(order(&state, &s)[0].clone()).or_insert(0) += 1;
        }
        assert_eq!(counts["a"], 500);
        assert_eq!(counts["b"], 100);
        assert_eq!(counts["c"], 100);
        // The others follow the pick, as listed.
        let full = order(&state, &s);
        assert_eq!(full.len(), 3);
    }

    #[test]
    fn cooling_targets_are_skipped_then_all_unavailable_fails_or_tries_anyway() {
        let s = snapshot(json!({"targets": [{"model": "a"}, {"model": "b"}], "max_fallbacks": 5}));
        let state = RoutingState::default();
        state.cool_down(s.model("a").unwrap(), None);
        assert_eq!(order(&state, &s), ["b"]);
        state.cool_down(s.model("b").unwrap(), Some(7));
        let model = s.model("r").unwrap();
        let Err(ProxyError::AllCandidatesUnavailable {
            model: name,
            retry_after,
        }) = state.plan(&s, model)
        else {
            panic!("all cooling should fail")
        };
        assert_eq!(name, "r");
        assert_eq!(retry_after, 7, "the soonest end of a cooldown");
        state.recovered("b");
        assert_eq!(order(&state, &s), ["b"]);

        let anyway = snapshot(
            json!({"targets": [{"model": "a"}, {"model": "b"}], "when_all_unavailable": "try_anyway"}),
        );
        state.cool_down(anyway.model("b").unwrap(), None);
        assert_eq!(order(&state, &anyway), ["a", "b"]);
    }

    #[test]
    fn cooldown_honours_retry_after_up_to_max_and_can_be_off() {
        let s = snapshot(json!({"targets": [{"model": "a"}]}));
        let state = RoutingState::default();
        let a = s.model("a").unwrap();
        let now = Instant::now();
        state.cool_down(a, Some(3600));
        let until = state.cooling_until("a", now).unwrap();
        let secs = (until - now).as_secs_f64();
        assert!((59.0..61.0).contains(&secs), "capped at max: {secs}");
        state.cool_down(a, None);
        let until = state.cooling_until("a", now).unwrap();
        let secs = (until - now).as_secs_f64();
        assert!((29.0..31.0).contains(&secs), "the default: {secs}");

        state.cool_down(s.model("d").unwrap(), Some(10));
        assert!(state.cooling_until("d", now).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooldown_ends_when_its_time_is_up() {
        let s = snapshot(json!({"targets": [{"model": "a"}, {"model": "b"}]}));
        let state = RoutingState::default();
        state.cool_down(s.model("a").unwrap(), Some(10));
        assert_eq!(order(&state, &s), ["b"]);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(order(&state, &s), ["b"]);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(order(&state, &s), ["a", "b"], "back in after 10 s");
    }

    #[test]
    fn max_fallbacks_bounds_the_candidates() {
        let s = snapshot(
            json!({"targets": [{"model": "a"}, {"model": "b"}, {"model": "c"}], "max_fallbacks": 1}),
        );
        assert_eq!(order(&RoutingState::default(), &s), ["a", "b"]);
    }

    fn rejected(status: u16, retry_after: Option<u64>) -> ProxyError {
        ProxyError::UpstreamRejected {
            status: StatusCode::from_u16(status).unwrap(),
            error: UpstreamErrorFields {
                message: "no".into(),
                kind: "x".into(),
                param: None,
                code: None,
            },
            retry_after,
        }
    }

    fn failed(retry_after: Option<u64>) -> ProxyError {
        ProxyError::UpstreamFailed {
            detail: "down".into(),
            retry_after,
        }
    }

    #[test]
    fn what_follows_a_failure() {
        let plan = Plan {
            model: "m",
            candidates: Vec::new(),
            retries: 2,
            retry_on_429: false,
            fallback_on_statuses: &[404],
            resume_streams: false,
        };
        assert!(matches!(
            plan.next(&failed(None).class(), 1),
            Next::Retry(_)
        ));
        assert!(matches!(
            plan.next(&ProxyError::Timeout(1).class(), 2),
            Next::Retry(_)
        ));
        assert_eq!(
            plan.next(&failed(None).class(), 3),
            Next::Fallback { cool_down: true },
            "two retries, then the next target"
        );
        assert_eq!(
            plan.next(&failed(Some(2)).class(), 1),
            Next::Retry(Duration::from_secs(2))
        );
        assert_eq!(
            plan.next(&failed(Some(60)).class(), 1),
            Next::Fallback { cool_down: true },
            "a wait over the cap moves on"
        );
        assert_eq!(plan.next(&rejected(429, None).class(), 1), Next::Answer);
        assert_eq!(plan.next(&rejected(400, None).class(), 1), Next::Answer);
        assert_eq!(
            plan.next(&rejected(404, None).class(), 1),
            Next::Fallback { cool_down: false }
        );
        let retrying = Plan {
            retry_on_429: true,
            ..plan
        };
        assert_eq!(
            retrying.next(&rejected(429, Some(1)).class(), 1),
            Next::Retry(Duration::from_secs(1))
        );
        assert_eq!(
            retrying.next(&rejected(429, None).class(), 3),
            Next::Fallback { cool_down: true }
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_full_jitter() {
        for retry in 1..=10 {
            let bound = (BACKOFF_BASE * 2u32.pow(retry - 1)).min(BACKOFF_CAP);
            let waits: Vec<_> = (0..200).map(|_| backoff(retry)).collect();
            assert!(waits.iter().all(|w| *w <= bound), "retry {retry}");
            assert!(
                waits.iter().any(|w| *w < bound / 2),
                "retry {retry}: jitter spreads the waits"
            );
        }
    }
}
