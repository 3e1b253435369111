//! The certificate authority: generate or load, issue, save.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::{CertError, GatewayIdentity};

/// New certificates start this far in the past, so small clock skew between the
/// issuer and the verifier does not make a fresh certificate "not yet valid".
const BACKDATE: time::Duration = time::Duration::minutes(5);

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// A PEM private key. `Debug` and `Display` never print it.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyPem(String);

impl PrivateKeyPem {
    pub fn new(pem: String) -> Self {
        Self(pem)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem([redacted])")
    }
}

/// A certificate and the private key generated for it.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: PrivateKeyPem,
}

pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: PrivateKeyPem,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA with an ECDSA P-256 key.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self, CertError> {
        let key = KeyPair::generate().map_err(gen_err("generating the CA key"))?;
        let key_pem = PrivateKeyPem(key.serialize_pem());
        let mut params = base_params(common_name, validity, &key)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let certified =
            CertifiedIssuer::self_signed(params, key).map_err(gen_err("self-signing the CA"))?;
        let cert_pem = certified.pem();
        // Rebuild the issuer from the certificate so generated and loaded CAs are alike.
        Self::from_pem(&cert_pem, key_pem.expose())
    }

    /// Loads a CA from its certificate and private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(gen_err("reading the CA private key"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(gen_err("reading the CA certificate"))?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: PrivateKeyPem(key_pem.to_owned()),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &PrivateKeyPem {
        &self.key_pem
    }

    /// Writes `ca.pem` and `ca-key.pem` (mode 0600) into `dir`, never overwriting.
    pub fn save(&self, dir: &Path) -> Result<(), CertError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        write_new(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        write_new(
            &dir.join(CA_KEY_FILE),
            self.key_pem.expose().as_bytes(),
            0o600,
        )
    }

    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(io_err(&path))
        };
        Self::from_pem(&read(CA_CERT_FILE)?, &read(CA_KEY_FILE)?)
    }

    /// A client certificate for a gateway, with a fresh ECDSA P-256 key.
    pub fn issue_gateway(
        &self,
        identity: &GatewayIdentity,
        validity: Duration,
    ) -> Result<Issued, CertError> {
        let key = KeyPair::generate().map_err(gen_err("generating the gateway key"))?;
        let params = self.gateway_params(identity, validity, &key)?;
        self.sign(params, key)
    }

    /// A gateway certificate valid exactly from `not_before` to `not_after`: for
    /// certificates that must be expired or not yet valid (tests, fault injection).
    pub fn issue_gateway_between(
        &self,
        identity: &GatewayIdentity,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, CertError> {
        if not_after <= not_before {
            return Err(CertError::Validity(
                "not_after must be later than not_before".to_owned(),
            ));
        }
        let key = KeyPair::generate().map_err(gen_err("generating the gateway key"))?;
        let mut params = self.gateway_params(identity, Duration::ZERO, &key)?;
        params.not_before = not_before;
        params.not_after = not_after;
        self.sign(params, key)
    }

    /// The parameters of every gateway certificate this CA issues.
    pub(crate) fn gateway_params(
        &self,
        identity: &GatewayIdentity,
        validity: Duration,
        public_key: &impl PublicKeyData,
    ) -> Result<CertificateParams, CertError> {
        let mut params = base_params(
            &format!("aisix-gateway {}", identity.dp_id),
            validity,
            public_key,
        )?;
        params.subject_alt_names = identity
            .uris()
            .into_iter()
            .map(|u| u.try_into().map(SanType::URI))
            .collect::<Result<_, _>>()
            .map_err(gen_err("encoding the identity URIs"))?;
        crate::csr::gateway_usages(&mut params);
        Ok(params)
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// A server certificate for a control plane, valid for the given names and addresses.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<Issued, CertError> {
        self.issue_service(dns_names, ips, validity, false)
    }

    /// A server certificate that may also authenticate as a client: what etcd needs
    /// with `--client-cert-auth`, because its HTTP gateway dials the server with the
    /// server's own certificate.
    pub fn issue_server_and_client(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<Issued, CertError> {
        self.issue_service(dns_names, ips, validity, true)
    }

    fn issue_service(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Duration,
        client_too: bool,
    ) -> Result<Issued, CertError> {
        let key = KeyPair::generate().map_err(gen_err("generating the server key"))?;
        let cn = dns_names
            .first()
            .map_or("aisix-control-plane", String::as_str);
        let mut params = base_params(cn, validity, &key)?;
        for name in dns_names {
            let name = name
                .clone()
                .try_into()
                .map_err(gen_err("encoding a DNS name"))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(ips.iter().copied().map(SanType::IpAddress));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if client_too {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        self.sign(params, key)
    }

    fn sign(&self, params: CertificateParams, key: KeyPair) -> Result<Issued, CertError> {
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(gen_err("signing the certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: PrivateKeyPem(key.serialize_pem()),
        })
    }
}

fn base_params(
    common_name: &str,
    validity: Duration,
    key: &impl PublicKeyData,
) -> Result<CertificateParams, CertError> {
    let now = OffsetDateTime::now_utc();
    let validity = time::Duration::try_from(validity)
        .map_err(|_| CertError::Validity("validity is too long".to_owned()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    params.serial_number = Some(serial(key, now));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A positive 128-bit serial, unique per key and moment.
fn serial(key: &impl PublicKeyData, now: OffsetDateTime) -> SerialNumber {
    let mut h = Sha256::new();
    h.update(key.der_bytes());
    h.update(now.unix_timestamp_nanos().to_be_bytes());
    let mut bytes: [u8; 16] = h.finalize()[..16].try_into().unwrap_or([1; 16]);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn gen_err(what: &'static str) -> impl Fn(rcgen::Error) -> CertError {
    move |source| CertError::Generate { what, source }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `path` with `mode`, failing if it exists; the file is complete or absent.
pub(crate) fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    if path.exists() {
        return Err(CertError::Exists(path.to_owned()));
    }
    write_atomic(path, contents, mode)
}

/// Replaces `path` with `contents`: written to a temporary file with `mode`, synced,
/// renamed over the target and the directory synced, so a crash leaves the old file or
/// the new one, never a mix.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}
