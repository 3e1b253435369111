//! `upstream.tls` as an operator behind a private CA uses it: a provider served over
//! HTTPS with a certificate from that CA, asking for a client certificate. Without the
//! settings the call fails (an unknown issuer); with `ca_file` and the client
//! certificate it is served; bad files stop start-up naming the field, and a key's
//! bytes never show.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use tests::{TlsFiles, http_client, key_hash, start_agent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const CALLER: &str = "sk-upstream-tls-caller";

const ANSWER: &str = r#"{"id":"c1","object":"chat.completion","created":1,"model":"up","choices":[{"index":0,"message":{"role":"assistant","content":"over TLS"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;

/// An HTTPS provider with a certificate from `tls.ca` that, when `client_certificate`,
/// requires one from it too; counts the requests that got past the handshake.
async fn provider(tls: &TlsFiles, client_certificate: bool) -> (String, Arc<AtomicUsize>) {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let (cert, key) = (read(&tls.server_cert), read(&tls.server_key));
    let config = if client_certificate {
        certs::tls::server_config(&cert, &key, &read(&tls.ca)).unwrap()
    } else {
        certs::tls::listener_config(&cert, &key).unwrap()
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/v1", listener.local_addr().unwrap());
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ANSWER}",
                    ANSWER.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (url, served)
}

fn write_config(dir: &Path, api_base: &str, upstream: &str) -> std::path::PathBuf {
    let resources = dir.join("resources.yaml");
    std::fs::write(
        &resources,
        json!({
            "provider_keys": [{"id": "pk", "display_name": "private", "provider": "openai", "api_base": api_base, "api_key": "sk-private"}],
            "models": [{"id": "m", "display_name": "private-gpt", "model_name": "up", "provider_key_id": "pk"}],
            "api_keys": [{"id": "k", "key_hash": key_hash(CALLER), "allowed_models": ["*"]}],
        })
        .to_string(),
    )
    .unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "resources_file: {}\nproxy:\n  addr: 127.0.0.1:0\nshutdown:\n  min_drain_secs: 0\n{upstream}",
            resources.display()
        ),
    )
    .unwrap();
    config
}

async fn chat(url: &str) -> (u16, String) {
    let r = http_client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(CALLER)
        .json(&json!({"model": "private-gpt", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn a_provider_behind_a_private_ca_and_client_certificates_is_reached_with_upstream_tls() {
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsFiles::generate(dir.path(), "private provider CA");
    let (api_base, served) = provider(&tls, true).await;

    // The system's roots alone: the provider's certificate is not trusted.
    let (mut plain, url) = start_agent(&write_config(dir.path(), &api_base, "")).await;
    let (status, body) = chat(&url).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(served.load(Ordering::SeqCst), 0);
    plain
        .wait_for_line("TLS handshake failed", std::time::Duration::from_secs(5))
        .await;
    drop(plain);

    // The CA trusted, but no client certificate: the provider refuses it (with TLS 1.3
    // after the client's side of the handshake: a 502 rather than a 503).
    let ca_only = format!("upstream:\n  tls:\n    ca_file: {}\n", tls.ca.display());
    let (agent, url) = start_agent(&write_config(dir.path(), &api_base, &ca_only)).await;
    let (status, body) = chat(&url).await;
    assert!(matches!(status, 502 | 503), "{status}: {body}");
    assert_eq!(served.load(Ordering::SeqCst), 0);
    drop(agent);

    // Both: served.
    let full = format!(
        "upstream:\n  tls:\n    ca_file: {}\n    client_cert_file: {}\n    client_key_file: {}\n",
        tls.ca.display(),
        tls.client_cert.display(),
        tls.client_key.display()
    );
    let (agent, url) = start_agent(&write_config(dir.path(), &api_base, &full)).await;
    let (status, body) = chat(&url).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("over TLS"), "{body}");
    assert_eq!(served.load(Ordering::SeqCst), 1);
    drop(agent);
}

#[tokio::test]
async fn verify_false_reaches_a_provider_whose_certificate_nobody_trusts() {
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsFiles::generate(dir.path(), "untrusted bench CA");
    let (api_base, served) = provider(&tls, false).await;
    let (agent, url) = start_agent(&write_config(dir.path(), &api_base, "")).await;
    let (status, body) = chat(&url).await;
    assert_eq!(status, 503, "{body}");
    drop(agent);
    let off = "upstream:\n  tls:\n    verify: false\n";
    let (agent, url) = start_agent(&write_config(dir.path(), &api_base, off)).await;
    let (status, body) = chat(&url).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("over TLS"), "{body}");
    assert_eq!(served.load(Ordering::SeqCst), 1);
    drop(agent);
}

#[tokio::test]
async fn bad_upstream_tls_files_stop_start_up_naming_the_field_and_no_key_shows() {
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsFiles::generate(dir.path(), "bad files CA");
    let key = std::fs::read_to_string(&tls.client_key).unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let cases = [
        (
            format!("upstream:\n  tls:\n    ca_file: {}\n", not_pem.display()),
            "upstream.tls.ca_file",
        ),
        (
            "upstream:\n  tls:\n    ca_file: /nonexistent/ca.pem\n".to_owned(),
            "upstream.tls.ca_file",
        ),
        (
            format!(
                "upstream:\n  tls:\n    client_cert_file: {}\n",
                tls.client_cert.display()
            ),
            "upstream.tls.client_key_file",
        ),
        // A certificate with somebody else's key.
        (
            format!(
                "upstream:\n  tls:\n    client_cert_file: {}\n    client_key_file: {}\n",
                tls.client_key.display(),
                tls.client_key.display()
            ),
            "upstream.tls.client_key_file",
        ),
        // A real certificate with another certificate's key.
        (
            format!(
                "upstream:\n  tls:\n    client_cert_file: {}\n    client_key_file: {}\n",
                tls.client_cert.display(),
                tls.server_key.display()
            ),
            "upstream.tls.client_key_file",
        ),
        ("upstream:\n  retries: 99\n".to_owned(), "upstream.retries"),
    ];
    for (upstream, field) in cases {
        let config = write_config(dir.path(), "https://127.0.0.1:9/v1", &upstream);
        let out = std::process::Command::new(tests::binary("aisix-agent"))
            .args(["validate", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{upstream}: {stderr}");
        assert!(stderr.contains(field), "{upstream}: {stderr}");
        for line in key.lines().filter(|l| l.len() > 20) {
            assert!(!stderr.contains(line), "key material in: {stderr}");
        }
    }
}
