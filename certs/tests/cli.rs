//! The real `aisix-certs` binary: create a CA, issue certificates, inspect them.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failure should fail the test loudly"
)]

use std::path::Path;
use std::process::Command;

fn certs(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_aisix-certs"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn ca_gateway_server_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_dir, gw_dir, srv_dir) = (
        dir.path().join("ca"),
        dir.path().join("gw"),
        dir.path().join("srv"),
    );
    let (ok, out) = certs(&["ca", "--dir", path(&ca_dir), "--common-name", "Test Root"]);
    assert!(ok, "{out}");
    let (ok, out) = certs(&["ca", "--dir", path(&ca_dir)]);
    assert!(
        !ok && out.contains("already exists; refusing to overwrite it"),
        "{out}"
    );

    let (ok, out) = certs(&[
        "gateway",
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
    ]);
    assert!(ok, "{out}");
    let (ok, out) = certs(&["inspect", path(&gw_dir.join("gateway.pem"))]);
    assert!(ok, "{out}");
    assert!(out.contains("issuer:           CN=Test Root"), "{out}");
    assert!(
        out.contains("gateway identity: env_id=prod dp_id=edge-1"),
        "{out}"
    );
    assert!(
        out.contains("uris:             x-aisix://env/prod, x-aisix://dp/edge-1"),
        "{out}"
    );
    assert!(out.contains("days left:        29"), "{out}");

    let (ok, out) = certs(&[
        "server",
        "--ca-dir",
        path(&ca_dir),
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
        "--out",
        path(&srv_dir),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = certs(&["inspect", path(&srv_dir.join("server.pem"))]);
    assert!(
        ok && out.contains("dns names:        localhost")
            && out.contains("ip addresses:     127.0.0.1"),
        "{out}"
    );

    let (ok, out) = certs(&["inspect", path(&gw_dir.join("gateway-key.pem"))]);
    assert!(
        !ok && out.contains("no PEM block of type CERTIFICATE found"),
        "{out}"
    );
    assert!(
        !out.contains("PRIVATE KEY-----\n"),
        "a private key was echoed"
    );
    let (ok, out) = certs(&[
        "gateway",
        "--ca-dir",
        path(&ca_dir),
        "--env",
        "a/b",
        "--dp",
        "x",
        "--out",
        path(&dir.path().join("bad")),
    ]);
    assert!(!ok && out.contains("env_id 'a/b' must be"), "{out}");
}
