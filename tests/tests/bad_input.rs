//! Bad input against the real agent binary, written byte for byte on raw connections
//! (no HTTP client tidies it up): each is answered with the right status in the
//! route's error envelope, reaches no upstream, and leaves the gateway healthy. Slow
//! clients and floods of idle connections are bounded by the header read timeout and
//! the connection limit.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::time::{Duration, Instant};

use cloud_mock::provider::MockProvider;
use serde_json::Value;
use tests::{Process, addr_in, http_client, key_hash, raw_http, start_agent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CALLER: &str = "sk-bad-input-caller";

struct Agent {
    process: Process,
    /// `host:port` of the proxy.
    addr: String,
    mock: MockProvider,
    _dir: tempfile::TempDir,
}

async fn start(proxy_lines: &str) -> Agent {
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let resources = format!(
        r#"
provider_keys:
  - {{id: pk1, display_name: mock, provider: openai, api_base: "{base}", api_key: sk-up}}
models:
  - {{id: m1, display_name: gpt, model_name: up-gpt, provider_key_id: pk1}}
api_keys:
  - {{id: k1, key_hash: {caller}, allowed_models: ["*"]}}
"#,
        base = mock.url(),
        caller = key_hash(CALLER),
    );
    std::fs::write(dir.path().join("resources.yaml"), resources).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "resources_file: {}\nproxy:\n  addr: 127.0.0.1:0\n{proxy_lines}shutdown:\n  min_drain_secs: 0\n",
            dir.path().join("resources.yaml").display()
        ),
    )
    .unwrap();
    let (process, url) = start_agent(&config).await;
    Agent {
        process,
        addr: url.trim_start_matches("http://").to_owned(),
        mock,
        _dir: dir,
    }
}

/// A request with `Connection: close`, the caller key and `headers` added.
fn request(method: &str, target: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{method} {target} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn bearer() -> String {
    format!("Authorization: Bearer {CALLER}\r\nContent-Type: application/json\r\n")
}

/// What an answer must look like: its status and envelope.
#[derive(Debug, Clone, Copy)]
enum Shape {
    OpenAi,
    Anthropic,
    /// Refused by the HTTP layer before any route: a bare status.
    Bare,
}

fn check_shape(case: &str, body: &str, shape: Shape) {
    if let Shape::Bare = shape {
        return;
    }
    let json: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{case}: body is not JSON ({e}): {body:?}"));
    match shape {
        Shape::OpenAi => {
            let message = json["error"]["message"].as_str();
            assert!(message.is_some_and(|m| !m.is_empty()), "{case}: {json}");
            assert!(json["error"]["type"].is_string(), "{case}: {json}");
        }
        Shape::Anthropic => {
            assert_eq!(json["type"], "error", "{case}: {json}");
            assert!(json["error"]["type"].is_string(), "{case}: {json}");
            assert!(json["error"]["message"].is_string(), "{case}: {json}");
        }
        Shape::Bare => {}
    }
}

async fn healthy(agent: &Agent) {
    assert!(
        agent.process_alive(),
        "the agent exited:\n{}",
        agent.process.output()
    );
    let answer = http_client()
        .post(format!("http://{}/v1/chat/completions", agent.addr))
        .bearer_auth(CALLER)
        .json(&serde_json::json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}

impl Agent {
    fn process_alive(&self) -> bool {
        std::path::Path::new(&format!("/proc/{}", self.process.pid())).exists()
    }
}

#[tokio::test]
async fn malformed_requests_get_their_envelope_and_reach_no_upstream() {
    let agent = start("  request_body_limit_bytes: 65536\n  max_header_bytes: 8192\n").await;
    let chat = "/v1/chat/completions";
    let messages = "/v1/messages";
    let valid = br#"{"model":"gpt","messages":[{"role":"user","content":"hi"}]}"#;
    let big_header = format!("{}X-Padding: {}\r\n", bearer(), "a".repeat(12_000));
    let huge_header = format!("{}X-Padding: {}\r\n", bearer(), "a".repeat(300_000));
    let anthropic = format!("x-api-key: {CALLER}\r\nContent-Type: application/json\r\n");
    let lines = |n: usize| (0..n).fold(bearer(), |head, i| head + &format!("X-Line-{i}: v\r\n"));
    let chunked_big = {
        let mut out = format!(
            "POST {chat} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n{}Transfer-Encoding: chunked\r\n\r\n",
            bearer()
        )
        .into_bytes();
        for _ in 0..20 {
            out.extend_from_slice(format!("{:x}\r\n{}\r\n", 8192, "x".repeat(8192)).as_bytes());
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    };
    let declared_big = format!(
        "POST {chat} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n{}Content-Length: 10000000\r\n\r\n{{\"model\":",
        bearer()
    )
    .into_bytes();
    let cases: Vec<(&str, Vec<u8>, u16, Shape)> = vec![
        (
            "invalid JSON",
            request("POST", chat, &bearer(), br#"{"model": "gpt", "messages": ["#),
            400,
            Shape::OpenAi,
        ),
        (
            "wrong types",
            request("POST", chat, &bearer(), br#"{"model": 5, "messages": "hi"}"#),
            400,
            Shape::OpenAi,
        ),
        (
            "messages not an array",
            request("POST", chat, &bearer(), br#"{"model": "gpt", "messages": {}}"#),
            400,
            Shape::OpenAi,
        ),
        (
            "a JSON array instead of an object",
            request("POST", chat, &bearer(), b"[1, 2, 3]"),
            400,
            Shape::OpenAi,
        ),
        (
            "invalid UTF-8",
            request(
                "POST",
                chat,
                &bearer(),
                b"{\"model\":\"gpt\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\xc3\"}]}",
            ),
            400,
            Shape::OpenAi,
        ),
        (
            "empty body",
            request("POST", chat, &bearer(), b""),
            400,
            Shape::OpenAi,
        ),
        (
            "wrong content type",
            request(
                "POST",
                chat,
                &format!("Authorization: Bearer {CALLER}\r\nContent-Type: text/plain\r\n"),
                valid,
            ),
            415,
            Shape::OpenAi,
        ),
        (
            "wrong content type, Anthropic route",
            request(
                "POST",
                messages,
                &format!("x-api-key: {CALLER}\r\nContent-Type: text/plain\r\n"),
                valid,
            ),
            415,
            Shape::Anthropic,
        ),
        (
            "a form where JSON is expected",
            request(
                "POST",
                chat,
                &format!(
                    "Authorization: Bearer {CALLER}\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                ),
                b"--x--\r\n",
            ),
            415,
            Shape::OpenAi,
        ),
        ("oversized body, Content-Length", declared_big, 413, Shape::OpenAi),
        ("oversized body, chunked", chunked_big, 413, Shape::OpenAi),
        (
            "oversized headers",
            request("POST", chat, &big_header, valid),
            431,
            Shape::OpenAi,
        ),
        (
            "oversized headers, Anthropic route",
            request(
                "POST",
                messages,
                &format!("{anthropic}X-Padding: {}\r\n", "a".repeat(12_000)),
                valid,
            ),
            431,
            Shape::Anthropic,
        ),
        (
            "headers past the hard bound",
            request("POST", chat, &huge_header, valid),
            431,
            Shape::Bare,
        ),
        // 250 lines: past the proxy's 200 (its envelope); 450: past hyper's bound of 400.
        (
            "too many header lines",
            request("POST", chat, &lines(250), valid),
            431,
            Shape::OpenAi,
        ),
        (
            "too many header lines, Anthropic route",
            request("POST", messages, &(anthropic.clone() + &lines(250)), valid),
            431,
            Shape::Anthropic,
        ),
        (
            "header lines past the hard bound",
            request("POST", chat, &lines(450), valid),
            431,
            Shape::Bare,
        ),
        (
            "invalid JSON, Anthropic route",
            request("POST", messages, &anthropic, b"{\"model\""),
            400,
            Shape::Anthropic,
        ),
        (
            "caller key in x-api-key on an OpenAI route",
            request(
                "POST",
                chat,
                &format!("x-api-key: {CALLER}\r\nContent-Type: application/json\r\n"),
                valid,
            ),
            401,
            Shape::OpenAi,
        ),
        (
            "caller key in an api-key header",
            request(
                "POST",
                chat,
                &format!("api-key: {CALLER}\r\nContent-Type: application/json\r\n"),
                valid,
            ),
            401,
            Shape::OpenAi,
        ),
        (
            "caller key in the query string",
            request(
                "POST",
                &format!("{chat}?api_key={CALLER}"),
                "Content-Type: application/json\r\n",
                valid,
            ),
            401,
            Shape::OpenAi,
        ),
        (
            "caller key without the Bearer scheme",
            request(
                "POST",
                chat,
                &format!("Authorization: {CALLER}\r\nContent-Type: application/json\r\n"),
                valid,
            ),
            401,
            Shape::OpenAi,
        ),
        (
            "passthrough with ..",
            request("GET", "/passthrough/openai/v1/../../admin", &bearer(), b""),
            400,
            Shape::OpenAi,
        ),
        (
            "passthrough with encoded dots",
            request("GET", "/passthrough/openai/v1/%2e%2e/%2E%2E/admin", &bearer(), b""),
            400,
            Shape::OpenAi,
        ),
        (
            "passthrough with an encoded slash",
            request("GET", "/passthrough/openai/v1%2F..%2Fadmin", &bearer(), b""),
            400,
            Shape::OpenAi,
        ),
        (
            "passthrough with an empty segment",
            request("GET", "/passthrough/openai//evil.example/v1", &bearer(), b""),
            400,
            Shape::OpenAi,
        ),
        (
            "passthrough with a backslash",
            request("GET", "/passthrough/openai/v1\\..\\admin", &bearer(), b""),
            400,
            Shape::Bare,
        ),
        (
            "passthrough with the key in the wrong place",
            request("GET", "/passthrough/openai/v1/models", "Cookie: key=sk-bad-input-caller\r\n", b""),
            401,
            Shape::OpenAi,
        ),
        ("garbage request line", b"HELLO\r\n\r\n".to_vec(), 400, Shape::Bare),
        (
            "unknown method on a route",
            request("BREW", chat, &bearer(), b""),
            405,
            Shape::OpenAi,
        ),
    ];
    for (case, bytes, status, shape) in cases {
        let answer = raw_http(&agent.addr, &bytes)
            .await
            .unwrap_or_else(|| panic!("{case}: the connection closed without an answer"));
        assert_eq!(answer.status, status, "{case}: {}", answer.body);
        check_shape(case, &answer.body, shape);
        if !matches!(shape, Shape::Bare) {
            let id = answer.header("x-aisix-request-id");
            assert!(
                id.is_some_and(|id| id.len() == 36),
                "{case}: {:?}",
                answer.headers
            );
        }
    }
    assert!(
        agent.mock.requests().is_empty(),
        "bad requests reached the upstream: {:?}",
        agent.mock.requests()
    );

    // An absolute URL names a host: the request still goes to the provider key's own
    // API base, never to that host.
    let answer = raw_http(
        &agent.addr,
        &request(
            "GET",
            "http://evil.example/passthrough/openai/v1/models",
            &bearer(),
            b"",
        ),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    let seen = agent.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/models");

    // A request id from the caller is echoed only when it is well formed.
    for (sent, echoed) in [
        ("trace-42.a:b_c", true),
        ("<script>alert(1)</script>", false),
    ] {
        let answer = raw_http(
            &agent.addr,
            &request(
                "GET",
                "/v1/models",
                &format!("{}x-aisix-request-id: {sent}\r\n", bearer()),
                b"",
            ),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 200);
        let id = answer.header("x-aisix-request-id").unwrap();
        assert_eq!(id == sent, echoed, "{sent} -> {id}");
    }
    healthy(&agent).await;
}

#[tokio::test]
async fn slow_clients_and_idle_floods_are_cut_off_and_served_again() {
    let mut agent = start("  header_read_timeout_ms: 3000\n  max_connections: 500\n").await;
    let status = {
        let line = agent
            .process
            .wait_for_line("metrics listener ready", Duration::from_secs(10))
            .await;
        format!("http://{}", addr_in(&line))
    };

    // A client that never finishes its headers is disconnected.
    let mut slow = TcpStream::connect(&agent.addr).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n")
        .await
        .unwrap();
    let began = Instant::now();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(15), slow.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a half-sent request kept its connection: {read:?}"
    );
    let waited = began.elapsed();
    assert!(
        waited >= Duration::from_millis(2500),
        "cut before the timeout: {waited:?}"
    );

    // A flood of idle connections (more than the limit, fewer than the limit plus the
    // listen backlog of 1024, so the kernel queues them all): at most max_connections
    // are held open, each is closed after the timeout, and a real caller arriving
    // behind them is served.
    // In waves: a burst faster than the kernel's accept queue takes would leave
    // connections the client thinks open and the server never queued.
    let mut idle = Vec::new();
    for _ in 0..28 {
        let wave = (0..50).map(|_| TcpStream::connect(agent.addr.as_str()));
        for stream in futures_util::future::join_all(wave).await {
            idle.push(stream.unwrap());
        }
    }
    assert_eq!(idle.len(), 1400, "connections opened");
    let pid = agent.process.pid();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let held = fds();
    assert!(
        (100..=500 + 64).contains(&held),
        "the agent holds {held} descriptors with {} connections open to it",
        idle.len()
    );
    // The status listener is not affected by the proxy's flood.
    let livez = http_client()
        .get(format!("{status}/livez"))
        .send()
        .await
        .unwrap();
    assert_eq!(livez.status(), 200);
    let began = Instant::now();
    healthy(&agent).await;
    let served_after = began.elapsed();
    assert!(
        served_after < Duration::from_secs(30),
        "a caller behind the flood waited {served_after:?}"
    );
    let reads = idle.into_iter().map(|mut s| async move {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    });
    let closed = futures_util::future::join_all(reads)
        .await
        .into_iter()
        .filter(|closed| *closed)
        .count();
    assert_eq!(closed, 1400, "idle connections closed by the agent");
    assert!(fds() <= 64, "descriptors left after the flood: {}", fds());
    healthy(&agent).await;
}

#[tokio::test]
async fn downstream_idle_timeout_closes_kept_alive_connections() {
    // AISIX's caller-side idle timeout, far below proxy.header_read_timeout_ms.
    let agent =
        start("  header_read_timeout_ms: 30000\ndownstream:\n  idle_timeout_secs: 1\n").await;
    let mut conn = TcpStream::connect(&agent.addr).await.unwrap();
    conn.write_all(b"GET /livez HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    // Kept alive, then idle: closed after about a second, not thirty.
    let began = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection stayed open: {read:?}"
    );
    let waited = began.elapsed();
    assert!(
        (Duration::from_millis(800)..Duration::from_secs(5)).contains(&waited),
        "closed after {waited:?}"
    );
}
