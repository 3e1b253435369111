//! What is known about one request by the time its answer ends: the facts handlers
//! learn on the way (caller key id, model alias, tokens, time to first token, a refusal
//! inside a stream), and, when the answer's last byte is sent or the caller goes away,
//! one access-log line and the request metrics.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::Method;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Instant;
use tracing::info;

use crate::formats::endpoint::FORWARDED;
use crate::formats::tokens::Tokens;
use crate::hooks::GuardrailVerdict;
use crate::observe::metrics::{Metrics, RequestRecord};
use crate::observe::trace::{Ending, RequestTrace};

#[derive(Debug, Default)]
struct Facts {
    key_id: Option<Arc<str>>,
    model: Option<Arc<str>>,
    /// The client's address (`proxy.real_ip`: from a trusted proxy's header).
    client: Option<std::net::IpAddr>,
    /// The provider that answered (its name, as usage events say it).
    provider: Option<String>,
    tokens: Tokens,
    first_token: Option<Duration>,
    /// A refusal that happened after the response began (a guardrail cutting a stream).
    late_error: Option<&'static str>,
    /// What the answer said of itself (traced requests only).
    response_model: Option<String>,
    finish_reasons: Vec<String>,
    /// Guardrail verdicts other than passes, each once.
    guardrails: Vec<GuardrailVerdict>,
}

/// Counts a request whose caller went away before its response head (the server drops
/// the handler then): armed when the request arrives, disarmed by [`Unanswered::answered`].
pub struct Unanswered {
    metrics: Arc<Metrics>,
    route: &'static str,
    record: Record,
    armed: bool,
}

impl Unanswered {
    pub fn new(metrics: Arc<Metrics>, route: &'static str, record: Record) -> Self {
        Self {
            metrics,
            route,
            record,
            armed: true,
        }
    }

    /// The response head is ready: the request was not cancelled.
    pub fn answered(mut self) {
        self.armed = false;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if self.armed {
            let model = self.record.with(|f| f.model.clone());
            self.metrics.record_cancelled(self.route, model.as_ref());
            tracing::debug!(request_id = %self.record.request_id(), route = self.route, "the caller went away before the answer began");
        }
    }
}

/// The current request's id and the facts learned about it, shared between the
/// handler and the request-context middleware (a request extension). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Record(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    request_id: Arc<str>,
    facts: Mutex<Facts>,
    trace: Option<RequestTrace>,
    /// Where the request counts in `aisix_proxy_in_flight_requests` (traffic only).
    in_flight: Option<Counted>,
}

/// A request's series in `aisix_proxy_in_flight_requests`: its route, and its model
/// once known.
#[derive(Debug)]
struct Counted {
    metrics: Arc<Metrics>,
    route: &'static str,
    model: Mutex<Option<Arc<str>>>,
}

impl Record {
    pub fn new(request_id: Arc<str>, trace: Option<RequestTrace>) -> Self {
        Self::with_in_flight(request_id, trace, None)
    }

    /// A record counted in flight on `route` (until its [`InFlight`] is dropped).
    pub(crate) fn with_in_flight(
        request_id: Arc<str>,
        trace: Option<RequestTrace>,
        counted: Option<(Arc<Metrics>, &'static str)>,
    ) -> Self {
        let in_flight = counted.map(|(metrics, route)| {
            metrics.in_flight_began(route);
            Counted {
                metrics,
                route,
                model: Mutex::default(),
            }
        });
        Self(Arc::new(Shared {
            request_id,
            facts: Mutex::default(),
            trace,
            in_flight,
        }))
    }

    /// The request's spans, when it is traced.
    pub fn trace(&self) -> Option<&RequestTrace> {
        self.0.trace.as_ref()
    }

    /// When a step begins, for its span (`None` when the request is not traced).
    pub fn clock(&self) -> Option<std::time::SystemTime> {
        self.0.trace.as_ref().map(|_| std::time::SystemTime::now())
    }

    /// A step that began at `started` (see [`clock`](Self::clock)) ended with `outcome`.
    pub fn step(
        &self,
        name: &'static str,
        started: Option<std::time::SystemTime>,
        outcome: &'static str,
    ) {
        if let (Some(trace), Some(started)) = (&self.0.trace, started) {
            trace.step(
                name,
                started,
                vec![
                    opentelemetry::KeyValue::new("aisix.outcome", outcome),
                    opentelemetry::KeyValue::new("aisix.request_id", self.0.request_id.clone()),
                ],
            );
        }
    }

    /// The answer's own model name and finish reasons (kept for traced requests).
    pub fn answer(&self, model: Option<String>, finish_reasons: Vec<String>) {
        self.with(|f| {
            if model.is_some() {
                f.response_model = model;
            }
            f.finish_reasons.extend(finish_reasons);
        });
    }

    /// `x-aisix-request-id`: the caller's well-formed id or a fresh UUID.
    pub fn request_id(&self) -> &Arc<str> {
        &self.0.request_id
    }

    fn with<T>(&self, f: impl FnOnce(&mut Facts) -> T) -> T {
        f(&mut self.0.facts.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A guardrail's verdict (the same verdict twice is kept once: a stream's windows).
    pub fn guardrail(&self, verdict: GuardrailVerdict) {
        self.with(|f| {
            if !f.guardrails.contains(&verdict) {
                f.guardrails.push(verdict);
            }
        });
    }

    /// The verdicts so far, for the usage event.
    pub fn guardrails(&self) -> Vec<GuardrailVerdict> {
        self.with(|f| f.guardrails.clone())
    }

    /// The caller key's id (its resource id, never the key).
    pub fn caller(&self, key_id: &Arc<str>) {
        self.with(|f| f.key_id = Some(key_id.clone()));
    }

    /// The provider of the model that answered.
    pub fn provider(&self, name: String) {
        self.with(|f| f.provider = Some(name));
    }

    /// The client's address, as the client-address rules see it.
    pub fn client(&self, ip: std::net::IpAddr) {
        self.with(|f| f.client = Some(ip));
    }

    /// The configured model alias the request named.
    pub fn model(&self, alias: &Arc<str>) {
        self.with(|f| f.model = Some(alias.clone()));
        if let Some(counted) = &self.0.in_flight {
            let mut model = counted.model.lock().unwrap_or_else(PoisonError::into_inner);
            if model.as_ref() != Some(alias) {
                let before = model.replace(alias.clone());
                counted
                    .metrics
                    .in_flight_moved(counted.route, before.as_ref(), alias);
            }
        }
    }

    pub fn usage(&self, tokens: Tokens, first_token: Option<Duration>) {
        self.with(|f| {
            f.tokens = tokens;
            f.first_token = first_token;
        });
    }

    pub fn late_error(&self, error_type: &'static str) {
        self.with(|f| f.late_error = Some(error_type));
    }
}

/// The route label of a path: one of the fixed routes, or `other`.
pub fn route_label(path: &str) -> &'static str {
    const FIXED: [&str; 6] = [
        "/livez",
        "/readyz",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/messages/count_tokens",
    ];
    if let Some(route) = FIXED.iter().chain(FORWARDED).find(|r| **r == path) {
        return route;
    }
    if path.starts_with("/passthrough/") {
        return "/passthrough";
    }
    "other"
}

/// The tracing target of the access-log line (`RUST_LOG=aisix::access=off` silences it).
pub const ACCESS_TARGET: &str = "aisix::access";

/// Everything the access-log line and the metrics need, gathered when the response
/// headers were sent; written once, when the body ends or is dropped.
pub(crate) struct Finish {
    /// Counted in flight until this is written (dropped); `None` for probes.
    pub _in_flight: Option<InFlight>,
    pub metrics: Arc<Metrics>,
    pub access_log: bool,
    pub method: Method,
    pub path: String,
    pub status: u16,
    pub served_by: Option<String>,
    pub error_type: Option<&'static str>,
    pub client_type: Option<Arc<str>>,
    pub record: Record,
    pub started: Instant,
}

/// Whether `route` is a probe: not traffic, so neither logged, counted nor traced.
pub(crate) fn is_probe(route: &str) -> bool {
    matches!(route, "/livez" | "/readyz")
}

/// A counted record's request in flight in `aisix_proxy_in_flight_requests`, until
/// dropped.
#[derive(Debug)]
pub(crate) struct InFlight(pub Record);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(counted) = &self.0.0.in_flight {
            let model = counted.model.lock().unwrap_or_else(PoisonError::into_inner);
            counted
                .metrics
                .in_flight_ended(counted.route, model.as_ref());
        }
    }
}

impl Finish {
    fn write(self) {
        let route = route_label(&self.path);
        // Probes are not traffic: a load balancer asking every second would drown the
        // access log and the request metrics.
        if is_probe(route) {
            return;
        }
        let duration = self.started.elapsed();
        let mut facts = self.record.with(std::mem::take);
        let error_type = self.error_type.or(facts.late_error);
        if let Some(trace) = self.record.trace() {
            trace.end(Ending {
                status: self.status,
                request_id: self.record.request_id(),
                key_id: facts.key_id.as_ref(),
                model: facts.model.as_ref(),
                error_type,
                input_tokens: facts.tokens.prompt,
                output_tokens: facts.tokens.completion,
                cache_read_tokens: facts.tokens.cache_read,
                cache_write_tokens: facts.tokens.cache_write,
                first_token: facts.first_token,
                response_model: facts.response_model.take(),
                finish_reasons: std::mem::take(&mut facts.finish_reasons),
            });
        }
        self.metrics.record_request(&RequestRecord {
            route,
            provider: facts.provider.as_deref(),
            model: facts.model.as_ref(),
            status: self.status,
            duration,
            ttft: facts.first_token,
            tokens: facts.tokens,
            error_type,
            client_type: self.client_type.as_ref(),
        });
        if self.access_log {
            info!(
                target: ACCESS_TARGET,
                request_id = %self.record.request_id(),
                method = %self.method,
                path = self.path,
                status = self.status,
                api_key_id = facts.key_id.as_deref(),
                client_ip = facts.client.map(tracing::field::display),
                model = facts.model.as_deref(),
                served_by = self.served_by,
                error_type,
                latency_ms = duration.as_secs_f64() * 1000.0,
                ttft_ms = facts.first_token.map(|d| d.as_secs_f64() * 1000.0),
                input_tokens = facts.tokens.prompt,
                output_tokens = facts.tokens.completion,
                cache_read_tokens = facts.tokens.cache_read,
                cache_write_tokens = facts.tokens.cache_write,
                "request"
            );
        }
    }
}

/// A response body that writes its [`Finish`] when it ends or is dropped (a caller
/// that goes away mid-stream still gets its line).
pub(crate) struct Logged {
    inner: Option<Body>,
    finish: Option<Finish>,
}

impl Logged {
    pub fn new(inner: Body, finish: Finish) -> Self {
        Self {
            inner: Some(inner),
            finish: Some(finish),
        }
    }

    /// Drops the inner body first (its usage tap writes the tokens), then writes.
    fn end(&mut self) {
        self.inner = None;
        if let Some(finish) = self.finish.take() {
            finish.write();
        }
    }
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), http_body::Body::size_hint)
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.end();
    }
}
