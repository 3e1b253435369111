//! The shared rate limiter against a real Redis, driven through its API: the
//! decisions of the scripts (sliding windows, retry hints, token reservations,
//! concurrency leases) without the HTTP around them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::sync::Arc;
use std::time::Duration;

use proxy_core::policy::ratelimit::{Denied, RateLimiter, Scope, SharedOptions};
use proxy_core::resources::RateLimit;
use proxy_core::shared::redis::{Redis, RedisOptions};
use tests::eventually;
use tests::redis::RedisServer;

/// A limiter on `server`, once its connection is up (until then the local counters
/// would decide).
async fn limiter(server: &RedisServer, fail_closed: bool, lease_ttl: Duration) -> Arc<RateLimiter> {
    let redis = Redis::start(
        "ratelimit",
        &RedisOptions {
            url: Some(server.url()),
            timeout_ms: 500,
            ..RedisOptions::default()
        },
    )
    .unwrap();
    connected(&redis).await;
    Arc::new(RateLimiter::new(Some(SharedOptions {
        redis,
        lease_ttl,
        fail_closed,
    })))
}

async fn connected(redis: &Redis) {
    eventually(
        "the limiter reaches Redis",
        Duration::from_secs(10),
        || async { redis.connected() },
    )
    .await;
}

fn key(id: &str, limits: RateLimit) -> Vec<(Scope, RateLimit)> {
    vec![(Scope::ApiKey(id.into()), limits)]
}

#[tokio::test]
async fn two_limiters_on_one_redis_share_a_limit_and_say_when_it_frees() {
    let server = RedisServer::start().await;
    let a = limiter(&server, false, Duration::from_secs(30)).await;
    let b = limiter(&server, false, Duration::from_secs(30)).await;
    let limits = RateLimit {
        rpm: Some(4),
        ..RateLimit::default()
    };
    let mut remaining = Vec::new();
    for (i, limiter) in [&a, &b, &a, &b].into_iter().enumerate() {
        let lease = limiter
            .admit(key("shared", limits.clone()), 0)
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e:?}"));
        remaining.push(lease.requests.unwrap().remaining);
    }
    assert_eq!(remaining, [3, 2, 1, 0], "one count across both limiters");
    let Err(Denied::Limited(refusal)) = b.admit(key("shared", limits.clone()), 0).await else {
        panic!("the fifth request is refused");
    };
    assert_eq!(
        refusal.message,
        "rate limit exceeded: 4 requests per minute for this API key"
    );
    // Sliding: a slot frees when enough of this window has slid out, at most two
    // windows from now.
    assert!(
        (1..=120).contains(&refusal.retry_after_secs),
        "{}",
        refusal.retry_after_secs
    );
    // Other keys are not affected.
    assert!(a.admit(key("other", limits), 0).await.is_ok());
    let counted = server.cli(&["HVALS", "aisix:{rl}:k:shared"]);
    assert_eq!(counted, "4", "refusals are not counted");
    // A limit past what Lua counts exactly is still decided in Redis.
    let huge = RateLimit {
        rpd: Some(u64::MAX),
        ..RateLimit::default()
    };
    let lease = a.admit(key("huge", huge), 0).await.unwrap();
    assert!(lease.requests.unwrap().remaining > 1 << 52);
    assert_eq!(server.cli(&["HVALS", "aisix:{rl}:k:huge"]), "1");
}

#[tokio::test]
async fn a_refusal_by_one_scope_counts_nothing_in_the_other() {
    let server = RedisServer::start().await;
    let limiter = limiter(&server, false, Duration::from_secs(30)).await;
    let both = |model_rpm| {
        vec![
            (
                Scope::ApiKey("k".into()),
                RateLimit {
                    rpd: Some(10),
                    ..RateLimit::default()
                },
            ),
            (
                Scope::Model("m".into()),
                RateLimit {
                    rpd: Some(model_rpm),
                    ..RateLimit::default()
                },
            ),
        ]
    };
    limiter.admit(both(1), 0).await.unwrap();
    let Err(Denied::Limited(refusal)) = limiter.admit(both(1), 0).await else {
        panic!("the model's limit refuses");
    };
    assert_eq!(
        refusal.message,
        "rate limit exceeded: 1 requests per day for model 'm'"
    );
    let lease = limiter.admit(both(5), 0).await.unwrap();
    assert_eq!(
        lease.requests.unwrap().remaining,
        8,
        "the refusal counted nothing"
    );
}

#[tokio::test]
async fn token_windows_hold_reservations_and_settle_the_real_count() {
    let server = RedisServer::start().await;
    let limiter = limiter(&server, false, Duration::from_secs(30)).await;
    let limits = RateLimit {
        tpd: Some(100),
        ..RateLimit::default()
    };
    let first = limiter.admit(key("t", limits.clone()), 120).await.unwrap();
    assert_eq!(first.tokens.unwrap().remaining, 0, "the reservation counts");
    let Err(Denied::Limited(refusal)) = limiter.admit(key("t", limits.clone()), 10).await else {
        panic!("refused while the reservation is held");
    };
    assert!(
        refusal.message.contains("100 tokens per day"),
        "{}",
        refusal.message
    );
    // The answer used 30 tokens: the reservation is replaced by them.
    first.charge_tokens(30, 0);
    drop(first);
    eventually(
        "the reservation is settled",
        Duration::from_secs(5),
        || async { server.cli(&["HVALS", "aisix:{rl}:k:t"]) == "30" },
    )
    .await;
    let second = limiter.admit(key("t", limits), 0).await.unwrap();
    assert_eq!(second.tokens.unwrap().remaining, 70);
}

#[tokio::test]
async fn concurrency_leases_are_renewed_while_held_and_released_at_the_end() {
    let server = RedisServer::start().await;
    let ttl = Duration::from_secs(2);
    let a = limiter(&server, false, ttl).await;
    let b = limiter(&server, false, ttl).await;
    let limits = RateLimit {
        concurrency: Some(1),
        ..RateLimit::default()
    };
    let held = a.admit(key("c", limits.clone()), 0).await.unwrap();
    let Err(Denied::Limited(refusal)) = b.admit(key("c", limits.clone()), 0).await else {
        panic!("the slot is taken on the other limiter");
    };
    assert_eq!(
        refusal.message,
        "rate limit exceeded: 1 concurrent requests for this API key"
    );
    // Held past its TTL: renewed while its limiter lives.
    tokio::time::sleep(ttl + Duration::from_millis(800)).await;
    assert!(
        b.admit(key("c", limits.clone()), 0).await.is_err(),
        "still held"
    );
    drop(held);
    eventually("released at the end", Duration::from_secs(1), || async {
        b.admit(key("c", limits.clone()), 0).await.is_ok()
    })
    .await;
    // A replica that dies holding a lease: tests/tests/shared_state.rs kills one.
}

#[tokio::test]
async fn a_request_end_rides_along_with_the_next_admission_or_goes_alone() {
    let server = RedisServer::start().await;
    let a = limiter(&server, false, Duration::from_secs(30)).await;
    let limits = RateLimit {
        concurrency: Some(1),
        tpm: Some(1_000),
        ..RateLimit::default()
    };
    // The next admission, made at once, carries the previous request's end first:
    // the one slot is free for it and the tokens are settled to the real count.
    for round in 0..20 {
        let lease = a
            .admit(key("r", limits.clone()), 100)
            .await
            .unwrap_or_else(|e| {
                panic!("round {round}: the end before was carried along, yet {e:?}")
            });
        lease.charge_tokens(10, 0);
        drop(lease);
    }
    // The last end goes alone, within moments: the slot is free on Redis and the
    // minute's window holds 20 requests of 10 tokens, no reservation left.
    let b = limiter(&server, false, Duration::from_secs(30)).await;
    eventually(
        "the last end was sent alone",
        Duration::from_secs(1),
        || async {
            let held = server.cli(&["ZCARD", "aisix:{rl}:k:r:concurrency"]);
            held.trim() == "0"
        },
    )
    .await;
    // (Two windows when the minute turned meanwhile: the sum is the same.)
    let fields = server.cli(&["HGETALL", "aisix:{rl}:k:r"]);
    let tokens: i64 = fields
        .lines()
        .skip(1)
        .step_by(2)
        .map(|v| v.trim().parse::<i64>().expect("a count"))
        .sum();
    assert_eq!(tokens, 200, "20 x 10 tokens settled: {fields}");
    assert!(b.admit(key("r", limits.clone()), 100).await.is_ok());
}

#[tokio::test]
async fn without_redis_the_local_counters_decide_or_the_policy_refuses() {
    let mut server = RedisServer::start().await;
    let open = limiter(&server, false, Duration::from_secs(30)).await;
    let closed = limiter(&server, true, Duration::from_secs(30)).await;
    server.kill().await;
    let limits = RateLimit {
        rpd: Some(2),
        ..RateLimit::default()
    };
    let started = std::time::Instant::now();
    // Local counters: the limit still holds within this limiter.
    assert!(open.admit(key("f", limits.clone()), 0).await.is_ok());
    assert!(open.admit(key("f", limits.clone()), 0).await.is_ok());
    assert!(matches!(
        open.admit(key("f", limits.clone()), 0).await,
        Err(Denied::Limited(_))
    ));
    assert_eq!(
        closed.admit(key("f", limits.clone()), 0).await.err(),
        Some(Denied::Unavailable)
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "no request waits long for a Redis that is gone: {:?}",
        started.elapsed()
    );
    server.restart().await;
    eventually(
        "the limiter is back on Redis",
        Duration::from_secs(10),
        || async { closed.admit(key("f", limits.clone()), 0).await.is_ok() },
    )
    .await;
    let lease = closed.admit(key("f", limits), 0).await.unwrap();
    assert_eq!(
        lease.requests.unwrap().remaining,
        0,
        "counted in Redis again"
    );
}

#[tokio::test]
async fn windows_slide_so_a_window_edge_gives_no_second_burst() {
    let server = RedisServer::start().await;
    let limiter = limiter(&server, false, Duration::from_secs(30)).await;
    let limits = RateLimit {
        rps: Some(4),
        ..RateLimit::default()
    };
    // Fill the limit late in one second (Redis runs on this machine's clock)...
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let to_late =
        Duration::from_millis(1850) - Duration::from_millis(u64::from(now.subsec_millis()));
    tokio::time::sleep(to_late).await;
    for _ in 0..4 {
        limiter.admit(key("edge", limits.clone()), 0).await.unwrap();
    }
    // ...and ask again just after the edge: a fixed window would admit four more at
    // once; the sliding one still counts most of the last second.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut admitted = 0;
    for _ in 0..4 {
        if limiter.admit(key("edge", limits.clone()), 0).await.is_ok() {
            admitted += 1;
        }
    }
    assert!(
        admitted < 4,
        "a second burst of {admitted} at the window edge"
    );
}
