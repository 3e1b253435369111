//! OpenTelemetry traces over OTLP/HTTP (protobuf), with the GenAI semantic conventions.
//!
//! One server span per proxy request (ended with its answer's last byte), a client span
//! per upstream attempt (the one that answered ends with the answer too, carrying the
//! usage), and a span for each policy step that waits (rate limits, budget, cache,
//! guardrails). The caller's W3C `traceparent`/`tracestate` are continued, and each
//! attempt's context is sent upstream. Prompts and answers are never exported.
//!
//! Export never costs a request anything: ending a span pushes it to a bounded queue,
//! which a task on the agent's runtime exports (every second, or at a full batch). A
//! full queue drops the span and counts it, as does a batch the collector did not
//! take; [`Tracing::stats`] feeds the `aisix_otlp_*` metrics and a warning at most once
//! per interval.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, TraceFlags, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanProcessor};
use tracing::warn;

use crate::formats::body::RequestBody;
use crate::formats::endpoint::Endpoint;
use crate::observe::metrics::OtlpReading;
use crate::observe::span_wire;

/// Spans waiting for export at most; more are dropped (and counted).
const MAX_QUEUE: usize = 4096;
/// Spans per export request, and how long a span waits for a fuller batch.
const MAX_BATCH: usize = 512;
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// The instrumentation scope of every span.
const SCOPE: &str = "aisix-agent";
/// How often dropped spans are reported in the log, at most.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// `observability.tracing.otlp`, resolved.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// The collector's OTLP/HTTP traces URL (`.../v1/traces`).
    pub endpoint: String,
    /// Share of new traces recorded (0..=1); a caller's sampled flag wins.
    pub sample_ratio: f64,
    /// `service.name`.
    pub service_name: String,
    /// Per export request, retries included.
    pub timeout: Duration,
}

/// What the exporter did, for metrics and `/status/config`.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full (a slow or absent collector).
    pub dropped_queue_full: AtomicU64,
    /// Spans in batches the collector did not take.
    pub dropped_export_failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ExportStats {
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The counts, for the metrics and `/status/config`.
    pub fn reading(&self) -> OtlpReading {
        OtlpReading {
            exported: self.exported.load(Ordering::Relaxed),
            queue_full: self.dropped_queue_full.load(Ordering::Relaxed),
            export_failed: self.dropped_export_failed.load(Ordering::Relaxed),
        }
    }

    fn dropped(&self) -> u64 {
        self.dropped_queue_full.load(Ordering::Relaxed)
            + self.dropped_export_failed.load(Ordering::Relaxed)
    }
}

/// The agent's tracer; cheap to clone.
#[derive(Clone)]
pub struct Tracing(Arc<Inner>);

struct Inner {
    /// Holds its provider, and so the span processor.
    tracer: SdkTracer,
    queue: Arc<Queue>,
    stats: Arc<ExportStats>,
    endpoint: String,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("endpoint", &self.0.endpoint)
            .finish_non_exhaustive()
    }
}

impl Tracing {
    /// Starts the exporter; must be called inside a Tokio runtime (it exports there).
    pub fn start(options: &TraceOptions) -> Result<Tracing, String> {
        let endpoint = reqwest::Url::parse(&options.endpoint)
            .map_err(|e| format!("observability.tracing.otlp.endpoint: {e}"))?;
        let client = otlp_client(options.timeout).map_err(|e| format!("the OTLP client: {e}"))?;
        let stats = Arc::new(ExportStats::default());
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(options.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let queue = Arc::new(Queue {
            batches: Mutex::new(Vec::new()),
            full: tokio::sync::Notify::new(),
            client,
            endpoint,
            resource: span_wire::resource(resource.iter()),
            scope: span_wire::scope(SCOPE, env!("CARGO_PKG_VERSION")),
            stats: stats.clone(),
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(export_batches(Arc::downgrade(&queue)));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Queued(queue.clone()))
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                options.sample_ratio.clamp(0.0, 1.0),
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer(SCOPE);
        let tracing = Tracing(Arc::new(Inner {
            tracer,
            queue,
            stats,
            endpoint: options.endpoint.clone(),
        }));
        tokio::spawn(report_drops(Arc::downgrade(&tracing.0)));
        Ok(tracing)
    }

    pub fn stats(&self) -> &ExportStats {
        &self.0.stats
    }

    pub fn endpoint(&self) -> &str {
        &self.0.endpoint
    }

    /// Exports what is queued, waiting up to `timeout` (when a drain is over).
    pub async fn flush(&self, timeout: Duration) {
        let queue = &self.0.queue;
        let _ = tokio::time::timeout(timeout, queue.export(queue.take())).await;
    }

    /// The server span of a request, a child of the caller's `traceparent` if any;
    /// `None` when the trace is not sampled (nothing more is built for it, and the
    /// caller's context goes upstream as it came).
    pub fn server(
        &self,
        headers: &HeaderMap,
        method: &http::Method,
        route: &'static str,
    ) -> Option<RequestTrace> {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let (name, method): (std::borrow::Cow<'static, str>, Value) = match *method {
            // The usual spans named without an allocation.
            http::Method::POST => (
                match route {
                    "/v1/chat/completions" => "POST /v1/chat/completions".into(),
                    "/v1/messages" => "POST /v1/messages".into(),
                    _ => format!("POST {route}").into(),
                },
                "POST".into(),
            ),
            _ => (
                format!("{method} {route}").into(),
                method.as_str().to_owned().into(),
            ),
        };
        let span = self
            .0
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method),
                KeyValue::new("http.route", route),
            ])
            .start_with_context(&self.0.tracer, &parent);
        if !span.span_context().is_sampled() {
            return None;
        }
        Some(RequestTrace {
            tracing: self.clone(),
            cx: parent.with_span(span),
            answer: Mutex::new(None),
        })
    }
}

/// A request's spans: the server span, and the answering attempt's span until the
/// answer ends.
pub struct RequestTrace {
    tracing: Tracing,
    cx: Context,
    answer: Mutex<Option<Context>>,
}

impl std::fmt::Debug for RequestTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestTrace").finish_non_exhaustive()
    }
}

/// What the end of a request tells its spans.
pub struct Ending<'a> {
    pub status: u16,
    pub request_id: &'a Arc<str>,
    pub key_id: Option<&'a Arc<str>>,
    pub model: Option<&'a Arc<str>>,
    pub error_type: Option<&'static str>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub first_token: Option<Duration>,
    pub response_model: Option<String>,
    pub finish_reasons: Vec<String>,
}

impl RequestTrace {
    /// A child span of the server span for an upstream attempt, started now.
    pub fn attempt(&self, attributes: Vec<KeyValue>, name: String) -> Attempt {
        let tracer = &self.tracing.0.tracer;
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(tracer, &self.cx);
        Attempt {
            cx: self.cx.with_span(span),
        }
    }

    /// A finished step of the request (a rate-limit or budget check, a cache lookup, a
    /// guardrail scan) that began at `started`.
    pub fn step(&self, name: &'static str, started: SystemTime, attributes: Vec<KeyValue>) {
        let tracer = &self.tracing.0.tracer;
        let mut span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(started)
            .with_attributes(attributes)
            .start_with_context(tracer, &self.cx);
        span.end();
    }

    /// Sends this request's context upstream when no attempt span carries it
    /// (passthrough).
    pub fn inject(&self, headers: &mut HeaderMap) {
        inject(&self.cx, headers);
    }

    /// Ends the answering attempt's span (with the usage) and the server span. Each
    /// span's attributes are set at once (one lock of the span each).
    pub fn end(&self, ending: Ending<'_>) {
        let answered = self
            .answer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let mut usage = Vec::with_capacity(4);
        for (key, n) in [
            ("gen_ai.usage.input_tokens", ending.input_tokens),
            ("gen_ai.usage.output_tokens", ending.output_tokens),
            (
                "gen_ai.usage.cache_read.input_tokens",
                ending.cache_read_tokens,
            ),
            (
                "gen_ai.usage.cache_creation.input_tokens",
                ending.cache_write_tokens,
            ),
        ] {
            if n > 0 {
                usage.push(KeyValue::new(key, i64::try_from(n).unwrap_or(i64::MAX)));
            }
        }
        if let Some(cx) = answered {
            let span = cx.span();
            let mut attributes = Vec::with_capacity(usage.len() + 4);
            attributes.extend_from_slice(&usage);
            if let Some(model) = ending.response_model {
                attributes.push(KeyValue::new("gen_ai.response.model", model));
            }
            if !ending.finish_reasons.is_empty() {
                let reasons: Vec<opentelemetry::StringValue> =
                    ending.finish_reasons.into_iter().map(Into::into).collect();
                attributes.push(KeyValue::new(
                    "gen_ai.response.finish_reasons",
                    Value::Array(reasons.into()),
                ));
            }
            if let Some(ttft) = ending.first_token {
                attributes.push(KeyValue::new(
                    "gen_ai.server.time_to_first_token",
                    ttft.as_secs_f64(),
                ));
            }
            if let Some(error) = ending.error_type {
                attributes.push(KeyValue::new("error.type", error));
                span.set_status(Status::error(error));
            }
            span.set_attributes(attributes);
            span.end();
        }
        let span = self.cx.span();
        let mut attributes = usage;
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(ending.status),
        ));
        attributes.push(KeyValue::new("aisix.request_id", ending.request_id.clone()));
        if let Some(key) = ending.key_id {
            attributes.push(KeyValue::new("aisix.api_key_id", key.clone()));
        }
        if let Some(model) = ending.model {
            attributes.push(KeyValue::new("aisix.model", model.clone()));
        }
        if let Some(error) = ending.error_type {
            attributes.push(KeyValue::new("error.type", error));
        }
        span.set_attributes(attributes);
        if ending.status >= 500 || (ending.error_type.is_some() && ending.status < 400) {
            span.set_status(Status::error(ending.error_type.unwrap_or("")));
        }
        span.end();
    }
}

/// One upstream attempt's span.
pub struct Attempt {
    cx: Context,
}

impl Attempt {
    /// Sends the attempt's context upstream: `traceparent` (and the caller's
    /// `tracestate`).
    pub fn inject(&self, headers: &mut HeaderMap) {
        inject(&self.cx, headers);
    }

    /// The attempt failed: what happened and what the gateway does next
    /// (`retry`, `failover`, `answer`).
    pub fn failed(self, status: Option<u16>, error_type: &str, next: &'static str) {
        let span = self.cx.span();
        if let Some(status) = status {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        span.set_attribute(KeyValue::new("error.type", error_type.to_owned()));
        span.set_attribute(KeyValue::new("aisix.next", next));
        span.set_status(Status::error(error_type.to_owned()));
        span.end();
    }

    /// The attempt answered: its span ends with the answer (see [`RequestTrace::end`]).
    pub fn answered(self, trace: &RequestTrace, status: u16) {
        self.cx.span().set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        *trace.answer.lock().unwrap_or_else(PoisonError::into_inner) = Some(self.cx);
    }
}

/// What an upstream attempt's span says of it.
pub struct AttemptFacts<'a> {
    pub endpoint: Endpoint,
    /// The provider key's `provider`.
    pub provider: &'a str,
    pub api_base: &'a str,
    pub upstream_model: &'a str,
    /// The direct model (alias) tried.
    pub target: &'a Arc<str>,
    pub number: u32,
    pub request_id: &'a Arc<str>,
    pub body: &'a RequestBody<'a>,
}

/// `gen_ai.operation.name` of an endpoint.
pub fn operation(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Messages | Endpoint::Forward("/v1/responses") => {
            "chat"
        }
        Endpoint::CountTokens => "count_tokens",
        Endpoint::Forward("/v1/completions") => "text_completion",
        Endpoint::Forward("/v1/embeddings") => "embeddings",
        Endpoint::Forward("/v1/rerank") => "rerank",
        Endpoint::Forward(path) if path.starts_with("/v1/images") => "image_generation",
        Endpoint::Forward(_) => "audio",
    }
}

/// `gen_ai.provider.name`: the semantic conventions' names where they have one.
fn provider_name(provider: &str) -> &str {
    match provider {
        "azure" | "azure_openai" => "azure.ai.openai",
        "bedrock" => "aws.bedrock",
        "gemini" => "gcp.gemini",
        "vertex" | "vertex_ai" => "gcp.vertex_ai",
        "mistral" => "mistral_ai",
        "xai" => "x_ai",
        other => other,
    }
}

/// The host of a base URL (`https://host:port/path`), without parsing all of it.
fn host(base: &str) -> Option<&str> {
    let rest = base.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.split(':').next()?,
    };
    (!host.is_empty()).then_some(host)
}

pub fn attempt_attributes(facts: &AttemptFacts<'_>) -> Vec<KeyValue> {
    let provider: Value = match provider_name(facts.provider) {
        // The usual names without an allocation.
        "openai" => "openai".into(),
        "anthropic" => "anthropic".into(),
        other => other.to_owned().into(),
    };
    let mut attributes = vec![
        KeyValue::new("gen_ai.operation.name", operation(facts.endpoint)),
        KeyValue::new("gen_ai.provider.name", provider),
        KeyValue::new("gen_ai.request.model", facts.upstream_model.to_owned()),
        KeyValue::new("aisix.target", facts.target.clone()),
        KeyValue::new("aisix.attempt", i64::from(facts.number)),
        KeyValue::new("aisix.request_id", facts.request_id.clone()),
        KeyValue::new("aisix.stream", facts.body.stream),
    ];
    if let Some(host) = host(facts.api_base) {
        attributes.push(KeyValue::new("server.address", host.to_owned()));
    }
    let max_tokens = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|name| serde_json::from_str::<i64>(facts.body.field(name)?.get()).ok());
    if let Some(max) = max_tokens {
        attributes.push(KeyValue::new("gen_ai.request.max_tokens", max));
    }
    for (name, key) in [
        ("temperature", "gen_ai.request.temperature"),
        ("top_p", "gen_ai.request.top_p"),
    ] {
        if let Some(value) = facts
            .body
            .field(name)
            .and_then(|v| serde_json::from_str::<f64>(v.get()).ok())
        {
            attributes.push(KeyValue::new(key, value));
        }
    }
    attributes
}

/// `traceparent` (version 00, and only the sampled flag) and `tracestate`, as the
/// SDK's `TraceContextPropagator` writes them but without `format!` and its hex
/// formatting of each id (a tenth of a traced request's tracing cost).
fn inject(cx: &Context, headers: &mut HeaderMap) {
    headers.remove("traceparent");
    headers.remove("tracestate");
    let span = cx.span();
    let context = span.span_context();
    if !context.is_valid() {
        return;
    }
    let mut parent = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let flags = (context.trace_flags() & TraceFlags::SAMPLED).to_u8();
    let ids = [
        (3..35, &context.trace_id().to_bytes()[..]),
        (36..52, &context.span_id().to_bytes()[..]),
        (53..55, &[flags][..]),
    ];
    for (at, id) in ids {
        // The slots are twice the ids' lengths.
        let _ = hex::encode_to_slice(id, &mut parent[at]);
    }
    // Hex digits and dashes: always a valid value.
    if let Ok(parent) = HeaderValue::from_bytes(&parent) {
        headers.insert("traceparent", parent);
    }
    if let Ok(state) = HeaderValue::from_str(&context.trace_state().header()) {
        headers.insert("tracestate", state);
    }
}

/// The caller's trace context, sent upstream as it came when the agent does not trace.
pub fn forward_caller_context(caller: &HeaderMap, upstream: &mut HeaderMap) {
    for name in ["traceparent", "tracestate"] {
        if let Some(value) = caller.get(name) {
            upstream.insert(name, value.clone());
        }
    }
}

/// Ended spans waiting for export, already encoded ([`span_wire`]) in batches of at
/// most [`MAX_BATCH`], behind a lock; drained by [`export_batches`] on the agent's
/// runtime. (The SDK's own batch processor wakes its thread for every span: a context
/// switch per span, which cost +30 % CPU per request on a busy core in `scripts/bench`.)
struct Queue {
    batches: Mutex<Vec<Batch>>,
    /// Told when a batch is full.
    full: tokio::sync::Notify,
    client: reqwest::Client,
    endpoint: reqwest::Url,
    /// The encoded `Resource` and `InstrumentationScope` of every export.
    resource: Vec<u8>,
    scope: Vec<u8>,
    stats: Arc<ExportStats>,
    runtime: tokio::runtime::Handle,
}

/// Encoded spans of one export request.
struct Batch {
    spans: Vec<u8>,
    count: usize,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl Queue {
    fn take(&self) -> Vec<Batch> {
        std::mem::take(&mut *self.batches.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Exports `batches`, one request each, counting what the collector took and what
    /// it did not.
    async fn export(&self, batches: Vec<Batch>) {
        for batch in batches {
            let body = span_wire::export_request(&self.resource, &self.scope, &batch.spans);
            drop(batch.spans);
            let n = batch.count as u64;
            match self.send(body).await {
                Ok(()) => {
                    self.stats.exported.fetch_add(n, Ordering::Relaxed);
                }
                Err(error) => {
                    self.stats
                        .dropped_export_failed
                        .fetch_add(n, Ordering::Relaxed);
                    *self
                        .stats
                        .last_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(error);
                }
            }
        }
    }

    /// One OTLP/HTTP export (`application/x-protobuf`); any 2xx is taken. The answer
    /// is read to its end, so the connection goes back to the pool for the next batch.
    async fn send(&self, body: Vec<u8>) -> Result<(), String> {
        let answer = self
            .client
            .post(self.endpoint.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("export failed: {e}"))?;
        let status = answer.status();
        answer
            .bytes()
            .await
            .map_err(|e| format!("export failed: {e}"))?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the collector answered {status}"))
        }
    }
}

/// The provider's span processor: ends spans into the [`Queue`].
#[derive(Debug)]
struct Queued(Arc<Queue>);

impl SpanProcessor for Queued {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let queue = &self.0;
        let mut batches = queue.batches.lock().unwrap_or_else(PoisonError::into_inner);
        let queued =
            batches.len().saturating_sub(1) * MAX_BATCH + batches.last().map_or(0, |b| b.count);
        if queued >= MAX_QUEUE {
            drop(batches);
            queue
                .stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if batches.last().is_none_or(|b| b.count >= MAX_BATCH) {
            batches.push(Batch {
                // About what a batch of the agent's spans takes.
                spans: Vec::with_capacity(MAX_BATCH * 384),
                count: 0,
            });
        }
        let Some(batch) = batches.last_mut() else {
            return;
        };
        span_wire::push_span(&mut batch.spans, &span);
        batch.count += 1;
        if batch.count == MAX_BATCH {
            queue.full.notify_one();
        }
    }

    /// Starts exporting what is queued ([`Tracing::flush`] waits for it).
    fn force_flush(&self) -> OTelSdkResult {
        let queue = self.0.clone();
        let batches = queue.take();
        if !batches.is_empty() {
            queue
                .runtime
                .clone()
                .spawn(async move { queue.export(batches).await });
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.force_flush()
    }
}

/// Exports the queue every [`BATCH_DELAY`], or when a batch is full, until the tracer
/// is gone. One export at a time: spans ended meanwhile wait in the queue (bounded).
async fn export_batches(queue: std::sync::Weak<Queue>) {
    loop {
        let Some(q) = queue.upgrade() else {
            return;
        };
        tokio::select! {
            () = tokio::time::sleep(BATCH_DELAY) => {}
            () = q.full.notified() => {}
        }
        let batches = q.take();
        q.export(batches).await;
    }
}

/// The HTTP client of OTLP exports (traces and metrics): bounded by `timeout`, never
/// following a redirect, never through a proxy from the environment.
pub(super) fn otlp_client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    crate::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(2)))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
}

/// Logs dropped spans at most once per [`REPORT_EVERY`], until the tracer is gone.
async fn report_drops(inner: std::sync::Weak<Inner>) {
    let mut reported = 0;
    loop {
        tokio::time::sleep(REPORT_EVERY).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let dropped = inner.stats.dropped();
        if dropped > reported {
            warn!(
                endpoint = %inner.endpoint,
                dropped = dropped - reported,
                last_error = inner.stats.last_error().as_deref(),
                "OTLP trace export is losing spans (collector slow or unreachable)"
            );
            reported = dropped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_is_injected_as_the_sdk_would() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceId, TraceState};
        let state: TraceState = "vendor=abc,other=1".parse().unwrap_or_default();
        let contexts = [
            (TraceFlags::SAMPLED, state),
            (TraceFlags::new(0x03), TraceState::default()),
            (TraceFlags::default(), TraceState::default()),
        ];
        for (flags, state) in contexts {
            let span = SpanContext::new(
                TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap_or(TraceId::INVALID),
                SpanId::from_hex("b7ad6b7169203331").unwrap_or(SpanId::INVALID),
                flags,
                true,
                state,
            );
            let cx = Context::new().with_remote_span_context(span);
            let mut ours = HeaderMap::new();
            ours.insert("traceparent", HeaderValue::from_static("stale"));
            inject(&cx, &mut ours);
            let mut sdk = HeaderMap::new();
            TraceContextPropagator::new()
                .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(&mut sdk));
            assert_eq!(ours, sdk);
        }
        let mut none = HeaderMap::new();
        none.insert("tracestate", HeaderValue::from_static("stale"));
        inject(&Context::new(), &mut none);
        assert!(none.is_empty(), "{none:?}");
    }

    #[tokio::test]
    async fn a_full_queue_drops_spans_and_counts_them() {
        // Nothing listens on port 9; the export task does not run before the loop
        // ends (one thread), so the queue fills.
        let tracing = Tracing::start(&TraceOptions {
            endpoint: "http://127.0.0.1:9/v1/traces".to_owned(),
            sample_ratio: 1.0,
            service_name: "test".to_owned(),
            timeout: Duration::from_millis(100),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let request_id: Arc<str> = "r1".into();
        for _ in 0..MAX_QUEUE + 10 {
            let trace = tracing
                .server(
                    &HeaderMap::new(),
                    &http::Method::POST,
                    "/v1/chat/completions",
                )
                .unwrap_or_else(|| panic!("sampled at ratio 1"));
            trace.end(Ending {
                status: 200,
                request_id: &request_id,
                key_id: None,
                model: None,
                error_type: None,
                input_tokens: 0,
                output_tokens: 0,
                cache_read_tokens: 0,
                cache_write_tokens: 0,
                first_token: None,
                response_model: None,
                finish_reasons: Vec::new(),
            });
        }
        let counts = tracing.stats().reading();
        assert_eq!((counts.queue_full, counts.exported), (10, 0));
    }

    #[test]
    fn server_address_is_the_host_of_the_base_url() {
        assert_eq!(host("https://api.openai.com/v1"), Some("api.openai.com"));
        assert_eq!(host("http://127.0.0.1:18081/v1"), Some("127.0.0.1"));
        assert_eq!(
            host("http://user:pw@proxy.internal:8080"),
            Some("proxy.internal")
        );
        assert_eq!(host("http://[::1]:4000/x"), Some("::1"));
        assert_eq!(host("https://example.com?x=1"), Some("example.com"));
        assert_eq!(host("not a url"), None);
    }
}
