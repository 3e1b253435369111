//! Rate limits shared by replicas, counted in Redis (`ratelimit.backend: redis`).
//!
//! Each admission is one script run (one round trip) that reads Redis's clock, checks
//! every limit of every scope and, only when all admit, counts the request: so two
//! replicas never both take the last slot, and a refusal by one scope counts nothing
//! in another. Windows slide: the estimate is the current fixed window's count plus
//! the previous window's, weighted by the share of it still inside the sliding
//! window, so there is no burst of twice the limit at a window edge.
//!
//! Token limits reserve the request's estimate at admission and settle it with the
//! real count when the answer ends. Concurrency slots are leases with a TTL, renewed
//! while held, so the slots of a replica that died expire. The end of a request (settle
//! and release) is sent in the background, off the request path.
//!
//! Keys: `aisix:{rl}:<scope>:<dimension>`; the one hash tag keeps every counter a
//! script touches in one cluster slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use redis::Script;

use super::{DIMENSIONS, Quota, Refusal, Scope};
use crate::resources::RateLimit;
use crate::shared::redis::{Op, Redis, Trouble};

const ADMIT: &str = r"
-- KEYS[i]: entry i's counter. ARGV: lease member, lease ttl (ms), then four values
-- per entry: kind ('r' requests, 't' tokens, 'c' concurrency), window (ms), limit,
-- cost (1 for requests, the tokens reserved for tokens).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, ttl = ARGV[1], tonumber(ARGV[2])
local seen = {}
for i = 1, #KEYS do
  local key, at = KEYS[i], 2 + (i - 1) * 4
  local kind, w, limit = ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  if limit < 1 then return {0, i, w} end
  if kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local held = redis.call('ZCARD', key)
    if held >= limit then return {0, i, 1000} end
    seen[i] = {held}
  else
    local idx = math.floor(now / w)
    local counts = redis.call('HMGET', key, idx, idx - 1)
    local cur, prev = tonumber(counts[1]) or 0, tonumber(counts[2]) or 0
    local into = now - idx * w
    if cur + prev * (w - into) / w + 1 > limit then
      -- How long until the estimate is down to limit - 1.
      local room, wait = limit - 1, 0
      if cur <= room then
        wait = (w - into) - math.floor((room - cur) * w / prev)
      else
        wait = (w - into) + (w - math.floor(room * w / cur))
      end
      return {0, i, math.max(wait, 1)}
    end
    seen[i] = {idx, cur, prev, into}
  end
end
local out = {1, now}
for i = 1, #KEYS do
  local key, at, s = KEYS[i], 2 + (i - 1) * 4, seen[i]
  local kind, w, limit, cost = ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  if kind == 'c' then
    redis.call('ZADD', key, now + ttl, member)
    redis.call('PEXPIRE', key, ttl * 2)
    out[#out + 1] = limit - s[1] - 1
    out[#out + 1] = 0
  else
    local idx, cur, prev, into = s[1], s[2], s[3], s[4]
    if cost > 0 then
      redis.call('HINCRBY', key, idx, cost)
      cur = cur + cost
    end
    -- Only the two windows the estimate reads are kept.
    if redis.call('HLEN', key) > 2 then
      for _, f in ipairs(redis.call('HKEYS', key)) do
        if tonumber(f) < idx - 1 then redis.call('HDEL', key, f) end
      end
    end
    redis.call('PEXPIRE', key, 2 * w)
    local used = cur + prev * (w - into) / w
    local reset = 0
    if cur > 0 then reset = 2 * w - into elseif prev > 0 then reset = w - into end
    out[#out + 1] = math.max(limit - math.ceil(used), 0)
    out[#out + 1] = reset
  end
end
return out
";

const FINISH: &str = r"
-- KEYS[i]: entry i's counter. ARGV: lease member, admission time (ms), then three
-- values per entry: kind ('t' or 'c'), window (ms), tokens reserved; then the tokens
-- the answer used.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, admitted, used = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[#ARGV])
for i = 1, #KEYS do
  local key, at = KEYS[i], 2 + (i - 1) * 3
  local kind, w, reserved = ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  if kind == 'c' then
    redis.call('ZREM', key, member)
  else
    local was, idx = math.floor(admitted / w), math.floor(now / w)
    if reserved > 0 and was >= idx - 1 then
      if redis.call('HINCRBY', key, was, -reserved) <= 0 then redis.call('HDEL', key, was) end
    end
    if used > 0 then
      redis.call('HINCRBY', key, idx, used)
      redis.call('PEXPIRE', key, 2 * w)
    end
  end
end
return 1
";

const RENEW: &str = r"
-- KEYS[i]: a concurrency counter; ARGV[1]: lease ttl (ms); ARGV[i + 1]: a lease in it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
return #KEYS
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Requests,
    Tokens,
    Concurrency,
}

impl Kind {
    fn code(self) -> &'static str {
        match self {
            Kind::Requests => "r",
            Kind::Tokens => "t",
            Kind::Concurrency => "c",
        }
    }
}

/// One limit of one scope, as the scripts see it.
struct Entry {
    key: String,
    kind: Kind,
    window_ms: u64,
    limit: u64,
    /// Whose limit, and what the refusal says of it.
    scope: usize,
    unit: &'static str,
}

/// The shared counters and this replica's live concurrency leases.
pub(super) struct SharedLimits {
    redis: Redis,
    lease_ttl: Duration,
    scripts: Scripts,
    /// Tells this replica's leases apart from other replicas'.
    replica: String,
    next_lease: AtomicU64,
    /// Leases held now, renewed in the background: member -> concurrency keys.
    live: Mutex<HashMap<String, Vec<String>>>,
}

struct Scripts {
    admit: Script,
    finish: Script,
    renew: Script,
}

/// A request admitted by the shared counters: settled and released when dropped.
pub(super) struct SharedLease {
    limits: Arc<SharedLimits>,
    member: String,
    admitted_ms: u64,
    reserved: u64,
    /// Token and concurrency entries: (key, kind, window).
    finish: Vec<(String, Kind, u64)>,
    pub used: AtomicU64,
}

/// What Redis decided.
pub(super) enum Decision {
    Admitted {
        lease: SharedLease,
        requests: Option<Quota>,
        tokens: Option<Quota>,
    },
    Refused(Refusal),
}

impl SharedLimits {
    pub fn new(redis: Redis, lease_ttl: Duration) -> Arc<Self> {
        let limits = Arc::new(SharedLimits {
            redis,
            lease_ttl,
            scripts: Scripts {
                admit: Script::new(ADMIT),
                finish: Script::new(FINISH),
                renew: Script::new(RENEW),
            },
            replica: uuid::Uuid::new_v4().simple().to_string(),
            next_lease: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
        });
        tokio::spawn(renew_leases(Arc::downgrade(&limits)));
        limits
    }

    /// One round trip: checks every limit of `scopes` and counts the request when all
    /// admit it, reserving `reserve` tokens in each token window.
    pub async fn admit(
        self: &Arc<Self>,
        scopes: &[(Scope, RateLimit)],
        reserve: u64,
    ) -> Result<Decision, Trouble> {
        let entries = entries(scopes);
        let member = format!(
            "{}:{}",
            self.replica,
            self.next_lease.fetch_add(1, Ordering::Relaxed)
        );
        let ttl_ms = u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut invocation = self.scripts.admit.prepare_invoke();
        invocation.arg(&member).arg(ttl_ms);
        for entry in &entries {
            let cost = match entry.kind {
                Kind::Requests | Kind::Concurrency => 1,
                Kind::Tokens => reserve,
            };
            invocation
                .key(&entry.key)
                .arg(entry.kind.code())
                .arg(entry.window_ms)
                .arg(entry.limit)
                .arg(cost);
        }
        let answer: Vec<i64> = self.redis.run(Op::Script(invocation)).await?;
        let number = |i: usize| {
            answer
                .get(i)
                .and_then(|n| u64::try_from(*n).ok())
                .ok_or(Trouble::Error)
        };
        if number(0)? == 0 {
            let entry = usize::try_from(number(1)?)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| entries.get(i))
                .ok_or(Trouble::Error)?;
            let (scope, _) = &scopes[entry.scope];
            return Ok(Decision::Refused(Refusal {
                message: format!(
                    "rate limit exceeded: {} {} for {}",
                    entry.limit,
                    entry.unit,
                    scope.describe()
                ),
                retry_after_secs: number(2)?.div_ceil(1000).max(1),
            }));
        }
        let admitted_ms = number(1)?;
        let (mut requests, mut tokens) = (None, None);
        for (i, entry) in entries.iter().enumerate() {
            if entry.kind == Kind::Concurrency || !matches!(scopes[entry.scope].0, Scope::ApiKey(_))
            {
                continue;
            }
            let quota = Quota {
                limit: entry.limit,
                remaining: number(2 + 2 * i)?,
                reset_ms: number(3 + 2 * i)?,
            };
            let slot = if entry.kind == Kind::Tokens {
                &mut tokens
            } else {
                &mut requests
            };
            // The tightest limit speaks for the family.
            if slot.is_none_or(|q: Quota| quota.remaining < q.remaining) {
                *slot = Some(quota);
            }
        }
        let finish: Vec<(String, Kind, u64)> = entries
            .into_iter()
            .filter(|e| e.kind != Kind::Requests)
            .map(|e| (e.key, e.kind, e.window_ms))
            .collect();
        let held: Vec<String> = finish
            .iter()
            .filter(|(_, kind, _)| *kind == Kind::Concurrency)
            .map(|(key, _, _)| key.clone())
            .collect();
        if !held.is_empty() {
            self.live
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(member.clone(), held);
        }
        Ok(Decision::Admitted {
            lease: SharedLease {
                limits: self.clone(),
                member,
                admitted_ms,
                reserved: reserve,
                finish,
                used: AtomicU64::new(0),
            },
            requests,
            tokens,
        })
    }

    async fn renew(&self) {
        let pairs: Vec<(String, String)> = {
            let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            live.iter()
                .flat_map(|(member, keys)| keys.iter().map(|k| (k.clone(), member.clone())))
                .collect()
        };
        if pairs.is_empty() {
            return;
        }
        let mut invocation = self.scripts.renew.prepare_invoke();
        invocation.arg(u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX));
        for (key, member) in &pairs {
            invocation.key(key).arg(member);
        }
        // A failure is counted by the connection; the next round tries again.
        let _: Result<i64, _> = self.redis.run(Op::Script(invocation)).await;
    }
}

/// Every limit of `scopes`, in order.
fn entries(scopes: &[(Scope, RateLimit)]) -> Vec<Entry> {
    let mut entries = Vec::new();
    for (i, (scope, limits)) in scopes.iter().enumerate() {
        let name = match scope {
            Scope::ApiKey(id) => format!("k:{id}"),
            Scope::Model(model) => format!("m:{model}"),
        };
        for dimension in DIMENSIONS {
            if let Some(limit) = dimension.limit(limits) {
                entries.push(Entry {
                    key: format!("aisix:{{rl}}:{name}:{}", dimension.name()),
                    kind: if dimension.tokens() {
                        Kind::Tokens
                    } else {
                        Kind::Requests
                    },
                    window_ms: dimension.window_ms(),
                    limit,
                    scope: i,
                    unit: dimension.unit(),
                });
            }
        }
        if let Some(limit) = limits.concurrency {
            entries.push(Entry {
                key: format!("aisix:{{rl}}:{name}:concurrency"),
                kind: Kind::Concurrency,
                window_ms: 0,
                limit,
                scope: i,
                unit: "concurrent requests",
            });
        }
    }
    entries
}

impl Drop for SharedLease {
    fn drop(&mut self) {
        if self.finish.is_empty() {
            return;
        }
        self.limits
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.member);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (shutting down): the leases expire by their TTL.
            return;
        };
        let limits = self.limits.clone();
        let member = std::mem::take(&mut self.member);
        let finish = std::mem::take(&mut self.finish);
        let (admitted_ms, reserved) = (self.admitted_ms, self.reserved);
        let used = self.used.load(Ordering::Relaxed);
        runtime.spawn(async move {
            let mut invocation = limits.scripts.finish.prepare_invoke();
            invocation.arg(&member).arg(admitted_ms);
            for (key, kind, window) in &finish {
                invocation
                    .key(key)
                    .arg(kind.code())
                    .arg(window)
                    .arg(if *kind == Kind::Tokens { reserved } else { 0 });
            }
            invocation.arg(used);
            // Lost on failure: the reservation stays counted until its window ends,
            // the lease until its TTL.
            let _: Result<i64, _> = limits.redis.run(Op::Script(invocation)).await;
        });
    }
}

/// Renews this replica's leases a few times per TTL until the limiter is dropped.
async fn renew_leases(limits: Weak<SharedLimits>) {
    loop {
        let Some(every) = limits.upgrade().map(|l| l.lease_ttl / 3) else {
            return;
        };
        tokio::time::sleep(every.max(Duration::from_millis(100))).await;
        let Some(limits) = limits.upgrade() else {
            return;
        };
        limits.renew().await;
    }
}
