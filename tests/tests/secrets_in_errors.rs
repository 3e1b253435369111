//! Key material never appears in an error: inline PEM from an environment variable
//! works as documented, and every way of getting it wrong fails without printing it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::binary;

struct Bundle {
    cert: String,
    key: String,
    ca: String,
}

fn bundle() -> Bundle {
    let ca =
        certs::CertificateAuthority::generate("secrets CA", Duration::from_secs(86_400)).unwrap();
    let identity = certs::GatewayIdentity::new("env-1", "gw-1").unwrap();
    let issued = ca
        .issue_gateway(&identity, Duration::from_secs(3_600))
        .unwrap();
    Bundle {
        cert: issued.cert_pem,
        key: issued.key_pem.expose().to_owned(),
        ca: ca.cert_pem().to_owned(),
    }
}

/// `validate` of a managed config whose certificate (`cert`) and CA are files and whose
/// key comes from `AISIX_MANAGED__CP_KEY_PEM`.
fn validate(dir: &Path, bundle: &Bundle, cert: &str, key: &str) -> (i32, String) {
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("ca.pem"), &bundle.ca).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "managed:\n  enabled: true\n  cp_base_url: https://127.0.0.1:7443\n  cp_cert_file: {}\n  cp_ca_file: {}\n  state_dir: {}\n",
            dir.join("cert.pem").display(),
            dir.join("ca.pem").display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    let out = Command::new(binary("aisix-agent"))
        .args(["validate", "--config"])
        .arg(&config)
        .env("AISIX_MANAGED__CP_KEY_PEM", key)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The base64 lines of the key: none may show up in any output.
fn assert_no_key_material(key: &str, output: &str) {
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        for piece in line.as_bytes().chunks(16) {
            let piece = std::str::from_utf8(piece).unwrap();
            if piece.len() >= 12 {
                assert!(
                    !output.contains(piece),
                    "key material in the output: {output}"
                );
            }
        }
    }
}

#[test]
fn inline_pem_from_the_environment_works_and_no_error_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle();

    // As documented: the key's line breaks survive the environment.
    let (code, out) = validate(dir.path(), &bundle, &bundle.cert, &bundle.key);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("gateway gw-1 of environment env-1"), "{out}");
    assert_no_key_material(&bundle.key, &out);

    // Every way of getting it wrong: cut short, line breaks folded, key given as the
    // certificate, garbage around it, the key's own body damaged.
    let folded = bundle.key.replace('\n', " ");
    let cut = &bundle.key[..bundle.key.len() / 2];
    let damaged = bundle.key.replacen('A', "*", 3);
    let cases = [
        ("folded", bundle.cert.clone(), folded),
        ("cut", bundle.cert.clone(), cut.to_owned()),
        ("damaged", bundle.cert.clone(), damaged),
        (
            "wrapped",
            bundle.cert.clone(),
            format!("junk {}\njunk", bundle.key),
        ),
        ("key as certificate", bundle.key.clone(), bundle.key.clone()),
    ];
    for (case, cert, key) in &cases {
        let (code, out) = validate(dir.path(), &bundle, cert, key);
        assert_ne!(code, 0, "{case}: accepted: {out}");
        assert!(
            out.contains("managed"),
            "{case}: the error names no field: {out}"
        );
        assert_no_key_material(&bundle.key, &out);
    }
}
