//! What every request of the pipeline shares: the state, the options, the hooks, the
//! gateway's own headers, and the call being served.

use crate::observe::trace::Tracing;
use crate::policy::guardrails::Detectors;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cache::{CacheOptions, ResponseCache};
use super::routing::RoutingState;
use crate::formats::endpoint::Endpoint;
use crate::hooks::{BudgetGate, UsageSink};
use crate::observe::metrics::Metrics;
use crate::observe::record::Record;
use crate::policy::health::ModelHealth;
use crate::policy::ratelimit::{RateLimiter, SharedOptions};
use crate::providers::client::Upstream;
use crate::shared::redis::Redis;
use crate::snapshot::SnapshotStore;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-aisix-request-id");
pub const CALL_ID: HeaderName = HeaderName::from_static("x-aisix-call-id");
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-aisix-served-by");
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("x-aisix-cache");

/// Proxy listener settings (the `proxy` section of the config file).
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Largest accepted request body; `None` means unlimited.
    pub body_limit: Option<usize>,
    /// How long a request body may take to arrive, plus its declared length at
    /// `min_body_rate` bytes per second: a slow upload of a large body is not cut, a
    /// stalled one is (408).
    pub body_read_timeout: Duration,
    pub min_body_rate: u64,
    /// Largest accepted request head (request line and headers); larger ones are
    /// refused with 431 in the route's envelope.
    pub max_header_bytes: usize,
    /// Extra headers, besides `x-aisix-request-id`, whose value may be adopted as the
    /// request id (e.g. `x-request-id`), in order of preference.
    pub request_id_headers: Vec<HeaderName>,
    /// Write one access-log line per request.
    pub access_log: bool,
    /// Peers whose `client_ip_header` is believed (reverse proxies).
    pub trusted_proxies: Vec<IpNet>,
    pub client_ip_header: HeaderName,
    /// The client is the header's last address that is not a trusted proxy (nginx's
    /// `real_ip_recursive on`); else its last address.
    pub real_ip_recursive: bool,
    /// The response cache of non-streaming chat completions; `None`: off.
    pub cache: Option<CacheOptions>,
    /// Rate-limit counters shared by replicas in Redis; `None`: this process's only.
    pub shared_limits: Option<SharedOptions>,
    /// OpenTelemetry spans exported over OTLP; `None`: none recorded.
    pub tracing: Option<Tracing>,
    /// Path rewrites applied before routing: the first whose pattern matches, once.
    pub url_rewrites: Arc<[UrlRewrite]>,
    /// The request metrics' `client_type` by `User-Agent`: the first rule that matches;
    /// none: the label is empty.
    pub client_types: Arc<[ClientTypeRule]>,
    /// A quiet answer stream gets a comment this often; `None`: never.
    pub sse_keepalive: Option<Duration>,
}

/// A path rewrite (AISIX's `proxy.url_rewrites`): a request whose path matches
/// `pattern` is routed as `pattern` replaced by `replacement` (`$1`... name groups).
#[derive(Debug, Clone)]
pub struct UrlRewrite {
    pub name: String,
    pub pattern: regex::Regex,
    pub replacement: String,
}

/// One `client_type` rule (AISIX's `observability.metrics.client_type_rules`).
#[derive(Debug, Clone)]
pub struct ClientTypeRule {
    pub pattern: regex::Regex,
    pub client: Arc<str>,
}

impl ProxyOptions {
    /// The `client_type` of a request with these headers: the first rule matching its
    /// `User-Agent`, `other` when none does, empty when there are no rules.
    pub fn client_type(&self, headers: &axum::http::HeaderMap) -> Option<Arc<str>> {
        if self.client_types.is_empty() {
            return None;
        }
        let agent = headers
            .get(axum::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let rule = self.client_types.iter().find(|r| r.pattern.is_match(agent));
        Some(rule.map_or_else(|| Arc::from("other"), |r| r.client.clone()))
    }

    /// The Redis connections these options use (shared limits, shared cache).
    pub fn redis(&self) -> Vec<Redis> {
        let limits = self.shared_limits.as_ref().map(|s| s.redis.clone());
        let cache = self.cache.as_ref().and_then(|c| c.redis.clone());
        limits.into_iter().chain(cache).collect()
    }
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            body_limit: None,
            body_read_timeout: Duration::from_secs(30),
            min_body_rate: 64 * 1024,
            max_header_bytes: 64 * 1024,
            request_id_headers: Vec::new(),
            access_log: false,
            trusted_proxies: Vec::new(),
            client_ip_header: HeaderName::from_static("x-forwarded-for"),
            real_ip_recursive: true,
            cache: None,
            shared_limits: None,
            tracing: None,
            url_rewrites: Arc::from([]),
            client_types: Arc::from([]),
            sse_keepalive: None,
        }
    }
}

/// What the proxy asks of its environment, when there is one to ask (managed mode).
#[derive(Clone, Default)]
pub struct Hooks {
    /// Asked before dispatch; without one every request is allowed.
    pub budget: Option<Arc<dyn BudgetGate>>,
    /// Receives one event per dispatched request.
    pub usage: Option<Arc<dyn UsageSink>>,
    /// Where request metrics are counted (the agent serves them).
    pub metrics: Arc<Metrics>,
}

/// Everything a request needs; cheap to clone.
#[derive(Clone)]
pub struct ProxyState(pub(crate) Arc<Inner>);

pub(crate) struct Inner {
    pub store: Arc<SnapshotStore>,
    pub upstream: Upstream,
    /// Guardrails' detector services: their client and circuits.
    pub detectors: Arc<Detectors>,
    pub options: ProxyOptions,
    pub draining: CancellationToken,
    pub started_unix: u64,
    pub health: Arc<ModelHealth>,
    pub hooks: Hooks,
    pub routing: Arc<RoutingState>,
    pub limiter: Arc<RateLimiter>,
    pub cache: Option<Arc<ResponseCache>>,
}

impl ProxyState {
    /// `draining` is cancelled when shutdown begins: liveness then fails while
    /// in-flight requests finish.
    pub fn new(
        store: Arc<SnapshotStore>,
        upstream: Upstream,
        options: ProxyOptions,
        draining: CancellationToken,
        health: Arc<ModelHealth>,
        hooks: Hooks,
    ) -> Self {
        let started_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let cache = options
            .cache
            .clone()
            .map(|c| Arc::new(ResponseCache::new(c)));
        let limiter = Arc::new(RateLimiter::new(options.shared_limits.clone()));
        let routing = Arc::new(RoutingState::with_default_retries(
            upstream.default_retries(),
        ));
        let detectors = Arc::new(Detectors::new(upstream.client().clone()));
        Self(Arc::new(Inner {
            detectors,
            store,
            upstream,
            options,
            draining,
            started_unix,
            health,
            hooks,
            routing,
            limiter,
            cache,
        }))
    }

    /// The same proxy (snapshot, limits, cache, routing credits, detector circuits,
    /// hooks) sending through `upstream`: for a worker with a runtime of its own,
    /// whose upstream connections must live on that runtime.
    pub fn with_upstream(&self, upstream: Upstream) -> Self {
        let inner = &self.0;
        Self(Arc::new(Inner {
            detectors: Arc::new(inner.detectors.with_client(upstream.client().clone())),
            store: inner.store.clone(),
            upstream,
            options: inner.options.clone(),
            draining: inner.draining.clone(),
            started_unix: inner.started_unix,
            health: inner.health.clone(),
            hooks: inner.hooks.clone(),
            routing: inner.routing.clone(),
            limiter: inner.limiter.clone(),
            cache: inner.cache.clone(),
        }))
    }

    /// The client provider calls go through.
    pub fn upstream(&self) -> &Upstream {
        &self.0.upstream
    }

    /// Upstream failure streaks per model, recorded by the request handlers.
    pub fn health(&self) -> Arc<ModelHealth> {
        self.0.health.clone()
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.0
    }
}

/// One call: its endpoint, ids and when it began.
pub(crate) struct Call {
    pub endpoint: Endpoint,
    pub request_id: Arc<str>,
    /// `x-aisix-call-id`, also the usage event's id.
    pub call_id: String,
    pub started: Instant,
    /// Facts for the access log and metrics.
    pub record: Record,
}

impl Call {
    /// `rules` at `stage`, their verdicts going to this call's record.
    pub fn guardrails<'a>(
        &'a self,
        rules: &'a [Arc<crate::resources::Guardrail>],
        stage: crate::policy::guardrails::Stage,
        state: &'a Inner,
    ) -> crate::policy::guardrails::Chain<'a> {
        crate::policy::guardrails::Chain {
            rules,
            stage,
            request_id: &self.request_id,
            record: &self.record,
            metrics: &state.hooks.metrics,
            detectors: &state.detectors,
        }
    }
}

/// The client's address: the peer's, unless the peer is a trusted proxy; then the
/// rightmost address in `client_ip_header` that is not itself a trusted proxy (what
/// the nearest untrusted hop connected from), or without `real_ip_recursive` simply
/// the rightmost. A missing or unparsable header means the peer.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, options: &ProxyOptions) -> IpAddr {
    let trusted = |ip: &IpAddr| options.trusted_proxies.iter().any(|net| net.contains(ip));
    if !trusted(&peer) {
        return peer;
    }
    let mut hops = Vec::new();
    for value in headers.get_all(&options.client_ip_header) {
        let Ok(text) = value.to_str() else {
            return peer;
        };
        for hop in text.split(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(ip),
                Err(_) => return peer,
            }
        }
    }
    if !options.real_ip_recursive {
        return hops.last().copied().unwrap_or(peer);
    }
    hops.iter()
        .rev()
        .find(|ip| !trusted(ip))
        .or(hops.first())
        .copied()
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn client_addresses_come_from_trusted_proxies_only() {
        let options = ProxyOptions {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            ..ProxyOptions::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                "x-forwarded-for",
                axum::http::HeaderValue::from_str(value).unwrap(),
            );
            h
        };
        let proxy = ip("10.0.0.5");
        let stranger = ip("198.51.100.7");
        // Not from a trusted proxy: the header is ignored.
        assert_eq!(client_ip(stranger, &with("192.0.2.1"), &options), stranger);
        // From one: the rightmost untrusted hop (a caller cannot prepend its way in).
        assert_eq!(
            client_ip(proxy, &with("192.0.2.1"), &options),
            ip("192.0.2.1")
        );
        assert_eq!(
            client_ip(proxy, &with("10.9.9.9, 192.0.2.1, 10.0.0.7"), &options),
            ip("192.0.2.1")
        );
        // Only proxies: the first one; nothing usable: the peer.
        assert_eq!(
            client_ip(proxy, &with("10.1.1.1, 10.2.2.2"), &options),
            ip("10.1.1.1")
        );
        assert_eq!(client_ip(proxy, &with("nonsense"), &options), proxy);
        // Not recursive (nginx's default): the last address, trusted or not.
        let last = ProxyOptions {
            real_ip_recursive: false,
            ..options.clone()
        };
        assert_eq!(
            client_ip(proxy, &with("192.0.2.1, 10.0.0.7"), &last),
            ip("10.0.0.7")
        );
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &options), proxy);
    }
}
