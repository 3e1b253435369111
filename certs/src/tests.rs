use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use time::OffsetDateTime;

use super::*;
use crate::tls::{SwappableIdentity, client_config, peer_identity, server_config};

const DAY: Duration = Duration::from_secs(86_400);

fn id(env: &str, dp: &str) -> GatewayIdentity {
    GatewayIdentity::new(env, dp).unwrap()
}

fn inline(s: &str) -> PemSource {
    PemSource::Inline(s.to_owned())
}

fn load(cert: &str, key: &str, ca: &str) -> Result<Bundle, CertError> {
    Bundle::load(
        &inline(cert),
        &inline(key),
        &inline(ca),
        OffsetDateTime::now_utc(),
    )
}

#[test]
fn csr_is_signed_only_for_the_expected_identity() {
    let ca = CertificateAuthority::generate("CA", DAY).unwrap();
    let csr = generate_csr(&id("env-1", "dp-1")).unwrap();
    assert!(!format!("{csr:?}").contains("PRIVATE KEY"));
    let cert = ca
        .sign_gateway_csr(&csr.csr_pem, &id("env-1", "dp-1"), 10 * DAY)
        .unwrap();
    let info = &inspect_pem("c", &cert).unwrap()[0];
    assert_eq!(info.identity, Some(id("env-1", "dp-1")));
    assert_eq!(info.days_left(OffsetDateTime::now_utc()), 10);
    // The key stayed with the requester and matches the signed certificate.
    let bundle = load(&cert, csr.key_pem.expose(), ca.cert_pem()).unwrap();
    assert_eq!(bundle.identity, id("env-1", "dp-1"));

    let e = ca
        .sign_gateway_csr(&csr.csr_pem, &id("env-2", "dp-1"), DAY)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "CSR: identity env env-1 / dp dp-1 does not match the expected env env-2 / dp dp-1"
    );
    let e = ca
        .sign_gateway_csr("garbage", &id("e", "d"), DAY)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("CSR: not a valid CSR"), "{e}");
}

#[test]
fn bundle_errors_name_the_problem() {
    let ca = CertificateAuthority::generate("CA", DAY).unwrap();
    let gw = ca.issue_gateway(&id("e", "d"), 30 * DAY).unwrap();
    let other = ca.issue_gateway(&id("e", "d"), 30 * DAY).unwrap();
    let (cert, key) = (gw.cert_pem.as_str(), gw.key_pem.expose());
    assert!(load(cert, key, ca.cert_pem()).is_ok());

    let err = |r: Result<Bundle, CertError>| r.unwrap_err().to_string();
    assert_eq!(
        err(load(key, key, ca.cert_pem())),
        "certificate (inline PEM): no PEM block of type CERTIFICATE found"
    );
    assert_eq!(
        err(load(cert, cert, ca.cert_pem())),
        "private key (inline PEM): no PEM block of type PRIVATE KEY found"
    );
    assert_eq!(
        err(load(cert, other.key_pem.expose(), ca.cert_pem())),
        "certificate (inline PEM): the private key does not match the certificate"
    );

    let later = OffsetDateTime::now_utc() + time::Duration::days(40);
    let e = Bundle::load(&inline(cert), &inline(key), &inline(ca.cert_pem()), later)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("certificate (inline PEM): expired at"), "{e}");
    let earlier = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let e = Bundle::load(&inline(cert), &inline(key), &inline(ca.cert_pem()), earlier)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("certificate (inline PEM): not valid before"),
        "{e}"
    );

    let server = ca
        .issue_server(&["localhost".to_owned()], &[], DAY)
        .unwrap();
    let e = err(load(
        &server.cert_pem,
        server.key_pem.expose(),
        ca.cert_pem(),
    ));
    assert!(e.contains("no gateway identity"), "{e}");

    let stranger = CertificateAuthority::generate("CA", DAY).unwrap();
    assert_eq!(
        err(load(cert, key, stranger.cert_pem())),
        "certificate (inline PEM): not issued by the given CA"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.pem"), cert).unwrap();
    std::fs::write(dir.path().join("k.pem"), key).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    let file = |n: &str| PemSource::File(dir.path().join(n));
    let b = Bundle::load(
        &file("c.pem"),
        &file("k.pem"),
        &file("ca.pem"),
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    assert_eq!(b.identity, id("e", "d"));
    let e = Bundle::load(
        &file("nope.pem"),
        &file("k.pem"),
        &file("ca.pem"),
        OffsetDateTime::now_utc(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("nope.pem"), "{e}");
    let e = Bundle::load(
        &file("k.pem"),
        &file("k.pem"),
        &file("ca.pem"),
        OffsetDateTime::now_utc(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("k.pem") && e.contains("no PEM block of type CERTIFICATE"),
        "{e}"
    );
}

/// Runs a TLS handshake in memory; returns the identity the server verified.
fn handshake(
    client: rustls::ClientConfig,
    server: &rustls::ServerConfig,
    name: &str,
) -> Result<Option<GatewayIdentity>, rustls::Error> {
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let mut c = rustls::Connection::from(rustls::ClientConnection::new(Arc::new(client), name)?);
    let mut s = rustls::Connection::from(rustls::ServerConnection::new(Arc::new(server.clone()))?);
    for _ in 0..20 {
        pump(&mut c, &mut s)?;
        pump(&mut s, &mut c)?;
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(s.peer_certificates().and_then(peer_identity));
        }
    }
    Err(rustls::Error::General("handshake did not finish".into()))
}

fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) -> Result<(), rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut slice = &buf[..];
    while !slice.is_empty() {
        to.read_tls(&mut slice).unwrap();
        to.process_new_packets()?;
    }
    Ok(())
}

#[test]
fn mutual_tls_verifies_both_sides_and_swaps_identity() {
    let ca = CertificateAuthority::generate("CA", DAY).unwrap();
    let server = ca
        .issue_server(
            &["localhost".to_owned()],
            &["127.0.0.1".parse().unwrap()],
            DAY,
        )
        .unwrap();
    let server_cfg =
        server_config(&server.cert_pem, server.key_pem.expose(), ca.cert_pem()).unwrap();
    let bundle = |dp: &str, ca: &CertificateAuthority| {
        let gw = ca.issue_gateway(&id("env-1", dp), DAY).unwrap();
        load(&gw.cert_pem, gw.key_pem.expose(), ca.cert_pem()).unwrap()
    };

    let identity = SwappableIdentity::new(&bundle("dp-1", &ca)).unwrap();
    let client_cfg = client_config(ca.cert_pem(), None, identity.clone()).unwrap();
    assert_eq!(
        handshake(client_cfg.clone(), &server_cfg, "localhost").unwrap(),
        Some(id("env-1", "dp-1"))
    );
    assert_eq!(
        handshake(client_cfg.clone(), &server_cfg, "127.0.0.1").unwrap(),
        Some(id("env-1", "dp-1"))
    );

    // Rotation: the same client config presents the new certificate on the next handshake.
    identity.swap(&bundle("dp-2", &ca)).unwrap();
    assert_eq!(
        handshake(client_cfg.clone(), &server_cfg, "localhost").unwrap(),
        Some(id("env-1", "dp-2"))
    );

    // The server refuses resumption too: a client that keeps sessions still has to
    // present its current certificate.
    let mut resuming = client_cfg.clone();
    resuming.resumption = rustls::client::Resumption::in_memory_sessions(8);
    assert_eq!(
        handshake(resuming.clone(), &server_cfg, "localhost").unwrap(),
        Some(id("env-1", "dp-2"))
    );
    identity.swap(&bundle("dp-4", &ca)).unwrap();
    assert_eq!(
        handshake(resuming, &server_cfg, "localhost").unwrap(),
        Some(id("env-1", "dp-4"))
    );

    // The client checks the server's name.
    assert!(handshake(client_cfg, &server_cfg, "cp.example").is_err());

    // The server refuses a gateway certificate from another CA.
    let stranger = CertificateAuthority::generate("Other", DAY).unwrap();
    let foreign = SwappableIdentity::new(&bundle("dp-3", &stranger)).unwrap();
    let cfg = client_config(ca.cert_pem(), None, foreign).unwrap();
    assert!(handshake(cfg, &server_cfg, "localhost").is_err());

    // A client that trusts another CA refuses the server.
    let cfg = client_config(stranger.cert_pem(), None, identity.clone()).unwrap();
    assert!(handshake(cfg, &server_cfg, "localhost").is_err());
    // ... unless that CA is given as the extra CA.
    let cfg = client_config(stranger.cert_pem(), Some(ca.cert_pem()), identity).unwrap();
    assert!(handshake(cfg, &server_cfg, "localhost").is_ok());
}
