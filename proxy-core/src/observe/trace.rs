//! OpenTelemetry traces over OTLP/HTTP (protobuf), with the GenAI semantic conventions.
//!
//! One server span per proxy request (ended with its answer's last byte), a client span
//! per upstream attempt (the one that answered ends with the answer too, carrying the
//! usage), and a span for each policy step that waits (rate limits, budget, cache,
//! guardrails). The caller's W3C `traceparent`/`tracestate` are continued, and each
//! attempt's context is sent upstream. Prompts and answers are never exported.
//!
//! Export never costs a request anything: ending a span is a bounded-queue send; the
//! OpenTelemetry SDK's batch processor exports from its own thread, its HTTP calls run
//! on the agent's runtime. A full queue drops the span and counts it, as does a batch
//! the collector did not take; [`Tracing::stats`] feeds the `aisix_otlp_*` metrics and
//! a warning at most once per interval.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter, SpanProcessor,
};
use tracing::warn;

use crate::formats::body::RequestBody;
use crate::formats::endpoint::Endpoint;

/// Spans waiting for export at most; more are dropped (and counted).
const MAX_QUEUE: usize = 4096;
/// Spans per export request, and how long a span waits for a fuller batch.
const MAX_BATCH: usize = 512;
const BATCH_DELAY: Duration = Duration::from_secs(1);
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
    queued: AtomicUsize,
    last_error: Mutex<Option<String>>,
}

impl ExportStats {
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
    tracer: SdkTracer,
    provider: SdkTracerProvider,
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
    /// Starts the exporter; must be called inside a Tokio runtime (its HTTP calls run
    /// there).
    pub fn start(options: &TraceOptions) -> Result<Tracing, String> {
        crate::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(2)))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| format!("the OTLP client: {e}"))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(options.endpoint.clone())
            .with_timeout(options.timeout)
            .with_http_client(OnRuntime {
                client,
                runtime: tokio::runtime::Handle::current(),
            })
            .build()
            .map_err(|e| format!("observability.tracing.otlp.endpoint: {e}"))?;
        let stats = Arc::new(ExportStats::default());
        let batch = BatchSpanProcessor::builder(Counted {
            inner: exporter,
            stats: stats.clone(),
        })
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(MAX_QUEUE)
                .with_max_export_batch_size(MAX_BATCH)
                .with_scheduled_delay(BATCH_DELAY)
                .build(),
        )
        .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Bounded {
                inner: batch,
                stats: stats.clone(),
            })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                options.sample_ratio.clamp(0.0, 1.0),
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(options.service_name.clone())
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("aisix-agent");
        let tracing = Tracing(Arc::new(Inner {
            tracer,
            provider,
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

    /// Sends what is queued and stops; blocks up to `timeout` (call when draining).
    pub fn shutdown(&self, timeout: Duration) {
        let _ = self.0.provider.shutdown_with_timeout(timeout);
    }

    /// The server span of a request: a child of the caller's `traceparent`, if any.
    pub fn server(&self, headers: &HeaderMap, method: &str, route: &str) -> RequestTrace {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let span = self
            .0
            .tracer
            .span_builder(format!("{method} {route}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_owned()),
                KeyValue::new("http.route", route.to_owned()),
            ])
            .start_with_context(&self.0.tracer, &parent);
        RequestTrace {
            tracing: self.clone(),
            cx: parent.with_span(span),
            answer: Mutex::new(None),
        }
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
    pub request_id: &'a str,
    pub key_id: Option<&'a str>,
    pub model: Option<&'a str>,
    pub error_type: Option<&'a str>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub first_token: Option<Duration>,
    pub response_model: Option<&'a str>,
    pub finish_reasons: &'a [String],
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

    /// Ends the answering attempt's span (with the usage) and the server span.
    pub fn end(&self, ending: &Ending<'_>) {
        let answered = self
            .answer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let usage = [
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
        ];
        let usage: Vec<KeyValue> = usage
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| KeyValue::new(*k, i64::try_from(*n).unwrap_or(i64::MAX)))
            .collect();
        if let Some(cx) = answered {
            let span = cx.span();
            span.set_attributes(usage.iter().cloned());
            if let Some(model) = ending.response_model {
                span.set_attribute(KeyValue::new("gen_ai.response.model", model.to_owned()));
            }
            if !ending.finish_reasons.is_empty() {
                span.set_attribute(KeyValue::new(
                    "gen_ai.response.finish_reasons",
                    Value::Array(
                        ending
                            .finish_reasons
                            .iter()
                            .map(|r| r.clone().into())
                            .collect::<Vec<opentelemetry::StringValue>>()
                            .into(),
                    ),
                ));
            }
            if let Some(ttft) = ending.first_token {
                span.set_attribute(KeyValue::new(
                    "gen_ai.server.time_to_first_token",
                    ttft.as_secs_f64(),
                ));
            }
            if let Some(error) = ending.error_type {
                span.set_attribute(KeyValue::new("error.type", error.to_owned()));
                span.set_status(Status::error(error.to_owned()));
            }
            span.end();
        }
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(ending.status),
        ));
        span.set_attribute(KeyValue::new(
            "aisix.request_id",
            ending.request_id.to_owned(),
        ));
        if let Some(key) = ending.key_id {
            span.set_attribute(KeyValue::new("aisix.api_key_id", key.to_owned()));
        }
        if let Some(model) = ending.model {
            span.set_attribute(KeyValue::new("aisix.model", model.to_owned()));
        }
        span.set_attributes(usage);
        if let Some(error) = ending.error_type {
            span.set_attribute(KeyValue::new("error.type", error.to_owned()));
        }
        if ending.status >= 500 || (ending.error_type.is_some() && ending.status < 400) {
            span.set_status(Status::error(ending.error_type.unwrap_or("").to_owned()));
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
    pub target: &'a str,
    pub number: u32,
    pub request_id: &'a str,
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

pub fn attempt_attributes(facts: &AttemptFacts<'_>) -> Vec<KeyValue> {
    let provider = provider_name(facts.provider).to_owned();
    let mut attributes = vec![
        KeyValue::new("gen_ai.operation.name", operation(facts.endpoint)),
        KeyValue::new("gen_ai.provider.name", provider.clone()),
        KeyValue::new("gen_ai.system", provider),
        KeyValue::new("gen_ai.request.model", facts.upstream_model.to_owned()),
        KeyValue::new("aisix.target", facts.target.to_owned()),
        KeyValue::new("aisix.attempt", i64::from(facts.number)),
        KeyValue::new("aisix.request_id", facts.request_id.to_owned()),
        KeyValue::new("aisix.stream", facts.body.stream),
    ];
    if let Some(host) = reqwest::Url::parse(facts.api_base)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
    {
        attributes.push(KeyValue::new("server.address", host));
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

fn inject(cx: &Context, headers: &mut HeaderMap) {
    headers.remove("traceparent");
    headers.remove("tracestate");
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// The caller's trace context, sent upstream as it came when the agent does not trace.
pub fn forward_caller_context(caller: &HeaderMap, upstream: &mut HeaderMap) {
    for name in ["traceparent", "tracestate"] {
        if let Some(value) = caller.get(name) {
            upstream.insert(name, value.clone());
        }
    }
}

/// The batch processor, with a queue bound that counts what it drops.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    stats: Arc<ExportStats>,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        // Counted until its batch is exported, so the processor's own queue (as long
        // as this bound) never overflows silently.
        if self.stats.queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUE {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
}

/// The OTLP exporter, counting what it sent and what the collector did not take.
#[derive(Debug)]
struct Counted {
    inner: opentelemetry_otlp::SpanExporter,
    stats: Arc<ExportStats>,
}

impl SpanExporter for Counted {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        let stats = &self.stats;
        stats.queued.fetch_sub(n, Ordering::Relaxed);
        match &result {
            Ok(()) => {
                stats.exported.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(error) => {
                stats
                    .dropped_export_failed
                    .fetch_add(n as u64, Ordering::Relaxed);
                *stats
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(error.to_string());
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter's HTTP calls, made on the agent's runtime (the batch processor's
/// thread only waits for them).
#[derive(Debug)]
struct OnRuntime {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.runtime.spawn(async move {
            let _ = tx.send(post(client, request).await);
        });
        rx.await
            .map_err(|_| HttpError::from("the runtime stopped"))?
    }
}

async fn post(
    client: reqwest::Client,
    request: http::Request<Bytes>,
) -> Result<http::Response<Bytes>, HttpError> {
    let request = reqwest::Request::try_from(request.map(reqwest::Body::from))?;
    let response = client.execute(request).await?;
    let mut answer = http::Response::builder().status(response.status());
    if let Some(headers) = answer.headers_mut() {
        *headers = response.headers().clone();
    }
    let body = response.bytes().await?;
    Ok(answer.body(body)?)
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
