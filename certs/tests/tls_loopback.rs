//! Real TLS handshakes over loopback between a rustls client and server built from
//! issued certificates.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failure should fail the test loudly"
)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use certs::tls::{
    Anonymous, SwappableIdentity, client_config, gateway_server_config, peer_identity,
    server_config,
};
use certs::{Bundle, CertificateAuthority, GatewayIdentity, PemSource};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use time::OffsetDateTime;

const DAY: Duration = Duration::from_secs(86_400);

/// An mTLS echo server: greets each connection with the verified peer's dp id, then
/// echoes lines.
fn start_server(ca: &CertificateAuthority) -> SocketAddr {
    let issued = ca
        .issue_server(&["localhost".to_owned()], &[], DAY)
        .unwrap();
    start_server_with(
        server_config(&issued.cert_pem, issued.key_pem.expose(), ca.cert_pem()).unwrap(),
    )
}

fn start_server_with(config: rustls::ServerConfig) -> SocketAddr {
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in listener.incoming().map_while(Result::ok) {
            let config = config.clone();
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = StreamOwned::new(conn, tcp);
                while tls.conn.is_handshaking() {
                    if tls.conn.complete_io(&mut tls.sock).is_err() {
                        return;
                    }
                }
                let who = tls
                    .conn
                    .peer_certificates()
                    .and_then(peer_identity)
                    .map_or("none".to_owned(), |i| i.dp_id);
                if writeln!(tls, "hello {who}").is_err() {
                    return;
                }
                let mut reader = BufReader::new(tls);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let reply = format!("echo {line}");
                    if reader.get_mut().write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

type Client = BufReader<StreamOwned<ClientConnection, TcpStream>>;

/// Connects and returns the greeting (or the error that ended the handshake).
fn connect(addr: SocketAddr, config: &ClientConfig) -> Result<(Client, String), String> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = ClientConnection::new(
        Arc::new(config.clone()),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut client = BufReader::new(StreamOwned::new(conn, tcp));
    let mut greeting = String::new();
    match client.read_line(&mut greeting) {
        Ok(n) if n > 0 => Ok((client, greeting.trim().to_owned())),
        Ok(_) => Err("connection closed".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

fn echo(client: &mut Client, text: &str) -> String {
    writeln!(client.get_mut(), "{text}").unwrap();
    let mut line = String::new();
    client.read_line(&mut line).unwrap();
    line.trim().to_owned()
}

fn bundle(ca: &CertificateAuthority, dp: &str) -> Bundle {
    let gw = ca
        .issue_gateway(&GatewayIdentity::new("env-1", dp).unwrap(), DAY)
        .unwrap();
    let src = |s: &str| PemSource::Inline(s.to_owned());
    Bundle::load(
        &src(&gw.cert_pem),
        &src(gw.key_pem.expose()),
        &src(ca.cert_pem()),
        OffsetDateTime::now_utc(),
    )
    .unwrap()
}

#[test]
fn handshake_succeeds_and_identity_swaps_without_dropping_connections() {
    let ca = CertificateAuthority::generate("CA", DAY).unwrap();
    let addr = start_server(&ca);
    let identity = SwappableIdentity::new(&bundle(&ca, "dp-1")).unwrap();
    let config = client_config(ca.cert_pem(), None, identity.clone()).unwrap();

    let (mut first, greeting) = connect(addr, &config).unwrap();
    assert_eq!(greeting, "hello dp-1");
    assert_eq!(echo(&mut first, "one"), "echo one");

    identity.swap(&bundle(&ca, "dp-2")).unwrap();
    let (mut second, greeting) = connect(addr, &config).unwrap();
    assert_eq!(greeting, "hello dp-2");
    // The connection made before the swap is still up.
    assert_eq!(echo(&mut first, "two"), "echo two");
    assert_eq!(echo(&mut second, "three"), "echo three");
}

#[test]
fn the_server_refuses_bad_or_missing_client_certificates() {
    let ca = CertificateAuthority::generate("CA", DAY).unwrap();
    let addr = start_server(&ca);

    let stranger = CertificateAuthority::generate("Other", DAY).unwrap();
    let foreign = SwappableIdentity::new(&bundle(&stranger, "dp-x")).unwrap();
    let config = client_config(ca.cert_pem(), None, foreign).unwrap();
    assert!(
        connect(addr, &config).is_err(),
        "a certificate from another CA was accepted"
    );

    let now = OffsetDateTime::now_utc();
    let id = GatewayIdentity::new("env-1", "dp-old").unwrap();
    let old = ca
        .issue_gateway_between(
            &id,
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        )
        .unwrap();
    let src = |s: &str| PemSource::Inline(s.to_owned());
    // Loaded as of a moment when it was still valid, so the client will present it.
    let then = now - time::Duration::days(5);
    let expired = Bundle::load(
        &src(&old.cert_pem),
        &src(old.key_pem.expose()),
        &src(ca.cert_pem()),
        then,
    )
    .unwrap();
    let config = client_config(
        ca.cert_pem(),
        None,
        SwappableIdentity::new(&expired).unwrap(),
    )
    .unwrap();
    assert!(
        connect(addr, &config).is_err(),
        "an expired certificate was accepted"
    );

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.cert_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let anonymous = ClientConfig::builder_with_provider(certs::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    assert!(
        connect(addr, &anonymous).is_err(),
        "a client without a certificate was accepted"
    );
}

#[test]
fn gateway_server_refuses_revoked_identities_and_certificates_without_one() {
    let ca = CertificateAuthority::generate("CA", DAY).unwrap();
    let next_ca = CertificateAuthority::generate("next CA", DAY).unwrap();
    let issued = ca
        .issue_server(&["localhost".to_owned()], &[], DAY)
        .unwrap();
    let trusted = format!("{}{}", ca.cert_pem(), next_ca.cert_pem());
    let config = gateway_server_config(
        &issued.cert_pem,
        issued.key_pem.expose(),
        &trusted,
        Arc::new(|id: &GatewayIdentity| id.dp_id == "dp-revoked"),
        Anonymous::Refused,
    )
    .unwrap();
    let addr = start_server_with(config);
    let connect_as = |bundle: &Bundle| {
        let identity = SwappableIdentity::new(bundle).unwrap();
        connect(addr, &client_config(ca.cert_pem(), None, identity).unwrap()).map(|(_, g)| g)
    };
    assert_eq!(connect_as(&bundle(&ca, "dp-1")).unwrap(), "hello dp-1");
    assert!(connect_as(&bundle(&ca, "dp-revoked")).is_err());
    // Certificates from every trusted CA are accepted.
    assert_eq!(connect_as(&bundle(&next_ca, "dp-2")).unwrap(), "hello dp-2");

    // A client certificate from the CA but without a gateway identity is refused.
    let plain = ca
        .issue_server_and_client(&["client.example".to_owned()], &[], DAY)
        .unwrap();
    let client = certs::tls::plain_client_config(
        ca.cert_pem(),
        Some((&plain.cert_pem, plain.key_pem.expose())),
    )
    .unwrap();
    assert!(connect(addr, &client).is_err());
}
