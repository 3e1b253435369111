//! The proxy listener: routes, request ids, access log and graceful drain.
//!
//! Layout:
//! - `mod.rs`: the proxy's service (model-routed `POST`s straight to the pipeline, the
//!   router for the rest) and the request context (request id, head size, drain, the
//!   access record).
//! - `basic.rs`: `/livez`, `/readyz`, `/v1/models` and the fallbacks.
//! - `listener.rs`: the accept loop (TLS, header timeout, connection limit) and drain.

mod basic;
mod listener;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
pub use axum::http::HeaderName;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{MethodRouter, any, get, post};
use axum::{Extension, Router};
use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;

use crate::failure::{Envelope, ErrorType, ProxyError};
use crate::formats::endpoint::{self, Endpoint};
use crate::observe::record::{self, Record};
use crate::pipeline::{self, REQUEST_ID, SERVED_BY};

pub use crate::observe::record::route_label;
pub use crate::pipeline::{ClientTypeRule, Hooks, ProxyOptions, ProxyState, UrlRewrite};
pub use basic::{livez_response, readyz_response};
pub use listener::{App, ListenerOptions, serve};

/// The proxy listener's service ([`Proxy`]).
pub fn router(state: ProxyState) -> Proxy {
    Proxy {
        rewrites: state.0.options.url_rewrites.clone(),
        router: routes(state.clone()),
        state,
    }
}

/// The proxy listener's service: its path rewritten first (`url_rewrites`), a
/// model-routed `POST` goes straight to the pipeline, and every other request (probes,
/// `/v1/models`, passthrough, other methods, unknown routes) through axum's router.
/// Both run [`in_context`]. The router's matching, middleware, boxed handler and
/// extension inserts cost a call about 5 k instructions and 17 allocations (of 80),
/// for a choice that is a string comparison.
#[derive(Clone)]
pub struct Proxy {
    state: ProxyState,
    rewrites: Arc<[UrlRewrite]>,
    router: Router,
}

impl Proxy {
    pub async fn call(self, request: http::Request<Incoming>, peer: SocketAddr) -> Response {
        let mut request = request.map(Body::new);
        detach_headers(request.headers_mut());
        if !self.rewrites.is_empty() {
            // Rewritten before routing, so the new path is routed (and logged) as sent.
            request = rewrite(&self.rewrites, request);
        }
        match model_routed(&request) {
            Some(endpoint) => {
                let state = self.state.clone();
                in_context(&self.state, request, move |request, record| {
                    // The headers are moved out, not cloned as axum's `HeaderMap`
                    // extractor does.
                    let (parts, body) = request.into_parts();
                    pipeline::call(endpoint, state, peer, record, parts.headers, body)
                })
                .await
            }
            None => {
                // A passthrough call lasts as long as a model-routed one and keeps
                // its URI (the model-routed path drops it before the call).
                detach_uri(request.uri_mut());
                listener::via_router(self.router, request, peer).await
            }
        }
    }
}

/// hyper's header values (and the path) are slices of the connection's read buffer
/// and keep all of it (8 KiB) alive while the call lasts, and hyper reads on into a
/// buffer of its own meanwhile, to notice a caller hanging up. Moved into one
/// allocation their size, a call in flight holds one read buffer, not two.
fn detach_headers(headers: &mut HeaderMap) {
    let size = headers.values().map(HeaderValue::len).sum();
    let mut block = BytesMut::with_capacity(size);
    for value in headers.values() {
        block.extend_from_slice(value.as_bytes());
    }
    let mut block = block.freeze();
    for value in headers.values_mut() {
        let own = block.split_to(value.len());
        if let Ok(mut own) = HeaderValue::from_maybe_shared(own) {
            own.set_sensitive(value.is_sensitive());
            *value = own;
        }
    }
}

/// The path and query in an allocation of their own (see [`detach_headers`]).
fn detach_uri(uri: &mut http::Uri) {
    let Some(own) = uri
        .path_and_query()
        .map(|p| Bytes::copy_from_slice(p.as_str().as_bytes()))
        .and_then(|p| http::uri::PathAndQuery::from_maybe_shared(p).ok())
    else {
        return;
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(own);
    if let Ok(detached) = http::Uri::from_parts(parts) {
        *uri = detached;
    }
}

/// The endpoint of a model-routed `POST` (what [`routes`] routes with [`routed`]).
fn model_routed(request: &Request) -> Option<Endpoint> {
    if request.method() != http::Method::POST {
        return None;
    }
    match request.uri().path() {
        "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
        "/v1/messages" => Some(Endpoint::Messages),
        "/v1/messages/count_tokens" => Some(Endpoint::CountTokens),
        path => endpoint::FORWARDED
            .iter()
            .find(|forwarded| **forwarded == path)
            .map(|forwarded| Endpoint::Forward(forwarded)),
    }
}

/// The request with its path rewritten by the first matching rule; the query stays.
fn rewrite(rules: &[UrlRewrite], mut request: Request) -> Request {
    let path = request.uri().path();
    let Some(rule) = rules.iter().find(|r| r.pattern.is_match(path)) else {
        return request;
    };
    let mut rewritten = rule
        .pattern
        .replace(path, rule.replacement.as_str())
        .into_owned();
    if let Some(query) = request.uri().query() {
        rewritten.push('?');
        rewritten.push_str(query);
    }
    // A replacement that makes no valid path leaves the request as it was.
    if let Ok(path_and_query) = rewritten.parse::<http::uri::PathAndQuery>() {
        let mut parts = request.uri().clone().into_parts();
        parts.path_and_query = Some(path_and_query);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    request
}

fn routes(state: ProxyState) -> Router {
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
        .route("/passthrough/{provider}/{*rest}", any(passthrough))
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
              request: Request| {
            // The headers are moved out, not cloned as axum's `HeaderMap` extractor does.
            let (parts, body) = request.into_parts();
            pipeline::call(endpoint, state, peer, record, parts.headers, body)
        },
    )
}

/// `ANY /passthrough/{provider}/{*rest}`.
async fn passthrough(
    State(state): State<ProxyState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(record): Extension<Record>,
    Path((provider, _)): Path<(String, String)>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    pipeline::passthrough::passthrough(state, record, peer, provider, method, uri, headers, body)
        .await
}

/// [`in_context`] as axum middleware: the record goes to the handler as an extension.
async fn request_context(State(state): State<ProxyState>, req: Request, next: Next) -> Response {
    in_context(&state, req, |mut req, record| {
        req.extensions_mut().insert(record);
        next.run(req)
    })
    .await
}

/// Runs `inner` on `req` with its context: request id, head size, drain, the access
/// record (handed to `inner`), and the access line and metrics once the answer ends.
async fn in_context<F, Fut>(state: &ProxyState, req: Request, inner: F) -> Response
where
    F: FnOnce(Request, Record) -> Fut,
    Fut: Future<Output = Response>,
{
    let id: Arc<str> = request_id(req.headers(), &state.0.options.request_id_headers).into();
    let started = tokio::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let route = record::route_label(&path);
    // Probes are not traffic (see `Finish`).
    let traffic = !record::is_probe(route);
    let trace = (state.0.options.tracing.as_ref())
        .filter(|_| traffic)
        .and_then(|tracing| tracing.server(req.headers(), &method, route));
    let counted = traffic.then(|| (state.0.hooks.metrics.clone(), route));
    let record = Record::with_in_flight(id.clone(), trace, counted);
    let in_flight = traffic.then(|| record::InFlight(record.clone()));
    let unanswered = traffic
        .then(|| record::Unanswered::new(state.0.hooks.metrics.clone(), route, record.clone()));
    let client_type = state.0.options.client_type(req.headers());
    let limit = state.0.options.max_header_bytes;
    let too_large = if head_size(&req) > limit {
        Some(ProxyError::HeadersTooLarge { limit })
    } else if req.headers().len() > MAX_HEADER_LINES {
        Some(ProxyError::TooManyHeaders {
            limit: MAX_HEADER_LINES,
        })
    } else {
        None
    };
    let mut response = if let Some(error) = too_large {
        match path.starts_with("/v1/messages") {
            true => error.into_response_in(Envelope::Anthropic),
            false => error.into_response_in(Envelope::OpenAi),
        }
    } else {
        inner(req, record.clone()).await
    };
    if let Some(unanswered) = unanswered {
        unanswered.answered();
    }
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
        _in_flight: in_flight,
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
        client_type,
        record,
        started,
    };
    response.map(|body| Body::new(record::Logged::new(body, finish)))
}

/// The size of a request's head as sent: request line and header lines.
/// The most header lines a request may have; more get 431 in the route's envelope.
/// The proxy listener's hard bound (`ListenerOptions::max_headers`) is twice this.
pub const MAX_HEADER_LINES: usize = 200;

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
    fn header_values_and_paths_leave_the_read_buffer() {
        let buffer = Bytes::from_static(b"/v1/x?a=1 application/json t1 t2 secret");
        let inside = |bytes: &[u8]| buffer.as_ptr_range().contains(&bytes.as_ptr());
        let value = |range: std::ops::Range<usize>| {
            HeaderValue::from_maybe_shared(buffer.slice(range)).unwrap()
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, value(10..26));
        headers.append("x-tag", value(27..29));
        headers.append("x-tag", value(30..32));
        let mut secret = value(33..39);
        secret.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, secret);
        headers.insert("x-empty", HeaderValue::from_static(""));
        let before = headers.clone();
        assert!(
            headers
                .values()
                .all(|v| v.is_empty() || inside(v.as_bytes()))
        );

        detach_headers(&mut headers);
        assert_eq!(headers, before);
        assert!(headers.values().all(|v| !inside(v.as_bytes())));
        assert!(headers[header::AUTHORIZATION].is_sensitive());
        assert!(!headers[header::CONTENT_TYPE].is_sensitive());
        let tags: Vec<_> = headers.get_all("x-tag").iter().collect();
        assert_eq!(tags, ["t1", "t2"]);

        let mut uri = http::Uri::from_maybe_shared(buffer.slice(0..9)).unwrap();
        assert!(inside(uri.path().as_bytes()));
        detach_uri(&mut uri);
        assert_eq!(uri, "/v1/x?a=1");
        assert!(!inside(uri.path().as_bytes()));
        let mut absolute = http::Uri::from_static("http://h:1/p?q");
        detach_uri(&mut absolute);
        assert_eq!(absolute, "http://h:1/p?q");
    }

    #[test]
    fn only_model_routed_posts_skip_the_router() {
        let request = |method: http::Method, path: &str| {
            Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .unwrap()
        };
        let post = |path: &str| model_routed(&request(http::Method::POST, path));
        assert_eq!(
            post("/v1/chat/completions"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(
            post("/v1/chat/completions?x=1"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(post("/v1/messages"), Some(Endpoint::Messages));
        assert_eq!(
            post("/v1/messages/count_tokens"),
            Some(Endpoint::CountTokens)
        );
        for path in endpoint::FORWARDED {
            assert_eq!(post(path), Some(Endpoint::Forward(path)));
        }
        // What the router answers (405, 404, passthrough, probes) stays with it.
        for path in [
            "/v1/chat/completions/",
            "/V1/messages",
            "/passthrough/openai/v1/x",
            "/livez",
            "/v1/models",
        ] {
            assert_eq!(post(path), None, "{path}");
        }
        for method in [http::Method::GET, http::Method::HEAD, http::Method::PUT] {
            assert_eq!(model_routed(&request(method, "/v1/chat/completions")), None);
        }
    }

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
}
