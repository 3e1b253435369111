//! Certificate bundles (certificate chain, private key, CA) from inline PEM or files,
//! checked the way an agent needs before it dials a control plane.

use std::path::PathBuf;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{CertError, CertInfo, GatewayIdentity, PrivateKeyPem, inspect_pem};

/// Where one PEM item comes from.
#[derive(Debug, Clone)]
pub enum PemSource {
    Inline(String),
    File(PathBuf),
}

impl PemSource {
    /// The PEM text, and a name for it in error messages.
    fn read(&self, item: &str) -> Result<(String, String), CertError> {
        match self {
            PemSource::Inline(pem) => Ok((pem.clone(), format!("{item} (inline PEM)"))),
            PemSource::File(path) => std::fs::read_to_string(path)
                .map(|pem| (pem, format!("{item} ({})", path.display())))
                .map_err(|source| CertError::Io {
                    path: path.clone(),
                    source,
                }),
        }
    }
}

/// A checked gateway bundle: the chain's leaf is valid now, matches the key, carries a
/// gateway identity and was issued by the CA.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyPem,
    pub ca: Vec<CertificateDer<'static>>,
    pub cert_pem: String,
    pub ca_pem: String,
    pub identity: GatewayIdentity,
    pub leaf: CertInfo,
}

impl Bundle {
    pub fn load(
        cert: &PemSource,
        key: &PemSource,
        ca: &PemSource,
        now: OffsetDateTime,
    ) -> Result<Self, CertError> {
        let (cert_pem, cert_name) = cert.read("certificate")?;
        let (key_pem, key_name) = key.read("private key")?;
        let (ca_pem, ca_name) = ca.read("CA")?;
        let chain = pem_certs(&cert_name, &cert_pem)?;
        let ca_certs = pem_certs(&ca_name, &ca_pem)?;
        let key_der = pem_key(&key_name, &key_pem)?;

        let leaf = inspect_pem(&cert_name, &cert_pem)?.remove(0);
        check_validity(&cert_name, &leaf, now)?;
        let identity = leaf
            .identity
            .clone()
            .ok_or_else(|| CertError::MissingIdentity {
                what: cert_name.clone(),
            })?;
        keys_match(&cert_name, &chain, key_der)?;
        issued_by(&cert_name, &chain[0], &ca_certs)?;
        Ok(Self {
            chain,
            key: PrivateKeyPem::new(key_pem),
            ca: ca_certs,
            cert_pem,
            ca_pem,
            identity,
            leaf,
        })
    }
}

/// Checks that the first certificate of `cert_pem` was issued by a CA in `ca_pem` and
/// is valid at `now`; returns what it says. Errors say which check failed.
pub fn verify_certificate(
    cert_pem: &str,
    ca_pem: &str,
    now: OffsetDateTime,
) -> Result<CertInfo, CertError> {
    let chain = pem_certs("certificate", cert_pem)?;
    let cas = pem_certs("CA", ca_pem)?;
    let leaf = inspect_pem("certificate", cert_pem)?.remove(0);
    issued_by("certificate", &chain[0], &cas)?;
    check_validity("certificate", &leaf, now)?;
    Ok(leaf)
}

fn check_validity(what: &str, leaf: &CertInfo, now: OffsetDateTime) -> Result<(), CertError> {
    if now < leaf.not_before {
        return Err(CertError::NotYetValid {
            what: what.to_owned(),
            not_before: leaf.not_before,
        });
    }
    if now > leaf.not_after {
        return Err(CertError::Expired {
            what: what.to_owned(),
            not_after: leaf.not_after,
        });
    }
    Ok(())
}

/// PEM text that does not parse. The parser's own message quotes the text around the
/// fault, which may be private key material: it is never passed on.
fn malformed(what: &str) -> CertError {
    CertError::Parse {
        what: what.to_owned(),
        reason: "malformed PEM (a BEGIN/END section is broken, cut short or has its line \
                 breaks folded into spaces)"
            .to_owned(),
    }
}

pub(crate) fn pem_certs(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| malformed(what))?;
    if certs.is_empty() {
        return Err(CertError::WrongPemType {
            what: what.to_owned(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

pub(crate) fn pem_key(what: &str, pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|_| malformed(what))?
        .ok_or_else(|| CertError::WrongPemType {
            what: what.to_owned(),
            expected: "PRIVATE KEY",
        })
}

fn keys_match(
    what: &str,
    chain: &[CertificateDer<'static>],
    key: PrivateKeyDer<'static>,
) -> Result<(), CertError> {
    let provider = crate::tls::provider();
    let certified = rustls::sign::CertifiedKey::from_der(chain.to_vec(), key, &provider);
    match certified.map(|c| c.keys_match()) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(rustls::Error::InconsistentKeys(_))) | Err(rustls::Error::InconsistentKeys(_)) => {
            Err(CertError::KeyMismatch {
                what: what.to_owned(),
            })
        }
        Ok(Err(e)) | Err(e) => Err(CertError::Parse {
            what: what.to_owned(),
            reason: e.to_string(),
        }),
    }
}

fn issued_by(
    what: &str,
    leaf: &CertificateDer<'_>,
    cas: &[CertificateDer<'_>],
) -> Result<(), CertError> {
    fn parse<'a>(der: &'a [u8]) -> Option<X509Certificate<'a>> {
        X509Certificate::from_der(der).map(|(_, c)| c).ok()
    }
    let Some(leaf) = parse(leaf) else {
        return Err(CertError::Parse {
            what: what.to_owned(),
            reason: "unreadable leaf".to_owned(),
        });
    };
    let signed = cas.iter().filter_map(|ca| parse(ca)).any(|ca| {
        ca.subject() == leaf.issuer() && leaf.verify_signature(Some(ca.public_key())).is_ok()
    });
    if signed {
        Ok(())
    } else {
        Err(CertError::NotIssuedByCa {
            what: what.to_owned(),
        })
    }
}
