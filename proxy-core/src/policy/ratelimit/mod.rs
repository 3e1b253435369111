//! Rate limits of caller keys and models: requests per second, minute, hour and day,
//! tokens per minute and day, and concurrent requests.
//!
//! Counters live in this process (`ratelimit.backend: local`, the default) or in Redis,
//! shared by every replica (`redis`, see `shared.rs`). When Redis cannot answer, the
//! local counters decide (or, with `fail_closed`, the request is refused).
//!
//! Local windows are fixed and aligned to the Unix clock (a minute window resets on
//! the minute), so `x-ratelimit-reset-*` is exact. Request limits are checked and
//! counted before dispatch; token limits refuse a request once the window's tokens
//! reach the limit and are charged when the answer's usage is known. A concurrency
//! slot is held by the [`Lease`] until the response body ends (also when the caller
//! goes away).

mod shared;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use crate::resources::RateLimit;
use crate::shared::redis::Redis;
use shared::{Decision, SharedLease, SharedLimits};

/// Whose limit it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    ApiKey(Arc<str>),
    Model(Arc<str>),
}

impl Scope {
    /// `aisix_ratelimit_rejections_total`'s `scope`.
    pub fn label(&self) -> &'static str {
        match self {
            Scope::ApiKey(_) => "api_key",
            Scope::Model(_) => "model",
        }
    }

    fn describe(&self) -> String {
        match self {
            Scope::ApiKey(_) => "this API key".to_owned(),
            Scope::Model(name) => format!("model '{name}'"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dimension {
    Rps,
    Rpm,
    Rph,
    Rpd,
    Tpm,
    Tpd,
}

const DIMENSIONS: [Dimension; 6] = [
    Dimension::Rps,
    Dimension::Rpm,
    Dimension::Rph,
    Dimension::Rpd,
    Dimension::Tpm,
    Dimension::Tpd,
];

impl Dimension {
    fn window_ms(self) -> u64 {
        match self {
            Dimension::Rps => 1_000,
            Dimension::Rpm | Dimension::Tpm => 60_000,
            Dimension::Rph => 3_600_000,
            Dimension::Rpd | Dimension::Tpd => 86_400_000,
        }
    }

    fn limit(self, limits: &RateLimit) -> Option<u64> {
        match self {
            Dimension::Rps => limits.rps,
            Dimension::Rpm => limits.rpm,
            Dimension::Rph => limits.rph,
            Dimension::Rpd => limits.rpd,
            Dimension::Tpm => limits.tpm,
            Dimension::Tpd => limits.tpd,
        }
    }

    fn tokens(self) -> bool {
        matches!(self, Dimension::Tpm | Dimension::Tpd)
    }

    /// The dimension's name in the config and in Redis keys.
    fn name(self) -> &'static str {
        match self {
            Dimension::Rps => "rps",
            Dimension::Rpm => "rpm",
            Dimension::Rph => "rph",
            Dimension::Rpd => "rpd",
            Dimension::Tpm => "tpm",
            Dimension::Tpd => "tpd",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Dimension::Rps => "requests per second",
            Dimension::Rpm => "requests per minute",
            Dimension::Rph => "requests per hour",
            Dimension::Rpd => "requests per day",
            Dimension::Tpm => "tokens per minute",
            Dimension::Tpd => "tokens per day",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Window {
    index: u64,
    used: u64,
}

impl Window {
    /// What is used in the window containing `now_ms`.
    fn used_at(&self, dimension: Dimension, now_ms: u64) -> u64 {
        if self.index == now_ms / dimension.window_ms() {
            self.used
        } else {
            0
        }
    }

    fn add(&mut self, dimension: Dimension, now_ms: u64, n: u64) {
        let index = now_ms / dimension.window_ms();
        if self.index != index {
            *self = Window { index, used: 0 };
        }
        self.used = self.used.saturating_add(n);
    }
}

#[derive(Debug, Default)]
struct Counters {
    windows: [Window; 6],
    in_flight: u64,
}

/// A refusal: which limit, and when it frees up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    pub retry_after_secs: u64,
    /// Which scope refused (`api_key`, `model`).
    pub scope: &'static str,
}

/// One `x-ratelimit-*` family (requests or tokens) for the caller key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: u64,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Limited(Refusal),
    /// The shared counters cannot answer and the policy is `fail_closed`.
    Unavailable,
}

/// Where the counters are kept beyond this process.
#[derive(Debug, Clone)]
pub struct SharedOptions {
    pub redis: Redis,
    /// How long a concurrency slot outlives a replica that stopped renewing it.
    pub lease_ttl: std::time::Duration,
    /// Refuse requests while Redis cannot answer, instead of counting locally.
    pub fail_closed: bool,
}

#[derive(Default)]
pub struct RateLimiter {
    local: Mutex<HashMap<Scope, Counters>>,
    shared: Option<(Arc<SharedLimits>, bool)>,
}

/// An admitted request: holds its concurrency slots and charges tokens.
pub struct Lease {
    held: Held,
    /// The caller key's request and token quotas after this request was counted.
    pub requests: Option<Quota>,
    pub tokens: Option<Quota>,
}

enum Held {
    Local {
        limiter: Arc<RateLimiter>,
        scopes: Vec<(Scope, RateLimit)>,
    },
    Shared(SharedLease),
}

impl RateLimiter {
    /// Counters in this process only. With `shared`, in Redis first; must then be
    /// called inside a Tokio runtime.
    pub fn new(shared: Option<SharedOptions>) -> Self {
        Self {
            local: Mutex::default(),
            shared: shared.map(|s| (SharedLimits::new(s.redis, s.lease_ttl), s.fail_closed)),
        }
    }

    /// Checks every limit of `scopes`; when all admit the request, counts it and
    /// returns the lease. Nothing is counted on a refusal. `reserve` is the request's
    /// token estimate, held in shared token windows until the answer's count is known.
    pub async fn admit(
        self: &Arc<Self>,
        scopes: Vec<(Scope, RateLimit)>,
        reserve: u64,
    ) -> Result<Lease, Denied> {
        if let Some((shared, fail_closed)) = &self.shared {
            match shared.admit(&scopes, reserve).await {
                Ok(Decision::Admitted {
                    lease,
                    requests,
                    tokens,
                }) => {
                    return Ok(Lease {
                        held: Held::Shared(lease),
                        requests,
                        tokens,
                    });
                }
                Ok(Decision::Refused(refusal)) => return Err(Denied::Limited(refusal)),
                Err(_) if *fail_closed => return Err(Denied::Unavailable),
                // Counted by the connection; this replica's counters decide meanwhile.
                Err(_) => {}
            }
        }
        self.admit_local(scopes, unix_ms()).map_err(Denied::Limited)
    }

    /// [`admit`](Self::admit) on this process's counters, at `now_ms`.
    pub fn admit_local(
        self: &Arc<Self>,
        scopes: Vec<(Scope, RateLimit)>,
        now_ms: u64,
    ) -> Result<Lease, Refusal> {
        let mut all = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(refusal) = refusal(&all, &scopes, now_ms) {
            return Err(refusal);
        }
        let (requests, tokens) = take(&mut all, &scopes, now_ms);
        Ok(Lease {
            held: Held::Local {
                limiter: self.clone(),
                scopes,
            },
            requests,
            tokens,
        })
    }
}

/// The first limit a new request would exceed, over every scope.
fn refusal(
    all: &HashMap<Scope, Counters>,
    scopes: &[(Scope, RateLimit)],
    now_ms: u64,
) -> Option<Refusal> {
    for (scope, limits) in scopes {
        let counters = all.get(scope);
        for (i, dimension) in DIMENSIONS.iter().enumerate() {
            let Some(limit) = dimension.limit(limits) else {
                continue;
            };
            let used = counters.map_or(0, |c| c.windows[i].used_at(*dimension, now_ms));
            let full = if dimension.tokens() {
                used >= limit
            } else {
                used + 1 > limit
            };
            if full {
                return Some(Refusal {
                    message: format!(
                        "rate limit exceeded: {limit} {} for {}",
                        dimension.unit(),
                        scope.describe()
                    ),
                    retry_after_secs: ceil_secs(reset_ms(*dimension, now_ms)),
                    scope: scope.label(),
                });
            }
        }
        if let Some(limit) = limits.concurrency
            && counters.map_or(0, |c| c.in_flight) >= limit
        {
            return Some(Refusal {
                message: format!(
                    "rate limit exceeded: {limit} concurrent requests for {}",
                    scope.describe()
                ),
                retry_after_secs: 1,
                scope: scope.label(),
            });
        }
    }
    None
}

/// Counts a request admitted in every scope; the caller key's tightest request and
/// token quotas, for the `x-ratelimit-*` headers.
fn take(
    all: &mut HashMap<Scope, Counters>,
    scopes: &[(Scope, RateLimit)],
    now_ms: u64,
) -> (Option<Quota>, Option<Quota>) {
    let mut requests = None;
    let mut tokens = None;
    for (scope, limits) in scopes {
        let counters = all.entry(scope.clone()).or_default();
        for (i, dimension) in DIMENSIONS.iter().enumerate() {
            let Some(limit) = dimension.limit(limits) else {
                continue;
            };
            if !dimension.tokens() {
                counters.windows[i].add(*dimension, now_ms, 1);
            }
            if matches!(scope, Scope::ApiKey(_)) {
                let quota = Quota {
                    limit,
                    remaining: limit
                        .saturating_sub(counters.windows[i].used_at(*dimension, now_ms)),
                    reset_ms: reset_ms(*dimension, now_ms),
                };
                let slot = if dimension.tokens() {
                    &mut tokens
                } else {
                    &mut requests
                };
                // The tightest limit speaks for the family.
                if slot.is_none_or(|q: Quota| quota.remaining < q.remaining) {
                    *slot = Some(quota);
                }
            }
        }
        if limits.concurrency.is_some() {
            counters.in_flight += 1;
        }
    }
    (requests, tokens)
}

impl Lease {
    /// Charges `n` tokens (when the answer's usage is known) to every token limit.
    pub fn charge_tokens(&self, n: u64, now_ms: u64) {
        let (limiter, scopes) = match &self.held {
            Held::Shared(lease) => {
                lease
                    .used
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            Held::Local { limiter, scopes } => (limiter, scopes),
        };
        if n == 0 {
            return;
        }
        let mut all = limiter.local.lock().unwrap_or_else(PoisonError::into_inner);
        for (scope, limits) in scopes {
            let counters = all.entry(scope.clone()).or_default();
            for (i, dimension) in DIMENSIONS.iter().enumerate() {
                if dimension.tokens() && dimension.limit(limits).is_some() {
                    counters.windows[i].add(*dimension, now_ms, n);
                }
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // A shared lease settles and releases itself.
        let Held::Local { limiter, scopes } = &self.held else {
            return;
        };
        let mut all = limiter.local.lock().unwrap_or_else(PoisonError::into_inner);
        for (scope, limits) in scopes {
            if limits.concurrency.is_some()
                && let Some(counters) = all.get_mut(scope)
            {
                counters.in_flight = counters.in_flight.saturating_sub(1);
            }
        }
    }
}

fn reset_ms(dimension: Dimension, now_ms: u64) -> u64 {
    let window = dimension.window_ms();
    window - now_ms % window
}

fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `x-ratelimit-reset-*`: seconds, like `"1s"`, `"59.5s"`.
pub fn format_reset(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        let seconds = format!("{}.{:03}", ms / 1000, ms % 1000);
        format!("{}s", seconds.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn key(limits: RateLimit) -> Vec<(Scope, RateLimit)> {
        vec![(Scope::ApiKey("k".into()), limits)]
    }

    /// A minute boundary, so windows are easy to reason about.
    const T0: u64 = 1_800_000_000_000 - 1_800_000_000_000 % 86_400_000;

    #[test]
    fn request_windows_refuse_past_the_limit_and_reset_on_the_boundary() {
        let limiter = Arc::new(RateLimiter::default());
        let limits = RateLimit {
            rpm: Some(2),
            rps: Some(5),
            ..RateLimit::default()
        };
        let first = limiter
            .admit_local(key(limits.clone()), T0 + 10_000)
            .unwrap();
        let q = first.requests.unwrap();
        assert_eq!(
            (q.limit, q.remaining, q.reset_ms),
            (2, 1, 50_000),
            "rpm is tightest"
        );
        limiter
            .admit_local(key(limits.clone()), T0 + 20_000)
            .unwrap();
        let refused = limiter
            .admit_local(key(limits.clone()), T0 + 30_500)
            .err()
            .unwrap();
        assert_eq!(refused.retry_after_secs, 30);
        assert_eq!(
            refused.message,
            "rate limit exceeded: 2 requests per minute for this API key"
        );
        // A refusal is not counted; the next minute starts afresh.
        let again = limiter.admit_local(key(limits), T0 + 60_000).unwrap();
        assert_eq!(again.requests.unwrap().remaining, 1);
    }

    #[test]
    fn every_request_dimension_has_its_window() {
        for (limits, window_ms) in [
            (
                RateLimit {
                    rps: Some(1),
                    ..RateLimit::default()
                },
                1_000,
            ),
            (
                RateLimit {
                    rph: Some(1),
                    ..RateLimit::default()
                },
                3_600_000,
            ),
            (
                RateLimit {
                    rpd: Some(1),
                    ..RateLimit::default()
                },
                86_400_000,
            ),
        ] {
            let limiter = Arc::new(RateLimiter::default());
            limiter.admit_local(key(limits.clone()), T0).unwrap();
            assert!(
                limiter
                    .admit_local(key(limits.clone()), T0 + window_ms - 1)
                    .is_err()
            );
            assert!(limiter.admit_local(key(limits), T0 + window_ms).is_ok());
        }
    }

    #[test]
    fn tokens_are_charged_after_the_answer_and_refuse_once_spent() {
        let limiter = Arc::new(RateLimiter::default());
        let limits = RateLimit {
            tpm: Some(100),
            tpd: Some(1000),
            ..RateLimit::default()
        };
        let lease = limiter.admit_local(key(limits.clone()), T0).unwrap();
        assert_eq!(lease.tokens.unwrap().remaining, 100);
        lease.charge_tokens(60, T0 + 1);
        let lease = limiter.admit_local(key(limits.clone()), T0 + 2).unwrap();
        assert_eq!(lease.tokens.unwrap().remaining, 40);
        lease.charge_tokens(60, T0 + 3);
        let refused = limiter
            .admit_local(key(limits.clone()), T0 + 4)
            .err()
            .unwrap();
        assert!(
            refused.message.contains("100 tokens per minute"),
            "{}",
            refused.message
        );
        assert!(
            limiter.admit_local(key(limits), T0 + 60_000).is_ok(),
            "the daily limit has room"
        );
    }

    #[test]
    fn concurrency_is_held_by_the_lease() {
        let limiter = Arc::new(RateLimiter::default());
        let limits = RateLimit {
            concurrency: Some(1),
            ..RateLimit::default()
        };
        let model = |l: &RateLimit| vec![(Scope::Model("m".into()), l.clone())];
        let held = limiter.admit_local(model(&limits), T0).unwrap();
        let refused = limiter.admit_local(model(&limits), T0).err().unwrap();
        assert_eq!(
            refused.message,
            "rate limit exceeded: 1 concurrent requests for model 'm'"
        );
        drop(held);
        assert!(limiter.admit_local(model(&limits), T0).is_ok());
    }

    #[test]
    fn a_refusal_by_one_scope_counts_nothing_in_the_others() {
        let limiter = Arc::new(RateLimiter::default());
        let both = |model_rpm| {
            vec![
                (
                    Scope::ApiKey("k".into()),
                    RateLimit {
                        rpm: Some(10),
                        ..RateLimit::default()
                    },
                ),
                (
                    Scope::Model("m".into()),
                    RateLimit {
                        rpm: Some(model_rpm),
                        ..RateLimit::default()
                    },
                ),
            ]
        };
        limiter.admit_local(both(1), T0).unwrap();
        assert!(limiter.admit_local(both(1), T0).is_err());
        let lease = limiter.admit_local(both(5), T0).unwrap();
        assert_eq!(
            lease.requests.unwrap().remaining,
            8,
            "the refused request was not counted"
        );
    }

    #[test]
    fn resets_read_as_seconds() {
        assert_eq!(format_reset(1000), "1s");
        assert_eq!(format_reset(59_500), "59.5s");
        assert_eq!(format_reset(1), "0.001s");
    }
}
