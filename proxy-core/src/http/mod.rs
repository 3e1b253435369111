//! The proxy listener: routes, request ids, access log and graceful drain.
//!
//! Layout:
//! - `mod.rs`: state, router, the request-context middleware and `serve`.
//! - `basic.rs`: `/livez`, `/readyz`, `/v1/models`, caller authentication and
//!   fallbacks.
//! - `endpoint.rs`: the model-routed endpoints and what each adapter makes of them.
//! - `call.rs`: one model-routed call (chat completions, messages, count_tokens,
//!   completions, embeddings, responses, rerank, audio, images).
//! - `passthrough.rs`: `ANY /passthrough/{provider}/{*rest}`.

mod basic;
mod call;
mod endpoint;
mod listener;
mod passthrough;
mod record;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
pub use axum::http::HeaderName;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{MethodRouter, any, get, post};
use axum::{Extension, Router};
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;

use crate::budget::BudgetGate;
use crate::cache::{CacheOptions, ResponseCache};
use crate::error::{Envelope, ProxyError};
use crate::health::ModelHealth;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::routing::RoutingState;
use crate::snapshot::SnapshotStore;
use crate::usage::UsageSink;

use crate::upstream::Upstream;
pub use basic::livez_response;
use endpoint::Endpoint;
pub use listener::{ListenerOptions, serve};
pub use record::{ErrorType, Record, route_label};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-aisix-request-id");
pub const CALL_ID: HeaderName = HeaderName::from_static("x-aisix-call-id");
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-aisix-served-by");
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("x-aisix-cache");

/// Proxy listener settings (the `proxy` section of the config file).
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Largest accepted request body; `None` means unlimited.
    pub body_limit: Option<usize>,
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
    /// The response cache of non-streaming chat completions; `None`: off.
    pub cache: Option<CacheOptions>,
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

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            body_limit: None,
            max_header_bytes: 64 * 1024,
            request_id_headers: Vec::new(),
            access_log: false,
            trusted_proxies: Vec::new(),
            client_ip_header: HeaderName::from_static("x-forwarded-for"),
            cache: None,
        }
    }
}

/// The client's address: the peer's, unless the peer is a trusted proxy; then the
/// rightmost address in `client_ip_header` that is not itself a trusted proxy (what
/// the nearest untrusted hop connected from). A missing or unparsable header means
/// the peer.
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
    hops.iter()
        .rev()
        .find(|ip| !trusted(ip))
        .or(hops.first())
        .copied()
        .unwrap_or(peer)
}

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct ProxyState(Arc<Inner>);

struct Inner {
    store: Arc<SnapshotStore>,
    upstream: Upstream,
    options: ProxyOptions,
    draining: CancellationToken,
    started_unix: u64,
    health: Arc<ModelHealth>,
    hooks: Hooks,
    routing: RoutingState,
    limiter: Arc<RateLimiter>,
    cache: Option<ResponseCache>,
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
        let cache = options.cache.map(ResponseCache::new);
        Self(Arc::new(Inner {
            store,
            upstream,
            options,
            draining,
            started_unix,
            health,
            hooks,
            routing: RoutingState::default(),
            limiter: Arc::default(),
            cache,
        }))
    }

    /// Upstream failure streaks per model, recorded by the request handlers.
    pub fn health(&self) -> Arc<ModelHealth> {
        self.0.health.clone()
    }
}

pub fn router(state: ProxyState) -> Router {
    let mut router = Router::new()
        .route("/livez", get(basic::livez))
        .route("/readyz", get(basic::readyz))
        .route("/v1/models", get(basic::list_models))
        .route("/v1/chat/completions", routed(Endpoint::ChatCompletions))
        .route("/v1/messages", routed(Endpoint::Messages))
        .route("/v1/messages/count_tokens", routed(Endpoint::CountTokens));
    for path in endpoint::FORWARDED {
        router = router.route(path, routed(Endpoint::Forward(path)));
    }
    router
        .route("/passthrough/{provider}/{*rest}", any(passthrough::handle))
        .fallback(basic::unknown_route)
        .method_not_allowed_fallback(basic::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_context,
        ))
        .with_state(state)
}

/// `POST` of a model-routed endpoint.
fn routed(endpoint: Endpoint) -> MethodRouter<ProxyState> {
    post(
        move |State(state): State<ProxyState>,
              ConnectInfo(peer): ConnectInfo<SocketAddr>,
              Extension(record): Extension<Record>,
              headers: HeaderMap,
              body: Body| call::run(endpoint, state, peer, record, headers, body),
    )
}

async fn request_context(
    State(state): State<ProxyState>,
    mut req: Request,
    next: Next,
) -> Response {
    let id: Arc<str> = request_id(req.headers(), &state.0.options.request_id_headers).into();
    let record = Record::new(id.clone());
    req.extensions_mut().insert(record.clone());
    let started = tokio::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let limit = state.0.options.max_header_bytes;
    let mut response = if head_size(&req) > limit {
        let error = ProxyError::HeadersTooLarge { limit };
        match path.starts_with("/v1/messages") {
            true => error.into_response_in(Envelope::Anthropic),
            false => error.into_response_in(Envelope::OpenAi),
        }
    } else {
        next.run(req).await
    };
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    if state.0.draining.is_cancelled() {
        // HTTP/1.1: hyper closes the connection after this response, so keep-alive
        // clients reconnect (to another replica) instead of holding on to this one.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let finish = record::Finish {
        metrics: state.0.hooks.metrics.clone(),
        access_log: state.0.options.access_log,
        method,
        path,
        status: response.status().as_u16(),
        served_by: response
            .headers()
            .get(SERVED_BY)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        error_type: response.extensions().get::<ErrorType>().map(|e| e.0),
        record,
        started,
    };
    response.map(|body| Body::new(record::Logged::new(body, finish)))
}

/// The size of a request's head as sent: request line and header lines.
fn head_size(req: &Request) -> usize {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + line
}

/// The caller's own well-formed id, or a fresh UUID.
fn request_id(headers: &HeaderMap, accepted: &[HeaderName]) -> String {
    std::iter::once(&REQUEST_ID)
        .chain(accepted)
        .filter_map(|name| headers.get(name)?.to_str().ok())
        .find(|v| well_formed_id(v))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

fn well_formed_id(v: &str) -> bool {
    (1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        let accepted = [HeaderName::from_static("x-request-id")];
        h.insert("x-request-id", HeaderValue::from_static("ingress-1"));
        assert_eq!(request_id(&h, &accepted), "ingress-1");
        assert_ne!(request_id(&h, &[]), "ingress-1");
        h.insert(REQUEST_ID, HeaderValue::from_static("mine-2"));
        assert_eq!(request_id(&h, &accepted), "mine-2");
        h.insert(REQUEST_ID, HeaderValue::from_static("bad id with spaces"));
        assert_eq!(request_id(&h, &accepted), "ingress-1");
        assert_eq!(request_id(&HeaderMap::new(), &[]).len(), 36);
        assert!(!well_formed_id(&"x".repeat(129)));
    }

    #[test]
    fn client_addresses_come_from_trusted_proxies_only() {
        let options = ProxyOptions {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            ..ProxyOptions::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", HeaderValue::from_str(value).unwrap());
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
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &options), proxy);
    }
}
