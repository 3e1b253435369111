//! rustls configurations for the control-plane link.
//!
//! The client presents a gateway identity held in a [`SwappableIdentity`], so a rotated
//! certificate takes effect on the next handshake without rebuilding the client. The
//! server accepts only client certificates issued by its CA, and [`peer_identity`]
//! reads the verified peer's gateway identity for the application.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use rustls::{DigitallySignedStruct, DistinguishedName};

use crate::bundle::{pem_certs, pem_key};
use crate::{Bundle, CertError, GatewayIdentity, inspect_der};

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The workspace's one crypto provider (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client certificate a TLS client presents; replaceable at run time.
#[derive(Debug)]
pub struct SwappableIdentity {
    current: ArcSwap<CertifiedKey>,
}

impl SwappableIdentity {
    pub fn new(bundle: &Bundle) -> Result<Arc<Self>, CertError> {
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(certified_key(bundle)?),
        }))
    }

    /// Presents `bundle` from the next handshake on; open connections are unaffected.
    pub fn swap(&self, bundle: &Bundle) -> Result<(), CertError> {
        self.current.store(Arc::new(certified_key(bundle)?));
        Ok(())
    }
}

impl ResolvesClientCert for SwappableIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn certified_key(bundle: &Bundle) -> Result<CertifiedKey, CertError> {
    let key = pem_key("private key", bundle.key.expose())?;
    CertifiedKey::from_der(bundle.chain.clone(), key, &provider())
        .map_err(|e| CertError::Tls(format!("cannot use the gateway key: {e}")))
}

fn roots(what: &str, ca_pem: &str) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in pem_certs(what, ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| CertError::Tls(format!("{what}: {e}")))?;
    }
    Ok(roots)
}

/// A client config that trusts `ca_pem` (plus `extra_ca_pem`, if given) and presents
/// the identity; TLS 1.2 minimum.
pub fn client_config(
    ca_pem: &str,
    extra_ca_pem: Option<&str>,
    identity: Arc<SwappableIdentity>,
) -> Result<ClientConfig, CertError> {
    let mut roots = roots("CA", ca_pem)?;
    if let Some(extra) = extra_ca_pem {
        for cert in pem_certs("extra CA", extra)? {
            roots
                .add(cert)
                .map_err(|e| CertError::Tls(format!("extra CA: {e}")))?;
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_cert_resolver(identity);
    // A resumed session would carry the identity of the handshake it resumes: after a
    // rotation the server must see the new certificate, so every connection does a
    // full handshake (they are long-lived and pooled, so this is cheap).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// A client config for other TLS services (etcd): trusts `ca_pem` and, when given,
/// presents a fixed client certificate and key (PEM); TLS 1.2 minimum.
pub fn plain_client_config(
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<ClientConfig, CertError> {
    plain_client_config_for(ca_pem, client, None)
}

/// Like [`plain_client_config`]; with `server_name`, the server's certificate must be
/// valid for that name whatever host was connected to (etcd reached by IP address or
/// through a load balancer, AISIX's `etcd.tls.domain_name`).
pub fn plain_client_config_for(
    ca_pem: &str,
    client: Option<(&str, &str)>,
    server_name: Option<&str>,
) -> Result<ClientConfig, CertError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| CertError::Tls(e.to_string()))?;
    let roots = Arc::new(roots("CA", ca_pem)?);
    let builder = match server_name {
        None => builder.with_root_certificates(roots),
        Some(name) => {
            let name = rustls::pki_types::ServerName::try_from(name.to_owned())
                .map_err(|_| CertError::Tls(format!("'{name}' is not a server name")))?;
            let inner =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| CertError::Tls(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamedServer { inner, name }))
        }
    };
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_pem, key_pem)) => builder
            .with_client_auth_cert(
                pem_certs("client certificate", cert_pem)?,
                pem_key("client key", key_pem)?,
            )
            .map_err(|e| CertError::Tls(format!("client certificate and key: {e}"))),
    }
}

/// Verifies a server's certificate as webpki does, for a fixed name rather than the
/// one connected to.
#[derive(Debug)]
struct NamedServer {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: rustls::pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for NamedServer {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _connected_to: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server config presenting `cert_pem`/`key_pem` and requiring client certificates
/// issued by `client_ca_pem`; TLS 1.2 minimum.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
) -> Result<ServerConfig, CertError> {
    let verifier = webpki_verifier(client_ca_pem)?;
    finish_server_config(verifier, cert_pem, key_pem)
}

/// A server config for an HTTPS listener without client certificates (the proxy and
/// admin listeners): `cert_pem` holds the chain to send, leaf first; TLS 1.2 minimum,
/// HTTP/1.1 over ALPN.
pub fn listener_config(cert_pem: &str, key_pem: &str) -> Result<ServerConfig, CertError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(
            pem_certs("certificate", cert_pem)?,
            pem_key("key", key_pem)?,
        )
        .map_err(|e| CertError::Tls(format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Decides, during the handshake, whether a gateway identity is refused (revoked).
pub type Refuse = Arc<dyn Fn(&GatewayIdentity) -> bool + Send + Sync>;

/// Whether a client may connect without presenting a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    Refused,
    /// Admitted: the application must confine such connections (enrollment only). A
    /// certificate that is presented is still verified and refused when bad.
    Admitted,
}

/// Like [`server_config`], but trusting every CA in `client_ca_pem` and refusing, in
/// the handshake, client certificates without a gateway identity or whose identity
/// `refuse` rejects. `cert_pem` may hold the chain to send (leaf first).
pub fn gateway_server_config(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
    refuse: Refuse,
    anonymous: Anonymous,
) -> Result<ServerConfig, CertError> {
    let inner = webpki_verifier(client_ca_pem)?;
    finish_server_config(
        Arc::new(GatewayVerifier {
            inner,
            refuse,
            anonymous,
        }),
        cert_pem,
        key_pem,
    )
}

fn webpki_verifier(client_ca_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, CertError> {
    WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots("client CA", client_ca_pem)?),
        provider(),
    )
    .build()
    .map_err(|e| CertError::Tls(e.to_string()))
}

fn finish_server_config(
    verifier: Arc<dyn ClientCertVerifier>,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ServerConfig, CertError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            pem_certs("server certificate", cert_pem)?,
            pem_key("server key", key_pem)?,
        )
        .map_err(|e| CertError::Tls(format!("server certificate and key: {e}")))?;
    // Every connection verifies a client certificate afresh (rotation, revocation),
    // even from clients that would like to resume.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

struct GatewayVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    refuse: Refuse,
    anonymous: Anonymous,
}

impl std::fmt::Debug for GatewayVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayVerifier").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for GatewayVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.anonymous == Anonymous::Refused
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let identity = inspect_der("client certificate", end_entity)
            .ok()
            .and_then(|info| info.identity)
            .ok_or_else(|| {
                rustls::Error::General("client certificate has no gateway identity".to_owned())
            })?;
        if (self.refuse)(&identity) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The gateway identity of a peer whose chain the TLS layer has verified.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Option<GatewayIdentity> {
    inspect_der("peer certificate", chain.first()?)
        .ok()?
        .identity
}

/// A client config for enrolling (no client certificate, no CA bundle yet): the server
/// is accepted only if the chain it sends includes a CA certificate whose SHA-256 is
/// `ca_sha256` (from the enrollment token) and its certificate verifies against that
/// CA for the server name.
pub fn enrollment_client_config(ca_sha256: &str) -> Result<ClientConfig, CertError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| CertError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
            ca_sha256: ca_sha256.to_ascii_lowercase(),
            provider: provider(),
        }))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

#[derive(Debug)]
struct PinnedCaVerifier {
    ca_sha256: String,
    provider: Arc<CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let pinned = intermediates
            .iter()
            .find(|c| crate::enrollment::sha256_hex(c) == self.ca_sha256)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the control plane did not present the CA named in the enrollment token"
                        .to_owned(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(pinned.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
