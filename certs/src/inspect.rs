//! Reading certificates back: the fields operators and health checks need.

use std::net::IpAddr;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{CertError, GatewayIdentity};

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// Hex, colon-separated.
    pub serial: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub uris: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// SHA-256 of the DER, hex, colon-separated.
    pub sha256_fingerprint: String,
    pub is_ca: bool,
    pub identity: Option<GatewayIdentity>,
}

impl CertInfo {
    /// Days until `not_after`, a started day counting as one: a certificate issued for
    /// 90 days has 90 left right after issue, one with an hour left has 1. Zero or
    /// negative (whole days past) once expired.
    pub fn days_left(&self, now: OffsetDateTime) -> i64 {
        let left = self.not_after - now;
        let days = left.whole_days();
        if left.is_positive() && left > time::Duration::days(days) {
            days + 1
        } else {
            days
        }
    }
}

/// Reads every certificate in a PEM document (`what` names it in errors).
pub fn inspect_pem(what: &str, pem: &str) -> Result<Vec<CertInfo>, CertError> {
    let ders = crate::bundle::pem_certs(what, pem)?;
    ders.iter().map(|der| inspect_der(what, der)).collect()
}

/// Reads one DER certificate (`what` names it in errors).
pub fn inspect_der(what: &str, der: &[u8]) -> Result<CertInfo, CertError> {
    let parse_err = |reason: String| CertError::Parse {
        what: what.to_owned(),
        reason,
    };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| parse_err(e.to_string()))?;
    let (mut dns_names, mut ip_addresses, mut uris) = (Vec::new(), Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => dns_names.push((*n).to_owned()),
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::IPAddress(b) => {
                    if let Some(ip) = ip_from_bytes(b) {
                        ip_addresses.push(ip);
                    }
                }
                _ => {}
            }
        }
    }
    let identity = GatewayIdentity::from_uris(uris.iter().map(String::as_str));
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: colon_hex(cert.raw_serial()),
        dns_names,
        ip_addresses,
        uris,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        sha256_fingerprint: colon_hex(&Sha256::digest(der)),
        is_ca: cert.is_ca(),
        identity,
    })
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    }
}

fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::CertificateAuthority;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn issued_certificates_read_back() {
        let ca = CertificateAuthority::generate("Test CA", 365 * DAY).unwrap();
        let ca_info = &inspect_pem("ca", ca.cert_pem()).unwrap()[0];
        assert!(ca_info.is_ca);
        assert_eq!(ca_info.subject, "CN=Test CA");

        let id = GatewayIdentity::new("env-1", "dp-1").unwrap();
        let gw = ca.issue_gateway(&id, 30 * DAY).unwrap();
        let info = &inspect_pem("gateway", &gw.cert_pem).unwrap()[0];
        assert_eq!(info.identity.as_ref(), Some(&id));
        assert_eq!(info.issuer, "CN=Test CA");
        assert!(!info.is_ca);
        let now = OffsetDateTime::now_utc();
        assert_eq!(info.days_left(now), 30);
        assert_eq!(info.days_left(info.not_after - time::Duration::hours(1)), 1);
        assert_eq!(
            info.days_left(info.not_after + time::Duration::hours(25)),
            -1
        );
        // Backdated for clock skew.
        assert!(info.not_before <= now - time::Duration::minutes(4));
        assert_eq!(info.sha256_fingerprint.len(), 32 * 3 - 1);
        assert!(!format!("{gw:?}").contains("PRIVATE KEY"));

        let server = ca
            .issue_server(
                &["cp.local".to_owned()],
                &["127.0.0.1".parse().unwrap()],
                DAY,
            )
            .unwrap();
        let info = &inspect_pem("server", &server.cert_pem).unwrap()[0];
        assert_eq!(info.dns_names, ["cp.local"]);
        assert_eq!(info.ip_addresses, ["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(info.identity, None);

        // Two gateway certificates never share a serial.
        let again = ca.issue_gateway(&id, DAY).unwrap();
        assert_ne!(
            inspect_pem("a", &again.cert_pem).unwrap()[0].serial,
            inspect_pem("b", &gw.cert_pem).unwrap()[0].serial
        );
    }

    #[test]
    fn save_load_and_refuse_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("CA", DAY).unwrap();
        ca.save(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = CertificateAuthority::load(dir.path()).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        let gw = loaded
            .issue_gateway(&GatewayIdentity::new("e", "d").unwrap(), DAY)
            .unwrap();
        assert_eq!(inspect_pem("gw", &gw.cert_pem).unwrap()[0].issuer, "CN=CA");
        assert!(matches!(ca.save(dir.path()), Err(CertError::Exists(_))));
    }

    #[test]
    fn wrong_input_is_named() {
        let e = inspect_pem(
            "bundle.pem",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "bundle.pem: no PEM block of type CERTIFICATE found"
        );
        let e = inspect_pem(
            "x.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("x.pem: not a valid X.509 certificate"),
            "{e}"
        );
    }
}
