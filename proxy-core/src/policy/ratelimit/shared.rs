//! Rate limits shared by replicas, counted in Redis (`ratelimit.backend: redis`).
//!
//! Each admission is one script run (one round trip) that checks every limit of every
//! scope and, only when all admit, counts the request: so two replicas never both
//! take the last slot, and a refusal by one scope counts nothing in another. Windows
//! slide: the estimate is the current fixed window's count plus the previous window's,
//! weighted by the share of it still inside the sliding window, so there is no burst
//! of twice the limit at a window edge.
//!
//! The script only reads, decides and writes; the replica works out the window
//! fields, weights, quotas and waits from its own clock (replicas' clocks differ by
//! milliseconds, windows are seconds to days long). Lua is slow enough that this
//! halves Redis's time per admission, which bounds what one Redis serves.
//!
//! Token limits reserve the request's estimate at admission and settle it with the
//! real count when the answer ends. Concurrency slots are leases with a TTL, renewed
//! while held, so the slots of a replica that died expire. The ends of requests
//! (settle and release) ride along with the next admission, so a busy replica makes
//! one round trip per request; ends no admission takes within a millisecond are sent
//! by a background task, many in one script run.
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

use redis::{Script, ScriptInvocation};
use tokio::sync::Notify;

use super::{DIMENSIONS, Quota, Refusal, Scope, unix_ms};
use crate::resources::RateLimit;
use crate::shared::redis::{Op, Redis, Trouble};

const ADMIT: &str = r"
-- Ends of earlier requests, then (when ARGV goes on) one admission. The ends go first
-- so what they free counts for the admission.
-- KEYS: two per scope: its windows (a hash) and its concurrency leases (a sorted set,
-- scored by expiry); first those of each end's scopes, then those of the scopes to
-- admit.
-- ARGV[1]: the number of ends. Per end: its lease member and number of scopes; per
-- scope: the number of counts to change, that many (field, amount) pairs, and 1 when
-- it holds a lease (else 0).
-- Then the admission: lease member, now (ms), lease ttl (ms); per scope: the number of
-- windows, five values per window (current field, previous field, limit, cost, the
-- weight of the previous window), the hash's ttl (ms) and the concurrency limit (0:
-- none).
-- Answer: 1, then two numbers per limit, in order: the current and the previous
-- window's counts before this request, or for concurrency the leases held and 0. A
-- refusal: 0, the refusing limit's number and its two numbers.
local at, k = 2, 0
for _ = 1, tonumber(ARGV[1]) do
  local member, scopes = ARGV[at], tonumber(ARGV[at + 1])
  at = at + 2
  for _ = 1, scopes do
    local hash, zset = KEYS[k + 1], KEYS[k + 2]
    k = k + 2
    for _ = 1, tonumber(ARGV[at]) do
      redis.call('HINCRBY', hash, ARGV[at + 1], ARGV[at + 2])
      at = at + 2
    end
    if ARGV[at + 1] == '1' then redis.call('ZREM', zset, member) end
    at = at + 2
  end
end
if at > #ARGV then return {1} end
local member, now, ttl = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
at = at + 3
local out, n, writes = {1}, 0, {}
for s = 1, (#KEYS - k) / 2 do
  local write = {hash = KEYS[k + 2 * s - 1], zset = KEYS[k + 2 * s], set = {}, fields = {}}
  local windows, first = tonumber(ARGV[at]), at + 1
  at = first + 5 * windows
  write.ttl, write.concurrency = ARGV[at], tonumber(ARGV[at + 1])
  at = at + 2
  if windows > 0 then
    for d = 0, windows - 1 do
      write.fields[2 * d + 1] = ARGV[first + 5 * d]
      write.fields[2 * d + 2] = ARGV[first + 5 * d + 1]
    end
    local counts = redis.call('HMGET', write.hash, unpack(write.fields))
    for d = 0, windows - 1 do
      n = n + 1
      local i = first + 5 * d
      local cur, prev = tonumber(counts[2 * d + 1]) or 0, tonumber(counts[2 * d + 2]) or 0
      if cur + prev * tonumber(ARGV[i + 4]) + 1 > tonumber(ARGV[i + 2]) then
        return {0, n, cur, prev}
      end
      out[#out + 1] = cur
      out[#out + 1] = prev
      local cost = tonumber(ARGV[i + 3])
      if cost > 0 then
        write.set[#write.set + 1] = ARGV[i]
        write.set[#write.set + 1] = cur + cost
      end
      if cur == 0 then write.fresh = true end
    end
  end
  if write.concurrency > 0 then
    n = n + 1
    local held = redis.call('ZCARD', write.zset)
    -- Leases a dead replica stopped renewing are only looked for when they matter.
    if held >= write.concurrency then
      redis.call('ZREMRANGEBYSCORE', write.zset, '-inf', now)
      held = redis.call('ZCARD', write.zset)
    end
    if held >= write.concurrency then return {0, n, held, 0} end
    write.held = held
    out[#out + 1] = held
    out[#out + 1] = 0
  end
  writes[s] = write
end
for _, write in ipairs(writes) do
  if #write.set > 0 then redis.call('HSET', write.hash, unpack(write.set)) end
  if write.fresh then
    -- A window's first count: fields no estimate reads any more go, and the hash
    -- lives to the end of the next window of its longest dimension.
    if redis.call('HLEN', write.hash) > #write.fields then
      local keep = {}
      for _, f in ipairs(write.fields) do keep[f] = true end
      for _, f in ipairs(redis.call('HKEYS', write.hash)) do
        if not keep[f] then redis.call('HDEL', write.hash, f) end
      end
    end
    redis.call('PEXPIRE', write.hash, write.ttl)
  end
  if write.concurrency > 0 then
    redis.call('ZADD', write.zset, now + ttl, member)
    -- A new set gets a TTL; the holders' renewals keep a live one.
    if write.held == 0 then redis.call('PEXPIRE', write.zset, ttl * 2) end
  end
end
return out
";

const RENEW: &str = r"
-- KEYS[i]: a concurrency counter; ARGV[1]: the new expiry (ms, the replica's clock, as
-- at admission); ARGV[2]: lease ttl (ms); ARGV[i + 2]: a lease in it.
local expiry, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', expiry, ARGV[i + 2])
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
return #KEYS
";

/// How long a request's end waits for the next admission to carry it before it is
/// sent alone. Held longer, a slot freed here is seen by other replicas later.
const END_HOLD: Duration = Duration::from_millis(1);

/// At most this many ends ride along with one admission, so it stays quick.
const ENDS_PER_ADMISSION: usize = 16;

/// Lua counts in doubles: integers up to 2^53 are exact; larger limits are that
/// (a limit nobody reaches either way).
const LUA_EXACT: u64 = 1 << 53;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Requests,
    Tokens,
    Concurrency,
}

/// One limit of one scope at one instant, numbered as the admission script numbers
/// them.
struct Entry {
    kind: Kind,
    /// The dimension's name (`rpm`, `tpd`...), the window's field prefix.
    name: &'static str,
    window_ms: u64,
    limit: u64,
    /// What admission adds: 1 request, or the tokens reserved.
    cost: u64,
    /// The current window and how far into it (ms).
    index: u64,
    into: u64,
    /// Whose limit, and what the refusal says of it.
    scope: usize,
    unit: &'static str,
}

impl Entry {
    fn field(&self, index: u64) -> String {
        format!("{}:{index}", self.name)
    }

    /// The share of the previous window still inside the sliding window.
    fn weight(&self) -> f64 {
        (self.window_ms - self.into) as f64 / self.window_ms as f64
    }

    /// The sliding estimate of `cur` and `prev`, rounded up.
    fn estimate(&self, cur: u64, prev: u64) -> u64 {
        (cur as f64 + prev as f64 * self.weight()).ceil() as u64
    }

    /// What is left after admission, from the counts Redis held before it.
    fn quota(&self, cur: u64, prev: u64) -> Quota {
        if self.kind == Kind::Concurrency {
            return Quota {
                limit: self.limit,
                remaining: self.limit.saturating_sub(cur + 1),
                reset_ms: 0,
            };
        }
        let cur = cur.saturating_add(self.cost);
        let (w, into) = (self.window_ms, self.into);
        Quota {
            limit: self.limit,
            remaining: self.limit.saturating_sub(self.estimate(cur, prev)),
            reset_ms: if cur > 0 {
                2 * w - into
            } else if prev > 0 {
                w - into
            } else {
                0
            },
        }
    }

    /// How long (ms) until a refused request would fit: until the estimate is down to
    /// `limit - 1`, the previous window's share shrinking as the window slides.
    fn wait(&self, cur: u64, prev: u64) -> u64 {
        if self.kind == Kind::Concurrency {
            return 1000;
        }
        let (w, into, room) = (self.window_ms, self.into, self.limit.saturating_sub(1));
        let (w, left) = (u128::from(w), u128::from(w - into));
        let wait = if cur <= room && prev > 0 {
            left.saturating_sub(u128::from(room - cur) * w / u128::from(prev))
        } else {
            left + w - u128::from(room) * w / u128::from(cur.max(1))
        };
        u64::try_from(wait).unwrap_or(u64::MAX).max(1)
    }
}

/// The refusal of `entry`, free again in `wait_ms`.
fn refusal(scopes: &[(Scope, RateLimit)], entry: &Entry, wait_ms: u64) -> Refusal {
    let (scope, _) = &scopes[entry.scope];
    Refusal {
        message: format!(
            "rate limit exceeded: {} {} for {}",
            entry.limit,
            entry.unit,
            scope.describe()
        ),
        retry_after_secs: wait_ms.div_ceil(1000).max(1),
        scope: scope.label(),
    }
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
        let now = unix_ms();
        let entries = entries(scopes, reserve, now);
        // A zero limit refuses whatever Redis holds.
        if let Some(entry) = entries.iter().find(|e| e.limit == 0) {
            let wait = if entry.kind == Kind::Concurrency {
                1000
            } else {
                entry.window_ms
            };
            return Ok(Decision::Refused(refusal(scopes, entry, wait)));
        }
        let member = format!(
            "{}:{}",
            self.replica,
            self.next_lease.fetch_add(1, Ordering::Relaxed)
        );
        let mut invocation = self.scripts.admit.prepare_invoke();
        // Ends waiting to be sent ride along: one round trip for both.
        let ended = {
            let mut queue = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
            let take = queue.len().min(ENDS_PER_ADMISSION);
            queue.drain(..take).collect::<Vec<_>>()
        };
        push_ends(&mut invocation, &ended, now);
        invocation
            .arg(&member)
            .arg(now)
            .arg(u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX));
        for (i, (scope, limits)) in scopes.iter().enumerate() {
            let [windows, leases] = keys(scope);
            invocation.key(windows).key(leases);
            let windows: Vec<&Entry> = entries
                .iter()
                .filter(|e| e.scope == i && e.kind != Kind::Concurrency)
                .collect();
            invocation.arg(windows.len());
            for entry in &windows {
                invocation
                    .arg(entry.field(entry.index))
                    .arg(entry.field(entry.index.wrapping_sub(1)))
                    .arg(entry.limit.min(LUA_EXACT))
                    .arg(entry.cost.min(LUA_EXACT))
                    .arg(entry.weight().to_string());
            }
            let longest = windows.iter().map(|e| e.window_ms).max().unwrap_or(0);
            invocation
                .arg(2 * longest)
                .arg(limits.concurrency.unwrap_or(0).min(LUA_EXACT));
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
            let wait = entry.wait(number(2)?, number(3)?);
            return Ok(Decision::Refused(refusal(scopes, entry, wait)));
        }
        let (mut requests, mut tokens) = (None, None);
        for (i, entry) in entries.iter().enumerate() {
            if entry.kind == Kind::Concurrency || !matches!(scopes[entry.scope].0, Scope::ApiKey(_))
            {
                continue;
            }
            let quota = entry.quota(number(1 + 2 * i)?, number(2 + 2 * i)?);
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
                admitted_ms: now,
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
        let ttl = u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut invocation = self.scripts.renew.prepare_invoke();
        invocation.arg(unix_ms().saturating_add(ttl)).arg(ttl);
        for (key, member) in &pairs {
            invocation.key(key).arg(member);
        }
        // A failure is counted by the connection; the next round tries again.
        let _: Result<i64, _> = self.redis.run(Op::Script(invocation)).await;
    }
}

/// Every limit of `scopes` at `now` (ms), in the admission script's order: per scope
/// its windows, then its concurrency.
fn entries(scopes: &[(Scope, RateLimit)], reserve: u64, now: u64) -> Vec<Entry> {
    let mut entries = Vec::new();
    for (i, (_, limits)) in scopes.iter().enumerate() {
        for dimension in DIMENSIONS {
            if let Some(limit) = dimension.limit(limits) {
                let window_ms = dimension.window_ms();
                let (kind, cost) = if dimension.tokens() {
                    (Kind::Tokens, reserve)
                } else {
                    (Kind::Requests, 1)
                };
                entries.push(Entry {
                    kind,
                    name: dimension.name(),
                    window_ms,
                    limit,
                    cost,
                    index: now / window_ms,
                    into: now % window_ms,
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
                cost: 1,
                index: 0,
                into: 0,
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

/// Sends the request ends no admission took along (see [`SharedLimits::admit`]),
/// until the limiter is dropped: an end waits [`END_HOLD`] for the next admission,
/// then goes with every end queued by then in one script run. A failed send is lost:
/// reservations stay counted until their window ends, leases until their TTL.
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
        tokio::time::sleep(END_HOLD).await;
        let Some(limits) = limits.upgrade() else {
            return;
        };
        let ended =
            std::mem::take(&mut *limits.ended.lock().unwrap_or_else(PoisonError::into_inner));
        if ended.is_empty() {
            continue;
        }
        let mut invocation = limits.scripts.admit.prepare_invoke();
        push_ends(&mut invocation, &ended, unix_ms());
        let _: Result<Vec<i64>, _> = limits.redis.run(Op::Script(invocation)).await;
    }
}

/// The admission script's leading part: `ended`, settled at `now` (ms). A token
/// window still the one of admission gets the difference between used and reserved;
/// one that turned since gets the used tokens, and the reservation leaves the
/// previous window (older windows are no longer read).
fn push_ends(invocation: &mut ScriptInvocation, ended: &[Ended], now: u64) {
    invocation.arg(ended.len());
    for end in ended {
        invocation.arg(&end.member).arg(end.finish.len());
        for settle in &end.finish {
            let [windows, leases] = &settle.keys;
            invocation.key(windows).key(leases);
            let mut changes: Vec<(String, i128)> = Vec::new();
            for (name, window) in &settle.tokens {
                let (was, index) = (end.admitted_ms / window, now / window);
                let (used, reserved) = (i128::from(end.used), i128::from(end.reserved));
                if was == index {
                    changes.push((format!("{name}:{index}"), used - reserved));
                } else {
                    if was + 1 == index {
                        changes.push((format!("{name}:{was}"), -reserved));
                    }
                    changes.push((format!("{name}:{index}"), used));
                }
            }
            changes.retain(|(_, amount)| *amount != 0);
            invocation.arg(changes.len());
            for (field, amount) in changes {
                invocation.arg(field).arg(amount.to_string());
            }
            invocation.arg(u8::from(settle.leased));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rpm(limit: u64, into: u64) -> Entry {
        let limits = RateLimit {
            rpm: Some(limit),
            ..RateLimit::default()
        };
        let scopes = [(Scope::ApiKey("k".into()), limits)];
        entries(&scopes, 0, 7 * 60_000 + into).remove(0)
    }

    #[test]
    fn a_refusal_waits_until_the_sliding_estimate_has_room() {
        // Half-way into the window, 20 in the previous one count as 10: full. At 33 s
        // they count as 9, room for one.
        let entry = rpm(10, 30_000);
        assert_eq!(entry.field(entry.index), "rpm:7");
        assert_eq!(entry.wait(0, 20), 3_000);
        // The current window is full by itself: its end, then until the share of
        // it counted from the next window is down to 9 of 12.
        assert_eq!(entry.wait(12, 0), 30_000 + 15_000);
        // Never less than a millisecond.
        assert_eq!(rpm(10, 59_999).wait(9, 1), 1);
    }

    #[test]
    fn the_quota_counts_this_request_and_the_previous_windows_share() {
        let entry = rpm(100, 15_000);
        let quota = entry.quota(9, 40);
        // 9 + 1 + 40 x 0.75 = 40.
        assert_eq!(quota.remaining, 60);
        assert_eq!(quota.reset_ms, 2 * 60_000 - 15_000);
        assert_eq!(rpm(5, 0).quota(10, 10).remaining, 0);
    }
}
