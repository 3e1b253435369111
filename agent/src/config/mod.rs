//! The agent's configuration file (YAML, `--config PATH`), with environment overrides.
//!
//! Unknown keys are errors that name their path. Sections of the AISIX config that this
//! build does not implement yet are accepted and reported once as ignored, so existing
//! config files keep working. `AISIX_<SECTION>__<FIELD>` environment variables override
//! file values (double underscore between levels; values are read as YAML scalars, except
//! multi-line values and `*_pem` fields, taken verbatim).
//!
//! Layout: this file has the top level, loading, overrides and the cross-section
//! checks; `sections.rs` the sections below it, their defaults and their own checks.

use proxy_core::observe::otlp_metrics::MetricsPushOptions;
use proxy_core::observe::trace::TraceOptions;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

mod sections;

use sections::at_most;
pub use sections::*;

/// Why a configuration could not be loaded. Each message names the file, variable or
/// field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        /// Shown in the message, not as a separate cause (printed once).
        error: std::io::Error,
    },
    #[error("config file {path} is not valid YAML: {error}")]
    Syntax {
        path: PathBuf,
        error: serde_yaml_ng::Error,
    },
    #[error("config file {path}: {field}: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    /// Several problems, each on its own line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    /// One error as it is, several as [`ConfigError::Several`].
    fn of(mut errors: Vec<ConfigError>) -> Self {
        match errors.len() {
            1 => errors.remove(0),
            _ => ConfigError::Several(errors),
        }
    }
}

/// At most this many problems are reported from one config file.
const MAX_PROBLEMS: usize = 50;

/// Sections that exist in the AISIX gateway config but that this build does not use.
const IGNORED_SECTIONS: &[&str] = &["deployment"];

/// Keys of the AISIX gateway's config that this build accepts without acting on them,
/// and why: each present one is reported once at start (log and `/status/config`
/// `ignored`), so an AISIX config file loads unchanged.
const NOT_IMPLEMENTED: &[(&str, &str)] = &[
    (
        "observability.metrics.buckets",
        "histograms use the built-in buckets",
    ),
    (
        "managed.cp_etcd_endpoint",
        "the control plane's configuration comes over its HTTPS API",
    ),
    (
        "managed.mtls_dir",
        "the bundle is kept in managed.state_dir/mtls",
    ),
    (
        "managed.dp_id_file",
        "the data-plane id is the bundle certificate's",
    ),
];

/// Removes the present [`NOT_IMPLEMENTED`] keys from `value`, saying each.
fn take_not_implemented(value: &mut Value) -> Vec<String> {
    let mut taken = Vec::new();
    for (path, why) in NOT_IMPLEMENTED {
        let (parents, leaf) = path.rsplit_once('.').unwrap_or(("", path));
        let mut node = Some(&mut *value);
        for part in parents.split('.').filter(|p| !p.is_empty()) {
            node = node.and_then(|n| n.get_mut(part));
        }
        if let Some(Value::Mapping(map)) = node
            && map.remove(leaf).is_some()
        {
            taken.push(format!("{path} ({why})"));
        }
    }
    taken
}

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
    /// Where rate-limit counters live (this process, or Redis for every replica).
    #[serde(default)]
    pub ratelimit: RateLimitSection,
    /// Defaults for every provider call and the upstream connection pool.
    #[serde(default)]
    pub upstream: UpstreamSection,
    /// The caller side of answer streams.
    #[serde(default)]
    pub downstream: DownstreamSection,
    // Accepted and reported as ignored (see IGNORED_SECTIONS).
    #[serde(default)]
    deployment: Option<Value>,
    #[serde(skip)]
    pub ignored: Vec<String>,
}

impl Config {
    /// Reads `path`, applies `AISIX_*__*` overrides from `env`, and validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(path, &text, env)
    }

    pub fn parse(
        path: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut value: Value =
            serde_yaml_ng::from_str(text).map_err(|error| ConfigError::Syntax {
                path: path.to_owned(),
                error,
            })?;
        if value.is_null() {
            value = Value::Mapping(Mapping::new());
        }
        let mut overrides: Vec<(String, String)> = env
            .iter()
            .filter(|(k, _)| k.starts_with("AISIX_") && k.contains("__"))
            .cloned()
            .collect();
        overrides.sort();
        for (var, raw) in &overrides {
            apply_override(&mut value, var, raw)?;
        }
        // A field set by a variable is that variable's fault, not the file's.
        let field_error = |field: String, message: String| {
            let message = with_hint(&field, message);
            match overrides
                .iter()
                .find(|(var, _)| override_path(var) == field)
            {
                Some((var, _)) => ConfigError::Env {
                    var: var.clone(),
                    message: format!("{field}: {message}"),
                },
                None => ConfigError::Field {
                    path: path.to_owned(),
                    field,
                    message,
                },
            }
        };
        let not_implemented = take_not_implemented(&mut value);
        // Every field the parser refuses is reported, not only the first: each one is
        // taken out and the rest parsed again.
        let mut errors = Vec::new();
        let mut config: Config = loop {
            match serde_path_to_error::deserialize::<_, Config>(value.clone()) {
                Ok(config) => break config,
                Err(e) => {
                    let removed = remove_at(&mut value, e.path());
                    let (field, message) = (e.path().to_string(), e.into_inner().to_string());
                    errors.push(field_error(parent_of_unknown(field, &message), message));
                    if !removed || errors.len() >= MAX_PROBLEMS {
                        return Err(ConfigError::of(errors));
                    }
                }
            }
        };
        if let Err((f, m)) = config.read_password_env(&env) {
            errors.push(field_error(f.to_owned(), m));
        }
        errors.extend(
            config
                .validate()
                .into_iter()
                .map(|(f, m)| field_error(f, m)),
        );
        if !errors.is_empty() {
            return Err(ConfigError::of(errors));
        }
        config.ignored = config.ignored_sections();
        config.ignored.extend(not_implemented);
        Ok(config)
    }

    /// The managed section when managed mode is enabled.
    pub fn managed(&self) -> Option<&ManagedSection> {
        self.managed.as_ref().filter(|m| m.enabled)
    }

    /// The admin section when the admin listener is enabled.
    pub fn admin(&self) -> Option<&AdminSection> {
        self.admin.as_ref().filter(|a| a.enabled)
    }

    /// `etcd.password_env`: the password read from the variable it names.
    fn read_password_env(
        &mut self,
        env: &[(String, String)],
    ) -> Result<(), (&'static str, String)> {
        let Some(etcd) = &mut self.etcd else {
            return Ok(());
        };
        let Some(var) = &etcd.password_env else {
            return Ok(());
        };
        if etcd.password.is_some() {
            return Err((
                "etcd.password_env",
                "set password or password_env, not both".to_owned(),
            ));
        }
        match env.iter().find(|(k, _)| k == var) {
            Some((_, password)) if !password.is_empty() => {
                etcd.password = Some(proxy_core::secret::Secret::new(password.clone()));
                Ok(())
            }
            _ => Err((
                "etcd.password_env",
                format!("the environment variable {var} is not set (it holds etcd's password)"),
            )),
        }
    }

    /// Where self-hosted mode keeps its last good snapshot: `etcd.cache_dir`, or
    /// AISIX's `managed.snapshot_cache_path` (`""`: none).
    pub fn etcd_cache_dir(&self) -> Option<PathBuf> {
        let aisix = self
            .managed
            .as_ref()
            .filter(|m| !m.enabled)
            .and_then(|m| m.snapshot_cache_path.clone());
        match aisix {
            Some(path) if path.as_os_str().is_empty() => None,
            Some(path) => Some(path),
            None => self.etcd.as_ref().and_then(|e| e.cache_dir.clone()),
        }
    }

    /// The reverse proxies whose client-address header is believed, the header, and
    /// whether the address is the header's last untrusted one (recursive) or its last.
    pub fn real_ip(&self) -> (Vec<ipnet::IpNet>, &str, bool) {
        match &self.proxy.real_ip {
            Some(r) => (r.trusted_proxies.clone(), &r.header, r.recursive),
            None => (
                self.proxy.trusted_proxies.clone(),
                &self.proxy.client_ip_header,
                true,
            ),
        }
    }

    /// The problems of the parsed config: the first of each group of checks (source,
    /// proxy and upstream limits, observability, rate limits, cache).
    fn validate(&self) -> Vec<(String, String)> {
        let named = |(f, m): (&'static str, String)| (f.to_owned(), m);
        let cache = match self.cache.enabled {
            true => validate_redis("cache", self.cache.redis.as_ref()),
            false => Ok(()),
        };
        [
            self.validate_source().map_err(named),
            self.validate_proxy().map_err(named),
            self.upstream.tls.load().map(drop).map_err(named),
            self.validate_observability().map_err(named),
            self.ratelimit.validate(),
            cache,
        ]
        .into_iter()
        .filter_map(Result::err)
        .collect()
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
            let aisix_cache = self
                .managed
                .as_ref()
                .is_some_and(|m| !m.enabled && m.snapshot_cache_path.is_some());
            if etcd.cache_dir.is_some() && aisix_cache {
                return Err((
                    "managed.snapshot_cache_path",
                    "set etcd.cache_dir or managed.snapshot_cache_path, not both".to_owned(),
                ));
            }
        }
        if let Some(managed) = self.managed() {
            managed.validate()?;
        }
        if let Some(admin) = self.admin() {
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
            (
                "proxy.body_read_timeout_ms",
                self.proxy.body_read_timeout_ms,
                1,
            ),
            (
                "proxy.min_body_rate_bytes_per_sec",
                self.proxy.min_body_rate_bytes_per_sec,
                1,
            ),
        ] {
            if value < least {
                return Err((field, format!("must be at least {least}")));
            }
        }
        self.validate_bounds()?;
        let u = &self.upstream;
        for (field, value) in [
            ("upstream.timeout_ms", u.timeout_ms),
            ("upstream.connect_timeout_ms", u.connect_timeout_ms),
            (
                "upstream.stream_timeout_ms",
                u.stream_timeout_ms.unwrap_or(1),
            ),
        ] {
            if value == 0 {
                return Err((field, "must be at least 1".to_owned()));
            }
        }
        at_most(&[
            ("upstream.timeout_ms", u.timeout_ms, 86_400_000),
            ("upstream.connect_timeout_ms", u.connect_timeout_ms, 600_000),
            (
                "upstream.stream_timeout_ms",
                u.stream_timeout_ms.unwrap_or(0),
                86_400_000,
            ),
            (
                "upstream.pool_idle_timeout_secs",
                u.pool_idle_timeout_secs,
                86_400,
            ),
            (
                "downstream.idle_timeout_secs",
                self.downstream.idle_timeout_secs.unwrap_or(0),
                3_600,
            ),
        ])?;
        let (field, header) = match &self.proxy.real_ip {
            Some(r) => ("proxy.real_ip.header", &r.header),
            None => ("proxy.client_ip_header", &self.proxy.client_ip_header),
        };
        if http_header_name(header).is_none() {
            return Err((field, format!("'{header}' is not a valid header name")));
        }
        if self.proxy.real_ip.is_some() && !self.proxy.trusted_proxies.is_empty() {
            return Err((
                "proxy.real_ip",
                "set proxy.real_ip.trusted_proxies or proxy.trusted_proxies, not both".to_owned(),
            ));
        }
        for rule in &self.proxy.url_rewrites {
            if let Err(e) = regex::Regex::new(&rule.pattern) {
                return Err((
                    "proxy.url_rewrites.match",
                    format!("'{}' is not a valid regular expression: {e}", rule.pattern),
                ));
            }
            if !rule.replacement.starts_with('/') {
                return Err((
                    "proxy.url_rewrites.rewrite",
                    format!("'{}' must be a path, starting with '/'", rule.replacement),
                ));
            }
        }
        if self.proxy.workers == Some(0) {
            return Err(("proxy.workers", "must be at least 1".to_owned()));
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

    /// The upper bounds of the proxy's, the cache's and the shutdown's figures.
    fn validate_bounds(&self) -> Result<(), (&'static str, String)> {
        at_most(&[
            (
                "proxy.max_connections",
                self.proxy.max_connections as u64,
                1_000_000,
            ),
            (
                "proxy.header_read_timeout_ms",
                self.proxy.header_read_timeout_ms,
                3_600_000,
            ),
            (
                "proxy.max_header_bytes",
                self.proxy.max_header_bytes as u64,
                16 << 20,
            ),
            (
                "proxy.body_read_timeout_ms",
                self.proxy.body_read_timeout_ms,
                3_600_000,
            ),
            ("cache.ttl_secs", self.cache.ttl_secs, 31_536_000),
            (
                "cache.max_entries",
                self.cache.max_entries as u64,
                10_000_000,
            ),
            (
                "shutdown.min_drain_secs",
                self.shutdown.min_drain_secs,
                3_600,
            ),
            (
                "shutdown.drain_timeout_secs",
                self.shutdown.drain_timeout_secs,
                86_400,
            ),
            ("upstream.retries", u64::from(self.upstream.retries), 10),
        ])
    }

    fn validate_observability(&self) -> Result<(), (&'static str, String)> {
        for rule in &self.observability.metrics.client_type_rules {
            if let Err(e) = regex::Regex::new(&rule.pattern) {
                return Err((
                    "observability.metrics.client_type_rules.pattern",
                    format!("'{}' is not a valid regular expression: {e}", rule.pattern),
                ));
            }
            let bounded = !rule.client.is_empty()
                && rule.client.len() <= 64
                && rule
                    .client
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !bounded {
                return Err((
                    "observability.metrics.client_type_rules.client",
                    format!(
                        "'{}' must be 1 to 64 letters, digits, '-', '_' or '.' (it becomes a label value)",
                        rule.client.chars().take(80).collect::<String>()
                    ),
                ));
            }
        }
        let metrics_path = &self.observability.metrics.prometheus.path;
        if !metrics_path.starts_with('/') || metrics_path.starts_with("/status/") {
            return Err((
                "observability.metrics.prometheus.path",
                format!(
                    "'{metrics_path}' must start with '/' and not be under /status/ (the status endpoints live there)"
                ),
            ));
        }
        let otlp = &self.observability.tracing.otlp;
        if otlp.enabled {
            sections::otlp_url(&otlp.endpoint, "traces")
                .map_err(|e| ("observability.tracing.otlp.endpoint", e))?;
            if !(0.0..=1.0).contains(&otlp.sample_ratio) {
                return Err((
                    "observability.tracing.otlp.sample_ratio",
                    format!("{} must be between 0 and 1", otlp.sample_ratio),
                ));
            }
        }
        let otlp = &self.observability.metrics.otlp;
        if otlp.enabled {
            sections::otlp_url(&otlp.endpoint, "metrics")
                .map_err(|e| ("observability.metrics.otlp.endpoint", e))?;
            if otlp.interval_secs == 0 {
                return Err((
                    "observability.metrics.otlp.interval_secs",
                    "must be at least 1".to_owned(),
                ));
            }
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

    /// `observability.tracing.otlp`, when enabled.
    pub fn trace_options(&self) -> Result<Option<TraceOptions>, (String, String)> {
        let otlp = &self.observability.tracing.otlp;
        if !otlp.enabled {
            return Ok(None);
        }
        let endpoint = sections::otlp_url(&otlp.endpoint, "traces")
            .map_err(|e| ("observability.tracing.otlp.endpoint".to_owned(), e))?;
        Ok(Some(TraceOptions {
            endpoint,
            sample_ratio: otlp.sample_ratio,
            service_name: self.observability.service_name.clone(),
            timeout: std::time::Duration::from_millis(otlp.timeout_ms.max(1)),
        }))
    }

    /// `observability.metrics.otlp`, when enabled.
    pub fn metrics_push_options(&self) -> Result<Option<MetricsPushOptions>, (String, String)> {
        let otlp = &self.observability.metrics.otlp;
        if !otlp.enabled {
            return Ok(None);
        }
        let endpoint = sections::otlp_url(&otlp.endpoint, "metrics")
            .map_err(|e| ("observability.metrics.otlp.endpoint".to_owned(), e))?;
        Ok(Some(MetricsPushOptions {
            endpoint,
            interval: std::time::Duration::from_secs(otlp.interval_secs.max(1)),
            timeout: std::time::Duration::from_millis(otlp.timeout_ms.max(1)),
            service_name: self.observability.service_name.clone(),
        }))
    }

    /// `observability.metrics.client_type_rules`, compiled (checked when the config
    /// loaded).
    pub fn client_types(&self) -> Vec<proxy_core::http::ClientTypeRule> {
        (self.observability.metrics.client_type_rules.iter())
            .filter_map(|rule| {
                Some(proxy_core::http::ClientTypeRule {
                    pattern: regex::Regex::new(&rule.pattern).ok()?,
                    client: rule.client.as_str().into(),
                })
            })
            .collect()
    }

    /// `proxy.url_rewrites`, compiled (checked when the config loaded).
    pub fn url_rewrites(&self) -> Vec<proxy_core::http::UrlRewrite> {
        self.proxy
            .url_rewrites
            .iter()
            .filter_map(|rule| {
                Some(proxy_core::http::UrlRewrite {
                    name: rule.name.clone(),
                    pattern: regex::Regex::new(&rule.pattern).ok()?,
                    replacement: rule.replacement.clone(),
                })
            })
            .collect()
    }

    /// The upstream client's settings, with `upstream.tls`'s files read; a file that
    /// cannot be used is the field's error.
    pub fn upstream_options(
        &self,
    ) -> Result<proxy_core::providers::client::UpstreamOptions, (&'static str, String)> {
        use std::time::Duration;
        let u = &self.upstream;
        Ok(proxy_core::providers::client::UpstreamOptions {
            timeout: Duration::from_millis(u.timeout_ms),
            stream_timeout: u.stream_timeout_ms.map(Duration::from_millis),
            connect_timeout: Duration::from_millis(u.connect_timeout_ms),
            pool_idle_timeout: Duration::from_secs(u.pool_idle_timeout_secs),
            pool_max_idle_per_host: u.pool_max_idle_per_host,
            tcp_keepalive: u.tcp_keepalive_secs.map(Duration::from_secs),
            tcp_keepalive_interval: u.tcp_keepalive_interval_secs.map(Duration::from_secs),
            tcp_keepalive_retries: u.tcp_keepalive_retries,
            retries: u.retries,
            tls: u.tls.load()?,
        })
    }

    /// Threads serving requests: `proxy.workers`, else one per core this process may
    /// run on (taskset and cgroup limits included).
    pub fn workers(&self) -> usize {
        self.proxy.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    /// Whether the proxy is served by a thread per core: `proxy.thread_per_core`, else
    /// when there is one worker. A shared runtime with one worker has nobody to share
    /// work with, and its scheduling costs about a third more CPU per request than a
    /// worker's own current-thread runtime (docs/performance.md).
    pub fn thread_per_core(&self) -> bool {
        self.proxy
            .thread_per_core
            .unwrap_or_else(|| self.workers() == 1)
    }

    /// How long the proxy listener waits for a request head, idle keep-alive time
    /// included (hyper measures both with one timer): `downstream.idle_timeout_secs`
    /// (AISIX's key) when set, else `proxy.header_read_timeout_ms`.
    pub fn head_wait(&self) -> std::time::Duration {
        match self.downstream.idle_timeout_secs {
            Some(secs) if secs > 0 => std::time::Duration::from_secs(secs),
            _ => std::time::Duration::from_millis(self.proxy.header_read_timeout_ms),
        }
    }

    /// The storage prefix resources live under, without a trailing slash: `etcd.prefix`
    /// and, when set, `etcd.env_id` below it.
    pub fn prefix(&self) -> String {
        let prefix = self.etcd.as_ref().map_or("/aisix", |e| e.prefix.as_str());
        let prefix = prefix.trim_end_matches('/');
        match self.etcd.as_ref().map(|e| e.env_id.as_str()) {
            Some(env) if !env.is_empty() => format!("{prefix}/{env}"),
            _ => prefix.to_owned(),
        }
    }

    fn ignored_sections(&self) -> Vec<String> {
        let present = [&self.deployment];
        let mut out: Vec<String> = IGNORED_SECTIONS
            .iter()
            .zip(present)
            .filter(|(_, v)| v.is_some())
            .map(|(name, _)| (*name).to_owned())
            .collect();
        if self.admin().is_some() && self.etcd.is_none() {
            out.push("admin (the admin listener runs in self-hosted etcd mode only)".to_owned());
        }
        // A disabled managed section may only carry where self-hosted mode keeps its
        // snapshot.
        let only_cache = self.etcd.is_some()
            && self
                .managed
                .as_ref()
                .is_some_and(|m| m.snapshot_cache_path.is_some() && m.cp_base_url.is_empty());
        if self.managed.as_ref().is_some_and(|m| !m.enabled) && !only_cache {
            out.push("managed (enabled is false)".to_owned());
        }
        if self
            .managed()
            .is_some_and(|m| m.snapshot_cache_path.is_some())
        {
            out.push(
                "managed.snapshot_cache_path (managed mode keeps its snapshot in managed.state_dir)"
                    .to_owned(),
            );
        }
        out
    }

    /// The client-address header as a validated header name.
    pub fn client_ip_header(&self) -> proxy_core::http::HeaderName {
        http_header_name(self.real_ip().1)
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

/// Names the section holding an unknown key (the key itself is in the message),
/// whichever way the deserializer reported its path.
/// Takes the node at `path` out of `value`; false when there is none (the error is
/// about the document itself, or a field that is missing).
fn remove_at(value: &mut Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut node = value;
    for segment in parents {
        let next = match (segment, node) {
            (Segment::Map { key }, Value::Mapping(map)) => map.get_mut(key.as_str()),
            (Segment::Seq { index }, Value::Sequence(items)) => items.get_mut(*index),
            _ => None,
        };
        match next {
            Some(next) => node = next,
            None => return false,
        }
    }
    match (last, node) {
        (Segment::Map { key }, Value::Mapping(map)) => map.remove(key.as_str()).is_some(),
        (Segment::Seq { index }, Value::Sequence(items)) if *index < items.len() => {
            items.remove(*index);
            true
        }
        _ => false,
    }
}

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
/// The config path a variable overrides: `AISIX_PROXY__ADDR` -> `proxy.addr`.
fn override_path(var: &str) -> String {
    var.trim_start_matches("AISIX_")
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect::<Vec<_>>()
        .join(".")
}

/// What to write instead, for the mistakes people make most.
fn with_hint(field: &str, message: String) -> String {
    if field.ends_with("addr") && message.contains("socket address") {
        return format!(
            "{message} (an IP address and a port, e.g. 127.0.0.1:3000 or 0.0.0.0:3000; host names such as localhost are not accepted)"
        );
    }
    message
}

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
    // PEM and other multi-line text is taken verbatim: read as a YAML plain scalar, its
    // line breaks would fold into spaces.
    let verbatim = raw.contains('\n') || path.last().is_some_and(|k| k.ends_with("_pem"));
    let value: Value = if verbatim {
        Value::String(raw.to_owned())
    } else {
        serde_yaml_ng::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
    };
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

    /// An AISIX gateway's config file, every section present, as its operator wrote it.
    const AISIX: &str = r#"
etcd:
  endpoints: ["https://10.0.0.5:2379"]
  prefix: /aisix
  env_id: prod
  user: root
  password_env: ETCD_PASSWORD
  dial_timeout_ms: 3000
  request_timeout_ms: 5000
  tls:
    ca_cert_file: /etc/aisix/etcd-ca.pem
    client_cert_file: /etc/aisix/etcd.pem
    client_key_file: /etc/aisix/etcd-key.pem
    domain_name: etcd.internal
proxy:
  addr: 0.0.0.0:3000
  request_body_limit_bytes: 10485760
  real_ip: {trusted_proxies: ["10.0.0.0/8"], recursive: true, header: x-real-ip}
  request_id: {accept_headers: ["x-request-id"]}
  thread_per_core: false
  workers: 2
  url_rewrites: [{name: strip, match: "^/openai/(.*)$", rewrite: "/$1"}]
admin: {enabled: true, addr: 127.0.0.1:3001, admin_keys: ["admin-key-1"]}
observability:
  service_name: aisix-gateway
  log_level: info
  access_log: true
  metrics:
    prometheus: {enabled: true, path: /metrics, addr: 127.0.0.1:9090}
    otlp: {enabled: false, endpoint: "http://otel:4318"}
    client_type_rules: [{pattern: "^OpenAI/Python", client: openai-python}]
    buckets: {request_ttft: [0.1, 0.5, 1, 2]}
  tracing:
    otlp: {enabled: false, endpoint: "http://otel:4318", sample_ratio: 0.1}
cache: {backend: memory}
ratelimit: {backend: local, concurrency_ttl_secs: 60}
upstream:
  timeout_ms: 120000
  stream_timeout_ms: 30000
  connect_timeout_ms: 5000
  tcp_keepalive_secs: 60
  tcp_keepalive_interval_secs: 10
  tcp_keepalive_retries: 3
  pool_idle_timeout_secs: 30
  pool_max_idle_per_host: 32
  retries: 1
  tls: {verify: true}
downstream: {idle_timeout_secs: 120, sse_keepalive_interval_secs: 15}
shutdown: {min_drain_secs: 5}
managed: {snapshot_cache_path: /var/lib/aisix/snapshot}
"#;

    #[test]
    fn an_aisix_config_file_loads_unchanged() {
        let env = vec![("ETCD_PASSWORD".to_owned(), "etcd-s3cret".to_owned())];
        let c = Config::parse(Path::new("aisix.yaml"), AISIX, env).unwrap();
        let etcd = c.etcd.as_ref().unwrap();
        assert_eq!(c.prefix(), "/aisix/prod");
        assert_eq!(etcd.username.as_deref(), Some("root"));
        assert_eq!(etcd.password.as_ref().unwrap().expose(), "etcd-s3cret");
        let tls = etcd.tls.as_ref().unwrap();
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(Path::new("/etc/aisix/etcd-ca.pem"))
        );
        assert_eq!(
            tls.key_file.as_deref(),
            Some(Path::new("/etc/aisix/etcd-key.pem"))
        );
        assert_eq!(tls.domain_name.as_deref(), Some("etcd.internal"));
        assert_eq!(c.admin().unwrap().addr.to_string(), "127.0.0.1:3001");
        let (trusted, header, recursive) = c.real_ip();
        assert_eq!((trusted.len(), header, recursive), (1, "x-real-ip", true));
        assert_eq!(c.client_ip_header().as_str(), "x-real-ip");
        assert_eq!(c.proxy.workers, Some(2));
        assert_eq!(c.downstream.sse_keepalive_interval_secs, Some(15));
        assert_eq!(
            c.head_wait().as_secs(),
            c.downstream.idle_timeout_secs.unwrap()
        );
        let rewrites = c.url_rewrites();
        assert_eq!(rewrites[0].name, "strip");
        assert_eq!(rewrites[0].replacement, "/$1");
        let upstream = c.upstream_options().unwrap();
        assert_eq!(upstream.retries, 1);
        assert!(upstream.tls.verify);
        assert_eq!(upstream.timeout.as_millis(), 120_000);
        assert_eq!(upstream.stream_timeout.unwrap().as_millis(), 30_000);
        assert_eq!(upstream.tcp_keepalive_retries, Some(3));
        assert_eq!(upstream.pool_max_idle_per_host, Some(32));
        assert_eq!(
            c.etcd_cache_dir().as_deref(),
            Some(Path::new("/var/lib/aisix/snapshot"))
        );
        // What this build does not act on is said, by key; the rest is implemented.
        let said: Vec<&str> = c
            .ignored
            .iter()
            .map(|k| k.split(' ').next().unwrap())
            .collect();
        assert_eq!(said, ["observability.metrics.buckets"]);
        assert!(!c.thread_per_core(), "the operator's `false` stands");
        // A key in neither AISIX's config nor ours is still an error naming its path.
        let typo = AISIX.replace("recursive: true", "recursve: true");
        let err = Config::parse(
            Path::new("aisix.yaml"),
            &typo,
            vec![("ETCD_PASSWORD".to_owned(), "x".to_owned())],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("proxy.real_ip") && err.contains("recursve"),
            "{err}"
        );
    }

    #[test]
    fn aisix_spellings_have_their_own_checks() {
        // password_env names a variable that must be set; its value never shows.
        let err = parse(AISIX).unwrap_err().to_string();
        assert!(
            err.contains("etcd.password_env") && err.contains("ETCD_PASSWORD"),
            "{err}"
        );
        let env = || vec![("ETCD_PASSWORD".to_owned(), "etcd-s3cret".to_owned())];
        let load = |text: &str| Config::parse(Path::new("aisix.yaml"), text, env());
        // admin.enabled: false binds nothing and needs no keys.
        let off = AISIX.replace(
            "admin: {enabled: true, addr: 127.0.0.1:3001, admin_keys: [\"admin-key-1\"]}",
            "admin: {enabled: false}",
        );
        assert!(load(&off).unwrap().admin().is_none());
        // Both spellings of the snapshot cache at once are refused.
        let both = AISIX.replace(
            "  env_id: prod\n",
            "  env_id: prod\n  cache_dir: /var/lib/x\n",
        );
        assert!(
            load(&both)
                .unwrap_err()
                .to_string()
                .contains("managed.snapshot_cache_path")
        );
        // An empty snapshot_cache_path keeps no cache.
        let none = AISIX.replace("/var/lib/aisix/snapshot", "\"\"");
        assert_eq!(load(&none).unwrap().etcd_cache_dir(), None);
        // Without env_id resources sit right under the prefix; one with a '/' is refused.
        assert_eq!(
            load(&AISIX.replace("  env_id: prod\n", ""))
                .unwrap()
                .prefix(),
            "/aisix"
        );
        let err = load(&AISIX.replace("env_id: prod", "env_id: a/b"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("etcd.env_id"), "{err}");
        let err = load(&AISIX.replace("domain_name: etcd.internal", "domain_name: \"not a name\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("etcd.tls.domain_name"), "{err}");
        // Both spellings of the trusted proxies at once are refused.
        let both = AISIX.replace(
            "  workers: 2\n",
            "  workers: 2\n  trusted_proxies: [\"10.0.0.0/8\"]\n",
        );
        assert!(
            load(&both)
                .unwrap_err()
                .to_string()
                .contains("proxy.real_ip")
        );
        let bad = AISIX.replace("\"^/openai/(.*)$\"", "\"(unclosed\"");
        let err = load(&bad).unwrap_err().to_string();
        assert!(err.contains("proxy.url_rewrites.match"), "{err}");
        let zero = AISIX.replace("workers: 2", "workers: 0");
        assert!(
            load(&zero)
                .unwrap_err()
                .to_string()
                .contains("proxy.workers")
        );
    }

    #[test]
    fn otlp_tracing_takes_a_base_url_or_the_traces_url() {
        let with = |otlp: &str| {
            parse(&format!(
                "resources_file: r.yaml\nobservability:\n  service_name: edge-1\n  tracing:\n    otlp: {otlp}\n"
            ))
        };
        let c = with("{enabled: true, endpoint: \"http://collector:4318\", sample_ratio: 0.25}")
            .unwrap();
        let options = c.trace_options().unwrap().unwrap();
        assert_eq!(options.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(
            (options.sample_ratio, options.service_name.as_str()),
            (0.25, "edge-1")
        );
        let c = with("{enabled: true, endpoint: \"https://otel.example/custom/traces\"}").unwrap();
        assert_eq!(
            c.trace_options().unwrap().unwrap().endpoint,
            "https://otel.example/custom/traces"
        );
        // Off: nothing is started, whatever the endpoint says.
        assert!(
            with("{enabled: false, endpoint: \"nonsense\"}")
                .unwrap()
                .trace_options()
                .unwrap()
                .is_none()
        );
        let error = with("{enabled: true, endpoint: \"collector:4317\"}")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("observability.tracing.otlp.endpoint"),
            "{error}"
        );
        let error = with("{enabled: true, sample_ratio: -0.1}")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("observability.tracing.otlp.sample_ratio"),
            "{error}"
        );
    }

    #[test]
    fn redis_sections_are_read_as_aisix_spells_them_and_checked_by_field() {
        let c = parse("resources_file: r.yaml\n").unwrap();
        assert_eq!(c.ratelimit.backend, RateLimitBackend::Local);
        assert!(c.ratelimit.options().unwrap().is_none(), "local by default");
        let c = parse(
            "resources_file: r.yaml
ratelimit:
  backend: redis
  concurrency_ttl_secs: 30
  fail_mode: fail_closed
  redis: {mode: sentinel, sentinels: ['10.0.0.1:26379', '10.0.0.2:26379'], master_name: mymaster, username: u, password: hunter2, database: 2, tls: true, timeout_ms: 3}
cache:
  enabled: true
  backend: redis
  redis: {mode: cluster, nodes: ['10.0.0.1:7000'], tls: {ca_file: /dev/null}}
",
        )
        .unwrap();
        assert_eq!(c.ratelimit.fail_mode, LimitFailMode::Closed);
        assert_eq!(c.ratelimit.concurrency_ttl_secs, 30);
        let redis = c.ratelimit.redis.as_ref().unwrap();
        assert_eq!(redis.master_name.as_deref(), Some("mymaster"));
        assert_eq!((redis.database, redis.timeout_ms), (2, 3));
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "the password is redacted"
        );
        for (text, field) in [
            (
                "ratelimit: {backend: redis, redis: {url: 'http://x'}}",
                "ratelimit.redis.url",
            ),
            (
                "ratelimit: {backend: redis, redis: {mode: sentinel, sentinels: ['a:1']}}",
                "ratelimit.redis.master_name",
            ),
            (
                "ratelimit: {concurrency_ttl_secs: 0}",
                "ratelimit.concurrency_ttl_secs",
            ),
            ("ratelimit: {backend: memcached}", "ratelimit.backend"),
            ("ratelimit: {redis: {host: x}}", "ratelimit.redis"),
            (
                "cache: {enabled: true, backend: redis, redis: {mode: cluster}}",
                "cache.redis.nodes",
            ),
            (
                "cache: {enabled: true, redis: {tls: {ca_file: /nonexistent/ca.pem}}}",
                "cache.redis.tls.ca_file",
            ),
        ] {
            let e = parse(&format!("resources_file: r.yaml\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("{field}:")), "{text}: {e}");
        }
        let e = parse("resources_file: r.yaml\nratelimit: {redis: {url: 'redis://:hunter2@[x'}}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ratelimit.redis.url") && !e.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn defaults_and_ignored_sections() {
        let c = parse("resources_file: r.yaml\nratelimit: {}\nobservability:\n  metrics: {prometheus: {enabled: true}}\n").unwrap();
        assert_eq!(c.proxy.addr.to_string(), "0.0.0.0:3000");
        assert_eq!(c.proxy.request_body_limit_bytes, 64 * 1024 * 1024);
        assert_eq!(c.shutdown.min_drain_secs, 5);
        assert_eq!(c.upstream.pool_max_idle_per_host, Some(128));
        assert_eq!(c.proxy.thread_per_core, None);
        let one = parse("resources_file: r.yaml\nproxy:\n  workers: 1\n").unwrap();
        assert!(one.thread_per_core(), "one worker: a thread of its own");
        let two = parse("resources_file: r.yaml\nproxy:\n  workers: 2\n").unwrap();
        assert!(!two.thread_per_core(), "several: the shared runtime");
        assert!(c.ignored.is_empty(), "{:?}", c.ignored);
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
        assert!(
            c.cache.options().unwrap().is_none(),
            "the cache is off by default"
        );
        let c = parse("resources_file: r.yaml\ncache: {enabled: true, ttl_secs: 30}\n").unwrap();
        let cache = c.cache.options().unwrap().unwrap();
        assert_eq!((cache.ttl.as_secs(), cache.max_entries.get()), (30, 10_000));
        assert!(cache.redis.is_none(), "in memory by default");
        let e = parse("resources_file: r.yaml\ncache: {enabled: true, max_entries: 0}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cache.max_entries: must be greater than 0"),
            "{e}"
        );
        let e = parse("resources_file: r.yaml\ncache: {enabled: true, persist: true}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cache: unknown field `persist`"), "{e}");
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
    fn an_overridden_field_names_its_variable_and_addresses_get_a_hint() {
        let env = [("AISIX_PROXY__ADDR".to_owned(), "localhost:3000".to_owned())];
        let e = Config::parse(Path::new("c.yaml"), "resources_file: r.yaml\n", env)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "environment variable AISIX_PROXY__ADDR: proxy.addr: invalid socket address"
            ),
            "{e}"
        );
        assert!(
            e.contains("host names such as localhost are not accepted"),
            "{e}"
        );
        assert!(!e.contains("c.yaml"), "{e}");
        // The same mistake in the file blames the file.
        let e = parse("resources_file: r.yaml\nproxy: {addr: localhost:3000}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxy.addr: invalid socket address"), "{e}");
        assert!(e.contains("e.g. 127.0.0.1:3000"), "{e}");
    }

    #[test]
    fn every_problem_of_a_config_file_is_reported_at_once() {
        // Two typos, a value of the wrong type, one in a list, an environment variable
        // and a range check: each named, in one report.
        let text = "resources_file: r.yaml\nproxy:\n  adr: 127.0.0.1:1\n  max_connections: many\n  trusted_proxies: [10.0.0.0/8, nonsense]\nobservabilty: {}\nshutdown: {drain_timeout_secs: 18446744073709551615}\n";
        let env = vec![(
            "AISIX_PROXY__HEADER_READ_TIMEOUT_MS".to_owned(),
            "soon".to_owned(),
        )];
        let e = Config::parse(Path::new("c.yaml"), text, env).unwrap_err();
        let ConfigError::Several(errors) = &e else {
            panic!("expected several problems: {e}");
        };
        let shown = e.to_string();
        for expected in [
            "config file c.yaml: proxy: unknown field `adr`",
            "config file c.yaml: proxy.max_connections: invalid type",
            "config file c.yaml: proxy.trusted_proxies[1]:",
            "config file c.yaml: (top level): unknown field `observabilty`",
            "environment variable AISIX_PROXY__HEADER_READ_TIMEOUT_MS: proxy.header_read_timeout_ms:",
            "config file c.yaml: shutdown.drain_timeout_secs: must be at most 86400",
        ] {
            assert!(shown.contains(expected), "{expected}: {shown}");
        }
        assert_eq!(errors.len(), 6, "{shown}");
        assert_eq!(shown.lines().count(), 6, "{shown}");
        // One problem stays one error, as before.
        let one = parse("resources_file: r.yaml\nproxy: {adr: x}\n").unwrap_err();
        assert!(matches!(one, ConfigError::Field { .. }), "{one}");
    }

    #[test]
    fn numbers_past_what_the_runtime_can_take_are_refused_by_name() {
        // The review's value: above tokio's semaphore limit, it crashed the listener.
        for (yaml, expected) in [
            (
                "proxy: {max_connections: 2305843009213693952}",
                "proxy.max_connections: must be at most 1000000",
            ),
            (
                "proxy: {body_read_timeout_ms: 0}",
                "proxy.body_read_timeout_ms: must be at least 1",
            ),
            (
                "cache: {max_entries: 100000000000}",
                "cache.max_entries: must be at most 10000000",
            ),
            (
                "shutdown: {drain_timeout_secs: 18446744073709551615}",
                "shutdown.drain_timeout_secs: must be at most 86400",
            ),
        ] {
            let e = parse(&format!("resources_file: r.yaml\n{yaml}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{yaml}: {e}");
        }
        let e =
            parse("etcd: {endpoints: [http://127.0.0.1:2379], request_timeout_ms: 99999999999}\n")
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("etcd.request_timeout_ms: must be at most 600000"),
            "{e}"
        );
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
