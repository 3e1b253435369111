//! The config file's sections below the top level, their defaults and their checks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use proxy_core::secret::Secret;
use proxy_core::shared::redis::RedisOptions;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    /// `http://` or `https://` URLs; requests fail over between them in order.
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The environment's folder under the prefix (AISIX's key root
    /// `<prefix>/<env_id>/<kind>/<id>`); empty: resources sit right under the prefix.
    #[serde(default)]
    pub env_id: String,
    /// Connect timeout for each endpoint.
    #[serde(default = "default_etcd_timeout")]
    pub dial_timeout_ms: u64,
    /// Timeout of each request other than the long-lived watch.
    #[serde(default = "default_etcd_timeout")]
    pub request_timeout_ms: u64,
    /// etcd authentication (both or neither); `user` is AISIX's spelling.
    #[serde(alias = "user")]
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// The environment variable holding the password (AISIX's way: never in the file).
    pub password_env: Option<String>,
    /// TLS to etcd: a CA to trust and optionally a client certificate.
    pub tls: Option<EtcdTlsSection>,
    /// Where the last good snapshot is kept (a sled database), so the agent starts and
    /// serves while etcd is unreachable. Without it, start-up waits for etcd.
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsSection {
    #[serde(alias = "ca_cert_file")]
    pub ca_file: Option<PathBuf>,
    #[serde(alias = "client_cert_file")]
    pub cert_file: Option<PathBuf>,
    #[serde(alias = "client_key_file")]
    pub key_file: Option<PathBuf>,
    /// The name etcd's certificate is checked for, when it differs from the endpoints'
    /// host (an IP address, a load balancer).
    pub domain_name: Option<String>,
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
    #[serde(alias = "cp_ca_cert_file")]
    pub cp_ca_file: Option<PathBuf>,
    /// An extra CA to trust for the control plane's server certificate.
    pub cp_extra_ca_file: Option<PathBuf>,
    /// Holds `mtls/` (the bundle in use) and the snapshot cache.
    #[serde(default)]
    pub state_dir: PathBuf,
    /// Where the last good snapshot is kept in self-hosted mode (AISIX's spelling of
    /// `etcd.cache_dir`); `""` keeps none.
    pub snapshot_cache_path: Option<PathBuf>,
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

/// `cache`: the response cache (off unless enabled), in memory or in Redis.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    pub enabled: bool,
    pub backend: CacheBackend,
    /// The connection when `backend` is `redis` (default `redis://127.0.0.1:6379`).
    pub redis: Option<RedisOptions>,
    pub ttl_secs: u64,
    /// The memory cache's bound (Redis evicts by its own policy).
    pub max_entries: usize,
    /// Answers larger than this are not kept.
    pub max_entry_bytes: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    #[default]
    Memory,
    Redis,
}

impl Default for CacheSection {
    fn default() -> Self {
        Self {
            enabled: false,
            backend: CacheBackend::Memory,
            redis: None,
            ttl_secs: 300,
            max_entries: 10_000,
            max_entry_bytes: 1 << 20,
        }
    }
}

impl CacheSection {
    /// The proxy's cache options when the cache is on; connects to Redis in the
    /// background when the cache is there.
    pub fn options(
        &self,
    ) -> Result<Option<proxy_core::pipeline::cache::CacheOptions>, (String, String)> {
        // validate_proxy refuses `max_entries: 0` when the cache is on.
        let Some(max_entries) =
            std::num::NonZeroUsize::new(self.max_entries).filter(|_| self.enabled)
        else {
            return Ok(None);
        };
        let redis = match self.backend {
            CacheBackend::Memory => None,
            CacheBackend::Redis => Some(start_redis("cache", self.redis.as_ref())?),
        };
        Ok(Some(proxy_core::pipeline::cache::CacheOptions {
            ttl: std::time::Duration::from_secs(self.ttl_secs),
            max_entries,
            max_entry_bytes: self.max_entry_bytes,
            redis,
        }))
    }
}

/// `ratelimit`: where the rate-limit counters live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    pub backend: RateLimitBackend,
    /// The connection when `backend` is `redis` (default `redis://127.0.0.1:6379`).
    pub redis: Option<RedisOptions>,
    /// How long a concurrency slot outlives a replica that stopped renewing it.
    pub concurrency_ttl_secs: u64,
    /// While Redis cannot answer: `open` counts in this replica, `closed` refuses.
    pub fail_mode: LimitFailMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitBackend {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitFailMode {
    #[default]
    #[serde(alias = "fail_open")]
    Open,
    #[serde(alias = "fail_closed")]
    Closed,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            backend: RateLimitBackend::Local,
            redis: None,
            concurrency_ttl_secs: 60,
            fail_mode: LimitFailMode::Open,
        }
    }
}

impl RateLimitSection {
    /// The shared counters when `backend` is `redis`; connects in the background.
    pub fn options(
        &self,
    ) -> Result<Option<proxy_core::policy::ratelimit::SharedOptions>, (String, String)> {
        if self.backend == RateLimitBackend::Local {
            return Ok(None);
        }
        Ok(Some(proxy_core::policy::ratelimit::SharedOptions {
            redis: start_redis("ratelimit", self.redis.as_ref())?,
            lease_ttl: std::time::Duration::from_secs(self.concurrency_ttl_secs),
            fail_closed: self.fail_mode == LimitFailMode::Closed,
        }))
    }

    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if self.concurrency_ttl_secs == 0 {
            return Err((
                "ratelimit.concurrency_ttl_secs".to_owned(),
                "must be at least 1".to_owned(),
            ));
        }
        validate_redis("ratelimit", self.redis.as_ref())
    }
}

/// Checks a `<section>.redis` section; the field is named in full.
pub(super) fn validate_redis(
    section: &str,
    redis: Option<&RedisOptions>,
) -> Result<(), (String, String)> {
    match redis {
        Some(options) => options
            .validate()
            .map_err(|(field, message)| (format!("{section}.redis.{field}"), message)),
        None => Ok(()),
    }
}

fn start_redis(
    component: &'static str,
    redis: Option<&RedisOptions>,
) -> Result<proxy_core::shared::redis::Redis, (String, String)> {
    let default = RedisOptions::default();
    proxy_core::shared::redis::Redis::start(component, redis.unwrap_or(&default))
        .map_err(|(field, message)| (format!("{component}.redis.{field}"), message))
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
    /// `false` binds no admin listener.
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_admin_addr")]
    pub addr: SocketAddr,
    /// Accepted as `Authorization: Bearer <key>` or `x-api-key: <key>`.
    #[serde(default)]
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

fn default_true() -> bool {
    true
}

fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3001))
}

/// `proxy.request_body_limit_bytes` when the config does not say: 64 MiB.
pub const DEFAULT_BODY_LIMIT: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    pub addr: SocketAddr,
    /// Largest request body; larger ones get 413. 0 means unlimited. The default, 64 MiB,
    /// is above what the providers themselves accept (Anthropic 32 MB, OpenAI's
    /// 50 MB of images per request); a body in flight is held in memory once.
    pub request_body_limit_bytes: u64,
    pub request_id: RequestIdSection,
    /// Reverse proxies (CIDRs) whose `client_ip_header` is believed; from any other
    /// peer the header is ignored and the peer address is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The header trusted proxies put the client address in (a comma-separated list,
    /// nearest proxy last, like `x-forwarded-for`).
    pub client_ip_header: String,
    /// AISIX's spelling of `trusted_proxies` and `client_ip_header`, like nginx's
    /// `set_real_ip_from` and `real_ip_recursive`.
    pub real_ip: Option<RealIpSection>,
    /// Threads serving requests; by default one per core the process may run on
    /// (taskset and cgroup limits included).
    pub workers: Option<usize>,
    /// Serve the proxy listener with `workers` threads, each with a runtime, an
    /// `SO_REUSEPORT` listener and an upstream pool of its own, instead of one shared
    /// multi-threaded runtime. Unset: a thread per core when there is one worker
    /// ([`crate::config::Config::thread_per_core`]).
    pub thread_per_core: Option<bool>,
    /// Path rewrites before routing: the first rule whose pattern matches rewrites the
    /// path, once.
    pub url_rewrites: Vec<UrlRewriteSection>,
    /// Serve the proxy over HTTPS.
    pub tls: Option<ListenerTlsSection>,
    /// Open connections at most; past it new connections wait in the listen backlog.
    pub max_connections: usize,
    /// Time allowed for a TLS handshake and for each request's headers; idle
    /// keep-alive connections are closed after it.
    pub header_read_timeout_ms: u64,
    /// Largest request head (request line and headers); larger ones get 431.
    pub max_header_bytes: usize,
    /// Time allowed for a request body to arrive, plus its declared length at
    /// `min_body_rate_bytes_per_sec`; a body still missing after it gets 408.
    pub body_read_timeout_ms: u64,
    pub min_body_rate_bytes_per_sec: u64,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 3000)),
            request_body_limit_bytes: DEFAULT_BODY_LIMIT,
            request_id: RequestIdSection::default(),
            trusted_proxies: Vec::new(),
            client_ip_header: "x-forwarded-for".to_owned(),
            real_ip: None,
            workers: None,
            thread_per_core: None,
            url_rewrites: Vec::new(),
            tls: None,
            max_connections: 10_000,
            header_read_timeout_ms: 30_000,
            max_header_bytes: 64 * 1024,
            body_read_timeout_ms: 30_000,
            min_body_rate_bytes_per_sec: 64 * 1024,
        }
    }
}

/// `proxy.real_ip`: when the TCP peer is one of `trusted_proxies`, the client address
/// comes from `header`: its last address, or with `recursive` the last one that is not
/// itself a trusted proxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RealIpSection {
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub recursive: bool,
    pub header: String,
}

impl Default for RealIpSection {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            recursive: false,
            header: "x-forwarded-for".to_owned(),
        }
    }
}

/// One `proxy.url_rewrites` rule: a regex over the path and its replacement (`$1`,
/// `${name}`), in AISIX's spellings (`match`/`rewrite`) or `pattern`/`replacement`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrlRewriteSection {
    #[serde(default)]
    pub name: String,
    #[serde(rename = "match", alias = "pattern")]
    pub pattern: String,
    #[serde(rename = "rewrite", alias = "replacement")]
    pub replacement: String,
}

/// `downstream`: the caller side of answer streams.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownstreamSection {
    /// A stream quiet this long gets an SSE comment (`: keep-alive`), so proxies
    /// between the gateway and the caller keep it open; unset or 0: none.
    pub sse_keepalive_interval_secs: Option<u64>,
    /// AISIX's caller-side idle timeout: the wait for each request head on a
    /// connection, idle keep-alive time included; unset or 0: `proxy.header_read_timeout_ms`.
    pub idle_timeout_secs: Option<u64>,
}

/// `upstream`: defaults for every provider call (a model's own `timeout` and
/// `stream_timeout` win) and the upstream connection pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSection {
    /// A whole answer, or a stream's first event, within this.
    pub timeout_ms: u64,
    /// The longest gap between stream events; unset: only `timeout_ms` bounds a stream.
    pub stream_timeout_ms: Option<u64>,
    pub connect_timeout_ms: u64,
    /// TCP keep-alive probes on upstream connections: idle time, interval, count.
    pub tcp_keepalive_secs: Option<u64>,
    pub tcp_keepalive_interval_secs: Option<u64>,
    pub tcp_keepalive_retries: Option<u32>,
    /// Idle pooled connections are closed after this.
    pub pool_idle_timeout_secs: u64,
    /// Idle connections kept per upstream host (default 128).
    pub pool_max_idle_per_host: Option<usize>,
    /// Retries of a model (or routing model) that sets none of its own.
    pub retries: u32,
    pub tls: UpstreamTlsSection,
}

/// `upstream.tls`: provider calls' TLS beyond the system's roots.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTlsSection {
    /// PEM CA certificates trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) and its key, for providers that ask for one.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// `false` accepts any upstream certificate: for a test bench only.
    pub verify: bool,
}

impl Default for UpstreamTlsSection {
    fn default() -> Self {
        Self {
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            verify: true,
        }
    }
}

impl UpstreamTlsSection {
    /// The files read and checked; errors name the field, never a key's bytes.
    pub(super) fn load(
        &self,
    ) -> Result<proxy_core::providers::client::UpstreamTls, (&'static str, String)> {
        let read = |field: &'static str, path: &Path| {
            std::fs::read(path).map_err(|e| (field, format!("cannot read {}: {e}", path.display())))
        };
        let extra_roots = match &self.ca_file {
            None => Vec::new(),
            Some(path) => {
                let pem = read("upstream.tls.ca_file", path)?;
                proxy_core::providers::connect::certificates_from_pem(&pem).ok_or((
                    "upstream.tls.ca_file",
                    format!("{}: no PEM certificate in it", path.display()),
                ))?
            }
        };
        let identity = match (&self.client_cert_file, &self.client_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let identity = proxy_core::providers::connect::Identity::from_pem(
                    &read("upstream.tls.client_cert_file", cert)?,
                    &read("upstream.tls.client_key_file", key)?,
                )
                .ok_or_else(|| {
                    (
                        "upstream.tls.client_key_file",
                        format!(
                            "{} and {} are not a PEM certificate and its private key",
                            cert.display(),
                            key.display()
                        ),
                    )
                })?;
                Some(identity)
            }
            (Some(_), None) => {
                return Err((
                    "upstream.tls.client_key_file",
                    "required with client_cert_file".to_owned(),
                ));
            }
            (None, Some(_)) => {
                return Err((
                    "upstream.tls.client_cert_file",
                    "required with client_key_file".to_owned(),
                ));
            }
        };
        Ok(proxy_core::providers::client::UpstreamTls {
            extra_roots,
            identity,
            verify: self.verify,
        })
    }
}

impl Default for UpstreamSection {
    fn default() -> Self {
        Self {
            timeout_ms: 600_000,
            stream_timeout_ms: None,
            connect_timeout_ms: 10_000,
            tcp_keepalive_secs: None,
            tcp_keepalive_interval_secs: None,
            tcp_keepalive_retries: None,
            pool_idle_timeout_secs: 90,
            pool_max_idle_per_host: Some(proxy_core::providers::client::DEFAULT_POOL_MAX_IDLE),
            retries: 0,
            tls: UpstreamTlsSection::default(),
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
    /// `service.name` on exported traces and metrics.
    pub service_name: String,
    pub metrics: MetricsSection,
    pub tracing: TracingSection,
}

impl Default for ObservabilitySection {
    fn default() -> Self {
        Self {
            log_level: "info".to_owned(),
            log_format: LogFormat::Text,
            access_log: true,
            service_name: "aisix-agent".to_owned(),
            metrics: MetricsSection::default(),
            tracing: TracingSection::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    pub prometheus: PrometheusSection,
    pub otlp: OtlpMetricsSection,
    /// AISIX's `client_type` label: the first rule whose `pattern` matches a request's
    /// `User-Agent` names its `client`; `other` when none does.
    pub client_type_rules: Vec<ClientTypeRuleSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTypeRuleSection {
    pub pattern: String,
    pub client: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSection {
    pub otlp: OtlpTracesSection,
}

/// `observability.tracing.otlp`: spans to an OpenTelemetry collector, OTLP/HTTP
/// protobuf.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpTracesSection {
    pub enabled: bool,
    /// The collector: a base URL (`http://collector:4318`, `/v1/traces` is added) or
    /// the full traces URL.
    pub endpoint: String,
    /// Share of new traces recorded, 0 to 1; a caller's `traceparent` decision wins.
    pub sample_ratio: f64,
    /// Per export request, retries included.
    pub timeout_ms: u64,
}

impl Default for OtlpTracesSection {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: "http://127.0.0.1:4318".to_owned(),
            sample_ratio: 1.0,
            timeout_ms: 5_000,
        }
    }
}

/// `observability.metrics.otlp`: the metrics pushed to an OpenTelemetry collector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpMetricsSection {
    pub enabled: bool,
    /// A base URL (`/v1/metrics` is added) or the full metrics URL.
    pub endpoint: String,
    pub interval_secs: u64,
    pub timeout_ms: u64,
}

impl Default for OtlpMetricsSection {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: "http://127.0.0.1:4318".to_owned(),
            interval_secs: 60,
            timeout_ms: 5_000,
        }
    }
}

/// The OTLP/HTTP URL of a signal: `endpoint` as given when it has a path, else with
/// `/v1/<signal>` added. Only `http` and `https` (OTLP over gRPC is not spoken).
pub fn otlp_url(endpoint: &str, signal: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(endpoint).map_err(|e| format!("'{endpoint}': {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!(
            "'{endpoint}': an http:// or https:// URL of an OTLP/HTTP receiver is required (port 4318 by convention; gRPC is not supported)"
        ));
    }
    if url.path() == "/" {
        return Ok(format!("{}/v1/{signal}", endpoint.trim_end_matches('/')));
    }
    Ok(endpoint.to_owned())
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

impl ManagedSection {
    pub(super) fn validate(&self) -> Result<(), (&'static str, String)> {
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
        self.validate_figures()
    }

    /// Every figure above zero and within its bound.
    fn validate_figures(&self) -> Result<(), (&'static str, String)> {
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
        at_most(&[
            (
                "managed.heartbeat_interval_secs",
                self.heartbeat_interval_secs,
                3_600,
            ),
            (
                "managed.connect_timeout_ms",
                self.connect_timeout_ms,
                600_000,
            ),
            (
                "managed.request_timeout_ms",
                self.request_timeout_ms,
                600_000,
            ),
            ("managed.budget.timeout_ms", self.budget.timeout_ms, 600_000),
            (
                "managed.usage.queue_max_events",
                self.usage.queue_max_events,
                100_000_000,
            ),
            (
                "managed.usage.batch_size",
                self.usage.batch_size as u64,
                100_000,
            ),
            (
                "managed.usage.flush_interval_ms",
                self.usage.flush_interval_ms,
                3_600_000,
            ),
        ])
    }
}

impl EtcdSection {
    pub(super) fn validate(&self) -> Result<(), (&'static str, String)> {
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
        if self.env_id.contains('/') || self.env_id.chars().any(char::is_control) {
            return Err((
                "etcd.env_id",
                format!("'{}' must be one folder name, without '/'", self.env_id),
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
        at_most(&[
            ("etcd.dial_timeout_ms", self.dial_timeout_ms, 600_000),
            ("etcd.request_timeout_ms", self.request_timeout_ms, 600_000),
        ])?;
        if self.username.is_some() != self.password.is_some() {
            return Err((
                "etcd.username",
                "username and password go together: set both or neither".to_owned(),
            ));
        }
        if let Some(tls) = &self.tls {
            if let Some(name) = &tls.domain_name
                && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
            {
                return Err((
                    "etcd.tls.domain_name",
                    format!("'{name}' is not a DNS name or an IP address"),
                ));
            }
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

/// The first field above its bound, as an error. Bounds keep every figure within what
/// the runtime can take (a semaphore's permits, a timer's range) and within reason.
pub(super) fn at_most(checks: &[(&'static str, u64, u64)]) -> Result<(), (&'static str, String)> {
    for &(field, value, most) in checks {
        if value > most {
            return Err((field, format!("must be at most {most}")));
        }
    }
    Ok(())
}
