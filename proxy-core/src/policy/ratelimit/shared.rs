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
//! while held, so the slots of a replica that died expire. The ends of requests
//! (settle and release) are sent in the background by one task, many in one script
//! run under load.
//!
//! Keys: per scope (`k:<api key id>`, `m:<model>`) a hash of its windows,
//! `aisix:{rl}:<scope>` (fields `<dimension>:<window index>`, so one read and one
//! write cover every window of the scope), and a sorted set of its concurrency leases,
//! `aisix:{rl}:<scope>:concurrency`; the one hash tag keeps every key a script
//! touches in one cluster slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use redis::Script;
use tokio::sync::Notify;

use super::{DIMENSIONS, Quota, Refusal, Scope};
use crate::resources::RateLimit;
use crate::shared::redis::{Op, Redis, Trouble};

const ADMIT: &str = r"
-- KEYS: two per scope: its windows (a hash, field '<dimension>:<window index>') and
-- its concurrency leases (a sorted set, scored by expiry). ARGV: lease member, lease
-- ttl (ms), then per scope: the number of windows, four values per window (name,
-- length in ms, limit, cost: 1 for requests, the tokens reserved for tokens), and the
-- concurrency limit (0: none). Limits are numbered in that order for the answer.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, ttl = ARGV[1], tonumber(ARGV[2])
local at, n, scopes = 3, 0, {}
for s = 1, #KEYS / 2 do
  local scope = {hash = KEYS[2 * s - 1], zset = KEYS[2 * s], windows = {}}
  local fields = {}
  for d = 1, tonumber(ARGV[at]) do
    local i = at + 4 * (d - 1)
    local w = tonumber(ARGV[i + 2])
    local idx = math.floor(now / w)
    scope.windows[d] = {name = ARGV[i + 1], w = w, limit = tonumber(ARGV[i + 3]),
      cost = tonumber(ARGV[i + 4]), idx = idx, into = now - idx * w}
    fields[2 * d - 1] = ARGV[i + 1] .. ':' .. idx
    fields[2 * d] = ARGV[i + 1] .. ':' .. (idx - 1)
  end
  at = at + 1 + 4 * #scope.windows
  scope.concurrency = tonumber(ARGV[at])
  at = at + 1
  if #fields > 0 then
    local counts = redis.call('HMGET', scope.hash, unpack(fields))
    for d, win in ipairs(scope.windows) do
      n = n + 1
      local cur, prev, w, into = tonumber(counts[2 * d - 1]) or 0, tonumber(counts[2 * d]) or 0, win.w, win.into
      if win.limit < 1 then return {0, n, w} end
      if cur + prev * (w - into) / w + 1 > win.limit then
        -- How long until the estimate is down to limit - 1.
        local room, wait = win.limit - 1, 0
        if cur <= room then
          wait = (w - into) - math.floor((room - cur) * w / prev)
        else
          wait = (w - into) + (w - math.floor(room * w / cur))
        end
        return {0, n, math.max(wait, 1)}
      end
      win.cur, win.prev = cur, prev
    end
  end
  if scope.concurrency > 0 then
    n = n + 1
    local held = redis.call('ZCARD', scope.zset)
    -- Leases a dead replica stopped renewing are only looked for when they matter.
    if held >= scope.concurrency then
      redis.call('ZREMRANGEBYSCORE', scope.zset, '-inf', now)
      held = redis.call('ZCARD', scope.zset)
    end
    if held >= scope.concurrency then return {0, n, 1000} end
    scope.held = held
  end
  scopes[s] = scope
end
local out = {1, now}
for _, scope in ipairs(scopes) do
  local set, fresh, longest = {}, false, 0
  for _, win in ipairs(scope.windows) do
    local cur = win.cur + win.cost
    if win.cost > 0 then
      set[#set + 1] = win.name .. ':' .. win.idx
      set[#set + 1] = cur
    end
    if win.cur == 0 then fresh = true end
    if win.w > longest then longest = win.w end
    local w, into = win.w, win.into
    local reset = 0
    if cur > 0 then reset = 2 * w - into elseif win.prev > 0 then reset = w - into end
    out[#out + 1] = math.max(win.limit - math.ceil(cur + win.prev * (w - into) / w), 0)
    out[#out + 1] = reset
  end
  if #set > 0 then redis.call('HSET', scope.hash, unpack(set)) end
  if fresh then
    -- A window's first count: windows no estimate reads any more go, and the hash
    -- lives to the end of the next window of its longest dimension.
    if redis.call('HLEN', scope.hash) > 2 * #scope.windows then
      local keep = {}
      for _, win in ipairs(scope.windows) do
        keep[win.name .. ':' .. win.idx] = true
        keep[win.name .. ':' .. (win.idx - 1)] = true
      end
      for _, f in ipairs(redis.call('HKEYS', scope.hash)) do
        if not keep[f] then redis.call('HDEL', scope.hash, f) end
      end
    end
    redis.call('PEXPIRE', scope.hash, 2 * longest)
  end
  if scope.concurrency > 0 then
    redis.call('ZADD', scope.zset, now + ttl, member)
    -- A new set gets a TTL; the holders' renewals keep a live one.
    if scope.held == 0 then redis.call('PEXPIRE', scope.zset, ttl * 2) end
    out[#out + 1] = scope.concurrency - scope.held - 1
    out[#out + 1] = 0
  end
end
return out
";

const FINISH: &str = r"
-- The ends of requests, several at once. KEYS: two per scope of each request, as for
-- admission. ARGV: per request its lease member, admission time (ms), the tokens its
-- answer used and its number of scopes, then per scope: the number of token windows,
-- three values per window (name, length in ms, tokens reserved), and 1 when it holds
-- a concurrency lease (else 0).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local at, k = 1, 0
while at <= #ARGV do
  local member, admitted, used = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local scopes = tonumber(ARGV[at + 3])
  at = at + 4
  for _ = 1, scopes do
    local hash, zset = KEYS[k + 1], KEYS[k + 2]
    k = k + 2
    local windows = tonumber(ARGV[at])
    for d = 1, windows do
      local i = at + 3 * (d - 1)
      local name, w, reserved = ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
      local was, idx = math.floor(admitted / w), math.floor(now / w)
      if was == idx then
        if used ~= reserved then redis.call('HINCRBY', hash, name .. ':' .. idx, used - reserved) end
      else
        if reserved > 0 and was == idx - 1 then
          redis.call('HINCRBY', hash, name .. ':' .. was, -reserved)
        end
        if used > 0 then redis.call('HINCRBY', hash, name .. ':' .. idx, used) end
      end
    end
    at = at + 1 + 3 * windows
    if ARGV[at] == '1' then redis.call('ZREM', zset, member) end
    at = at + 1
  end
end
return k
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

/// Lua counts in doubles: integers up to 2^53 are exact; larger limits are that
/// (a limit nobody reaches either way).
const LUA_EXACT: u64 = 1 << 53;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Requests,
    Tokens,
    Concurrency,
}

/// One limit of one scope, numbered as the admission script numbers them.
struct Entry {
    kind: Kind,
    /// The dimension's name (`rpm`, `tpd`...), the window's field prefix.
    name: &'static str,
    window_ms: u64,
    limit: u64,
    /// Whose limit, and what the refusal says of it.
    scope: usize,
    unit: &'static str,
}

/// A scope's two keys: its windows and its concurrency leases.
fn keys(scope: &Scope) -> [String; 2] {
    let name = match scope {
        Scope::ApiKey(id) => format!("k:{id}"),
        Scope::Model(model) => format!("m:{model}"),
    };
    [
        format!("aisix:{{rl}}:{name}"),
        format!("aisix:{{rl}}:{name}:concurrency"),
    ]
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
    /// Ends of requests waiting to be sent (see [`settle_ends`]).
    ended: Mutex<Vec<Ended>>,
    ending: Notify,
}

/// A request's end, queued.
struct Ended {
    member: String,
    admitted_ms: u64,
    reserved: u64,
    used: u64,
    finish: Vec<Settle>,
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
    /// What the end settles, per scope. Empty: nothing to settle.
    finish: Vec<Settle>,
    pub used: AtomicU64,
}

/// A scope's part of a request's end.
struct Settle {
    keys: [String; 2],
    /// Token windows: (name, length in ms).
    tokens: Vec<(&'static str, u64)>,
    /// It holds a concurrency lease.
    leased: bool,
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
            ended: Mutex::new(Vec::new()),
            ending: Notify::new(),
        });
        tokio::spawn(renew_leases(Arc::downgrade(&limits)));
        tokio::spawn(settle_ends(Arc::downgrade(&limits)));
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
        for (i, (scope, limits)) in scopes.iter().enumerate() {
            let [windows, leases] = keys(scope);
            invocation.key(windows).key(leases);
            let of_scope = entries.iter().filter(|e| e.scope == i);
            let windows: Vec<&Entry> = of_scope
                .clone()
                .filter(|e| e.kind != Kind::Concurrency)
                .collect();
            invocation.arg(windows.len());
            for entry in windows {
                let cost = if entry.kind == Kind::Tokens {
                    reserve
                } else {
                    1
                };
                invocation
                    .arg(entry.name)
                    .arg(entry.window_ms)
                    .arg(entry.limit.min(LUA_EXACT))
                    .arg(cost.min(LUA_EXACT));
            }
            invocation.arg(limits.concurrency.unwrap_or(0).min(LUA_EXACT));
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
        let finish: Vec<_> = scopes
            .iter()
            .enumerate()
            .map(|(i, (scope, limits))| {
                let tokens: Vec<(&'static str, u64)> = entries
                    .iter()
                    .filter(|e| e.scope == i && e.kind == Kind::Tokens)
                    .map(|e| (e.name, e.window_ms))
                    .collect();
                Settle {
                    keys: keys(scope),
                    tokens,
                    leased: limits.concurrency.is_some(),
                }
            })
            .filter(|settle| !settle.tokens.is_empty() || settle.leased)
            .collect();
        let held: Vec<String> = finish
            .iter()
            .filter(|settle| settle.leased)
            .map(|settle| settle.keys[1].clone())
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

/// Every limit of `scopes`, in the admission script's order: per scope its windows,
/// then its concurrency.
fn entries(scopes: &[(Scope, RateLimit)]) -> Vec<Entry> {
    let mut entries = Vec::new();
    for (i, (_, limits)) in scopes.iter().enumerate() {
        for dimension in DIMENSIONS {
            if let Some(limit) = dimension.limit(limits) {
                entries.push(Entry {
                    kind: if dimension.tokens() {
                        Kind::Tokens
                    } else {
                        Kind::Requests
                    },
                    name: dimension.name(),
                    window_ms: dimension.window_ms(),
                    limit,
                    scope: i,
                    unit: dimension.unit(),
                });
            }
        }
        if let Some(limit) = limits.concurrency {
            entries.push(Entry {
                kind: Kind::Concurrency,
                name: "concurrency",
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
        let limits = &self.limits;
        limits
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.member);
        limits
            .ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Ended {
                member: std::mem::take(&mut self.member),
                admitted_ms: self.admitted_ms,
                reserved: self.reserved,
                used: self.used.load(Ordering::Relaxed),
                finish: std::mem::take(&mut self.finish),
            });
        limits.ending.notify_one();
    }
}

/// Sends queued request ends, until the limiter is dropped: one task, one script run
/// at a time, so the ends that come while one is in flight go together in the next
/// (under load, many per round trip). A failed send is lost: reservations stay counted
/// until their window ends, leases until their TTL. (Holding ends back a few
/// milliseconds to batch more made the next admissions slower, not faster: measured
/// with `aisix-bench limiter`.)
async fn settle_ends(limits: Weak<SharedLimits>) {
    loop {
        {
            let Some(limits) = limits.upgrade() else {
                return;
            };
            tokio::select! {
                () = limits.ending.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => continue,
            }
        }
        let Some(limits) = limits.upgrade() else {
            return;
        };
        let ended =
            std::mem::take(&mut *limits.ended.lock().unwrap_or_else(PoisonError::into_inner));
        if ended.is_empty() {
            continue;
        }
        let mut invocation = limits.scripts.finish.prepare_invoke();
        for end in &ended {
            invocation
                .arg(&end.member)
                .arg(end.admitted_ms)
                .arg(end.used)
                .arg(end.finish.len());
            for settle in &end.finish {
                let [windows, leases] = &settle.keys;
                invocation.key(windows).key(leases).arg(settle.tokens.len());
                for (name, window) in &settle.tokens {
                    invocation.arg(*name).arg(*window).arg(end.reserved);
                }
                invocation.arg(u8::from(settle.leased));
            }
        }
        let _: Result<i64, _> = limits.redis.run(Op::Script(invocation)).await;
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
