//! The connections provider calls go over, and the pool that keeps them: TCP (no
//! delay, keep-alive as configured), TLS (the system's roots and the configured ones,
//! a client certificate when one is configured), the whole connect (handshake
//! included) within `connect_timeout`.
//!
//! Calls go through hyper's pooled client directly rather than through reqwest's:
//! without reqwest's per-call work (a copy of the headers kept for redirects, a clone
//! of its service stack, its response wrapper) a request costs about a fifth less CPU
//! (docs/performance.md, fourth round). reqwest still builds the requests (the adapters' credential hooks and
//! multipart forms) and serves the gateway's other outbound calls, with the same TLS
//! configuration.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tower_service::Service;

use super::client::{UpstreamOptions, UpstreamTls};

/// The pooled client provider calls go through.
pub type Pool = Client<Connector, reqwest::Body>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client certificate chain (leaf first) and its private key.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    /// The chain and key read from PEM, or `None` when either holds none or the key
    /// is not the first certificate's (a mismatch would otherwise fail every
    /// handshake, or stop start-up without naming the file).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Option<Self> {
        let chain = certificates_from_pem(cert_pem)?;
        let key = rustls_pemfile::private_key(&mut &key_pem[..]).ok()??;
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &crypto_provider())
            .ok()?;
        Some(Self { chain, key })
    }
}

/// The process's rustls provider (ring, installed once).
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    crate::install_crypto_provider();
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("chain", &self.chain.len())
            .field("key", &"[redacted]")
            .finish()
    }
}

/// Every certificate in `pem`, or `None` when it holds none or one is unreadable.
pub fn certificates_from_pem(pem: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    let certificates = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    (!certificates.is_empty()).then_some(certificates)
}

/// The TLS configuration of provider calls (no ALPN protocols yet): the platform's
/// verifier with the extra roots (or none, when `verify` is off), the client
/// certificate when there is one.
pub fn tls_config(tls: &UpstreamTls) -> Result<ClientConfig, String> {
    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .dangerous();
    let builder = if tls.verify {
        let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(
            tls.extra_roots.iter().cloned(),
            provider,
        )
        .map_err(|e| format!("the certificate verifier: {e}"))?;
        builder.with_custom_certificate_verifier(Arc::new(verifier))
    } else {
        builder.with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
    };
    match &tls.identity {
        Some(identity) => builder
            .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
            .map_err(|e| format!("the client certificate: {e}")),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// A pool of keep-alive connections made as `options` say, over `tls`.
pub fn pool(options: &UpstreamOptions, tls: ClientConfig) -> Pool {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    // Shared between a host's addresses, so a black-holed first address leaves time
    // for the next; the wrapper below bounds the whole connect, TLS included.
    tcp.set_connect_timeout(Some(options.connect_timeout));
    tcp.set_keepalive(options.tcp_keepalive);
    tcp.set_keepalive_interval(options.tcp_keepalive_interval);
    tcp.set_keepalive_retries(options.tcp_keepalive_retries);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    let connector = Connector {
        inner: https,
        timeout: options.connect_timeout,
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(options.pool_idle_timeout);
    if let Some(most) = options.pool_max_idle_per_host {
        builder.pool_max_idle_per_host(most);
    }
    builder.build(connector)
}

/// Connects over TCP and, for `https`, TLS, all of it within `timeout`.
#[derive(Clone)]
pub struct Connector {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

type Connected = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

impl Service<Uri> for Connector {
    type Response = Connected;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Connected, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {} ms", timeout.as_millis()),
                )
                .into()),
            }
        })
    }
}

/// Accepts any server certificate (`upstream.tls.verify: false`, for test benches);
/// the handshake's signatures are still checked.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_never_shows_its_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let identity =
            Identity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap();
        let shown = format!("{identity:?}");
        assert!(shown.contains("[redacted]"), "{shown}");
        assert!(!shown.contains(&key.serialize_pem()[40..80]), "{shown}");
        assert!(Identity::from_pem(cert.pem().as_bytes(), b"no key").is_none());
        let other = rcgen::KeyPair::generate().unwrap();
        let mismatched =
            Identity::from_pem(cert.pem().as_bytes(), other.serialize_pem().as_bytes());
        assert!(mismatched.is_none(), "a key that is not the certificate's");
        assert!(certificates_from_pem(b"not a certificate").is_none());
    }
}
