//! [`ProxyError`] and the one match that classifies it.

use std::sync::Arc;

use axum::http::StatusCode;
use tracing::{debug, info, warn};

use crate::formats::sse::StreamBreak;
use crate::hooks::BudgetDenial;

/// Why a proxy request failed. Messages are shown to callers: they never carry
/// secrets or upstream 5xx bodies.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    InvalidApiKey(&'static str),
    /// A known caller key that may not be used (now): `code` says why
    /// (`api_key_disabled`, `api_key_expired`).
    #[error("{message}")]
    InactiveApiKey {
        message: &'static str,
        code: &'static str,
    },
    #[error("{0}")]
    PermissionDenied(String),
    #[error("model '{0}' does not exist")]
    ModelNotFound(String),
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("request headers exceed the limit of {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("request has more than {limit} header lines")]
    TooManyHeaders { limit: usize },
    /// The caller did not send its whole body in time.
    #[error("the request body did not arrive within {millis} ms")]
    BodyReadTimeout { millis: u128 },
    /// The body's declared type is not one the endpoint reads.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// An upstream 4xx, shown with its status; `error` holds the fields the caller sees.
    #[error("{}", .error.message)]
    UpstreamRejected {
        status: StatusCode,
        error: UpstreamErrorFields,
        /// The upstream's `Retry-After`, in seconds, when it sent a parseable one.
        retry_after: Option<u64>,
    },
    /// An upstream 5xx or a transport failure. `detail` is for logs only.
    #[error("the upstream provider failed to answer")]
    UpstreamFailed {
        detail: String,
        retry_after: Option<u64>,
    },
    /// The provider could not be reached at all (connection refused, DNS, TLS): the
    /// adapter cannot complete the request. `detail` is for logs only.
    #[error("the upstream provider of model '{model}' cannot be reached")]
    ProviderUnreachable { model: String, detail: String },
    /// Every routing candidate is cooling down and the model says `fail`.
    #[error("every target of model '{model}' is cooling down after failures")]
    AllCandidatesUnavailable { model: String, retry_after: u64 },
    #[error("the upstream provider did not answer within {0} ms")]
    Timeout(u128),
    /// The upstream's stream failed after the caller's answer began: reported as the
    /// stream's last event, never as a response.
    #[error("{0}")]
    StreamBroken(StreamBreak),
    #[error("{0}")]
    NotImplemented(String),
    #[error("{0}")]
    ProviderUnavailable(String),
    /// A blocking guardrail matched; the matched text is never shown.
    #[error("the {stage} was blocked by guardrail '{guardrail}'{why}")]
    ContentFiltered {
        guardrail: String,
        stage: &'static str,
        /// Empty for a match; else why the rule blocked without one (it could not run).
        why: &'static str,
    },
    /// A rate limit of the caller key or the model refused the request.
    #[error("{message}")]
    RateLimited { message: String, retry_after: u64 },
    /// The shared rate-limit counters cannot answer and the policy is `fail_closed`.
    #[error(
        "rate limits cannot be checked: the shared counter store (Redis) is not answering; retry shortly"
    )]
    RateLimiterUnavailable,
    /// The budget gate refused the caller key.
    #[error("{}", .0.message)]
    BudgetDenied(Arc<BudgetDenial>),
    /// No configuration has loaded yet (the source has not answered, no cache).
    #[error("the gateway has not loaded its configuration yet; retry shortly")]
    NotReady,
    #[error("unknown route: {0}")]
    UnknownRoute(String),
    /// Something other than a model that the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed: {0}")]
    MethodNotAllowed(String),
}

/// The OpenAI-style fields of an upstream 4xx error, as the caller will see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamErrorFields {
    pub message: String,
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// Who a failure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The request or the caller's key: the caller can fix it.
    Caller,
    /// The gateway's configuration or state (no usable target, everything cooling down).
    Gateway,
    /// The upstream provider: its answer, its silence or its connection.
    Upstream,
}

/// What routing may do after an upstream attempt failed this way. The plan's settings
/// (`retries`, `retry_on_429`, `fallback_on_statuses`) decide the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// A transient fault: retry the target, then cool it down and fail over.
    Transient,
    /// The upstream's 429: retried when the plan retries 429s (then as `Transient`),
    /// else as `ByStatus`.
    RateLimited,
    /// An upstream 4xx: fail over when the plan lists the status, else it is the answer.
    ByStatus,
    /// This target cannot serve the request at all; the next one may (no cooldown).
    NextTarget,
    /// The answer: no retry, no failover.
    Final,
}

/// How a log line about a failure is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Caller mistakes and policy refusals: DEBUG.
    Debug,
    /// A provider refusing a request (its 400s): INFO, so a translation or
    /// configuration fault shows at the default level without raising alerts.
    Info,
    /// Gateway-side or upstream problems an operator may need to look at: WARN.
    Warn,
}

/// Everything that follows from a failure; one decision per variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub status: StatusCode,
    /// The envelope's error `type` (also the access log's and metrics' error type).
    pub kind: &'static str,
    pub origin: Origin,
    pub recovery: Recovery,
    /// Counts as a failure of the target in `aisix_model_health`.
    pub counts_against_health: bool,
    /// The `kind` label of `aisix_upstream_failures_total` when an attempt fails so.
    pub metric_kind: &'static str,
    /// The `Retry-After` the caller is sent, in seconds (capped at
    /// [`MAX_RETRY_AFTER_SECS`] on the wire; error bodies keep the true figure).
    pub retry_after: Option<u64>,
    /// `x-should-retry`, the header the official OpenAI and Anthropic SDKs obey before
    /// their own rule (retry 408, 409, 429 and 5xx): `Some(false)` on refusals that
    /// sending again cannot fix, `None` where their rule is right.
    pub should_retry: Option<bool>,
    /// The upstream's own `Retry-After`, in seconds (retry backoff and cooldown).
    pub upstream_retry_after: Option<u64>,
    pub log: LogLevel,
}

/// The longest `Retry-After` sent. SDKs sleep for what it says before retrying; a
/// budget that resets in ten hours must not park a client for ten hours (budget
/// denials also say `x-should-retry: false`, and their body has the reset time).
pub const MAX_RETRY_AFTER_SECS: u64 = 60;

impl ProxyError {
    pub fn invalid_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param,
        }
    }

    /// One line about a failed request, at the level its class says.
    pub fn log(&self, request_id: &str) {
        let class = self.class();
        let status = class.status.as_u16();
        match class.log {
            LogLevel::Warn => {
                warn!(request_id, status, error_type = class.kind, detail = ?self, "request failed");
            }
            LogLevel::Info => {
                info!(request_id, status, error_type = class.kind, error = %self, "the provider refused the request");
            }
            LogLevel::Debug => {
                debug!(request_id, status, error_type = class.kind, error = %self, "request rejected");
            }
        }
    }

    /// The upstream's HTTP status, when it answered with a refusal.
    pub fn upstream_status(&self) -> Option<u16> {
        match self {
            ProxyError::UpstreamRejected { status, .. } => Some(status.as_u16()),
            _ => None,
        }
    }

    pub fn class(&self) -> Class {
        use LogLevel::{Debug, Warn};
        use Origin::{Caller, Gateway, Upstream};
        use Recovery::{ByStatus, Final, NextTarget, RateLimited, Transient};
        /// A refusal of the caller's request: final, no health, no retry hint, and
        /// not worth sending again as it is.
        fn caller(status: StatusCode, kind: &'static str) -> Class {
            Class {
                status,
                kind,
                origin: Caller,
                recovery: Final,
                counts_against_health: false,
                metric_kind: "other",
                retry_after: None,
                should_retry: Some(false),
                upstream_retry_after: None,
                log: Debug,
            }
        }
        match self {
            ProxyError::InvalidApiKey(_) | ProxyError::InactiveApiKey { .. } => {
                caller(StatusCode::UNAUTHORIZED, "invalid_api_key")
            }
            ProxyError::PermissionDenied(_) => caller(StatusCode::FORBIDDEN, "permission_denied"),
            ProxyError::ModelNotFound(_) => caller(StatusCode::NOT_FOUND, "model_not_found"),
            ProxyError::InvalidRequest { .. } => {
                caller(StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            ProxyError::BodyTooLarge { .. } => {
                caller(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error")
            }
            // The body may well arrive on a second try.
            ProxyError::BodyReadTimeout { .. } => Class {
                should_retry: None,
                ..caller(StatusCode::REQUEST_TIMEOUT, "invalid_request_error")
            },
            ProxyError::HeadersTooLarge { .. } | ProxyError::TooManyHeaders { .. } => caller(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "invalid_request_error",
            ),
            ProxyError::UnsupportedMediaType(_) => {
                caller(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error")
            }
            ProxyError::UnknownRoute(_) | ProxyError::NotFound(_) => {
                caller(StatusCode::NOT_FOUND, "invalid_request_error")
            }
            ProxyError::MethodNotAllowed(_) => {
                caller(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error")
            }
            ProxyError::ContentFiltered { .. } => {
                caller(StatusCode::UNPROCESSABLE_ENTITY, "content_filter")
            }
            ProxyError::RateLimited { retry_after, .. } => Class {
                retry_after: Some(*retry_after),
                should_retry: None,
                ..caller(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded")
            },
            // Spent is spent until the period resets; without a decision (the control
            // plane away) a later try may pass.
            ProxyError::BudgetDenied(denial) => Class {
                retry_after: denial.retry_after_seconds,
                should_retry: (denial.code != "budget_unavailable").then_some(false),
                ..caller(StatusCode::TOO_MANY_REQUESTS, "billing_error")
            },
            ProxyError::UpstreamRejected {
                status,
                retry_after,
                ..
            } => {
                let rate_limited = *status == StatusCode::TOO_MANY_REQUESTS;
                Class {
                    status: *status,
                    kind: "upstream_error",
                    origin: Upstream,
                    recovery: if rate_limited { RateLimited } else { ByStatus },
                    // A 429 says the target is overloaded; other 4xx are about the request.
                    counts_against_health: rate_limited,
                    metric_kind: if rate_limited {
                        "rate_limited"
                    } else {
                        "rejected"
                    },
                    // Passed on for 429s only: the caller may wait and send again.
                    retry_after: retry_after.filter(|_| rate_limited),
                    should_retry: None,
                    upstream_retry_after: *retry_after,
                    // The provider refusing the gateway's credential or throttling it is
                    // the operator's business; a refused request is mostly the caller's.
                    log: if rate_limited
                        || matches!(*status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
                    {
                        Warn
                    } else {
                        LogLevel::Info
                    },
                }
            }
            ProxyError::UpstreamFailed { retry_after, .. } => Class {
                status: StatusCode::BAD_GATEWAY,
                kind: "upstream_error",
                origin: Upstream,
                recovery: Transient,
                counts_against_health: true,
                metric_kind: "server_error",
                // Our 502's retry hint is not the upstream's to give.
                retry_after: None,
                should_retry: None,
                upstream_retry_after: *retry_after,
                log: Warn,
            },
            ProxyError::ProviderUnreachable { .. } => Class {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "provider_unavailable",
                origin: Upstream,
                recovery: Transient,
                counts_against_health: true,
                metric_kind: "unreachable",
                retry_after: None,
                should_retry: None,
                upstream_retry_after: None,
                log: Warn,
            },
            ProxyError::Timeout(_) => Class {
                status: StatusCode::GATEWAY_TIMEOUT,
                kind: "timeout",
                origin: Upstream,
                recovery: Transient,
                counts_against_health: true,
                metric_kind: "timeout",
                retry_after: None,
                should_retry: None,
                upstream_retry_after: None,
                log: Warn,
            },
            ProxyError::StreamBroken(_) => Class {
                status: StatusCode::BAD_GATEWAY,
                kind: "stream_error",
                origin: Upstream,
                recovery: Final,
                counts_against_health: true,
                metric_kind: "stream_break",
                retry_after: None,
                should_retry: None,
                upstream_retry_after: None,
                log: Warn,
            },
            // The target's adapter cannot serve this endpoint or request.
            ProxyError::NotImplemented(_) => Class {
                origin: Gateway,
                recovery: NextTarget,
                metric_kind: "unsupported",
                ..caller(StatusCode::NOT_IMPLEMENTED, "not_implemented")
            },
            // The target has no usable provider key, or no target is left.
            ProxyError::ProviderUnavailable(_) => Class {
                origin: Gateway,
                recovery: NextTarget,
                should_retry: None,
                log: Warn,
                ..caller(StatusCode::SERVICE_UNAVAILABLE, "provider_unavailable")
            },
            // Not the caller's key: nothing can be checked yet. Worth a retry soon.
            ProxyError::RateLimiterUnavailable => Class {
                origin: Gateway,
                retry_after: Some(1),
                should_retry: None,
                log: Warn,
                ..caller(StatusCode::SERVICE_UNAVAILABLE, "rate_limiter_unavailable")
            },
            ProxyError::NotReady => Class {
                origin: Gateway,
                retry_after: Some(1),
                should_retry: None,
                log: Warn,
                ..caller(StatusCode::SERVICE_UNAVAILABLE, "not_ready")
            },
            ProxyError::AllCandidatesUnavailable { retry_after, .. } => Class {
                origin: Gateway,
                retry_after: Some(*retry_after),
                should_retry: None,
                log: Warn,
                ..caller(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "all_candidates_unavailable",
                )
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn upstream(status: u16, retry_after: Option<u64>) -> ProxyError {
        ProxyError::UpstreamRejected {
            status: StatusCode::from_u16(status).unwrap(),
            error: UpstreamErrorFields {
                message: "m".into(),
                kind: "k".into(),
                param: None,
                code: None,
            },
            retry_after,
        }
    }

    /// What routing, health and metrics read, pinned per kind of upstream failure.
    #[test]
    fn upstream_failures_are_classified_once() {
        let row = |e: ProxyError| {
            let c = e.class();
            // Every kind is exported at 0 for each model before it fires.
            assert!(crate::observe::metrics::FAILURE_KINDS.contains(&c.metric_kind));
            (
                c.origin,
                c.recovery,
                c.counts_against_health,
                c.metric_kind,
                c.retry_after,
                c.upstream_retry_after,
            )
        };
        use Origin::*;
        use Recovery::*;
        let failed = ProxyError::UpstreamFailed {
            detail: "d".into(),
            retry_after: Some(4),
        };
        assert_eq!(
            row(failed),
            (Upstream, Transient, true, "server_error", None, Some(4))
        );
        assert_eq!(
            row(ProxyError::Timeout(1)),
            (Upstream, Transient, true, "timeout", None, None)
        );
        let unreachable = ProxyError::ProviderUnreachable {
            model: "m".into(),
            detail: "d".into(),
        };
        assert_eq!(
            row(unreachable),
            (Upstream, Transient, true, "unreachable", None, None)
        );
        assert_eq!(
            row(upstream(429, Some(3))),
            (
                Upstream,
                RateLimited,
                true,
                "rate_limited",
                Some(3),
                Some(3)
            )
        );
        assert_eq!(
            row(upstream(400, Some(3))),
            (Upstream, ByStatus, false, "rejected", None, Some(3))
        );
        assert_eq!(
            row(ProxyError::NotImplemented("x".into())),
            (Gateway, NextTarget, false, "unsupported", None, None)
        );
        assert_eq!(
            row(ProxyError::ProviderUnavailable("x".into())),
            (Gateway, NextTarget, false, "other", None, None)
        );
        assert_eq!(
            row(ProxyError::invalid_request("n", Some("n"))),
            (Caller, Final, false, "other", None, None)
        );
        // The operator is warned of a provider refusing or throttling the gateway; a
        // provider refusing one request is an INFO line (shown at the default level).
        for (status, level) in [
            (401, LogLevel::Warn),
            (403, LogLevel::Warn),
            (429, LogLevel::Warn),
            (400, LogLevel::Info),
            (404, LogLevel::Info),
        ] {
            assert_eq!(upstream(status, None).class().log, level, "{status}");
        }
    }
}
