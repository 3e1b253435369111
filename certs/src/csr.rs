//! Certificate signing requests: the key pair is generated where it will be used and
//! never leaves; the CA signs only when the requested identity is the expected one.

use std::time::Duration;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType,
};

use crate::{CertError, CertificateAuthority, GatewayIdentity, Issued, PrivateKeyPem};

/// A CSR and the private key generated for it.
#[derive(Debug, Clone)]
pub struct Csr {
    pub csr_pem: String,
    pub key_pem: PrivateKeyPem,
}

/// Generates a new ECDSA P-256 key and a CSR carrying `identity`.
pub fn generate_csr(identity: &GatewayIdentity) -> Result<Csr, CertError> {
    let csr_err = |e: rcgen::Error| CertError::Csr(e.to_string());
    let key = KeyPair::generate().map_err(csr_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("aisix-gateway {}", identity.dp_id),
    );
    params.subject_alt_names = identity
        .uris()
        .into_iter()
        .map(|u| u.try_into().map(SanType::URI))
        .collect::<Result<_, _>>()
        .map_err(csr_err)?;
    let csr = params.serialize_request(&key).map_err(csr_err)?;
    Ok(Csr {
        csr_pem: csr.pem().map_err(csr_err)?,
        key_pem: PrivateKeyPem::new(key.serialize_pem()),
    })
}

impl CertificateAuthority {
    /// Signs `csr_pem` as a gateway client certificate, only if the identity it asks
    /// for is exactly `expected` (and it asks for nothing else). Validity, key usage and
    /// serial are the CA's choice, not the requester's.
    pub fn sign_gateway_csr(
        &self,
        csr_pem: &str,
        expected: &GatewayIdentity,
        validity: Duration,
    ) -> Result<String, CertError> {
        let mut request = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CertError::Csr(format!("not a valid CSR: {e}")))?;
        let uris: Vec<String> = request
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(u) => Ok(u.as_str().to_owned()),
                other => Err(CertError::Csr(format!(
                    "unexpected subject alternative name {other:?}"
                ))),
            })
            .collect::<Result<_, _>>()?;
        let asked = GatewayIdentity::from_uris(uris.iter().map(String::as_str));
        if asked.as_ref() != Some(expected) || uris.len() != 2 {
            return Err(CertError::Csr(format!(
                "identity {} does not match the expected {expected}",
                asked.map_or_else(|| "(none)".to_owned(), |a| a.to_string())
            )));
        }
        let template = self.gateway_params(expected, validity, &request.public_key)?;
        request.params = template;
        let cert = request
            .signed_by(self.issuer())
            .map_err(|e| CertError::Csr(format!("signing: {e}")))?;
        Ok(cert.pem())
    }

    /// Issues a gateway certificate through a locally generated CSR (what an agent and
    /// the control plane do over the wire), returning the certificate and the new key.
    pub fn issue_gateway_via_csr(
        &self,
        identity: &GatewayIdentity,
        validity: Duration,
    ) -> Result<Issued, CertError> {
        let csr = generate_csr(identity)?;
        let cert_pem = self.sign_gateway_csr(&csr.csr_pem, identity, validity)?;
        Ok(Issued {
            cert_pem,
            key_pem: csr.key_pem,
        })
    }
}

pub(crate) fn gateway_usages(params: &mut CertificateParams) {
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
}
