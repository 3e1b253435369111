//! The shared rate limiter alone, in this process: sequential admissions (one in
//! flight, like c=1) against a Redis, timed one by one, beside a bare `PING` through
//! the same connection. Says how much of a limited request's added latency is the
//! limiter's own round trip.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_core::policy::ratelimit::{RateLimiter, Scope, SharedOptions};
use proxy_core::resources::RateLimit;
use proxy_core::shared::redis::{Op, Redis, RedisOptions};

#[derive(Debug, Clone, clap::Args)]
pub struct LimiterArgs {
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// Timed calls of each kind.
    #[arg(long, default_value_t = 5000)]
    pub calls: usize,
}

fn percentile_us(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1].as_secs_f64() * 1e6
}

pub async fn run(args: &LimiterArgs) {
    let redis = Redis::start(
        "ratelimit",
        &RedisOptions {
            url: Some(args.redis.clone()),
            timeout_ms: 1000,
            ..RedisOptions::default()
        },
    )
    .expect("redis options");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis.connected() {
        assert!(Instant::now() < deadline, "no connection to {}", args.redis);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let limiter = Arc::new(RateLimiter::new(Some(SharedOptions {
        redis: redis.clone(),
        lease_ttl: Duration::from_secs(60),
        fail_closed: true,
    })));
    let one = RateLimit {
        rpm: Some(u64::MAX / 4),
        ..RateLimit::default()
    };
    let full = RateLimit {
        rpm: Some(1_000_000_000),
        rpd: Some(1_000_000_000_000),
        tpm: Some(1_000_000_000_000),
        concurrency: Some(100_000),
        ..RateLimit::default()
    };
    let mut rows = Vec::new();
    for (name, limits) in [
        ("ping", None),
        ("admit rpm", Some(one)),
        ("admit rpm+rpd+tpm+concurrency", Some(full)),
    ] {
        let mut times = Vec::with_capacity(args.calls);
        for _ in 0..args.calls {
            let started = Instant::now();
            match &limits {
                None => {
                    let _: String = redis.run(Op::Cmd(redis::cmd("PING"))).await.expect("PING");
                }
                Some(limits) => {
                    let lease = limiter
                        .admit(vec![(Scope::ApiKey("bench".into()), limits.clone())], 30)
                        .await
                        .expect("admitted");
                    times.push(started.elapsed());
                    lease.charge_tokens(13, 0);
                    drop(lease);
                    // Let the settlement go out first, as a gateway's next request
                    // would arrive after its answer.
                    tokio::task::yield_now().await;
                    continue;
                }
            }
            times.push(started.elapsed());
        }
        rows.push((
            name,
            percentile_us(&mut times, 50.0),
            percentile_us(&mut times, 99.0),
        ));
    }
    for (name, p50, p99) in rows {
        println!("{name}: p50 {p50:.0} µs, p99 {p99:.0} µs");
    }
}
