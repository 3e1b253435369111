//! Every Prometheus metric of the agent, declared here and nowhere else.
//!
//! Names follow `aisix_<noun>_<unit>[_total]`. Labels are bounded: routes are the fixed
//! route table, models are configured aliases (a name that matches no model is
//! recorded as `""`), statuses are HTTP codes, kinds and outcomes are the short lists
//! below. API keys never appear (not even hashed).
//!
//! Two kinds of metric:
//! - events, counted as they happen ([`Metrics`]'s fields, recorded on the request
//!   path and by the agent's background tasks);
//! - state, read when scraped ([`Readings`], gathered by the agent from the snapshot
//!   store, the watcher, the certificate and the usage queue).
//!
//! [`Metrics::render`] writes both in the OpenMetrics text format.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::formats::tokens::Tokens;
use crate::shared::redis::RedisStatus;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label value shared with the snapshot (a model alias) without copying it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template (AISIX's `endpoint`).
    pub endpoint: &'static str,
    pub model: Name,
    pub status: u16,
    /// From `observability.metrics.client_type_rules`; empty (no label, to Prometheus)
    /// without rules.
    pub client_type: Name,
}

fn guardrail_labels(name: &Arc<str>, hook: &'static str, kind: &'static str) -> GuardrailLabels {
    GuardrailLabels {
        guardrail: Name(name.clone()),
        hook,
        kind,
    }
}

fn in_flight_labels(route: &'static str, model: Option<&Arc<str>>) -> RouteLabels {
    RouteLabels {
        endpoint: route,
        model: model.map_or_else(empty, |m| Name(m.clone())),
    }
}

/// An empty label value, shared (an absent label to Prometheus).
fn empty() -> Name {
    static EMPTY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
    Name(EMPTY.clone())
}

#[derive(Debug, Clone, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub endpoint: &'static str,
    pub model: Name,
}

/// One upstream attempt's labels (AISIX's LLM-call families).
#[derive(Debug, Clone, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub model: Name,
    pub provider: Name,
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: Name,
}

/// AISIX's deployment families: the model the caller named and the direct model (the
/// target) an attempt went to; the same name twice for a direct model.
#[derive(Debug, Clone, PartialEq, Eq, EncodeLabelSet)]
pub struct DeploymentLabels {
    pub model: Name,
    pub deployment: Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ScopeLabels {
    pub scope: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BodyLimitLabels {
    pub endpoint: &'static str,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: Name,
    /// The provider that answered (`openai`, `anthropic`, `bedrock`...).
    pub provider: Name,
}

/// Every `kind` of `aisix_upstream_failures_total` (each failure class's `metric_kind`).
pub const FAILURE_KINDS: [&str; 8] = [
    "timeout",
    "unreachable",
    "server_error",
    "rate_limited",
    "rejected",
    "unsupported",
    "stream_break",
    "other",
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FailureLabels {
    /// The direct model that was called.
    pub model: Name,
    /// The kind comes from the failure's [`Class::metric_kind`](crate::failure::Class::metric_kind).
    pub kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PolicyLabels {
    /// `rate_limit`, `budget` or `guardrail`.
    pub policy: &'static str,
}

/// A guardrail's families: its name, the hook it ran at, its kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GuardrailLabels {
    pub guardrail: Name,
    pub hook: &'static str,
    pub kind: &'static str,
}

/// `Hash` for the label sets every request records, folded into one `u64` by FxHash
/// before the family's map hashes it again with SipHash: SipHash over each field in
/// turn cost a request about 300 instructions a lookup, a dozen times. Label values
/// are bounded (route templates, configured names, statuses), never a caller's
/// choice, so a fixed, unkeyed hash cannot be flooded.
macro_rules! quick_hash {
    ($($labels:ident { $($field:ident),+ })+) => {$(
        impl std::hash::Hash for $labels {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                let mut quick = rustc_hash::FxHasher::default();
                $(std::hash::Hash::hash(&self.$field, &mut quick);)+
                state.write_u64(std::hash::Hasher::finish(&quick));
            }
        }
    )+};
}

quick_hash! {
    RequestLabels { endpoint, model, status, client_type }
    RouteLabels { endpoint, model }
    AttemptLabels { model, provider, status }
    DeploymentLabels { model, deployment }
    TokenLabels { model, provider }
}

/// Seconds: 50 µs .. 10 s, for guardrail checks (in-process ones take microseconds,
/// remote detectors milliseconds).
const GUARDRAIL_BUCKETS: [f64; 12] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 10.0,
];

fn guardrail_histogram() -> Histogram {
    Histogram::new(GUARDRAIL_BUCKETS)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// Seconds: 1 ms .. 5 min, for whole requests and upstream calls.
const DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Event metrics. Cheap to record: atomics behind a read-locked map per family.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `aisix_proxy_requests_total{endpoint, model, status}`: answered requests
    /// (streams count when they end); AISIX's name and labels.
    pub requests: Family<RequestLabels, Counter>,
    /// `aisix_proxy_request_duration_seconds{endpoint, model, status}`: from the
    /// request's arrival to the last byte of its answer.
    pub request_duration: Histograms<RequestLabels>,
    /// `aisix_llm_requests_total{model, provider, status}`: upstream attempts (AISIX's
    /// LLM calls), by the status they came to (a failure's: the status it maps to).
    pub llm_requests: Family<AttemptLabels, Counter>,
    /// `aisix_llm_request_duration_seconds{model, provider, status}`: from sending an
    /// upstream request to its
    /// answer (headers for streams, the whole body otherwise) or failure, per attempt.
    pub upstream_duration: Histograms<AttemptLabels>,
    /// `aisix_llm_time_to_first_token_seconds{model, provider, status}`: streams, from
    /// the request's arrival to the first event sent (AISIX's name).
    pub time_to_first_token: Histograms<AttemptLabels>,
    /// `aisix_proxy_failed_requests_total{endpoint, model}`: requests answered with an
    /// error (4xx, 5xx) or whose stream an error ended.
    pub failed_requests: Family<RouteLabels, Counter>,
    /// `aisix_proxy_client_cancelled_requests_total{endpoint, model}`: callers gone
    /// before the response head.
    pub cancelled: Family<RouteLabels, Counter>,
    /// `aisix_proxy_request_body_limit_rejections_total{endpoint, outcome}`: 413s
    /// (`outcome`: `rejected`).
    pub body_limit_rejections: Family<BodyLimitLabels, Counter>,
    /// `aisix_deployment_{requests,success_responses,failure_responses,cooled_down}_total
    /// {model, deployment}`: upstream attempts, by outcome, and cooldowns begun.
    pub deployments: [Family<DeploymentLabels, Counter>; 4],
    /// `aisix_routing_{successful,failed}_fallbacks_total{model}`: attempts on a target
    /// other than the first, by whether that target answered.
    pub fallbacks: [Family<ModelLabels, Counter>; 2],
    /// `aisix_ratelimit_rejections_total{scope}`: requests a rate limit refused, by the
    /// scope that refused (`api_key`, `model`).
    pub ratelimit_rejections: Family<ScopeLabels, Counter>,
    /// `aisix_config_reload_failures_total`: file-mode reloads (SIGHUP) that failed.
    pub reload_failures: Counter,
    /// `aisix_llm_{input,output,total}_tokens_total{model, provider}`: tokens the
    /// upstreams reported (AISIX's names), streamed answers included; and
    /// `aisix_llm_cache_{read,write}_tokens_total`, the parts of the input read from and
    /// written to the provider's prompt cache.
    pub tokens: [Family<TokenLabels, Counter>; 5],
    /// `aisix_upstream_failures_total{model, kind}`: failed upstream attempts.
    pub upstream_failures: Family<FailureLabels, Counter>,
    /// `aisix_policy_rejections_total{policy}`: requests refused (or streams cut) by a
    /// rate limit, a budget or a guardrail.
    pub policy_rejections: Family<PolicyLabels, Counter>,
    /// `aisix_guardrail_blocks_total{guardrail, hook, kind}`: requests and answers a
    /// rule blocked (a rule that could not run and fails closed included).
    pub guardrail_blocks: Family<GuardrailLabels, Counter>,
    /// `aisix_guardrail_bypasses_total{guardrail, hook, kind}`: texts let through
    /// unchecked because the rule could not run and fails open.
    pub guardrail_bypasses: Family<GuardrailLabels, Counter>,
    /// `aisix_guardrail_latency_seconds{guardrail, hook, kind}`: each rule's check.
    pub guardrail_latency: Histograms<GuardrailLabels>,
    /// `aisix_heartbeats_total{outcome}`: `ok`, `failed`, `revoked`, `unknown_gateway`.
    pub heartbeats: Family<OutcomeLabels, Counter>,
    /// `aisix_budget_checks_total{outcome}`: `allowed`, `denied`, `failed`.
    pub budget_checks: Family<OutcomeLabels, Counter>,
    /// Requests (probes aside) whose answer has not ended, streams until their last
    /// byte; the drain waits for it to reach 0.
    pub in_flight: prometheus_client::metrics::gauge::Gauge,
    /// `aisix_proxy_in_flight_requests{endpoint, model}`: the same, by route and model
    /// (empty until the model is known).
    pub in_flight_by: Family<RouteLabels, prometheus_client::metrics::gauge::Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        let request_duration = Histograms::new_with_constructor(duration_histogram as fn() -> _);
        let upstream_duration = Histograms::new_with_constructor(duration_histogram as fn() -> _);
        let llm_requests = Family::default();
        registry.register(
            "aisix_llm_requests",
            "Upstream attempts, by direct model, provider and status",
            llm_requests.clone(),
        );
        let time_to_first_token = Histograms::new_with_constructor(duration_histogram as fn() -> _);
        let tokens: [Family<TokenLabels, Counter>; 5] = Default::default();
        let upstream_failures = Family::default();
        let policy_rejections = Family::default();
        let heartbeats = Family::default();
        let guardrail_blocks = Family::default();
        registry.register(
            "aisix_guardrail_blocks",
            "Requests and answers a guardrail blocked, by guardrail, hook and kind",
            guardrail_blocks.clone(),
        );
        let guardrail_bypasses = Family::default();
        registry.register(
            "aisix_guardrail_bypasses",
            "Texts let through unchecked because a guardrail could not run and fails open",
            guardrail_bypasses.clone(),
        );
        let guardrail_latency = Histograms::new_with_constructor(guardrail_histogram as fn() -> _);
        registry.register(
            "aisix_guardrail_latency_seconds",
            "Time each guardrail check took, by guardrail, hook and kind",
            guardrail_latency.clone(),
        );
        let budget_checks = Family::default();
        let in_flight = prometheus_client::metrics::gauge::Gauge::default();
        let in_flight_by = Family::default();
        registry.register(
            "aisix_proxy_in_flight_requests",
            "Requests whose answer has not ended (streams until their last byte), by endpoint and model",
            in_flight_by.clone(),
        );
        registry.register(
            "aisix_proxy_requests",
            "Requests answered, by endpoint, model alias and status",
            requests.clone(),
        );
        registry.register(
            "aisix_proxy_request_duration_seconds",
            "Time from a request's arrival to the last byte of its answer",
            request_duration.clone(),
        );
        registry.register(
            "aisix_llm_request_duration_seconds",
            "Time from sending an upstream request to its answer (headers of streams) or failure, per attempt",
            upstream_duration.clone(),
        );
        registry.register(
            "aisix_llm_time_to_first_token_seconds",
            "Streams: time from the request's arrival to the first event, by model alias, provider and status",
            time_to_first_token.clone(),
        );
        let failed_requests = Family::default();
        registry.register(
            "aisix_proxy_failed_requests",
            "Requests answered with an error (4xx, 5xx) or whose stream an error ended",
            failed_requests.clone(),
        );
        let cancelled = Family::default();
        registry.register(
            "aisix_proxy_client_cancelled_requests",
            "Requests whose caller went away before the response head",
            cancelled.clone(),
        );
        let body_limit_rejections = Family::default();
        registry.register(
            "aisix_proxy_request_body_limit_rejections",
            "Requests refused with 413 for a body over proxy.request_body_limit_bytes",
            body_limit_rejections.clone(),
        );
        let deployments: [Family<DeploymentLabels, Counter>; 4] = Default::default();
        for (family, (name, help)) in deployments.iter().zip(DEPLOYMENT_FAMILIES) {
            registry.register(name, help, family.clone());
        }
        let fallbacks: [Family<ModelLabels, Counter>; 2] = Default::default();
        for (family, (name, help)) in fallbacks.iter().zip(FALLBACK_FAMILIES) {
            registry.register(name, help, family.clone());
        }
        let ratelimit_rejections = Family::default();
        registry.register(
            "aisix_ratelimit_rejections",
            "Requests refused by a rate limit, by the scope that refused",
            ratelimit_rejections.clone(),
        );
        let reload_failures = Counter::default();
        registry.register(
            "aisix_config_reload_failures",
            "Resources-file reloads (SIGHUP) that failed; the last good snapshot kept serving",
            reload_failures.clone(),
        );
        for (family, (name, help)) in tokens.iter().zip(TOKEN_FAMILIES) {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "aisix_upstream_failures",
            "Failed upstream attempts, by direct model and kind",
            upstream_failures.clone(),
        );
        registry.register(
            "aisix_policy_rejections",
            "Requests refused or streams cut by a rate limit, budget or guardrail",
            policy_rejections.clone(),
        );
        registry.register(
            "aisix_heartbeats",
            "Heartbeats sent to the control plane, by outcome",
            heartbeats.clone(),
        );
        registry.register(
            "aisix_budget_checks",
            "Budget decisions asked of the control plane, by outcome",
            budget_checks.clone(),
        );
        // Refusals by policy exist at 0 from the start, so alerts on them see data.
        for policy in ["rate_limit", "budget", "guardrail"] {
            drop(policy_rejections.get_or_create(&PolicyLabels { policy }));
        }
        for scope in ["api_key", "model"] {
            drop(ratelimit_rejections.get_or_create(&ScopeLabels { scope }));
        }
        Self {
            registry,
            requests,
            request_duration,
            upstream_duration,
            llm_requests,
            time_to_first_token,
            failed_requests,
            cancelled,
            body_limit_rejections,
            deployments,
            fallbacks,
            ratelimit_rejections,
            reload_failures,
            tokens,
            upstream_failures,
            policy_rejections,
            heartbeats,
            guardrail_blocks,
            guardrail_bypasses,
            guardrail_latency,
            budget_checks,
            in_flight,
            in_flight_by,
        }
    }
}

/// One answered request, as the access log sees it.
pub struct RequestRecord<'a> {
    pub route: &'static str,
    pub model: Option<&'a Arc<str>>,
    pub status: u16,
    pub duration: Duration,
    pub ttft: Option<Duration>,
    /// The provider that answered, when one did.
    pub provider: Option<&'a str>,
    pub tokens: Tokens,
    /// The error type of a refusal (`rate_limit_exceeded`, `content_filter`...).
    pub error_type: Option<&'static str>,
    /// The request's `client_type`, when rules are configured.
    pub client_type: Option<&'a Arc<str>>,
}

/// The deployment families, in the order of [`Metrics::deployments`].
const DEPLOYMENT_FAMILIES: [(&str, &str); 4] = [
    (
        "aisix_deployment_requests",
        "Upstream attempts, by the model named and the target (deployment) tried",
    ),
    (
        "aisix_deployment_success_responses",
        "Upstream attempts that answered, by model and deployment",
    ),
    (
        "aisix_deployment_failure_responses",
        "Upstream attempts that failed, by model and deployment",
    ),
    (
        "aisix_deployment_cooled_down",
        "Cooldowns begun for a deployment after failures, by model and deployment",
    ),
];

/// The fallback families, in the order of [`Metrics::fallbacks`].
const FALLBACK_FAMILIES: [(&str, &str); 2] = [
    (
        "aisix_routing_successful_fallbacks",
        "Requests moved to another target that then answered, by routing model",
    ),
    (
        "aisix_routing_failed_fallbacks",
        "Requests moved to another target that failed too, by routing model",
    ),
];

/// The token families, in the order of [`Metrics::tokens`].
const TOKEN_FAMILIES: [(&str, &str); 5] = [
    (
        "aisix_llm_input_tokens",
        "Input tokens the upstreams reported, cached ones included, by model alias and provider",
    ),
    (
        "aisix_llm_output_tokens",
        "Output tokens the upstreams reported, by model alias and provider",
    ),
    (
        "aisix_llm_total_tokens",
        "Input and output tokens the upstreams reported, by model alias and provider",
    ),
    (
        "aisix_llm_cache_read_tokens",
        "Input tokens read from the provider's prompt cache",
    ),
    (
        "aisix_llm_cache_write_tokens",
        "Input tokens written to the provider's prompt cache",
    ),
];

impl Metrics {
    pub fn record_request(&self, r: &RequestRecord<'_>) {
        let model = r.model.map_or_else(empty, |m| Name(m.clone()));
        let labels = RequestLabels {
            endpoint: r.route,
            model: model.clone(),
            status: r.status,
            client_type: r.client_type.map_or_else(empty, |c| Name(c.clone())),
        };
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&labels)
            .observe(r.duration.as_secs_f64());
        let provider = Name(Arc::from(r.provider.unwrap_or("")));
        if let Some(ttft) = r.ttft {
            let labels = AttemptLabels {
                model: model.clone(),
                provider: provider.clone(),
                status: r.status,
            };
            self.time_to_first_token
                .get_or_create(&labels)
                .observe(ttft.as_secs_f64());
        }
        if r.status >= 400 || r.error_type.is_some() {
            let route = RouteLabels {
                endpoint: r.route,
                model: model.clone(),
            };
            self.failed_requests.get_or_create(&route).inc();
        }
        if r.status == 413 {
            let labels = BodyLimitLabels {
                endpoint: r.route,
                outcome: "rejected",
            };
            self.body_limit_rejections.get_or_create(&labels).inc();
        }
        let t = r.tokens;
        let counts = [
            t.prompt,
            t.completion,
            t.prompt + t.completion,
            t.cache_read,
            t.cache_write,
        ];
        let labels = TokenLabels {
            model: model.clone(),
            provider,
        };
        for (family, n) in self.tokens.iter().zip(counts) {
            if n > 0 {
                family.get_or_create(&labels).inc_by(n);
            }
        }
        if let Some(policy) = r.error_type.and_then(policy_of) {
            self.policy_rejections
                .get_or_create(&PolicyLabels { policy })
                .inc();
        }
    }

    /// One upstream attempt of `model` at `provider`, come to `status`, taking `took`.
    pub fn record_upstream(&self, model: &Arc<str>, provider: &str, status: u16, took: Duration) {
        let labels = AttemptLabels {
            model: Name(model.clone()),
            provider: Name(Arc::from(provider)),
            status,
        };
        self.llm_requests.get_or_create(&labels).inc();
        self.upstream_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Exports `aisix_upstream_failures_total` at 0 for every kind of failure of each
    /// of `models` (the direct ones of a snapshot), so alerts on a model's failures
    /// see data before its first failure.
    pub fn expect_models<'a>(&self, models: impl Iterator<Item = &'a Arc<str>>) {
        for model in models {
            for kind in FAILURE_KINDS {
                drop(self.upstream_failures.get_or_create(&FailureLabels {
                    model: Name(model.clone()),
                    kind,
                }));
            }
        }
    }

    /// A request arrived on `route` (its model not known yet).
    pub fn in_flight_began(&self, route: &'static str) {
        self.in_flight.inc();
        self.in_flight_by
            .get_or_create(&in_flight_labels(route, None))
            .inc();
    }

    /// A request in flight on `route` is now known to name `model`.
    pub fn in_flight_moved(
        &self,
        route: &'static str,
        before: Option<&Arc<str>>,
        model: &Arc<str>,
    ) {
        self.in_flight_by
            .get_or_create(&in_flight_labels(route, before))
            .dec();
        self.in_flight_by
            .get_or_create(&in_flight_labels(route, Some(model)))
            .inc();
    }

    /// A request's answer ended.
    pub fn in_flight_ended(&self, route: &'static str, model: Option<&Arc<str>>) {
        self.in_flight.dec();
        self.in_flight_by
            .get_or_create(&in_flight_labels(route, model))
            .dec();
    }

    /// A request whose caller went away before its response head.
    pub fn record_cancelled(&self, route: &'static str, model: Option<&Arc<str>>) {
        let labels = RouteLabels {
            endpoint: route,
            model: Name(model.cloned().unwrap_or_else(|| Arc::from(""))),
        };
        self.cancelled.get_or_create(&labels).inc();
    }

    /// An attempt of `model` (the alias named) on `deployment` (the target), answered
    /// or failed.
    pub fn record_deployment(&self, model: &Arc<str>, deployment: &Arc<str>, answered: bool) {
        let labels = DeploymentLabels {
            model: Name(model.clone()),
            deployment: Name(deployment.clone()),
        };
        self.deployments[0].get_or_create(&labels).inc();
        self.deployments[if answered { 1 } else { 2 }]
            .get_or_create(&labels)
            .inc();
    }

    /// A cooldown of `deployment` begun while serving `model`.
    pub fn record_cooldown(&self, model: &Arc<str>, deployment: &Arc<str>) {
        let labels = DeploymentLabels {
            model: Name(model.clone()),
            deployment: Name(deployment.clone()),
        };
        self.deployments[3].get_or_create(&labels).inc();
    }

    /// A request of routing model `model` moved to another target, which answered or not.
    pub fn record_fallback(&self, model: &Arc<str>, answered: bool) {
        let labels = ModelLabels {
            model: Name(model.clone()),
        };
        self.fallbacks[if answered { 0 } else { 1 }]
            .get_or_create(&labels)
            .inc();
    }

    pub fn record_ratelimit_rejection(&self, scope: &'static str) {
        self.ratelimit_rejections
            .get_or_create(&ScopeLabels { scope })
            .inc();
    }

    pub fn record_guardrail_block(&self, name: &Arc<str>, hook: &'static str, kind: &'static str) {
        self.guardrail_blocks
            .get_or_create(&guardrail_labels(name, hook, kind))
            .inc();
    }

    pub fn record_guardrail_bypass(&self, name: &Arc<str>, hook: &'static str, kind: &'static str) {
        self.guardrail_bypasses
            .get_or_create(&guardrail_labels(name, hook, kind))
            .inc();
    }

    pub fn record_guardrail_latency(
        &self,
        name: &Arc<str>,
        hook: &'static str,
        kind: &'static str,
        took: Duration,
    ) {
        self.guardrail_latency
            .get_or_create(&guardrail_labels(name, hook, kind))
            .observe(took.as_secs_f64());
    }

    /// A resources-file reload that failed.
    pub fn record_reload_failure(&self) {
        self.reload_failures.inc();
    }

    pub fn record_upstream_failure(&self, model: &Arc<str>, kind: &'static str) {
        self.upstream_failures
            .get_or_create(&FailureLabels {
                model: Name(model.clone()),
                kind,
            })
            .inc();
    }

    pub fn record_heartbeat(&self, outcome: &'static str) {
        self.heartbeats
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Exports managed mode's counters at 0 for every outcome, so alerts on them see
    /// data before the first event.
    pub fn expect_managed_mode(&self) {
        for outcome in ["ok", "failed", "revoked", "unknown_gateway"] {
            drop(self.heartbeats.get_or_create(&OutcomeLabels { outcome }));
        }
        for outcome in ["allowed", "denied", "failed"] {
            drop(self.budget_checks.get_or_create(&OutcomeLabels { outcome }));
        }
    }

    pub fn record_budget_check(&self, outcome: &'static str) {
        self.budget_checks
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// The whole exposition: event metrics, then `readings`, then `# EOF`.
    pub fn render(&self, readings: Readings) -> String {
        let mut state = Registry::default();
        state.register_collector(Box::new(readings));
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &state);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

/// The policy behind a refusal's error type.
fn policy_of(error_type: &str) -> Option<&'static str> {
    match error_type {
        "rate_limit_exceeded" => Some("rate_limit"),
        "billing_error" | "budget_exceeded" | "budget_unavailable" => Some("budget"),
        "content_filter" => Some("guardrail"),
        _ => None,
    }
}

/// State metrics, read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Readings {
    /// `aisix_config_source_info{source}`: `file`, `etcd` or `control_plane`; `None`
    /// before anything was applied.
    pub source: Option<&'static str>,
    /// `aisix_config_source_connected`: 1 while the configuration watch is established
    /// (`None` in file mode, which has nothing to connect to).
    pub connected: Option<bool>,
    /// `aisix_config_applied_revision`.
    pub revision: i64,
    /// `aisix_snapshot_age_seconds`: since the last apply or watch progress.
    pub age: Option<Duration>,
    /// `aisix_config_reloads_total`: batches that changed the configuration.
    pub applies: u64,
    /// `aisix_config_rejected_resources`.
    pub rejected: u64,
    /// `aisix_snapshot_resources{kind}`.
    pub resources: Vec<(&'static str, u64)>,
    /// `aisix_model_health{model}`: 0 healthy, 1 degraded, 2 down.
    pub model_health: Vec<(Arc<str>, u8)>,
    /// `aisix_deployment_state{model, deployment}`: each target's health, as
    /// `model_health` says it, under each model that routes to it (a direct model is
    /// its own deployment).
    pub deployment_state: Vec<(Arc<str>, Arc<str>, u8)>,
    /// `aisix_certificate_remaining_days` (managed mode).
    pub certificate_remaining_days: Option<f64>,
    /// `aisix_usage_queue_events`, `aisix_usage_event_drops_total` and
    /// `aisix_usage_events_emitted_total` (managed mode): pending, dropped, emitted.
    pub usage_queue: Option<(u64, u64, u64)>,
    /// `aisix_redis_connected{component}` and `aisix_redis_failures_total{component,
    /// kind}`: the shared rate limits' and cache's Redis connections, when configured.
    pub redis: Vec<RedisStatus>,
    /// `aisix_otlp_spans_exported_total` and `aisix_otlp_spans_dropped_total{reason}`,
    /// when traces are exported.
    pub otlp: Option<OtlpReading>,
    /// `aisix_otlp_metric_pushes_total{outcome}`: OTLP metrics pushes (ok, failed).
    pub metric_pushes: Option<(u64, u64)>,
}

/// The span exporter's counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct OtlpReading {
    pub exported: u64,
    /// Dropped because the export queue was full.
    pub queue_full: u64,
    /// In batches the collector did not take.
    pub export_failed: u64,
}

#[derive(EncodeLabelSet, Debug, Clone, PartialEq, Eq, Hash)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(EncodeLabelSet, Debug, Clone, PartialEq, Eq, Hash)]
struct VersionLabels {
    version: &'static str,
}

#[derive(EncodeLabelSet, Debug, Clone, PartialEq, Eq, Hash)]
struct SourceLabels {
    source: &'static str,
}

#[derive(EncodeLabelSet, Debug, Clone, PartialEq, Eq, Hash)]
struct KindLabels {
    kind: &'static str,
}

#[derive(EncodeLabelSet, Debug, Clone, PartialEq, Eq, Hash)]
struct ComponentLabels {
    component: &'static str,
}

#[derive(EncodeLabelSet, Debug, Clone, PartialEq, Eq, Hash)]
struct RedisFailureLabels {
    component: &'static str,
    kind: &'static str,
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: V,
) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    let e = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(e)
}

fn info(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: &impl EncodeLabelSet,
) -> std::fmt::Result {
    let mut e = encoder.encode_descriptor(name, help, None, MetricType::Info)?;
    e.encode_info(labels)
}

impl Collector for Readings {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        self.encode_snapshot(&mut encoder)?;
        self.encode_models(&mut encoder)?;
        self.encode_managed(&mut encoder)?;
        self.encode_redis(&mut encoder)?;
        self.encode_otlp(&mut encoder)
    }
}

impl Readings {
    /// The build, the configuration source and the snapshot.
    fn encode_snapshot(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        info(
            e,
            "aisix_build",
            "The agent's version",
            &VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            },
        )?;
        if let Some(source) = self.source {
            info(
                e,
                "aisix_config_source",
                "Where the configuration comes from",
                &SourceLabels { source },
            )?;
        }
        if let Some(connected) = self.connected {
            gauge(
                e,
                "aisix_config_source_connected",
                "1 while the configuration watch is established",
                i64::from(connected),
            )?;
        }
        gauge(
            e,
            "aisix_config_applied_revision",
            "Revision of the configuration snapshot in use",
            self.revision,
        )?;
        if let Some(age) = self.age {
            gauge(
                e,
                "aisix_snapshot_age_seconds",
                "Time since the snapshot was last applied or confirmed by watch progress",
                age.as_secs_f64(),
            )?;
        }
        let applies = ConstCounter::new(self.applies);
        applies.encode(e.encode_descriptor(
            "aisix_config_reloads",
            "Configuration batches that changed the snapshot",
            None,
            applies.metric_type(),
        )?)?;
        gauge(
            e,
            "aisix_config_rejected_resources",
            "Resources rejected by validation (the previous version, if any, keeps serving)",
            self.rejected,
        )?;
        {
            let mut family = e.encode_descriptor(
                "aisix_snapshot_resources",
                "Resources in the snapshot, by kind",
                None,
                MetricType::Gauge,
            )?;
            for (kind, n) in &self.resources {
                ConstGauge::new(*n).encode(family.encode_family(&KindLabels { kind })?)?;
            }
        }
        Ok(())
    }

    fn encode_models(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        {
            let mut family = e.encode_descriptor(
                "aisix_model_health",
                "Model health: 0 healthy, 1 degraded (4-7 consecutive upstream failures), 2 down (8 or more)",
                None,
                MetricType::Gauge,
            )?;
            for (model, health) in &self.model_health {
                let labels = ModelLabels {
                    model: Name(model.clone()),
                };
                ConstGauge::new(i64::from(*health)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = e.encode_descriptor(
            "aisix_deployment_state",
            "Each target's health under the model that routes to it: 0 healthy, 1 degraded, 2 down",
            None,
            MetricType::Gauge,
        )?;
        for (model, deployment, health) in &self.deployment_state {
            let labels = DeploymentLabels {
                model: Name(model.clone()),
                deployment: Name(deployment.clone()),
            };
            ConstGauge::new(i64::from(*health)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// The span exporter and the metrics pushes.
    fn encode_otlp(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        if let Some((pushed, failed)) = self.metric_pushes {
            let mut family = e.encode_descriptor(
                "aisix_otlp_metric_pushes",
                "OTLP metrics pushes, by outcome (ok, failed)",
                None,
                MetricType::Counter,
            )?;
            for (outcome, n) in [("ok", pushed), ("failed", failed)] {
                ConstCounter::new(n).encode(family.encode_family(&OutcomeLabels { outcome })?)?;
            }
        }
        let Some(otlp) = self.otlp else {
            return Ok(());
        };
        {
            let family = e.encode_descriptor(
                "aisix_otlp_spans_exported",
                "Spans the OTLP collector accepted",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(otlp.exported).encode(family)?;
        }
        let mut family = e.encode_descriptor(
            "aisix_otlp_spans_dropped",
            "Spans not exported: queue_full (collector too slow or away), export_failed (refused or unreachable)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in [
            ("queue_full", otlp.queue_full),
            ("export_failed", otlp.export_failed),
        ] {
            ConstCounter::new(n).encode(family.encode_family(&ReasonLabels { reason })?)?;
        }
        Ok(())
    }

    /// The Redis connections of the shared rate limits and cache.
    fn encode_redis(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        if self.redis.is_empty() {
            return Ok(());
        }
        {
            let mut family = e.encode_descriptor(
                "aisix_redis_connected",
                "1 while the Redis connection of a component (ratelimit, cache) is up",
                None,
                MetricType::Gauge,
            )?;
            for status in &self.redis {
                let labels = ComponentLabels {
                    component: status.component,
                };
                ConstGauge::new(i64::from(status.connected))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = e.encode_descriptor(
            "aisix_redis_failures",
            "Requests that went on without Redis (local counters, no cache), by component and kind",
            None,
            MetricType::Counter,
        )?;
        for status in &self.redis {
            for (kind, n) in &status.failures {
                let labels = RedisFailureLabels {
                    component: status.component,
                    kind,
                };
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    /// Managed mode's certificate and usage queue.
    fn encode_managed(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        if let Some(days) = self.certificate_remaining_days {
            gauge(
                e,
                "aisix_certificate_remaining_days",
                "Days until the gateway certificate expires",
                days,
            )?;
        }
        if let Some((pending, dropped, emitted)) = self.usage_queue {
            gauge(
                e,
                "aisix_usage_queue_events",
                "Usage events waiting to be sent to the control plane",
                pending,
            )?;
            for (name, help, n) in [
                (
                    "aisix_usage_event_drops",
                    "Usage events dropped because the queue was full (kept across restarts)",
                    dropped,
                ),
                (
                    "aisix_usage_events_emitted",
                    "Usage events recorded for the control plane since start",
                    emitted,
                ),
            ] {
                let counter = ConstCounter::new(n);
                counter.encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn counters_alerts_read_exist_at_zero_before_their_first_event() {
        let m = Metrics::default();
        let text = m.render(Readings::default());
        for policy in ["rate_limit", "budget", "guardrail"] {
            let line = format!("aisix_policy_rejections_total{{policy=\"{policy}\"}} 0");
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("aisix_heartbeats_total{"), "{text}");
        m.expect_managed_mode();
        let text = m.render(Readings::default());
        assert!(
            text.contains("aisix_heartbeats_total{outcome=\"failed\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("aisix_budget_checks_total{outcome=\"denied\"} 0"),
            "{text}"
        );
        assert!(!text.contains("aisix_upstream_failures_total{"), "{text}");
        m.expect_models([Arc::from("gpt-4o")].iter());
        let text = m.render(Readings::default());
        for kind in FAILURE_KINDS {
            let line =
                format!("aisix_upstream_failures_total{{model=\"gpt-4o\",kind=\"{kind}\"}} 0");
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn equal_labels_from_separate_names_count_in_one_series() {
        let m = Metrics::default();
        let request = |model: &str, status: u16| {
            let model: Arc<str> = Arc::from(model);
            m.record_request(&RequestRecord {
                route: "/v1/chat/completions",
                model: Some(&model),
                status,
                duration: Duration::from_millis(1),
                ttft: None,
                provider: Some("openai"),
                tokens: Tokens {
                    prompt: 2,
                    ..Tokens::default()
                },
                error_type: None,
                client_type: None,
            });
        };
        request("gpt-4o", 200);
        request("gpt-4o", 200);
        request("gpt-4o", 201);
        request("gpt-4", 200);
        let text = m.render(Readings::default());
        let series = |line: &str| text.lines().any(|l| l == line);
        assert!(
            series(
                r#"aisix_proxy_requests_total{endpoint="/v1/chat/completions",model="gpt-4o",status="200",client_type=""} 2"#
            ),
            "{text}"
        );
        assert!(
            series(
                r#"aisix_proxy_requests_total{endpoint="/v1/chat/completions",model="gpt-4o",status="201",client_type=""} 1"#
            ),
            "{text}"
        );
        assert!(
            series(
                r#"aisix_proxy_requests_total{endpoint="/v1/chat/completions",model="gpt-4",status="200",client_type=""} 1"#
            ),
            "{text}"
        );
        assert!(
            series(r#"aisix_llm_input_tokens_total{model="gpt-4o",provider="openai"} 6"#),
            "{text}"
        );
    }

    #[test]
    fn renders_events_and_readings_in_openmetrics() {
        let m = Metrics::default();
        let model: Arc<str> = Arc::from("gpt-4o");
        m.record_request(&RequestRecord {
            route: "/v1/chat/completions",
            model: Some(&model),
            status: 429,
            duration: Duration::from_millis(3),
            ttft: None,
            provider: None,
            tokens: Tokens::default(),
            error_type: Some("rate_limit_exceeded"),
            client_type: None,
        });
        m.record_request(&RequestRecord {
            route: "/v1/chat/completions",
            model: Some(&model),
            status: 200,
            duration: Duration::from_millis(30),
            ttft: Some(Duration::from_millis(7)),
            provider: Some("openai"),
            tokens: Tokens {
                prompt: 10,
                completion: 3,
                cache_read: 4,
                cache_write: 0,
            },
            error_type: None,
            client_type: Some(&Arc::from("sdk")),
        });
        for error_type in ["billing_error", "content_filter", "invalid_api_key"] {
            m.record_request(&RequestRecord {
                route: "/v1/messages",
                model: None,
                status: 429,
                duration: Duration::from_millis(1),
                ttft: None,
                provider: None,
                tokens: Tokens::default(),
                error_type: Some(error_type),
                client_type: None,
            });
        }
        m.record_upstream_failure(&model, "timeout");
        let auto: Arc<str> = Arc::from("auto");
        m.record_deployment(&auto, &model, false);
        m.record_cooldown(&auto, &model);
        m.record_deployment(&auto, &model, true);
        m.record_fallback(&auto, true);
        drop(m.fallbacks[1].get_or_create(&ModelLabels {
            model: Name(auto.clone()),
        }));
        m.record_ratelimit_rejection("model");
        m.record_cancelled("/v1/messages", None);
        m.record_reload_failure();
        let text = m.render(Readings {
            source: Some("etcd"),
            connected: Some(true),
            revision: 42,
            resources: vec![("models", 2)],
            model_health: vec![(model.clone(), 1)],
            deployment_state: vec![(auto.clone(), model.clone(), 1)],
            usage_queue: Some((5, 1, 9)),
            redis: vec![RedisStatus {
                component: "ratelimit",
                mode: crate::shared::redis::RedisMode::Sentinel,
                connected: false,
                failures: [("unavailable", 7), ("timeout", 2), ("error", 0)].into(),
                last_error: None,
            }],
            ..Readings::default()
        });
        for line in [
            "aisix_proxy_requests_total{endpoint=\"/v1/chat/completions\",model=\"gpt-4o\",status=\"429\",client_type=\"\"} 1",
            "aisix_proxy_requests_total{endpoint=\"/v1/chat/completions\",model=\"gpt-4o\",status=\"200\",client_type=\"sdk\"} 1",
            "aisix_llm_input_tokens_total{model=\"gpt-4o\",provider=\"openai\"} 10",
            "aisix_llm_total_tokens_total{model=\"gpt-4o\",provider=\"openai\"} 13",
            "aisix_llm_cache_read_tokens_total{model=\"gpt-4o\",provider=\"openai\"} 4",
            "aisix_policy_rejections_total{policy=\"rate_limit\"} 1",
            "aisix_policy_rejections_total{policy=\"budget\"} 1",
            "aisix_policy_rejections_total{policy=\"guardrail\"} 1",
            "aisix_proxy_requests_total{endpoint=\"/v1/messages\",model=\"\",status=\"429\",client_type=\"\"} 3",
            "aisix_upstream_failures_total{model=\"gpt-4o\",kind=\"timeout\"} 1",
            "aisix_llm_time_to_first_token_seconds_count{model=\"gpt-4o\",provider=\"openai\",status=\"200\"} 1",
            "aisix_proxy_failed_requests_total{endpoint=\"/v1/chat/completions\",model=\"gpt-4o\"} 1",
            "aisix_proxy_failed_requests_total{endpoint=\"/v1/messages\",model=\"\"} 3",
            "aisix_ratelimit_rejections_total{scope=\"api_key\"} 0",
            "aisix_ratelimit_rejections_total{scope=\"model\"} 1",
            "aisix_deployment_requests_total{model=\"auto\",deployment=\"gpt-4o\"} 2",
            "aisix_deployment_success_responses_total{model=\"auto\",deployment=\"gpt-4o\"} 1",
            "aisix_deployment_failure_responses_total{model=\"auto\",deployment=\"gpt-4o\"} 1",
            "aisix_deployment_cooled_down_total{model=\"auto\",deployment=\"gpt-4o\"} 1",
            "aisix_routing_successful_fallbacks_total{model=\"auto\"} 1",
            "aisix_routing_failed_fallbacks_total{model=\"auto\"} 0",
            "aisix_deployment_state{model=\"auto\",deployment=\"gpt-4o\"} 1",
            "aisix_proxy_client_cancelled_requests_total{endpoint=\"/v1/messages\",model=\"\"} 1",
            "aisix_config_reload_failures_total 1",
            "aisix_usage_events_emitted_total 9",
            "aisix_config_source_info{source=\"etcd\"} 1",
            "aisix_config_source_connected 1",
            "aisix_config_applied_revision 42",
            "aisix_config_reloads_total 0",
            "aisix_snapshot_resources{kind=\"models\"} 2",
            "aisix_model_health{model=\"gpt-4o\"} 1",
            "aisix_usage_queue_events 5",
            "aisix_usage_event_drops_total 1",
            "aisix_redis_connected{component=\"ratelimit\"} 0",
            "aisix_redis_failures_total{component=\"ratelimit\",kind=\"unavailable\"} 7",
            "aisix_redis_failures_total{component=\"ratelimit\",kind=\"timeout\"} 2",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert_eq!(text.matches("aisix_policy_rejections_total{").count(), 3);
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(text.matches("# EOF").count(), 1);
    }
}
