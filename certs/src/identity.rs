//! The gateway identity carried in a certificate's URI SANs.

use std::fmt;

use crate::CertError;

const ENV_PREFIX: &str = "x-aisix://env/";
const DP_PREFIX: &str = "x-aisix://dp/";

/// Which environment and data plane a gateway certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GatewayIdentity {
    pub env_id: String,
    pub dp_id: String,
}

impl GatewayIdentity {
    /// Ids are 1-128 characters of `A-Z a-z 0-9 - _ .`, so they embed safely in URIs,
    /// key prefixes and file names.
    pub fn new(env_id: &str, dp_id: &str) -> Result<Self, CertError> {
        for (name, id) in [("env_id", env_id), ("dp_id", dp_id)] {
            let ok = (1..=128).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !ok {
                return Err(CertError::Identity(format!(
                    "{name} '{id}' must be 1-128 characters of letters, digits, '-', '_' or '.'"
                )));
            }
        }
        Ok(Self {
            env_id: env_id.to_owned(),
            dp_id: dp_id.to_owned(),
        })
    }

    pub fn uris(&self) -> [String; 2] {
        [
            format!("{ENV_PREFIX}{}", self.env_id),
            format!("{DP_PREFIX}{}", self.dp_id),
        ]
    }

    /// Finds the identity among a certificate's URI SANs; both URIs must be present.
    pub fn from_uris<'a>(uris: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let (mut env, mut dp) = (None, None);
        for uri in uris {
            if let Some(id) = uri.strip_prefix(ENV_PREFIX) {
                env = Some(id);
            } else if let Some(id) = uri.strip_prefix(DP_PREFIX) {
                dp = Some(id);
            }
        }
        Self::new(env?, dp?).ok()
    }
}

impl fmt::Display for GatewayIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "env {} / dp {}", self.env_id, self.dp_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_validation() {
        let id = GatewayIdentity::new("prod-1", "dp.7").unwrap();
        let uris = id.uris();
        assert_eq!(uris, ["x-aisix://env/prod-1", "x-aisix://dp/dp.7"]);
        assert_eq!(
            GatewayIdentity::from_uris(uris.iter().map(String::as_str)),
            Some(id)
        );
        assert_eq!(GatewayIdentity::from_uris(["x-aisix://env/a"]), None);
        assert!(GatewayIdentity::new("a/b", "x").is_err());
        assert!(GatewayIdentity::new("", "x").is_err());
    }
}
