//! The conversions from wire specs to the validated domain types (`types.rs`). Each
//! conversion collects every problem it finds, each with its field path, instead of
//! stopping at the first.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use super::spec::{
    ApiKeySpec, CooldownSpec, CostSpec, ModelSpec, PromptCacheSpec, ProviderKeySpec, RateLimitSpec,
    RoutingSpec,
};
use super::types::{
    Adapter, ApiKey, AwsCredential, Cooldown, Cost, DirectTarget, EntraCredential, GoogleAuth,
    KeyHash, Model, ModelPattern, ModelTarget, Problems, PromptCache, ProviderKey, RateLimit,
    Routing, ServiceAccount, Strategy, Target, VertexProject, WhenAllUnavailable,
};
use crate::secret::Secret;

/// Vendors whose keys need no `api_base`: their public endpoint, without the `/v1`
/// the routes add, and their protocol family. `vllm` and `ollama` default to their
/// servers' local ports.
pub const BUILT_IN_BASES: &[(&str, &str, Adapter)] = &[
    ("openai", "https://api.openai.com", Adapter::OpenAi),
    ("anthropic", "https://api.anthropic.com", Adapter::Anthropic),
    (
        "gemini",
        "https://generativelanguage.googleapis.com",
        Adapter::Gemini,
    ),
    ("deepseek", "https://api.deepseek.com", Adapter::OpenAi),
    ("groq", "https://api.groq.com/openai", Adapter::OpenAi),
    ("mistral", "https://api.mistral.ai", Adapter::OpenAi),
    ("together", "https://api.together.xyz", Adapter::OpenAi),
    (
        "fireworks",
        "https://api.fireworks.ai/inference",
        Adapter::OpenAi,
    ),
    ("openrouter", "https://openrouter.ai/api", Adapter::OpenAi),
    ("xai", "https://api.x.ai", Adapter::OpenAi),
    ("cerebras", "https://api.cerebras.ai", Adapter::OpenAi),
    ("moonshot", "https://api.moonshot.ai", Adapter::OpenAi),
    ("vllm", "http://127.0.0.1:8000", Adapter::OpenAi),
    ("ollama", "http://127.0.0.1:11434", Adapter::OpenAi),
];

impl ProviderKey {
    pub fn from_spec(id: &str, spec: ProviderKeySpec) -> Result<Self, Problems> {
        let mut p = Problems::default();
        let display_name = required_name(&mut p, "display_name", spec.display_name);
        let provider = spec.provider.unwrap_or_default();
        if has_control(&provider) {
            p.push(
                "provider",
                "must not contain control characters (line breaks, tabs...)",
            );
        }
        let built_in = BUILT_IN_BASES.iter().find(|(name, _, _)| *name == provider);
        let adapter = match spec.adapter.as_deref() {
            Some("openai") => Adapter::OpenAi,
            Some("anthropic") => Adapter::Anthropic,
            Some("azure" | "azure-openai") => Adapter::AzureOpenAi,
            Some("gemini") => Adapter::Gemini,
            Some("vertex") => Adapter::Vertex,
            Some("bedrock") => Adapter::Bedrock,
            Some("") => {
                p.push("adapter", "must not be empty");
                Adapter::OpenAi
            }
            Some(other) => Adapter::Other(other.to_owned()),
            None if matches!(provider.as_str(), "azure" | "azure-openai") => Adapter::AzureOpenAi,
            None if provider == "vertex" => Adapter::Vertex,
            None if provider == "bedrock" => Adapter::Bedrock,
            None => built_in.map_or(Adapter::OpenAi, |(_, _, a)| a.clone()),
        };
        // Neither: a generic key, whose models name their provider.
        let generic = provider.is_empty() && spec.adapter.is_none();
        // The credential's problems are reported after the base's, in field order,
        // though a Vertex key's base follows from its credential.
        let mut later = Problems::default();
        let json_ok = matches!(
            adapter,
            Adapter::AzureOpenAi | Adapter::Vertex | Adapter::Bedrock
        );
        let credential = credential(&mut later, spec.api_key, spec.secret, json_ok);
        let entra = (adapter == Adapter::AzureOpenAi)
            .then(|| entra_credential(&mut later, &credential))
            .flatten();
        let vertex = (adapter == Adapter::Vertex)
            .then(|| vertex_project(&mut later, &credential))
            .flatten();
        let aws = (adapter == Adapter::Bedrock)
            .then(|| aws_credential(&mut later, &credential))
            .flatten();
        let api_base = match (spec.api_base, built_in, &vertex, &aws) {
            (Some(base), _, _, _) => normalize_api_base(&mut p, &base),
            (None, Some((_, base, _)), _, _) => (*base).to_owned(),
            (None, None, Some(v), _) if v.region == "global" => {
                "https://aiplatform.googleapis.com".to_owned()
            }
            (None, None, Some(v), _) => format!("https://{}-aiplatform.googleapis.com", v.region),
            (None, None, None, Some(aws)) => {
                format!("https://bedrock-runtime.{}.amazonaws.com", aws.region)
            }
            // A Vertex or Bedrock key's base follows from its credential, whose problem
            // is said; a generic key's from each model's provider.
            (None, None, None, None)
                if generic || matches!(adapter, Adapter::Vertex | Adapter::Bedrock) =>
            {
                String::new()
            }
            (None, None, None, None) => {
                p.push(
                    "api_base",
                    format!("required for provider '{provider}' (it is not built in)"),
                );
                String::new()
            }
        };
        p.0.extend(later.0);
        let api_version = spec.api_version.filter(|v| {
            let ok = !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                p.push("api_version", "must be an API version such as 2024-10-21");
            }
            ok
        });
        let key = ProviderKey {
            id: id.into(),
            display_name,
            provider: if provider.is_empty() {
                spec.adapter.unwrap_or_default()
            } else {
                provider
            },
            adapter,
            api_base,
            credential,
            api_version,
            entra,
            vertex,
            aws,
            generic,
            unknown_fields: spec.unknown.len(),
        };
        p.into_result(key)
    }
}

impl ProviderKey {
    /// This generic key as a key of `provider` (a model's): its protocol, and without
    /// an `api_base` of its own the vendor's public endpoint. `None` when `provider`
    /// has no public endpoint to default to.
    pub fn for_provider(&self, provider: &str) -> Option<ProviderKey> {
        let built_in = BUILT_IN_BASES.iter().find(|(name, _, _)| *name == provider);
        let adapter = match provider {
            "azure" | "azure-openai" => Adapter::AzureOpenAi,
            "vertex" => Adapter::Vertex,
            "bedrock" => Adapter::Bedrock,
            _ => built_in.map_or(Adapter::OpenAi, |(_, _, a)| a.clone()),
        };
        let api_base = match (self.api_base.is_empty(), built_in) {
            (false, _) => self.api_base.clone(),
            (true, Some((_, base, _))) => (*base).to_owned(),
            (true, None) => return None,
        };
        Some(ProviderKey {
            provider: provider.to_owned(),
            adapter,
            api_base,
            generic: false,
            ..self.clone()
        })
    }
}

/// The credential of `api_key` or `secret` (exactly one, non-empty, header-safe).
fn credential(
    p: &mut Problems,
    api_key: Option<Secret>,
    secret: Option<Secret>,
    json_ok: bool,
) -> Secret {
    match (api_key, secret) {
        // JSON credentials (client credentials, service accounts) never go into a
        // header as they are; they may span lines.
        (Some(k), None) | (None, Some(k))
            if json_ok && k.expose().trim_start().starts_with('{') =>
        {
            k
        }
        // The credential goes into a header: a line break would fail every request.
        (Some(k), None) | (None, Some(k)) if has_control(k.expose()) => {
            p.push(
                "api_key",
                "must not contain control characters (line breaks, tabs...)",
            );
            Secret::new("")
        }
        (Some(k), None) | (None, Some(k)) if !k.is_empty() => k,
        (Some(_), Some(_)) => {
            p.push("api_key", "set exactly one of api_key or secret, not both");
            Secret::new("")
        }
        (None, None) => {
            p.push("api_key", "required (api_key or secret)");
            Secret::new("")
        }
        _ => {
            p.push("api_key", "must not be empty");
            Secret::new("")
        }
    }
}

impl Model {
    pub fn from_spec(id: &str, spec: ModelSpec) -> Result<Self, Problems> {
        let mut p = Problems::default();
        let name = required_name(&mut p, "display_name", spec.display_name);
        let has_direct = spec.model_name.is_some() || spec.provider_key_id.is_some();
        let target = match (spec.routing, has_direct) {
            (Some(_), true) => {
                p.push(
                    "routing",
                    "a model is either direct (model_name, provider_key_id) or routing, not both",
                );
                None
            }
            (Some(r), false) => Some(ModelTarget::Routing(routing(&mut p, r))),
            (None, _) => Some(ModelTarget::Direct(DirectTarget {
                provider: spec.provider,
                model_name: required_name(&mut p, "model_name", spec.model_name),
                provider_key_id: required_name(&mut p, "provider_key_id", spec.provider_key_id),
            })),
        };
        let allowed_cidrs = spec
            .allowed_cidrs
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, c)| parse_cidr(&mut p, &format!("allowed_cidrs[{i}]"), c))
            .collect();
        let model = Model {
            id: id.into(),
            name: name.into(),
            target: target.unwrap_or(ModelTarget::Routing(Routing::empty())),
            timeout: millis(&mut p, "timeout", spec.timeout),
            stream_timeout: millis(&mut p, "stream_timeout", spec.stream_timeout),
            retries: spec.retries,
            allowed_cidrs,
            rate_limit: rate_limit(&mut p, "rate_limit", spec.rate_limit),
            cost: spec.cost.map(|c| cost(&mut p, c)),
            cooldown: spec
                .cooldown
                .map(|c| cooldown(&mut p, c))
                .unwrap_or_default(),
            prompt_cache: spec.prompt_cache.and_then(|c| prompt_cache(&mut p, c)),
            unknown_fields: spec.unknown.len(),
        };
        p.into_result(model)
    }

    /// Whether a client address may use this model (an empty list allows everyone).
    pub fn admits(&self, ip: IpAddr) -> bool {
        self.allowed_cidrs.is_empty() || self.allowed_cidrs.iter().any(|n| n.contains(&ip))
    }
}

impl Routing {
    fn empty() -> Self {
        Self {
            targets: Vec::new(),
            strategy: Strategy::Failover,
            retries: None,
            max_fallbacks: None,
            retry_on_429: false,
            fallback_on_statuses: Vec::new(),
            when_all_unavailable: WhenAllUnavailable::Fail,
            resume_streams: false,
        }
    }
}

impl ApiKey {
    pub fn from_spec(id: &str, spec: ApiKeySpec) -> Result<Self, Problems> {
        let mut p = Problems::default();
        for (path, value) in [
            ("display_name", &spec.display_name),
            ("team_id", &spec.team_id),
            ("user_id", &spec.user_id),
        ] {
            if value.as_deref().is_some_and(has_control) {
                p.push(
                    path,
                    "must not contain control characters (line breaks, tabs...)",
                );
            }
        }
        let key_hash = match spec.key_hash.as_deref().map(parse_key_hash) {
            Some(Ok(h)) => h,
            Some(Err(msg)) => {
                p.push("key_hash", msg);
                KeyHash([0; 32])
            }
            None => {
                p.push("key_hash", "required");
                KeyHash([0; 32])
            }
        };
        let allowed_models = match spec.allowed_models {
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    if m.trim().is_empty() {
                        p.push(format!("allowed_models[{i}]"), "must not be empty");
                        None
                    } else {
                        Some(ModelPattern::new(m))
                    }
                })
                .collect(),
            None => {
                p.push(
                    "allowed_models",
                    "required (an empty list denies every model)",
                );
                Vec::new()
            }
        };
        let expires_at = spec.expires_at.as_deref().and_then(|s| {
            use time::format_description::well_known::Rfc3339;
            match time::OffsetDateTime::parse(s, &Rfc3339) {
                Ok(t) => Some(SystemTime::from(t)),
                Err(e) => {
                    p.push("expires_at", format!("not an RFC 3339 timestamp: {e}"));
                    None
                }
            }
        });
        let key = ApiKey {
            id: id.into(),
            key_hash,
            allowed_models,
            disabled: spec.disabled,
            expires_at,
            rate_limit: rate_limit(&mut p, "rate_limit", spec.rate_limit),
            display_name: spec.display_name,
            team_id: spec.team_id,
            user_id: spec.user_id,
            unknown_fields: spec.unknown.len(),
        };
        p.into_result(key)
    }
}

fn parse_key_hash(s: &str) -> Result<KeyHash, &'static str> {
    let valid = s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let mut out = [0u8; 32];
    if !valid || hex::decode_to_slice(s, &mut out).is_err() {
        return Err("must be the lowercase hex SHA-256 of the caller key (64 characters)");
    }
    Ok(KeyHash(out))
}

/// Control characters (line breaks first) in a name would forge log lines and break
/// headers; none is a reasonable part of a name, a path or a credential.
fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

pub(super) fn required_name(p: &mut Problems, path: &str, v: Option<String>) -> String {
    match v {
        Some(s) if has_control(&s) => {
            p.push(
                path,
                "must not contain control characters (line breaks, tabs...)",
            );
            String::new()
        }
        Some(s) if !s.trim().is_empty() => s,
        Some(_) => {
            p.push(path, "must not be empty");
            String::new()
        }
        None => {
            p.push(path, "required");
            String::new()
        }
    }
}

/// An Azure key's credential as Entra ID client credentials, when it is their JSON
/// (`{tenant_id, client_id, client_secret, authority_host?}`); `None` for a plain key.
/// Problems name the field, never the value.
fn entra_credential(p: &mut Problems, credential: &Secret) -> Option<EntraCredential> {
    let text = credential.expose().trim_start();
    if !text.starts_with('{') {
        return None;
    }
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_str::<serde_json::Value>(text)
    else {
        p.push(
            "api_key",
            "looks like JSON client credentials but is not valid JSON",
        );
        return None;
    };
    let mut field = |name: &str| match fields.get(name).and_then(serde_json::Value::as_str) {
        Some(v) if !v.is_empty() && !has_control(v) => Some(v.to_owned()),
        _ => {
            p.push(format!("api_key.{name}"), "required (a non-empty string)");
            None
        }
    };
    let (tenant_id, client_id, client_secret) = (
        field("tenant_id"),
        field("client_id"),
        field("client_secret"),
    );
    let authority_host = match fields
        .get("authority_host")
        .and_then(serde_json::Value::as_str)
    {
        Some(host) => normalize_url(p, "api_key.authority_host", host),
        None => "https://login.microsoftonline.com".to_owned(),
    };
    Some(EntraCredential {
        tenant_id: tenant_id?,
        client_id: client_id?,
        client_secret: Secret::new(client_secret?),
        authority_host,
    })
}

/// A Vertex AI key's credential: JSON `{project, region, access_token}` or
/// `{project, region, service_account_json}` (the service account's JSON key, as an
/// object or as its text). Problems name the field, never the value.
fn vertex_project(p: &mut Problems, credential: &Secret) -> Option<VertexProject> {
    let Ok(serde_json::Value::Object(fields)) =
        serde_json::from_str::<serde_json::Value>(credential.expose())
    else {
        p.push(
            "api_key",
            "a Vertex AI credential is JSON: {project, region, access_token} or {project, region, service_account_json}",
        );
        return None;
    };
    let text = |p: &mut Problems,
                fields: &serde_json::Map<String, serde_json::Value>,
                path: &str,
                name: &str| {
        match fields.get(name).and_then(serde_json::Value::as_str) {
            Some(v) if !v.is_empty() && (name == "private_key" || !has_control(v)) => {
                Some(v.to_owned())
            }
            _ => {
                p.push(format!("{path}{name}"), "required (a non-empty string)");
                None
            }
        }
    };
    let project = text(p, &fields, "api_key.", "project");
    let region = text(p, &fields, "api_key.", "region");
    if let Some(r) = &region
        && !r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        p.push(
            "api_key.region",
            "must be a region name such as us-central1 or global",
        );
    }
    let auth = match (
        fields.get("access_token"),
        fields.get("service_account_json"),
    ) {
        (Some(_), None) => text(p, &fields, "api_key.", "access_token")
            .map(|t| GoogleAuth::AccessToken(Secret::new(t))),
        (None, Some(account)) => service_account(p, account).map(GoogleAuth::ServiceAccount),
        _ => {
            p.push(
                "api_key",
                "set exactly one of access_token or service_account_json",
            );
            None
        }
    };
    Some(VertexProject {
        project: project?,
        region: region?,
        auth: auth?,
    })
}

/// A Bedrock key's credential: JSON `{access_key_id, secret_access_key, region,
/// session_token?}`. Problems name the field, never the value.
fn aws_credential(p: &mut Problems, credential: &Secret) -> Option<AwsCredential> {
    let Ok(serde_json::Value::Object(fields)) =
        serde_json::from_str::<serde_json::Value>(credential.expose())
    else {
        p.push(
            "api_key",
            "a Bedrock credential is JSON: {access_key_id, secret_access_key, region, session_token?}",
        );
        return None;
    };
    let mut field = |name: &str, required: bool| match fields.get(name) {
        None | Some(serde_json::Value::Null) if !required => None,
        Some(serde_json::Value::String(v)) if !v.is_empty() && !has_control(v) => {
            Some(v.to_owned())
        }
        _ => {
            p.push(format!("api_key.{name}"), "required (a non-empty string)");
            None
        }
    };
    let access_key_id = field("access_key_id", true);
    let secret_access_key = field("secret_access_key", true);
    let region = field("region", true);
    let session_token = field("session_token", false);
    if let Some(r) = &region
        && !r
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        p.push("api_key.region", "must be an AWS region such as us-east-1");
        return None;
    }
    Some(AwsCredential {
        access_key_id: access_key_id?,
        secret_access_key: Secret::new(secret_access_key?),
        session_token: session_token.map(Secret::new),
        region: region?,
    })
}

fn service_account(p: &mut Problems, account: &serde_json::Value) -> Option<ServiceAccount> {
    const PATH: &str = "api_key.service_account_json.";
    let parsed;
    let account = match account {
        serde_json::Value::String(text) => {
            parsed = serde_json::from_str::<serde_json::Value>(text).ok();
            parsed.as_ref()
        }
        other => Some(other),
    };
    let Some(serde_json::Value::Object(fields)) = account else {
        p.push(
            "api_key.service_account_json",
            "must be a service account's JSON key",
        );
        return None;
    };
    let mut text = |name: &str| match fields.get(name).and_then(serde_json::Value::as_str) {
        Some(v) if !v.is_empty() => Some(v.to_owned()),
        _ => {
            p.push(format!("{PATH}{name}"), "required (a non-empty string)");
            None
        }
    };
    let client_email = text("client_email");
    let private_key = text("private_key").map(Secret::new);
    if let Some(key) = &private_key
        && !crate::providers::gemini::is_rsa_pkcs8(key.expose())
    {
        p.push(
            format!("{PATH}private_key"),
            "is not an RSA private key in PKCS#8 PEM (-----BEGIN PRIVATE KEY-----)",
        );
    }
    let token_uri = match fields.get("token_uri").and_then(serde_json::Value::as_str) {
        Some(uri) => normalize_url(p, &format!("{PATH}token_uri"), uri),
        None => "https://oauth2.googleapis.com/token".to_owned(),
    };
    Some(ServiceAccount {
        client_email: client_email?,
        private_key: private_key?,
        private_key_id: fields
            .get("private_key_id")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned),
        token_uri,
    })
}

fn normalize_url(p: &mut Problems, path: &str, raw: &str) -> String {
    let base = raw.trim().trim_end_matches('/');
    match base.parse::<http::Uri>() {
        Ok(uri)
            if matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some() => {}
        _ => p.push(path, format!("'{raw}' is not an http(s) URL with a host")),
    }
    base.to_owned()
}

fn normalize_api_base(p: &mut Problems, raw: &str) -> String {
    let trimmed = raw.trim().trim_end_matches('/');
    let base = trimmed
        .strip_suffix("/v1")
        .or_else(|| trimmed.strip_suffix("/v1beta"))
        .unwrap_or(trimmed);
    match base.parse::<http::Uri>() {
        Ok(uri)
            if matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.authority().is_some()
                && uri.query().is_none() => {}
        _ => p.push(
            "api_base",
            format!("'{raw}' is not an http(s) URL with a host"),
        ),
    }
    base.to_owned()
}

fn parse_cidr(p: &mut Problems, path: &str, s: &str) -> Option<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net.trunc());
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(IpNet::from(ip));
    }
    p.push(path, format!("'{s}' is not a CIDR block or IP address"));
    None
}

fn millis(p: &mut Problems, path: &str, v: Option<u64>) -> Option<Duration> {
    match v {
        Some(0) => {
            p.push(path, "must be at least 1 (milliseconds)");
            None
        }
        other => other.map(Duration::from_millis),
    }
}

fn rate_limit(p: &mut Problems, path: &str, spec: Option<RateLimitSpec>) -> RateLimit {
    let spec = spec.unwrap_or_default();
    let mut check = |field: &str, v: Option<u64>| {
        if v == Some(0) {
            p.push(
                format!("{path}.{field}"),
                "must be at least 1 (omit it for no limit)",
            );
        }
        v
    };
    RateLimit {
        rps: check("rps", spec.rps),
        rpm: check("rpm", spec.rpm),
        rph: check("rph", spec.rph),
        rpd: check("rpd", spec.rpd),
        tpm: check("tpm", spec.tpm),
        tpd: check("tpd", spec.tpd),
        concurrency: check("concurrency", spec.concurrency),
    }
}

fn cost(p: &mut Problems, spec: CostSpec) -> Cost {
    let mut check = |field: &str, v: Option<f64>| match v {
        Some(x) if x.is_finite() && x >= 0.0 => x,
        Some(_) => {
            p.push(format!("cost.{field}"), "must be a non-negative number");
            0.0
        }
        None => 0.0,
    };
    Cost {
        input_per_1k: check("input_per_1k", spec.input_per_1k),
        output_per_1k: check("output_per_1k", spec.output_per_1k),
    }
}

/// `None` unless `auto` is true.
fn prompt_cache(p: &mut Problems, spec: PromptCacheSpec) -> Option<PromptCache> {
    let ttl = match spec.ttl.as_deref() {
        None | Some("5m") => PromptCache::FiveMinutes,
        Some("1h") => PromptCache::OneHour,
        Some(other) => {
            p.push(
                "prompt_cache.ttl",
                format!("unknown value '{other}' (expected 5m or 1h)"),
            );
            PromptCache::FiveMinutes
        }
    };
    (spec.auto == Some(true)).then_some(ttl)
}

fn cooldown(p: &mut Problems, spec: CooldownSpec) -> Cooldown {
    let d = Cooldown::default();
    let c = Cooldown {
        enabled: spec.enabled.unwrap_or(d.enabled),
        default: spec.default_seconds.map_or(d.default, Duration::from_secs),
        max: spec.max_seconds.map_or(d.max, Duration::from_secs),
        honor_retry_after: spec.honor_retry_after.unwrap_or(d.honor_retry_after),
    };
    if c.default > c.max {
        p.push(
            "cooldown.default_seconds",
            "must not be greater than cooldown.max_seconds",
        );
    }
    c
}

fn routing(p: &mut Problems, spec: RoutingSpec) -> Routing {
    if spec.targets.is_empty() {
        p.push("routing.targets", "must list at least one target");
    }
    let targets = spec
        .targets
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let path = format!("routing.targets[{i}]");
            if t.weight == Some(0) {
                p.push(format!("{path}.weight"), "must be at least 1");
            }
            Target {
                model: required_name(p, &format!("{path}.model"), t.model),
                weight: t.weight.unwrap_or(1),
                priority: t.priority.unwrap_or(0),
            }
        })
        .collect();
    let strategy = match spec.strategy.as_deref() {
        None | Some("failover") => Strategy::Failover,
        Some("round_robin") => Strategy::RoundRobin,
        Some(other) => {
            p.push(
                "routing.strategy",
                format!("unknown strategy '{other}' (expected failover or round_robin)"),
            );
            Strategy::Failover
        }
    };
    let when_all_unavailable = match spec.when_all_unavailable.as_deref() {
        None | Some("fail") => WhenAllUnavailable::Fail,
        Some("try_anyway") => WhenAllUnavailable::TryAnyway,
        Some(other) => {
            p.push(
                "routing.when_all_unavailable",
                format!("unknown value '{other}' (expected fail or try_anyway)"),
            );
            WhenAllUnavailable::Fail
        }
    };
    let statuses = spec.fallback_on_statuses.unwrap_or_default();
    for (i, s) in statuses.iter().enumerate() {
        if !(400..=599).contains(s) {
            p.push(
                format!("routing.fallback_on_statuses[{i}]"),
                "must be an HTTP error status (400-599)",
            );
        }
    }
    Routing {
        targets,
        strategy,
        retries: spec.retries,
        max_fallbacks: spec.max_fallbacks,
        retry_on_429: spec.retry_on_429.unwrap_or(false),
        fallback_on_statuses: statuses,
        when_all_unavailable,
        resume_streams: spec.resume_streams.unwrap_or(false),
    }
}
