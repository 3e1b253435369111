//! `POST /dp/rotate-cert` and `POST /dp/register`: a CSR in, a certificate bundle out.
//! The private key never leaves the gateway.

use serde::{Deserialize, Serialize};

/// `POST /dp/rotate-cert`: the CSR carries the same identity SANs as the presenting
/// certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateRequest {
    pub csr_pem: String,
}

/// `POST /dp/register`: a one-time enrollment token from the console and a CSR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub token: String,
    pub csr_pem: String,
}

/// The answer of both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedBundle {
    pub certificate_pem: String,
    pub ca_pem: String,
    pub not_after_unix: Option<i64>,
}
