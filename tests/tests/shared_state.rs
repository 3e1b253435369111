//! Several real `aisix-agent` replicas sharing rate limits, concurrency and the
//! response cache through a real Redis: exact shared limits, a replica killed while
//! holding slots, Redis killed mid-run, and a sentinel failover.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cloud_mock::provider::{MockProvider, Script, Usage};
use serde_json::{Value, json};
use tests::redis::{MASTER_NAME, RedisCluster, RedisServer, Sentinel};
use tests::{Process, addr_in, eventually, get_json, http_client, key_hash, start_agent};

const LIMITED: &str = "shared-limited-key";
const TOKENS: &str = "shared-token-key";
const RESERVING: &str = "shared-reserving-key";
const CONCURRENT: &str = "shared-concurrent-key";
const FREE: &str = "shared-free-key";

/// One provider, a fast and a slow model, and a key per test.
fn resources(api_base: &str) -> String {
    format!(
        r#"
provider_keys:
  - {{id: pk1, display_name: mock, provider: openai, api_base: "{api_base}/v1", api_key: sk-upstream}}
models:
  - {{id: m1, display_name: fast, model_name: up-fast, provider_key_id: pk1}}
  - {{id: m2, display_name: slow, model_name: up-slow, provider_key_id: pk1}}
  - {{id: m3, display_name: costly, model_name: up-costly, provider_key_id: pk1}}
api_keys:
  - {{id: limited, key_hash: {limited}, allowed_models: ["*"], rate_limit: {{rpd: 10}}}}
  - {{id: tokens, key_hash: {tokens}, allowed_models: ["*"], rate_limit: {{tpd: 100}}}}
  - {{id: reserving, key_hash: {reserving}, allowed_models: ["*"], rate_limit: {{tpd: 100}}}}
  - {{id: concurrent, key_hash: {concurrent}, allowed_models: ["*"], rate_limit: {{concurrency: 2}}}}
  - {{id: free, key_hash: {free}, allowed_models: ["*"]}}
"#,
        limited = key_hash(LIMITED),
        tokens = key_hash(TOKENS),
        reserving = key_hash(RESERVING),
        concurrent = key_hash(CONCURRENT),
        free = key_hash(FREE),
    )
}

async fn mock() -> MockProvider {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    mock.set_script_for(
        "up-slow",
        Script {
            headers_delay_ms: 1500,
            ..Script::default()
        },
    );
    mock.set_script_for(
        "up-costly",
        Script {
            usage: Some(Usage {
                prompt_tokens: 30,
                completion_tokens: 20,
                ..Usage::default()
            }),
            ..Script::default()
        },
    );
    mock
}

struct Replica {
    process: Process,
    url: String,
    status: String,
}

/// Replicas of one config (each binds its own ports); returns once every replica has
/// its Redis connections up.
async fn replicas(dir: &std::path::Path, n: usize, config: &str) -> Vec<Replica> {
    let path = write_config(dir, config);
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(start_replica(&path).await);
    }
    for replica in &out {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let states = redis_states(replica).await;
            if states.iter().all(|c| c["connected"] == true) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replica does not reach Redis: {states:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    out
}

/// A config file in `dir` for the resources there, plus `config`.
fn write_config(dir: &std::path::Path, config: &str) -> std::path::PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = dir.join(format!(
        "config-{}.yaml",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(
        &path,
        format!(
            "resources_file: {}\nproxy:\n  addr: 127.0.0.1:0\nshutdown:\n  min_drain_secs: 0\n{config}",
            dir.join("resources.yaml").display()
        ),
    )
    .unwrap();
    path
}

/// One agent on `config`, serving (its Redis connections may still be down).
async fn start_replica(config: &std::path::Path) -> Replica {
    let (mut process, url) = start_agent(config).await;
    let line = process
        .wait_for_line("metrics listener ready", Duration::from_secs(10))
        .await;
    Replica {
        process,
        url,
        status: format!("http://{}", addr_in(&line)),
    }
}

async fn redis_states(replica: &Replica) -> Vec<Value> {
    let status = get_json(&format!("{}/status/config", replica.status)).await;
    status["redis"].as_array().cloned().unwrap_or_default()
}

fn shared_config(redis: &str) -> String {
    format!(
        "ratelimit:\n  backend: redis\n  concurrency_ttl_secs: 2\n  redis: {{url: \"{redis}\", timeout_ms: 1000}}\ncache:\n  enabled: true\n  backend: redis\n  redis: {{url: \"{redis}\", timeout_ms: 1000}}\n"
    )
}

async fn setup(n: usize) -> (RedisServer, MockProvider, tempfile::TempDir, Vec<Replica>) {
    let redis = RedisServer::start().await;
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("resources.yaml"), resources(&mock.url())).unwrap();
    let replicas = replicas(dir.path(), n, &shared_config(&redis.url())).await;
    (redis, mock, dir, replicas)
}

async fn chat(url: &str, key: &str, model: &str, content: &str) -> reqwest::Response {
    http_client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": content}]}))
        .send()
        .await
        .unwrap()
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn three_replicas_share_one_request_limit_exactly() {
    let (_redis, _mock, _dir, replicas) = setup(3).await;
    let calls = (0..30).map(|i| {
        let url = replicas[i % 3].url.clone();
        tokio::spawn(async move {
            let response = chat(&url, LIMITED, "fast", &format!("question {i}")).await;
            let status = response.status().as_u16();
            let remaining = header(&response, "x-ratelimit-remaining-requests");
            let reset = header(&response, "x-ratelimit-reset-requests");
            let retry_after = header(&response, "retry-after");
            let body: Value = response.json().await.unwrap();
            (status, remaining, retry_after, body, reset)
        })
    });
    let mut answers = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        answers.push(call.await.unwrap());
    }
    let passed: Vec<_> = answers.iter().filter(|a| a.0 == 200).collect();
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    assert_eq!((passed.len(), refused.len()), (10, 20), "{answers:?}");
    // Every admitted request saw its own count: the decision is one atomic step.
    let mut remaining: Vec<u64> = passed
        .iter()
        .map(|a| a.1.as_deref().unwrap().parse().unwrap())
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..10).collect::<Vec<_>>());
    // Sliding windows: what was counted today has slid out within two days.
    for (.., reset) in &passed {
        let secs: f64 = reset
            .as_deref()
            .unwrap()
            .trim_end_matches('s')
            .parse()
            .unwrap();
        assert!((86_400.0..=172_800.0).contains(&secs), "reset {secs}");
    }
    for (_, _, retry_after, body, _) in &refused {
        assert_eq!(
            body["error"]["message"],
            "rate limit exceeded: 10 requests per day for this API key"
        );
        assert_eq!(body["error"]["type"], "rate_limit_exceeded");
        let wait: u64 = retry_after.as_deref().unwrap().parse().unwrap();
        assert!(wait >= 1, "{wait}");
    }
}

#[tokio::test]
async fn token_limits_count_every_replicas_answers_and_reservations() {
    let (redis, mock, _dir, replicas) = setup(2).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let settled = |want: &'static str| {
        let redis = &redis;
        async move {
            eventually("the tokens are settled", Duration::from_secs(5), || async {
                redis.cli(&["HVALS", "aisix:{rl}:k:tokens"]) == want
            })
            .await;
        }
    };
    // 50 tokens per answer (the mock's usage), on either replica.
    assert_eq!(chat(&a.url, TOKENS, "costly", "one").await.status(), 200);
    settled("50").await;
    let second = chat(&b.url, TOKENS, "costly", "two").await;
    assert_eq!(second.status(), 200);
    settled("100").await;
    let refused = chat(&a.url, TOKENS, "costly", "three").await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "rate limit exceeded: 100 tokens per day for this API key"
    );

    // A request in flight holds its estimate (max_tokens and its size), so another
    // replica sees it before the answer's count is known.
    let held = {
        let url = a.url.clone();
        tokio::spawn(async move {
            http_client()
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(RESERVING)
                .json(&json!({"model": "slow", "max_tokens": 200, "messages": [{"role": "user", "content": "long"}]}))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    eventually(
        "the slow request is upstream",
        Duration::from_secs(5),
        || async { mock.requests().iter().any(|r| r.body.contains("long")) },
    )
    .await;
    let meanwhile = chat(&b.url, RESERVING, "fast", "meanwhile").await;
    assert_eq!(meanwhile.status(), 429, "the reservation is counted");
    assert_eq!(held.await.unwrap(), 200);
    // Settled to the 13 tokens the slow answer used.
    eventually(
        "the reservation is settled",
        Duration::from_secs(5),
        || async { redis.cli(&["HVALS", "aisix:{rl}:k:reserving"]) == "13" },
    )
    .await;
    let after = chat(&b.url, RESERVING, "fast", "after").await;
    assert_eq!(after.status(), 200);
    assert_eq!(
        header(&after, "x-ratelimit-limit-tokens").as_deref(),
        Some("100")
    );
}

#[tokio::test]
async fn concurrency_is_shared_and_a_killed_replicas_slots_expire() {
    let (_redis, mock, _dir, mut replicas) = setup(2).await;
    mock.set_script_for(
        "up-slow",
        Script {
            headers_delay_ms: 20_000,
            ..Script::default()
        },
    );
    let url = replicas[0].url.clone();
    let _held: Vec<_> = (0..2)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move { chat(&url, CONCURRENT, "slow", &format!("hold {i}")).await })
        })
        .collect();
    eventually(
        "both slow requests are upstream",
        Duration::from_secs(5),
        || async {
            mock.requests()
                .iter()
                .filter(|r| r.body.contains("hold"))
                .count()
                == 2
        },
    )
    .await;
    let b = replicas.pop().unwrap();
    let refused = chat(&b.url, CONCURRENT, "fast", "third").await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "rate limit exceeded: 2 concurrent requests for this API key"
    );
    // Held longer than the lease TTL (2 s): the live replica renews its leases.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(
        chat(&b.url, CONCURRENT, "fast", "still").await.status(),
        429
    );
    // The replica holding both slots dies: they expire within the TTL.
    replicas[0].process.signal("KILL");
    let killed = Instant::now();
    eventually(
        "the dead replica's slots expire",
        Duration::from_secs(8),
        || async {
            chat(&b.url, CONCURRENT, "fast", "after the kill")
                .await
                .status()
                == 200
        },
    )
    .await;
    assert!(
        killed.elapsed() < Duration::from_secs(4),
        "slots freed {:?} after the kill",
        killed.elapsed()
    );
}

#[tokio::test]
async fn an_answer_cached_by_one_replica_is_served_by_the_others() {
    let (_redis, mock, _dir, replicas) = setup(3).await;
    let first = chat(&replicas[0].url, FREE, "fast", "cache me").await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-aisix-cache").as_deref(), Some("miss"));
    let answer: Value = first.json().await.unwrap();
    let mut misses = 1;
    for replica in &replicas[1..] {
        // The first replica keeps the answer in the background: poll briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        let hit = loop {
            let r = chat(&replica.url, FREE, "fast", "cache me").await;
            if header(&r, "x-aisix-cache").as_deref() == Some("hit") {
                break r.json::<Value>().await.unwrap();
            }
            misses += 1;
            assert!(Instant::now() < deadline, "no cache hit on another replica");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(hit, answer, "the same answer");
    }
    let upstream = mock
        .requests()
        .iter()
        .filter(|r| r.body.contains("cache me"))
        .count();
    assert_eq!(upstream, misses, "hits never go upstream");
    assert!(
        misses <= 2,
        "{misses} misses: the shared entry was not used"
    );
}

#[tokio::test]
async fn redis_trouble_never_takes_the_gateway_down_and_recovery_is_automatic() {
    const PASSWORD: &str = "redis-secret-hunter2";
    let mut redis = RedisServer::with_password(PASSWORD).await;
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("resources.yaml"), resources(&mock.url())).unwrap();
    let url = redis.url();
    let section = |fail_mode: &str| {
        format!(
            "ratelimit:\n  backend: redis\n  fail_mode: {fail_mode}\n  redis: {{url: \"{url}\", password: {PASSWORD}, timeout_ms: 250}}\ncache:\n  enabled: true\n  backend: redis\n  redis: {{url: \"{url}\", password: {PASSWORD}, timeout_ms: 250}}\n"
        )
    };
    let open = replicas(dir.path(), 1, &section("open"))
        .await
        .pop()
        .unwrap();
    let closed = replicas(dir.path(), 1, &section("closed"))
        .await
        .pop()
        .unwrap();
    assert_eq!(
        chat(&open.url, LIMITED, "fast", "before").await.status(),
        200
    );
    assert_eq!(redis.cli(&["HVALS", "aisix:{rl}:k:limited"]), "1");

    redis.kill().await;
    let started = Instant::now();
    for i in 0..3 {
        let r = chat(&open.url, LIMITED, "fast", &format!("down {i}")).await;
        assert_eq!(r.status(), 200, "served on local counters");
        assert_eq!(header(&r, "x-aisix-cache").as_deref(), Some("miss"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no request waits for the dead Redis: {:?}",
        started.elapsed()
    );
    let refused = chat(&closed.url, LIMITED, "fast", "down").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(header(&refused, "retry-after").as_deref(), Some("1"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limiter_unavailable");
    let anthropic = http_client()
        .post(format!("{}/v1/messages", closed.url))
        .header("x-api-key", LIMITED)
        .json(&json!({"model": "fast", "max_tokens": 16, "messages": [{"role": "user", "content": "down"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(anthropic.status(), 503);
    assert_eq!(header(&anthropic, "retry-after").as_deref(), Some("1"));
    let body: Value = anthropic.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "overloaded_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("rate limits cannot be checked"),
        "{body}"
    );
    // Shown where an operator looks.
    let states = redis_states(&open).await;
    assert_eq!(states.len(), 2, "{states:?}");
    for state in &states {
        assert_eq!(state["connected"], false, "{state}");
        assert!(state["last_error"].is_string(), "{state}");
    }
    let limiter = states
        .iter()
        .find(|s| s["component"] == "ratelimit")
        .unwrap();
    let failures: u64 = limiter["failures"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert!(failures >= 3, "{limiter}");
    let (families, text) = tests::metrics::scrape(&format!("{}/metrics", open.status)).await;
    assert_eq!(
        tests::metrics::sample(
            &families,
            "aisix_redis_connected",
            &[("component", "cache")]
        ),
        Some(0.0),
        "{text}"
    );
    let counted: f64 = ["unavailable", "timeout", "error"]
        .iter()
        .filter_map(|kind| {
            tests::metrics::sample(
                &families,
                "aisix_redis_failures_total",
                &[("component", "ratelimit"), ("kind", kind)],
            )
        })
        .sum();
    assert!(counted >= 3.0, "{text}");

    redis.restart().await;
    for replica in [&open, &closed] {
        eventually(
            "the replica is back on Redis",
            Duration::from_secs(10),
            || async {
                redis_states(replica)
                    .await
                    .iter()
                    .all(|c| c["connected"] == true)
            },
        )
        .await;
    }
    assert_eq!(
        chat(&closed.url, LIMITED, "fast", "back").await.status(),
        200
    );
    assert_eq!(
        redis.cli(&["HVALS", "aisix:{rl}:k:limited"]),
        "1",
        "counted in the new Redis"
    );
    // The password appears nowhere the agent writes.
    for replica in [&open, &closed] {
        let status = http_client()
            .get(format!("{}/status/config", replica.status))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!status.contains(PASSWORD), "{status}");
        assert!(!replica.process.output().contains(PASSWORD));
    }
    assert!(!text.contains(PASSWORD));
}

#[tokio::test]
async fn a_sentinel_failover_is_followed_to_the_new_primary() {
    let mut primary = RedisServer::start().await;
    let replica = RedisServer::replica_of(primary.port).await;
    eventually(
        "the replica is in sync",
        Duration::from_secs(10),
        || async {
            replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
        },
    )
    .await;
    let sentinel = Sentinel::watch(primary.port).await;
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("resources.yaml"), resources(&mock.url())).unwrap();
    let config = format!(
        "ratelimit:\n  backend: redis\n  redis: {{mode: sentinel, sentinels: [\"127.0.0.1:{}\"], master_name: {MASTER_NAME}, timeout_ms: 250}}\n",
        sentinel.port
    );
    let agent = replicas(dir.path(), 1, &config).await.pop().unwrap();
    assert_eq!(chat(&agent.url, LIMITED, "fast", "one").await.status(), 200);
    assert_eq!(primary.cli(&["HVALS", "aisix:{rl}:k:limited"]), "1");

    primary.kill().await;
    eventually(
        "the sentinel promotes the replica",
        Duration::from_secs(30),
        || async { sentinel.primary() == Some(replica.port) },
    )
    .await;
    // Requests go on meanwhile (local counters), and soon count on the new primary.
    eventually(
        "the agent counts on the new primary",
        Duration::from_secs(15),
        || async {
            let before: u64 = replica
                .cli(&["HVALS", "aisix:{rl}:k:limited"])
                .parse()
                .unwrap_or(0);
            let status = chat(&agent.url, LIMITED, "fast", "after").await.status();
            assert!(status == 200 || status == 429, "{status}");
            let after: u64 = replica
                .cli(&["HVALS", "aisix:{rl}:k:limited"])
                .parse()
                .unwrap_or(0);
            after == before + 1
        },
    )
    .await;
    let states = redis_states(&agent).await;
    assert_eq!(states[0]["connected"], true, "{states:?}");
    assert_eq!(states[0]["mode"], "sentinel");
}

#[tokio::test]
async fn a_redis_cluster_holds_the_shared_limits_and_cache() {
    let cluster = RedisCluster::start().await;
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("resources.yaml"), resources(&mock.url())).unwrap();
    let nodes = cluster
        .addrs()
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let section = format!(
        "ratelimit:\n  backend: redis\n  redis: {{mode: cluster, nodes: [{nodes}], timeout_ms: 1000}}\ncache:\n  enabled: true\n  backend: redis\n  redis: {{mode: cluster, nodes: [{nodes}], timeout_ms: 1000}}\n"
    );
    let replicas = replicas(dir.path(), 2, &section).await;
    let mut passed = 0;
    for i in 0..14 {
        let url = &replicas[i % 2].url;
        match chat(url, LIMITED, "fast", &format!("cluster {i}"))
            .await
            .status()
            .as_u16()
        {
            200 => passed += 1,
            429 => {}
            other => panic!("status {other}"),
        }
    }
    assert_eq!(passed, 10, "one limit across the replicas");
    assert_eq!(cluster.cli(&["HVALS", "aisix:{rl}:k:limited"]), "10");
    // The cache spreads over the nodes; a hit on the other replica.
    let first = chat(&replicas[0].url, FREE, "fast", "cluster cache").await;
    assert_eq!(header(&first, "x-aisix-cache").as_deref(), Some("miss"));
    eventually("the other replica hits", Duration::from_secs(5), || async {
        let r = chat(&replicas[1].url, FREE, "fast", "cluster cache").await;
        header(&r, "x-aisix-cache").as_deref() == Some("hit")
    })
    .await;
}

#[tokio::test]
async fn a_slow_redis_costs_a_request_its_timeout_not_more() {
    let redis = RedisServer::start().await;
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("resources.yaml"), resources(&mock.url())).unwrap();
    let url = redis.url();
    let section = format!(
        "ratelimit:\n  backend: redis\n  redis: {{url: \"{url}\", timeout_ms: 50}}\ncache:\n  enabled: true\n  backend: redis\n  redis: {{url: \"{url}\", timeout_ms: 50}}\n"
    );
    let agent = replicas(dir.path(), 1, &section).await.pop().unwrap();
    assert_eq!(
        chat(&agent.url, LIMITED, "fast", "warm").await.status(),
        200
    );
    redis.pause();
    for i in 0..3 {
        let started = Instant::now();
        let r = chat(&agent.url, LIMITED, "fast", &format!("slow {i}")).await;
        assert_eq!(r.status(), 200);
        // The limiter's and the cache's waits, plus the call: far below a second.
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "{:?}",
            started.elapsed()
        );
    }
    let states = redis_states(&agent).await;
    for state in &states {
        assert!(
            state["failures"]["timeout"].as_u64().unwrap() >= 3,
            "{state}"
        );
        assert_eq!(
            state["connected"], true,
            "a slow answer is not a lost connection"
        );
    }
    redis.resume();
    eventually(
        "answers come from Redis again",
        Duration::from_secs(10),
        || async {
            chat(&agent.url, LIMITED, "fast", "resumed").await.status() == 200
                && redis
                    .cli(&["HVALS", "aisix:{rl}:k:limited"])
                    .parse::<u64>()
                    .unwrap_or(0)
                    >= 2
        },
    )
    .await;
}

#[tokio::test]
async fn redis_over_mutual_tls_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let files = tests::TlsFiles::generate(dir.path(), "redis test CA");
    let redis = RedisServer::with_tls(&files).await;
    assert!(redis.url().starts_with("rediss://"));
    let mock = mock().await;
    std::fs::write(dir.path().join("resources.yaml"), resources(&mock.url())).unwrap();
    let tls = format!(
        "{{ca_file: {}, client_cert_file: {}, client_key_file: {}}}",
        files.ca.display(),
        files.client_cert.display(),
        files.client_key.display()
    );
    let section = format!(
        "ratelimit:\n  backend: redis\n  redis: {{url: \"{}\", tls: {tls}, timeout_ms: 1000}}\n",
        redis.url()
    );
    let agent = replicas(dir.path(), 1, &section).await.pop().unwrap();
    assert_eq!(
        chat(&agent.url, LIMITED, "fast", "over tls").await.status(),
        200
    );
    assert_eq!(redis.cli(&["HVALS", "aisix:{rl}:k:limited"]), "1");

    // Without the private CA the server is not trusted: not connected, still serving.
    let untrusted = format!(
        "ratelimit:\n  backend: redis\n  redis: {{url: \"{}\", tls: true, timeout_ms: 1000}}\n",
        redis.url()
    );
    let other = start_replica(&write_config(dir.path(), &untrusted)).await;
    eventually(
        "the refusal is reported",
        Duration::from_secs(10),
        || async { redis_states(&other).await[0]["last_error"].is_string() },
    )
    .await;
    assert_eq!(redis_states(&other).await[0]["connected"], false);
    assert_eq!(
        chat(&other.url, LIMITED, "fast", "local").await.status(),
        200
    );
}
