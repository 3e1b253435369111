//! The validated domain types: what the rest of the proxy reads. They are built only
//! by the conversions in `validate.rs`, which check every field.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use wildmatch::WildMatch;

use crate::secret::Secret;

/// One problem found in a resource document, with the path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// Every problem found in one resource document.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Problems(pub Vec<FieldError>);

impl Problems {
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub(super) fn into_result<T>(self, value: T) -> Result<T, Problems> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", e.path, e.message)?;
        }
        Ok(())
    }
}

/// The wire protocol a provider key speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adapter {
    OpenAi,
    Anthropic,
    /// Azure OpenAI: deployments, `api-version`, `api-key` or Entra ID tokens.
    AzureOpenAi,
    /// Google's Gemini API (`generateContent`, `x-goog-api-key`).
    Gemini,
    /// Vertex AI: Gemini models of a Google Cloud project, OAuth2 bearer tokens.
    Vertex,
    /// AWS Bedrock's Converse API, requests signed with Signature V4.
    Bedrock,
    /// A protocol family this build does not implement: requests answer 501.
    Other(String),
}

impl Adapter {
    pub fn name(&self) -> &str {
        match self {
            Adapter::OpenAi => "openai",
            Adapter::Anthropic => "anthropic",
            Adapter::AzureOpenAi => "azure-openai",
            Adapter::Gemini => "gemini",
            Adapter::Vertex => "vertex",
            Adapter::Bedrock => "bedrock",
            Adapter::Other(name) => name,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProviderKey {
    pub id: Arc<str>,
    pub display_name: String,
    pub provider: String,
    pub adapter: Adapter,
    /// Base URL without a trailing slash or `/v1`; routes append `/v1/...`.
    pub api_base: String,
    pub credential: Secret,
    /// Azure OpenAI: the `api-version` sent (the adapter's default when unset).
    pub api_version: Option<String>,
    /// Azure OpenAI: Entra ID client credentials, when the credential is their JSON
    /// rather than a key.
    pub entra: Option<EntraCredential>,
    /// Vertex AI: the project and region, and how tokens are had.
    pub vertex: Option<VertexProject>,
    /// Bedrock: the AWS credentials requests are signed with, and their region.
    pub aws: Option<AwsCredential>,
    /// Neither `provider` nor `adapter` set (AISIX's generic keys): each model's own
    /// `provider` chooses the protocol, and without `api_base` its public endpoint
    /// (see [`ProviderKey::for_provider`]).
    pub generic: bool,
    pub unknown_fields: usize,
}

/// AWS credentials for Signature V4: an access key (and session token, for temporary
/// credentials) and the region requests are signed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsCredential {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    pub region: String,
}

/// A Vertex AI key's project, region and authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VertexProject {
    pub project: String,
    pub region: String,
    pub auth: GoogleAuth,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GoogleAuth {
    /// An OAuth2 access token, sent as it is.
    AccessToken(Secret),
    /// A service account: a signed JWT is exchanged at `token_uri` for tokens.
    ServiceAccount(ServiceAccount),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    pub client_email: String,
    /// The RSA private key, PKCS#8 PEM (checked when the key loads).
    pub private_key: Secret,
    pub private_key_id: Option<String>,
    pub token_uri: String,
}

/// Entra ID client credentials: a token is minted at
/// `{authority_host}/{tenant_id}/oauth2/v2.0/token` and sent as a bearer token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntraCredential {
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// `https://login.microsoftonline.com` unless the credential names another.
    pub authority_host: String,
}

#[derive(Debug)]
pub struct Model {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub target: ModelTarget,
    /// Non-streaming end-to-end limit; for streams, the limit until response headers.
    pub timeout: Option<Duration>,
    /// Longest allowed gap between two stream chunks.
    pub stream_timeout: Option<Duration>,
    /// More attempts after a retryable failure; unset: the gateway's default
    /// (`upstream.retries`).
    pub retries: Option<u32>,
    pub allowed_cidrs: Vec<IpNet>,
    pub rate_limit: RateLimit,
    pub cost: Option<Cost>,
    pub cooldown: Cooldown,
    /// Automatic prompt-cache breakpoints for Anthropic-family targets, when on.
    pub prompt_cache: Option<PromptCache>,
    pub unknown_fields: usize,
}

/// `prompt_cache: {auto: true, ttl}`: the breakpoints' lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptCache {
    FiveMinutes,
    OneHour,
}

#[derive(Debug)]
pub enum ModelTarget {
    Direct(DirectTarget),
    Routing(Routing),
}

#[derive(Debug)]
pub struct DirectTarget {
    pub provider: Option<String>,
    pub model_name: String,
    pub provider_key_id: String,
}

#[derive(Debug)]
pub struct Routing {
    pub targets: Vec<Target>,
    pub strategy: Strategy,
    /// More attempts per target after a retryable failure; unset: the gateway's default.
    pub retries: Option<u32>,
    pub max_fallbacks: Option<u32>,
    pub retry_on_429: bool,
    pub fallback_on_statuses: Vec<u16>,
    pub when_all_unavailable: WhenAllUnavailable,
    /// A chat stream that breaks after its first byte continues on the next target.
    pub resume_streams: bool,
}

#[derive(Debug)]
pub struct Target {
    pub model: String,
    pub weight: u32,
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Failover,
    RoundRobin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenAllUnavailable {
    Fail,
    TryAnyway,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub rps: Option<u64>,
    pub rpm: Option<u64>,
    pub rph: Option<u64>,
    pub rpd: Option<u64>,
    pub tpm: Option<u64>,
    pub tpd: Option<u64>,
    pub concurrency: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub input_per_1k: f64,
    pub output_per_1k: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cooldown {
    pub enabled: bool,
    pub default: Duration,
    pub max: Duration,
    pub honor_retry_after: bool,
}

impl Default for Cooldown {
    fn default() -> Self {
        Self {
            enabled: true,
            default: Duration::from_secs(30),
            max: Duration::from_secs(600),
            honor_retry_after: true,
        }
    }
}

/// SHA-256 of a caller's plaintext key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of_plaintext(plaintext: &str) -> Self {
        use sha2::{Digest, Sha256};
        Self(Sha256::digest(plaintext.as_bytes()).into())
    }
}

#[derive(Debug)]
pub struct ApiKey {
    pub id: Arc<str>,
    pub key_hash: KeyHash,
    pub allowed_models: Vec<ModelPattern>,
    pub disabled: bool,
    pub expires_at: Option<SystemTime>,
    pub rate_limit: RateLimit,
    pub display_name: Option<String>,
    pub team_id: Option<String>,
    pub user_id: Option<String>,
    pub unknown_fields: usize,
}

impl ApiKey {
    pub fn allows(&self, alias: &str) -> bool {
        self.allowed_models.iter().any(|p| p.matches(alias))
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
    }
}

/// An `allowed_models` entry: an exact alias, or a glob when it contains `*`.
#[derive(Debug)]
pub enum ModelPattern {
    Exact(String),
    Glob(WildMatch),
}

impl ModelPattern {
    pub(super) fn new(p: &str) -> Self {
        if p.contains('*') {
            Self::Glob(WildMatch::new(p))
        } else {
            Self::Exact(p.to_owned())
        }
    }

    pub fn matches(&self, alias: &str) -> bool {
        match self {
            Self::Exact(s) => s == alias,
            Self::Glob(g) => g.matches(alias),
        }
    }
}
