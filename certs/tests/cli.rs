//! The real `aisix-certs` binary: every subcommand, its files and its exit statuses.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failure should fail the test loudly"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use certs::{CertificateAuthority, GatewayIdentity};
use time::{Duration, OffsetDateTime};

fn certs(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_aisix-certs"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_issue_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_dir, gw_dir, srv_dir) = (
        dir.path().join("ca"),
        dir.path().join("gw"),
        dir.path().join("srv"),
    );
    let (code, out) = certs(&[
        "init-ca",
        "--dir",
        path(&ca_dir),
        "--common-name",
        "Test Root",
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(mode(&ca_dir.join("ca-key.pem")), 0o600);
    let (code, out) = certs(&["init-ca", "--dir", path(&ca_dir)]);
    assert!(
        code != 0 && out.contains("already exists; refusing to overwrite it"),
        "{out}"
    );

    let args = [
        "issue-gateway",
        "--ca-dir",
        path(&ca_dir),
        "--env",
        "prod",
        "--dp",
        "edge-1",
        "--days",
        "30",
        "--out",
        path(&gw_dir),
    ];
    let (code, out) = certs(&args);
    assert_eq!(code, 0, "{out}");
    assert_eq!(mode(&gw_dir.join("key.pem")), 0o600);
    let (code, out) = certs(&["inspect", path(&gw_dir.join("cert.pem"))]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("issuer:           CN=Test Root"), "{out}");
    assert!(
        out.contains("gateway identity: env_id=prod dp_id=edge-1"),
        "{out}"
    );
    assert!(
        out.contains("uris:             x-aisix://env/prod, x-aisix://dp/edge-1"),
        "{out}"
    );
    assert!(out.contains("days left:        30"), "{out}");

    let (code, out) = certs(&["inspect", "--json", path(&gw_dir.join("cert.pem"))]);
    assert_eq!(code, 0, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        json[0]["identity"],
        serde_json::json!({"env_id": "prod", "dp_id": "edge-1"})
    );
    assert_eq!(
        json[0]["days_left"], 30,
        "--days 30 shows 30 days left right after issue"
    );
    assert_eq!(json[0]["is_ca"], false);
    assert_eq!(json[0]["sha256_fingerprint"].as_str().unwrap().len(), 95);

    let (code, out) = certs(&[
        "issue-server",
        "--ca-dir",
        path(&ca_dir),
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
        "--out",
        path(&srv_dir),
    ]);
    assert_eq!(code, 0, "{out}");
    let (_, out) = certs(&["inspect", path(&srv_dir.join("cert.pem"))]);
    assert!(
        out.contains("dns names:        localhost") && out.contains("ip addresses:     127.0.0.1"),
        "{out}"
    );

    let (code, out) = certs(&["inspect", path(&gw_dir.join("key.pem"))]);
    assert!(
        code != 0 && out.contains("no PEM block of type CERTIFICATE found"),
        "{out}"
    );
    assert!(
        !out.contains("PRIVATE KEY-----"),
        "a private key was echoed"
    );
    let (code, out) = certs(&[
        "issue-gateway",
        "--ca-dir",
        path(&ca_dir),
        "--env",
        "a/b",
        "--dp",
        "x",
        "--out",
        path(&dir.path().join("bad")),
    ]);
    assert!(code != 0 && out.contains("env_id 'a/b' must be"), "{out}");
}

#[test]
fn csr_then_sign_csr_checks_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_dir, req) = (dir.path().join("ca"), dir.path().join("req"));
    assert_eq!(certs(&["init-ca", "--dir", path(&ca_dir)]).0, 0);
    let (code, out) = certs(&[
        "csr",
        "--env",
        "prod",
        "--dp",
        "edge-2",
        "--out",
        path(&req),
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(mode(&req.join("key.pem")), 0o600);
    let csr = path(&req.join("csr.pem")).to_owned();

    let wrong = dir.path().join("wrong.pem");
    let (code, out) = certs(&[
        "sign-csr",
        "--ca-dir",
        path(&ca_dir),
        "--csr",
        &csr,
        "--env",
        "prod",
        "--dp",
        "edge-9",
        "--out",
        path(&wrong),
    ]);
    assert!(
        code != 0 && out.contains("does not match the expected env prod / dp edge-9"),
        "{out}"
    );
    assert!(!wrong.exists());

    let signed = dir.path().join("signed.pem");
    let (code, out) = certs(&[
        "sign-csr",
        "--ca-dir",
        path(&ca_dir),
        "--csr",
        &csr,
        "--env",
        "prod",
        "--dp",
        "edge-2",
        "--days",
        "7",
        "--out",
        path(&signed),
    ]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = certs(&[
        "verify",
        "--ca",
        path(&ca_dir.join("ca.pem")),
        path(&signed),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("valid, issued by CN=AISIX CA, 7 days left"),
        "{out}"
    );
}

#[test]
fn verify_exit_status_names_the_failed_check() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    assert_eq!(certs(&["init-ca", "--dir", path(&ca_dir)]).0, 0);
    let ca = CertificateAuthority::load(&ca_dir).unwrap();
    let id = GatewayIdentity::new("e", "d").unwrap();
    let now = OffsetDateTime::now_utc();
    let write = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let expired = write(
        "expired.pem",
        &ca.issue_gateway_between(&id, now - Duration::days(10), now - Duration::days(1))
            .unwrap()
            .cert_pem,
    );
    let future = write(
        "future.pem",
        &ca.issue_gateway_between(&id, now + Duration::days(1), now + Duration::days(10))
            .unwrap()
            .cert_pem,
    );
    let stranger =
        CertificateAuthority::generate("Other", std::time::Duration::from_secs(86_400)).unwrap();
    let foreign = write(
        "foreign.pem",
        &stranger
            .issue_gateway(&id, std::time::Duration::from_secs(86_400))
            .unwrap()
            .cert_pem,
    );
    let garbage = write("garbage.pem", "hello");
    let ca_pem = ca_dir.join("ca.pem");
    let verify = |cert: &Path| certs(&["verify", "--ca", path(&ca_pem), path(cert)]);

    let (code, out) = verify(&foreign);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("not issued by the given CA"), "{out}");
    let (code, out) = verify(&future);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("not valid before"), "{out}");
    let (code, out) = verify(&expired);
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("expired at"), "{out}");
    assert_eq!(verify(&garbage).0, 1);
    assert_eq!(verify(&dir.path().join("absent.pem")).0, 1);
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "init-ca",
        "issue-gateway",
        "issue-server",
        "csr",
        "sign-csr",
        "inspect",
        "verify",
    ] {
        let (code, out) = certs(&[sub, "--help"]);
        assert_eq!(code, 0, "{sub}: {out}");
        assert!(out.contains("Usage: aisix-certs"), "{sub}: {out}");
    }
}
