//! Enrollment tokens: what an operator copies to install a gateway without moving a
//! private key. `et1:<env_id>:<dp_id>:<secret>:<ca-sha256>`: the identity tells the
//! agent what to put in its CSR; the secret (32 hex digits) is the one-time credential
//! the control plane checks (it stores only its SHA-256); the CA fingerprint (SHA-256
//! of the CA certificate's DER, 64 hex digits) lets the enrolling agent trust the
//! control plane before it has a CA bundle: it accepts the server only if the chain it
//! presents carries that CA and the server certificate verifies against it.

use sha2::{Digest, Sha256};

use crate::{CertError, GatewayIdentity};

const PREFIX: &str = "et1";

#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentToken {
    pub identity: GatewayIdentity,
    secret: String,
    /// Lowercase hex SHA-256 of the CA certificate (DER).
    pub ca_sha256: String,
}

impl std::fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentToken")
            .field("identity", &self.identity)
            .field("ca_sha256", &self.ca_sha256)
            .finish_non_exhaustive()
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fingerprint enrollment tokens carry: SHA-256 of the first certificate in
/// `ca_pem`, lowercase hex.
pub fn ca_fingerprint(ca_pem: &str) -> Result<String, CertError> {
    let ders = crate::bundle::pem_certs("CA certificate", ca_pem)?;
    let first = ders.first().ok_or_else(|| CertError::WrongPemType {
        what: "CA certificate".to_owned(),
        expected: "CERTIFICATE",
    })?;
    Ok(sha256_hex(first))
}

impl EnrollmentToken {
    /// A new token for `identity` with a random secret, pinning the CA in `ca_pem`.
    pub fn generate(identity: &GatewayIdentity, ca_pem: &str) -> Result<Self, CertError> {
        let mut secret = [0u8; 16];
        ring_fill(&mut secret)?;
        Ok(Self {
            identity: identity.clone(),
            secret: secret.iter().map(|b| format!("{b:02x}")).collect(),
            ca_sha256: ca_fingerprint(ca_pem)?,
        })
    }

    /// Reads a token as printed by [`EnrollmentToken::to_string`].
    pub fn parse(text: &str) -> Result<Self, CertError> {
        let invalid = || {
            CertError::Identity(
                "enrollment token: expected et1:<env_id>:<dp_id>:<32 hex digits>:<64 hex digits>"
                    .to_owned(),
            )
        };
        let mut parts = text.trim().split(':');
        let (Some(PREFIX), Some(env), Some(dp), Some(secret), Some(ca), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(invalid());
        };
        if !is_hex(secret, 32) || !is_hex(ca, 64) {
            return Err(invalid());
        }
        Ok(Self {
            identity: GatewayIdentity::new(env, dp)?,
            secret: secret.to_ascii_lowercase(),
            ca_sha256: ca.to_ascii_lowercase(),
        })
    }

    /// What the control plane stores and looks tokens up by.
    pub fn secret_sha256(&self) -> String {
        sha256_hex(self.secret.as_bytes())
    }

    /// The full token text (contains the secret: show it once, never log it).
    pub fn expose(&self) -> String {
        format!(
            "{PREFIX}:{}:{}:{}:{}",
            self.identity.env_id, self.identity.dp_id, self.secret, self.ca_sha256
        )
    }
}

fn ring_fill(buf: &mut [u8]) -> Result<(), CertError> {
    crate::tls::provider()
        .secure_random
        .fill(buf)
        .map_err(|_| CertError::Tls("no secure random source".to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::CertificateAuthority;
    use std::time::Duration;

    #[test]
    fn tokens_round_trip_and_pin_the_ca() {
        let ca = CertificateAuthority::generate("t", Duration::from_secs(3600)).unwrap();
        let id = GatewayIdentity::new("prod.eu", "dp-1").unwrap();
        let token = EnrollmentToken::generate(&id, ca.cert_pem()).unwrap();
        let parsed = EnrollmentToken::parse(&token.expose()).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(token.ca_sha256, ca_fingerprint(ca.cert_pem()).unwrap());
        let info = &crate::inspect_pem("ca", ca.cert_pem()).unwrap()[0];
        assert_eq!(
            info.sha256_fingerprint
                .replace(':', "")
                .to_ascii_lowercase(),
            token.ca_sha256
        );
        assert_eq!(parsed.identity, id);
        assert!(token.expose().starts_with("et1:prod.eu:dp-1:"));
        assert_ne!(
            EnrollmentToken::generate(&id, ca.cert_pem()).unwrap(),
            token
        );
        let secret = token.expose().split(':').nth(3).unwrap().to_owned();
        assert!(!format!("{token:?}").contains(&secret));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "et1:e:d:abc:def",
            "et2:e:d:00000000000000000000000000000000:0000000000000000000000000000000000000000000000000000000000000000",
            "et1:e:d:0000000000000000000000000000000g:0000000000000000000000000000000000000000000000000000000000000000",
            "et1:e:d:00000000000000000000000000000000:0000000000000000000000000000000000000000000000000000000000000000:x",
            "et1:e/x:d:00000000000000000000000000000000:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(EnrollmentToken::parse(bad).is_err(), "{bad}");
        }
    }
}
