//! certs: the one place in the workspace that knows about X.509.
//!
//! A [`CertificateAuthority`] is generated (ECDSA P-256) or loaded from PEM, and issues
//! gateway client certificates carrying a [`GatewayIdentity`] in URI SANs
//! (`x-aisix://env/<env_id>`, `x-aisix://dp/<dp_id>`, extended key usage clientAuth)
//! and control-plane server certificates (DNS and IP SANs, serverAuth). [`inspect_pem`]
//! reads any PEM certificate back. Gateways can instead make a CSR ([`generate_csr`])
//! that the CA signs only for the identity it expects. No async runtime: callers run key generation on a
//! blocking thread.
//!
//! Layout:
//! - `authority`: the CA, issuing, saving and loading.
//! - `inspect`: reading certificates (fields, fingerprint, days left, identity).
//! - `identity`: the gateway identity and its SAN URIs.
//! - `csr`: certificate signing requests (key generated locally).
//! - `enrollment`: one-time enrollment tokens that pin the CA.
//! - `bundle`: loading and checking a certificate, key and CA.
//! - `tls`: rustls client and server configurations for mutual TLS.

mod authority;
mod bundle;
mod csr;
pub mod enrollment;
mod identity;
mod inspect;
pub mod tls;

pub use authority::{CertificateAuthority, Issued, PrivateKeyPem};

/// Writes a new file with `mode` (atomically; never overwrites an existing file).
pub fn write_new_file(path: &std::path::Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    authority::write_new(path, contents, mode)
}

/// Replaces `path` with `contents` atomically (temporary file, sync, rename, directory
/// sync) with `mode`; a crash leaves either the old file or the new one.
pub fn write_file_atomic(
    path: &std::path::Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), CertError> {
    authority::write_atomic(path, contents, mode)
}
pub use bundle::{Bundle, PemSource, verify_certificate};
pub use csr::{Csr, generate_csr};
pub use identity::GatewayIdentity;
pub use inspect::{CertInfo, inspect_der, inspect_pem};

/// What went wrong with a certificate operation; each message names the item at fault.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: no PEM block of type {expected} found")]
    WrongPemType {
        what: String,
        expected: &'static str,
    },
    #[error("{what}: not a valid X.509 certificate: {reason}")]
    Parse { what: String, reason: String },
    #[error("invalid identity: {0}")]
    Identity(String),
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(std::path::PathBuf),
    #[error("{what}: the private key does not match the certificate")]
    KeyMismatch { what: String },
    #[error("{what}: expired at {not_after}")]
    Expired {
        what: String,
        not_after: time::OffsetDateTime,
    },
    #[error("{what}: not valid before {not_before} (check the clock)")]
    NotYetValid {
        what: String,
        not_before: time::OffsetDateTime,
    },
    #[error(
        "{what}: no gateway identity (needs URI SANs x-aisix://env/<env_id> and x-aisix://dp/<dp_id>)"
    )]
    MissingIdentity { what: String },
    #[error("{what}: not issued by the given CA")]
    NotIssuedByCa { what: String },
    #[error("validity: {0}")]
    Validity(String),
    #[error("CSR: {0}")]
    Csr(String),
    #[error("TLS: {0}")]
    Tls(String),
}

#[cfg(test)]
mod tests;
