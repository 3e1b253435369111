//! HTTPS on the proxy and admin listeners (self-hosted mode, real etcd): certificates
//! made at run time, key files left open to others and found fixed, plain HTTP and
//! stalled handshakes refused, and bad TLS files stopping start-up with the field named.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use certs::CertificateAuthority;
use cloud_mock::provider::MockProvider;
use serde_json::{Value, json};
use tests::etcd::Etcd;
use tests::{Process, addr_in, binary, eventually};
use tokio::io::AsyncReadExt;

const ADMIN_KEY: &str = "admin-key-listener-tls";
const CALLER: &str = "sk-listener-tls-caller";
const DAY: Duration = Duration::from_secs(86_400);
const WITHIN: Duration = Duration::from_secs(20);

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A client that trusts only `ca_pem`.
fn https_client(ca_pem: &str) -> reqwest::Client {
    tests::cloud::mtls_http(certs::tls::plain_client_config(ca_pem, None).unwrap())
}

#[tokio::test]
async fn proxy_and_admin_serve_https_with_private_keys() {
    let etcd = Etcd::start().await;
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("listener test CA", DAY).unwrap();
    let server = ca
        .issue_server(
            &["localhost".to_owned()],
            &["127.0.0.1".parse().unwrap()],
            DAY,
        )
        .unwrap();
    let cert = dir.path().join("server.pem");
    let key = dir.path().join("server.key");
    std::fs::write(&cert, &server.cert_pem).unwrap();
    std::fs::write(&key, server.key_pem.expose()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let tls = format!(
        "  tls:\n    cert_file: {}\n    key_file: {}\n",
        cert.display(),
        key.display()
    );
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "etcd:\n  endpoints: [\"{}\"]\nproxy:\n  addr: 127.0.0.1:0\n  header_read_timeout_ms: 2000\n{tls}admin:\n  addr: 127.0.0.1:0\n  admin_keys: [{ADMIN_KEY}]\n{tls}shutdown:\n  min_drain_secs: 0\n",
            etcd.url()
        ),
    )
    .unwrap();
    let mut agent = Process::start(
        &binary("aisix-agent"),
        &["--config", config.to_str().unwrap()],
        &[],
    );
    let line = agent.wait_for_line("proxy listener ready", WITHIN).await;
    assert!(line.contains("https"), "{line}");
    let proxy = addr_in(&line);
    let admin = addr_in(&agent.wait_for_line("admin listener ready", WITHIN).await);
    // The key was readable by others: fixed, and said so naming the setting.
    assert_eq!(mode(&key), 0o600);
    let warned = agent
        .wait_for_line("private key file was open to other users", WITHIN)
        .await;
    assert!(warned.contains("proxy.tls.key_file"), "{warned}");
    assert!(!agent.output().contains("BEGIN"), "key material in the log");

    let https = https_client(ca.cert_pem());
    let admin_url = format!("https://{admin}");
    let proxy_url = format!("https://{proxy}");
    eventually("the proxy answers over HTTPS", WITHIN, || async {
        https
            .get(format!("{proxy_url}/livez"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let create = |kind: &'static str, body: Value| {
        let https = https.clone();
        let url = format!("{admin_url}/admin/v1/{kind}");
        async move {
            let answer = https
                .post(url)
                .bearer_auth(ADMIN_KEY)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 201);
            answer.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let pk = create(
        "provider_keys",
        json!({"display_name": "mock", "provider": "openai", "api_base": mock.url(), "api_key": "sk-up"}),
    )
    .await;
    create(
        "models",
        json!({"display_name": "gpt", "model_name": "up-gpt", "provider_key_id": pk}),
    )
    .await;
    create(
        "api_keys",
        json!({"key": CALLER, "allowed_models": ["*"], "display_name": "tls"}),
    )
    .await;
    let chat = || {
        https
            .post(format!("{proxy_url}/v1/chat/completions"))
            .bearer_auth(CALLER)
            .json(&json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    eventually("a chat completion over HTTPS", WITHIN, || async {
        chat().await.is_ok_and(|r| r.status() == 200)
    })
    .await;

    // Plain HTTP to an HTTPS listener gets no HTTP answer.
    let plain = tests::http_client()
        .get(format!("http://{proxy}/livez"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    // A client that trusts another CA refuses the proxy.
    let stranger = CertificateAuthority::generate("other CA", DAY).unwrap();
    let refused = https_client(stranger.cert_pem())
        .get(format!("{proxy_url}/livez"))
        .send()
        .await;
    assert!(refused.is_err());
    // A connection that never starts its handshake is closed after the timeout.
    let mut stalled = tokio::net::TcpStream::connect(&proxy).await.unwrap();
    let began = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(15), stalled.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    assert!(began.elapsed() >= Duration::from_millis(1500));
    // Still serving.
    assert_eq!(chat().await.unwrap().status(), 200);
}

#[tokio::test]
async fn bad_listener_tls_files_stop_start_up_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("resources.yaml"),
        "provider_keys: []\nmodels: []\napi_keys: []\n",
    )
    .unwrap();
    let ca = CertificateAuthority::generate("listener test CA", DAY).unwrap();
    let server = ca
        .issue_server(&["localhost".to_owned()], &[], DAY)
        .unwrap();
    let cert = dir.path().join("server.pem");
    std::fs::write(&cert, &server.cert_pem).unwrap();
    let other = ca.issue_server(&["other".to_owned()], &[], DAY).unwrap();
    let wrong_key = dir.path().join("other.key");
    std::fs::write(&wrong_key, other.key_pem.expose()).unwrap();
    let not_pem = dir.path().join("junk.key");
    std::fs::write(&not_pem, "not a key").unwrap();
    let cases = [
        (
            format!("  tls:\n    cert_file: {}\n", cert.display()),
            "proxy.tls: missing field `key_file`",
        ),
        (
            format!(
                "  tls:\n    cert_file: {}\n    key_file: {}\n",
                cert.display(),
                dir.path().join("missing.key").display()
            ),
            "proxy.tls.key_file: cannot read",
        ),
        (
            format!(
                "  tls:\n    cert_file: {}\n    key_file: {}\n",
                cert.display(),
                not_pem.display()
            ),
            "proxy.tls",
        ),
        (
            format!(
                "  tls:\n    cert_file: {}\n    key_file: {}\n",
                cert.display(),
                wrong_key.display()
            ),
            "proxy.tls",
        ),
    ];
    for (tls, expected) in cases {
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "resources_file: {}\nproxy:\n  addr: 127.0.0.1:0\n{tls}",
                dir.path().join("resources.yaml").display()
            ),
        )
        .unwrap();
        let mut agent = Process::start(
            &binary("aisix-agent"),
            &["--config", config.to_str().unwrap()],
            &[],
        );
        let status = agent.wait_exit(WITHIN).await;
        assert!(!status.success(), "{tls}: started");
        let output = agent.output();
        assert!(output.contains(expected), "{tls}: {output}");
        assert!(!output.contains("proxy listener ready"), "{output}");
        assert!(!output.contains("BEGIN"), "key material in: {output}");
    }
}
