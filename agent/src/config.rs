//! The agent's configuration file (YAML, `--config PATH`), with environment overrides.
//!
//! Unknown keys are errors that name their path. Sections of the AISIX config that this
//! build does not implement yet are accepted and reported once as ignored, so existing
//! config files keep working. `AISIX_<SECTION>__<FIELD>` environment variables override
//! file values (double underscore between levels; values are read as YAML scalars).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use proxy_core::secret::Secret;
use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

/// Why a configuration could not be loaded. Each message names the file, variable or
/// field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML: {source}")]
    Syntax {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error("config file {path}: {field}: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

/// Sections that exist in the AISIX gateway config but that this build does not use.
const IGNORED_SECTIONS: &[&str] = &["ratelimit", "upstream", "downstream", "deployment"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// File mode: a YAML document with `provider_keys`, `models` and `api_keys` lists.
    pub resources_file: Option<PathBuf>,
    /// Self-hosted mode: resources are watched in etcd.
    pub etcd: Option<EtcdSection>,
    /// Self-hosted mode's admin listener.
    pub admin: Option<AdminSection>,
    /// Managed mode: configuration, budgets and usage through the control plane.
    pub managed: Option<ManagedSection>,
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub observability: ObservabilitySection,
    #[serde(default)]
    pub shutdown: ShutdownSection,
    /// The response cache of non-streaming chat completions.
    #[serde(default)]
    pub cache: CacheSection,
    // Accepted and reported as ignored (see IGNORED_SECTIONS).
    #[serde(default)]
    ratelimit: Option<Value>,
    #[serde(default)]
    upstream: Option<Value>,
    #[serde(default)]
    downstream: Option<Value>,
    #[serde(default)]
    deployment: Option<Value>,
    #[serde(skip)]
    pub ignored: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    /// `http://` or `https://` URLs; requests fail over between them in order.
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Connect timeout for each endpoint.
    #[serde(default = "default_etcd_timeout")]
    pub dial_timeout_ms: u64,
    /// Timeout of each request other than the long-lived watch.
    #[serde(default = "default_etcd_timeout")]
    pub request_timeout_ms: u64,
    /// etcd authentication (both or neither).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// TLS to etcd: a CA to trust and optionally a client certificate.
    pub tls: Option<EtcdTlsSection>,
    /// Where the last good snapshot is kept (a sled database), so the agent starts and
    /// serves while etcd is unreachable. Without it, start-up waits for etcd.
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsSection {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// The `managed` section: how to reach the control plane and where to keep state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedSection {
    /// Managed mode is on only when this is true.
    #[serde(default)]
    pub enabled: bool,
    /// `https://host:port` of the control plane's data-plane listener.
    #[serde(default)]
    pub cp_base_url: String,
    /// The certificate bundle: each item inline (`*_pem`) or as a file (`*_file`),
    /// never both. May be omitted when `state_dir/mtls` already holds a bundle (from
    /// an earlier start or `aisix-agent enroll`).
    pub cp_cert_pem: Option<Secret>,
    pub cp_cert_file: Option<PathBuf>,
    pub cp_key_pem: Option<Secret>,
    pub cp_key_file: Option<PathBuf>,
    pub cp_ca_pem: Option<Secret>,
    pub cp_ca_file: Option<PathBuf>,
    /// An extra CA to trust for the control plane's server certificate.
    pub cp_extra_ca_file: Option<PathBuf>,
    /// Holds `mtls/` (the bundle in use) and the snapshot cache.
    #[serde(default)]
    pub state_dir: PathBuf,
    #[serde(default = "default_heartbeat_interval")]
    pub heartbeat_interval_secs: u64,
    /// TCP + TLS connect timeout of every control-plane call.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Timeout of every control-plane call but the long-lived watch.
    #[serde(default = "default_cp_request_timeout")]
    pub request_timeout_ms: u64,
    #[serde(default)]
    pub budget: BudgetSection,
    #[serde(default)]
    pub usage: UsageSection,
}

/// `cache`: the in-memory response cache (off unless enabled).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    pub enabled: bool,
    pub ttl_secs: u64,
    pub max_entries: usize,
    /// Answers larger than this are not kept.
    pub max_entry_bytes: usize,
}

impl Default for CacheSection {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl_secs: 300,
            max_entries: 10_000,
            max_entry_bytes: 1 << 20,
        }
    }
}

impl CacheSection {
    /// The proxy's cache options when the cache is on.
    pub fn options(&self) -> Option<proxy_core::pipeline::cache::CacheOptions> {
        if !self.enabled {
            return None;
        }
        Some(proxy_core::pipeline::cache::CacheOptions {
            ttl: std::time::Duration::from_secs(self.ttl_secs),
            max_entries: std::num::NonZeroUsize::new(self.max_entries)?,
            max_entry_bytes: self.max_entry_bytes,
        })
    }
}

/// `managed.budget`: how budget decisions are asked for and what happens without one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetSection {
    /// What a key that was never checked gets while the control plane cannot answer.
    pub default_fail_mode: DefaultFailMode,
    /// How long a request waits for a budget decision.
    pub timeout_ms: u64,
    /// How long past its TTL a cached decision is still used while the control plane
    /// fails; after it the decision's fail mode applies.
    pub stale_window_secs: u64,
}

impl Default for BudgetSection {
    fn default() -> Self {
        Self {
            default_fail_mode: DefaultFailMode::Open,
            timeout_ms: 1000,
            stale_window_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultFailMode {
    Open,
    Closed,
}

/// `managed.usage`: the durable usage queue and its sender.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageSection {
    /// Events kept while the control plane is unreachable; past it the oldest are
    /// dropped (and counted).
    pub queue_max_events: u64,
    /// Events per `POST /dp/telemetry`.
    pub batch_size: usize,
    /// How often queued events are sent.
    pub flush_interval_ms: u64,
}

impl Default for UsageSection {
    fn default() -> Self {
        Self {
            queue_max_events: 100_000,
            batch_size: 200,
            flush_interval_ms: 1000,
        }
    }
}

fn default_heartbeat_interval() -> u64 {
    15
}

fn default_connect_timeout() -> u64 {
    5000
}

fn default_cp_request_timeout() -> u64 {
    10_000
}

fn default_prefix() -> String {
    "/aisix".to_owned()
}

fn default_etcd_timeout() -> u64 {
    5000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    #[serde(default = "default_admin_addr")]
    pub addr: SocketAddr,
    /// Accepted as `Authorization: Bearer <key>` or `x-api-key: <key>`.
    pub admin_keys: Vec<Secret>,
    /// Serve the admin API over HTTPS.
    pub tls: Option<ListenerTlsSection>,
}

/// `proxy.tls` / `admin.tls`: the listener serves HTTPS with this certificate (chain,
/// leaf first) and key, both PEM files; the key file must be private (0600).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsSection {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3001))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    pub addr: SocketAddr,
    /// 0 means unlimited.
    pub request_body_limit_bytes: u64,
    pub request_id: RequestIdSection,
    /// Reverse proxies (CIDRs) whose `client_ip_header` is believed; from any other
    /// peer the header is ignored and the peer address is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The header trusted proxies put the client address in (a comma-separated list,
    /// nearest proxy last, like `x-forwarded-for`).
    pub client_ip_header: String,
    /// Serve the proxy over HTTPS.
    pub tls: Option<ListenerTlsSection>,
    /// Open connections at most; past it new connections wait in the listen backlog.
    pub max_connections: usize,
    /// Time allowed for a TLS handshake and for each request's headers; idle
    /// keep-alive connections are closed after it.
    pub header_read_timeout_ms: u64,
    /// Largest request head (request line and headers); larger ones get 431.
    pub max_header_bytes: usize,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 3000)),
            request_body_limit_bytes: 0,
            request_id: RequestIdSection::default(),
            trusted_proxies: Vec::new(),
            client_ip_header: "x-forwarded-for".to_owned(),
            tls: None,
            max_connections: 10_000,
            header_read_timeout_ms: 30_000,
            max_header_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestIdSection {
    /// Generic request-id headers (e.g. `x-request-id`) whose value may be adopted.
    pub accept_headers: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObservabilitySection {
    /// A tracing filter (`info`, `debug`, `aisix::access=off,info`); `RUST_LOG` wins.
    pub log_level: String,
    pub log_format: LogFormat,
    pub access_log: bool,
    pub metrics: MetricsSection,
}

impl Default for ObservabilitySection {
    fn default() -> Self {
        Self {
            log_level: "info".to_owned(),
            log_format: LogFormat::Text,
            access_log: true,
            metrics: MetricsSection::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    pub prometheus: PrometheusSection,
}

/// `observability.metrics.prometheus`: the metrics and status listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusSection {
    pub enabled: bool,
    /// Where the metrics are served; `/status/config` and `/status/ready` are on the
    /// same listener.
    pub path: String,
    pub addr: SocketAddr,
}

impl Default for PrometheusSection {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/metrics".to_owned(),
            addr: SocketAddr::from(([0, 0, 0, 0], 9090)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSection {
    /// After SIGTERM, keep serving (with liveness failing) this long so load balancers
    /// notice, before closing the listener.
    pub min_drain_secs: u64,
    /// Then wait at most this long for in-flight requests and streams to finish.
    pub drain_timeout_secs: u64,
}

impl Default for ShutdownSection {
    fn default() -> Self {
        Self {
            min_drain_secs: 5,
            drain_timeout_secs: 30,
        }
    }
}

impl Config {
    /// Reads `path`, applies `AISIX_*__*` overrides from `env`, and validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text, env)
    }

    pub fn parse(
        path: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut value: Value =
            serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Syntax {
                path: path.to_owned(),
                source,
            })?;
        if value.is_null() {
            value = Value::Mapping(Mapping::new());
        }
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("AISIX_") && k.contains("__"))
            .collect();
        overrides.sort();
        for (var, raw) in overrides {
            apply_override(&mut value, &var, &raw)?;
        }
        let field_error = |field: String, message: String| ConfigError::Field {
            path: path.to_owned(),
            field,
            message,
        };
        let mut config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let (field, message) = (e.path().to_string(), e.into_inner().to_string());
            field_error(parent_of_unknown(field, &message), message)
        })?;
        config
            .validate()
            .map_err(|(f, m)| field_error(f.to_owned(), m))?;
        config.ignored = config.ignored_sections();
        Ok(config)
    }

    /// The managed section when managed mode is enabled.
    pub fn managed(&self) -> Option<&ManagedSection> {
        self.managed.as_ref().filter(|m| m.enabled)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        self.validate_source()?;
        self.validate_proxy()?;
        self.validate_observability()
    }

    /// Exactly one configuration source, and its section.
    fn validate_source(&self) -> Result<(), (&'static str, String)> {
        let sources = [
            self.resources_file.is_some(),
            self.etcd.is_some(),
            self.managed().is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => {
                return Err((
                    "(top level)",
                    "a configuration source is required: set managed (with enabled: true), etcd (self-hosted) or resources_file"
                        .to_owned(),
                ));
            }
            1 => {}
            _ => {
                return Err((
                    "(top level)",
                    "choose one configuration source: managed, etcd or resources_file".to_owned(),
                ));
            }
        }
        if let Some(etcd) = &self.etcd {
            etcd.validate()?;
        }
        if let Some(managed) = self.managed() {
            managed.validate()?;
        }
        if let Some(admin) = &self.admin {
            if admin.admin_keys.is_empty() || admin.admin_keys.iter().any(|k| k.expose().is_empty())
            {
                return Err((
                    "admin.admin_keys",
                    "at least one non-empty admin key is required".to_owned(),
                ));
            }
        }
        Ok(())
    }

    /// The proxy listener's limits and header names, and the response cache.
    fn validate_proxy(&self) -> Result<(), (&'static str, String)> {
        if self.cache.enabled {
            for (field, value) in [
                ("cache.ttl_secs", self.cache.ttl_secs),
                ("cache.max_entries", self.cache.max_entries as u64),
            ] {
                if value == 0 {
                    return Err((field, "must be greater than 0".to_owned()));
                }
            }
        }
        for (field, value, least) in [
            (
                "proxy.max_connections",
                self.proxy.max_connections as u64,
                1,
            ),
            (
                "proxy.header_read_timeout_ms",
                self.proxy.header_read_timeout_ms,
                1,
            ),
            (
                "proxy.max_header_bytes",
                self.proxy.max_header_bytes as u64,
                1024,
            ),
        ] {
            if value < least {
                return Err((field, format!("must be at least {least}")));
            }
        }
        if http_header_name(&self.proxy.client_ip_header).is_none() {
            return Err((
                "proxy.client_ip_header",
                format!(
                    "'{}' is not a valid header name",
                    self.proxy.client_ip_header
                ),
            ));
        }
        for h in &self.proxy.request_id.accept_headers {
            if http_header_name(h).is_none() {
                return Err((
                    "proxy.request_id.accept_headers",
                    format!("'{h}' is not a valid header name"),
                ));
            }
        }
        Ok(())
    }

    fn validate_observability(&self) -> Result<(), (&'static str, String)> {
        let metrics_path = &self.observability.metrics.prometheus.path;
        if !metrics_path.starts_with('/') || metrics_path.starts_with("/status/") {
            return Err((
                "observability.metrics.prometheus.path",
                format!(
                    "'{metrics_path}' must start with '/' and not be under /status/ (the status endpoints live there)"
                ),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.observability.log_level).map_err(|e| {
            (
                "observability.log_level",
                format!(
                    "'{}' is not a valid filter: {e}",
                    self.observability.log_level
                ),
            )
        })?;
        Ok(())
    }

    /// The storage prefix resources live under, without a trailing slash.
    pub fn prefix(&self) -> String {
        let prefix = self.etcd.as_ref().map_or("/aisix", |e| e.prefix.as_str());
        prefix.trim_end_matches('/').to_owned()
    }

    fn ignored_sections(&self) -> Vec<String> {
        let present = [
            &self.ratelimit,
            &self.upstream,
            &self.downstream,
            &self.deployment,
        ];
        let mut out: Vec<String> = IGNORED_SECTIONS
            .iter()
            .zip(present)
            .filter(|(_, v)| v.is_some())
            .map(|(name, _)| (*name).to_owned())
            .collect();
        if self.admin.is_some() && self.etcd.is_none() {
            out.push("admin (the admin listener runs in self-hosted etcd mode only)".to_owned());
        }
        if self.managed.as_ref().is_some_and(|m| !m.enabled) {
            out.push("managed (enabled is false)".to_owned());
        }
        out
    }

    /// The client-address header as a validated header name.
    pub fn client_ip_header(&self) -> proxy_core::http::HeaderName {
        http_header_name(&self.proxy.client_ip_header)
            .unwrap_or(proxy_core::http::HeaderName::from_static("x-forwarded-for"))
    }

    /// The request-id headers as validated header names.
    pub fn request_id_headers(&self) -> Vec<proxy_core::http::HeaderName> {
        self.proxy
            .request_id
            .accept_headers
            .iter()
            .filter_map(|h| http_header_name(h))
            .collect()
    }
}

impl ManagedSection {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let url = reqwest::Url::parse(&self.cp_base_url);
        match url {
            Ok(u) if u.scheme() == "https" && u.host().is_some() => {}
            Ok(u) if u.scheme() == "http" => {
                return Err((
                    "managed.cp_base_url",
                    format!(
                        "'{}': the control plane is reached over mutual TLS only; use https://",
                        self.cp_base_url
                    ),
                ));
            }
            _ => {
                return Err((
                    "managed.cp_base_url",
                    format!("'{}' is not an https:// URL", self.cp_base_url),
                ));
            }
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err((
                "managed.state_dir",
                "required: the directory that keeps the bundle and the last good snapshot"
                    .to_owned(),
            ));
        }
        let items = [
            (
                "managed.cp_cert_pem",
                self.cp_cert_pem.is_some(),
                self.cp_cert_file.is_some(),
            ),
            (
                "managed.cp_key_pem",
                self.cp_key_pem.is_some(),
                self.cp_key_file.is_some(),
            ),
            (
                "managed.cp_ca_pem",
                self.cp_ca_pem.is_some(),
                self.cp_ca_file.is_some(),
            ),
        ];
        for (field, inline, file) in items {
            if inline && file {
                return Err((
                    field,
                    format!(
                        "set {field} or {}, not both",
                        field.replace("_pem", "_file")
                    ),
                ));
            }
        }
        for (field, value) in [
            (
                "managed.heartbeat_interval_secs",
                self.heartbeat_interval_secs,
            ),
            ("managed.connect_timeout_ms", self.connect_timeout_ms),
            ("managed.request_timeout_ms", self.request_timeout_ms),
            ("managed.budget.timeout_ms", self.budget.timeout_ms),
            (
                "managed.usage.queue_max_events",
                self.usage.queue_max_events,
            ),
            ("managed.usage.batch_size", self.usage.batch_size as u64),
            (
                "managed.usage.flush_interval_ms",
                self.usage.flush_interval_ms,
            ),
        ] {
            if value == 0 {
                return Err((field, "must be greater than 0".to_owned()));
            }
        }
        Ok(())
    }
}

impl EtcdSection {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.endpoints.is_empty() {
            return Err((
                "etcd.endpoints",
                "at least one endpoint is required".to_owned(),
            ));
        }
        for e in &self.endpoints {
            let ok = (e.starts_with("http://") || e.starts_with("https://"))
                && reqwest::Url::parse(e).is_ok_and(|u| u.host().is_some());
            if !ok {
                return Err((
                    "etcd.endpoints",
                    format!("'{e}' is not an http:// or https:// URL"),
                ));
            }
        }
        if !self.prefix.starts_with('/') || self.prefix.trim_end_matches('/').is_empty() {
            return Err((
                "etcd.prefix",
                format!(
                    "'{}' must start with '/' and name a folder, e.g. /aisix",
                    self.prefix
                ),
            ));
        }
        if self.dial_timeout_ms == 0 {
            return Err(("etcd.dial_timeout_ms", "must be greater than 0".to_owned()));
        }
        if self.request_timeout_ms == 0 {
            return Err((
                "etcd.request_timeout_ms",
                "must be greater than 0".to_owned(),
            ));
        }
        if self.username.is_some() != self.password.is_some() {
            return Err((
                "etcd.username",
                "username and password go together: set both or neither".to_owned(),
            ));
        }
        if let Some(tls) = &self.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return Err((
                    "etcd.tls.cert_file",
                    "a client certificate needs both cert_file and key_file".to_owned(),
                ));
            }
        }
        Ok(())
    }
}

/// Names the section holding an unknown key (the key itself is in the message),
/// whichever way the deserializer reported its path.
fn parent_of_unknown(field: String, message: &str) -> String {
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    let field = match unknown {
        Some(name) if field == name => ".".to_owned(),
        Some(name) => field
            .strip_suffix(&format!(".{name}"))
            .map_or(field.clone(), str::to_owned),
        None => field,
    };
    if field == "." {
        "(top level)".to_owned()
    } else {
        field
    }
}

fn http_header_name(h: &str) -> Option<proxy_core::http::HeaderName> {
    proxy_core::http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()
}

/// `AISIX_PROXY__ADDR=...` sets `proxy.addr`; levels are separated by `__`.
fn apply_override(root: &mut Value, var: &str, raw: &str) -> Result<(), ConfigError> {
    let env_error = |message: String| ConfigError::Env {
        var: var.to_owned(),
        message,
    };
    let path: Vec<String> = var["AISIX_".len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(env_error("expected AISIX_<SECTION>__<FIELD>".to_owned()));
    }
    let value: Value =
        serde_yaml_ng::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
    let mut node = root;
    for (i, key) in path.iter().enumerate() {
        let Value::Mapping(map) = node else {
            return Err(env_error(format!(
                "'{}' is not a section",
                path[..i].join(".")
            )));
        };
        let key = Value::String(key.clone());
        if i + 1 == path.len() {
            map.insert(key, value);
            return Ok(());
        }
        node = map
            .entry(key)
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("c.yaml"), text, Vec::new())
    }

    #[test]
    fn defaults_and_ignored_sections() {
        let c = parse("resources_file: r.yaml\nratelimit: {}\nobservability:\n  metrics: {prometheus: {enabled: true}}\n").unwrap();
        assert_eq!(c.proxy.addr.to_string(), "0.0.0.0:3000");
        assert_eq!(c.proxy.request_body_limit_bytes, 0);
        assert_eq!(c.shutdown.min_drain_secs, 5);
        assert_eq!(c.ignored, ["ratelimit"]);
        let prometheus = &c.observability.metrics.prometheus;
        assert!(prometheus.enabled);
        assert_eq!(
            (
                prometheus.addr.to_string().as_str(),
                prometheus.path.as_str()
            ),
            ("0.0.0.0:9090", "/metrics")
        );
        let e = parse(
            "resources_file: r.yaml\nobservability:\n  metrics: {prometheus: {path: /status/x}}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("observability.metrics.prometheus.path: '/status/x'"),
            "{e}"
        );
        let e = parse("resources_file: r.yaml\nobservability:\n  metrics: {statsd: {}}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("observability.metrics: unknown field `statsd`"),
            "{e}"
        );
        assert!(c.cache.options().is_none(), "the cache is off by default");
        let c = parse("resources_file: r.yaml\ncache: {enabled: true, ttl_secs: 30}\n").unwrap();
        let cache = c.cache.options().unwrap();
        assert_eq!((cache.ttl.as_secs(), cache.max_entries.get()), (30, 10_000));
        let e = parse("resources_file: r.yaml\ncache: {enabled: true, max_entries: 0}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cache.max_entries: must be greater than 0"),
            "{e}"
        );
        let e = parse("resources_file: r.yaml\ncache: {enabled: true, backend: redis}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cache: unknown field `backend`"), "{e}");
    }

    #[test]
    fn unknown_keys_name_their_path() {
        let e = parse("resources_file: r.yaml\nproxy:\n  adr: 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config file c.yaml: proxy: unknown field `adr`"),
            "{e}"
        );
        let e = parse("resources_file: r.yaml\nproxyy: {}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("(top level): unknown field `proxyy`"), "{e}");
        let e = parse("resources_file: r.yaml\nproxy:\n  addr: nowhere\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxy.addr: invalid socket address"), "{e}");
        let e = parse("resources_file: r.yaml\nproxy:\n  trusted_proxies: [10.0.0.0/8, nope]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("proxy.trusted_proxies[1]: invalid IP address"),
            "{e}"
        );
        let c = parse("resources_file: r.yaml\nproxy:\n  trusted_proxies: [10.0.0.0/8]\n  client_ip_header: X-Real-IP\n").unwrap();
        assert_eq!(c.proxy.trusted_proxies.len(), 1);
        assert_eq!(c.client_ip_header(), "x-real-ip");
        let e = parse("proxy: {}\n").unwrap_err().to_string();
        assert!(e.contains("a configuration source is required"), "{e}");
        let e = parse("resources_file: [\n").unwrap_err().to_string();
        assert!(e.contains("not valid YAML"), "{e}");
    }

    #[test]
    fn etcd_and_admin_sections() {
        let c = parse(
            "etcd:\n  endpoints: [http://127.0.0.1:2379, http://10.0.0.2:2379]\n  prefix: /gw/\n  cache_dir: /tmp/c\nadmin:\n  admin_keys: [k1]\n",
        )
        .unwrap();
        let etcd = c.etcd.as_ref().unwrap();
        assert_eq!(etcd.endpoints.len(), 2);
        assert_eq!(
            (etcd.dial_timeout_ms, etcd.request_timeout_ms),
            (5000, 5000)
        );
        assert_eq!(c.prefix(), "/gw");
        assert_eq!(c.admin.as_ref().unwrap().addr.to_string(), "127.0.0.1:3001");
        assert!(c.ignored.is_empty(), "{:?}", c.ignored);

        let cases = [
            (
                "etcd: {endpoints: [http://e:1]}\nproxy: {max_connections: 0}\n",
                "proxy.max_connections: must be at least 1",
            ),
            (
                "etcd: {endpoints: [http://e:1]}\nproxy: {header_read_timeout_ms: 0}\n",
                "proxy.header_read_timeout_ms: must be at least 1",
            ),
            (
                "etcd: {endpoints: [http://e:1]}\nproxy: {max_header_bytes: 100}\n",
                "proxy.max_header_bytes: must be at least 1024",
            ),
            (
                "etcd: {endpoints: [http://e:1]}\nproxy: {tls: {cert_file: c.pem}}\n",
                "proxy.tls: missing field `key_file`",
            ),
            (
                "etcd: {endpoints: []}\n",
                "etcd.endpoints: at least one endpoint",
            ),
            (
                "etcd: {endpoints: [127.0.0.1:2379]}\n",
                "etcd.endpoints: '127.0.0.1:2379' is not an http",
            ),
            (
                "etcd: {endpoints: [http://e:1], prefix: aisix}\n",
                "etcd.prefix: 'aisix' must start with '/'",
            ),
            (
                "etcd: {endpoints: [http://e:1], dial_timeout_ms: 0}\n",
                "etcd.dial_timeout_ms: must be greater than 0",
            ),
            (
                "etcd: {endpoints: [http://e:1], username: u}\n",
                "etcd.username: username and password go together",
            ),
            (
                "etcd: {endpoints: [http://e:1], tls: {cert_file: c.pem}}\n",
                "etcd.tls.cert_file: a client certificate needs both",
            ),
            (
                "etcd: {endpoints: [http://e:1], tls: {ca: x}}\n",
                "etcd.tls: unknown field `ca`",
            ),
            (
                "etcd: {endpoints: [http://e:1]}\nadmin: {admin_keys: []}\n",
                "admin.admin_keys: at least one non-empty admin key",
            ),
            (
                "etcd: {endpoints: [http://e:1]}\nresources_file: r.yaml\n",
                "(top level): choose one configuration source",
            ),
        ];
        for (text, expected) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text} -> {e}");
        }
        let c = parse("resources_file: r.yaml\nadmin: {admin_keys: [k]}\n").unwrap();
        assert_eq!(c.ignored.len(), 1);
        assert!(c.ignored[0].starts_with("admin"));
    }

    #[test]
    fn managed_section() {
        let ok =
            "managed: {enabled: true, cp_base_url: 'https://cp:7443', state_dir: /var/lib/aisix}\n";
        let c = parse(ok).unwrap();
        let m = c.managed().unwrap();
        assert_eq!(m.heartbeat_interval_secs, 15);
        assert_eq!(m.connect_timeout_ms, 5000);
        assert_eq!(m.budget.default_fail_mode, DefaultFailMode::Open);
        assert_eq!(m.budget.stale_window_secs, 60);
        assert_eq!(m.usage.queue_max_events, 100_000);
        assert!(c.ignored.is_empty(), "{:?}", c.ignored);
        let tuned = "managed: {enabled: true, cp_base_url: 'https://cp:7443', state_dir: /s, budget: {default_fail_mode: closed, stale_window_secs: 5}, usage: {batch_size: 10}}\n";
        let c = parse(tuned).unwrap();
        let m = c.managed().unwrap();
        assert_eq!(m.budget.default_fail_mode, DefaultFailMode::Closed);
        assert_eq!(m.budget.stale_window_secs, 5);
        assert_eq!(m.budget.timeout_ms, 1000);
        assert_eq!(m.usage.batch_size, 10);
        let cases = [
            (
                "managed: {enabled: true, cp_base_url: 'http://cp:7443', state_dir: /s}\n",
                "managed.cp_base_url: 'http://cp:7443': the control plane is reached over mutual TLS only",
            ),
            (
                "managed: {enabled: true, cp_base_url: 'cp:7443', state_dir: /s}\n",
                "managed.cp_base_url",
            ),
            (
                "managed: {enabled: true, cp_base_url: 'https://cp'}\n",
                "managed.state_dir: required",
            ),
            (
                "managed: {enabled: true, cp_base_url: 'https://cp', state_dir: /s, cp_key_pem: k, cp_key_file: /k}\n",
                "managed.cp_key_pem: set managed.cp_key_pem or managed.cp_key_file, not both",
            ),
            (
                "managed: {enabled: true, cp_base_url: 'https://cp', state_dir: /s, heartbeat_interval_secs: 0}\n",
                "managed.heartbeat_interval_secs: must be greater than 0",
            ),
            (
                "managed: {enabled: true, cp_base_url: 'https://cp', state_dir: /s, cp_cert: x}\n",
                "managed: unknown field `cp_cert`",
            ),
            (
                "managed: {enabled: true, cp_base_url: 'https://cp', state_dir: /s, budget: {default_fail_mode: sticky}}\n",
                "managed.budget.default_fail_mode: unknown variant `sticky`, expected `open` or `closed`",
            ),
            (
                "managed: {enabled: true, cp_base_url: 'https://cp', state_dir: /s, usage: {batch_size: 0}}\n",
                "managed.usage.batch_size: must be greater than 0",
            ),
            (
                "managed: {enabled: true, cp_base_url: 'https://cp', state_dir: /s}\nresources_file: r.yaml\n",
                "choose one configuration source",
            ),
        ];
        for (text, expected) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text} -> {e}");
        }
        // A disabled section is not a source, and is reported.
        let c = parse("resources_file: r.yaml\nmanaged: {enabled: false}\n").unwrap();
        assert!(c.managed().is_none());
        assert_eq!(c.ignored, ["managed (enabled is false)"]);
    }

    #[test]
    fn environment_overrides() {
        let env = vec![
            ("AISIX_PROXY__ADDR".to_owned(), "127.0.0.1:9999".to_owned()),
            (
                "AISIX_PROXY__REQUEST_BODY_LIMIT_BYTES".to_owned(),
                "1024".to_owned(),
            ),
            ("AISIX_API_KEY".to_owned(), "not an override".to_owned()),
            (
                "AISIX_OBSERVABILITY__METRICS__PROMETHEUS__ADDR".to_owned(),
                "127.0.0.1:9191".to_owned(),
            ),
            (
                "AISIX_OBSERVABILITY__LOG_FORMAT".to_owned(),
                "json".to_owned(),
            ),
        ];
        let c = Config::parse(Path::new("c.yaml"), "resources_file: r.yaml\n", env).unwrap();
        assert_eq!(c.proxy.addr.to_string(), "127.0.0.1:9999");
        assert_eq!(c.proxy.request_body_limit_bytes, 1024);
        assert_eq!(
            c.observability.metrics.prometheus.addr.to_string(),
            "127.0.0.1:9191"
        );
        assert_eq!(c.observability.log_format, LogFormat::Json);
        let env = vec![("AISIX_PROXY__NOPE".to_owned(), "1".to_owned())];
        let e = Config::parse(Path::new("c.yaml"), "resources_file: r.yaml\n", env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxy: unknown field `nope`"), "{e}");
        let env = vec![("AISIX_RESOURCES_FILE__X".to_owned(), "1".to_owned())];
        let e = Config::parse(Path::new("c.yaml"), "resources_file: r.yaml\n", env)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("environment variable AISIX_RESOURCES_FILE__X"),
            "{e}"
        );
    }
}
