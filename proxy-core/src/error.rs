//! The one proxy error type, classified once into status, error type and envelope.
//!
//! `ProxyError::class` is an exhaustive match without a wildcard arm: a new variant
//! does not compile until someone decides its status, type and log level.

use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::budget::BudgetDenial;

/// Why a proxy request failed. Messages are shown to callers: they never carry
/// secrets or upstream 5xx bodies.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    InvalidApiKey(&'static str),
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
    #[error("{0}")]
    NotImplemented(String),
    #[error("{0}")]
    ProviderUnavailable(String),
    /// A blocking guardrail matched; the matched text is never shown.
    #[error("the {stage} was blocked by guardrail '{guardrail}'")]
    ContentFiltered {
        guardrail: String,
        stage: &'static str,
    },
    /// A rate limit of the caller key or the model refused the request.
    #[error("{message}")]
    RateLimited { message: String, retry_after: u64 },
    /// The budget gate refused the caller key.
    #[error("{}", .0.message)]
    BudgetDenied(Arc<BudgetDenial>),
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

/// The error envelope of a route family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// `{"error": {"message", "type", "param"?, "code"?}}`
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}`, the type following the status.
    Anthropic,
}

/// How an error presents itself: one decision per variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub status: StatusCode,
    pub kind: &'static str,
    /// Gateway-side problems an operator may need to look at are logged at WARN.
    pub operator_visible: bool,
}

impl ProxyError {
    pub fn invalid_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param,
        }
    }

    pub fn class(&self) -> Class {
        let (status, kind, operator_visible) = match self {
            ProxyError::InvalidApiKey(_) => (StatusCode::UNAUTHORIZED, "invalid_api_key", false),
            ProxyError::PermissionDenied(_) => (StatusCode::FORBIDDEN, "permission_denied", false),
            ProxyError::ModelNotFound(_) => (StatusCode::NOT_FOUND, "model_not_found", false),
            ProxyError::InvalidRequest { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", false)
            }
            ProxyError::BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                false,
            ),
            ProxyError::HeadersTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "invalid_request_error",
                false,
            ),
            ProxyError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                false,
            ),
            ProxyError::UpstreamRejected { status, .. } => (*status, "upstream_error", false),
            ProxyError::UpstreamFailed { .. } => (StatusCode::BAD_GATEWAY, "upstream_error", true),
            ProxyError::ProviderUnreachable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "provider_unavailable",
                true,
            ),
            ProxyError::AllCandidatesUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "all_candidates_unavailable",
                true,
            ),
            ProxyError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout", true),
            ProxyError::NotImplemented(_) => {
                (StatusCode::NOT_IMPLEMENTED, "not_implemented", false)
            }
            ProxyError::ProviderUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "provider_unavailable",
                true,
            ),
            ProxyError::BudgetDenied(_) => (StatusCode::TOO_MANY_REQUESTS, "billing_error", false),
            ProxyError::ContentFiltered { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "content_filter", false)
            }
            ProxyError::RateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", false)
            }
            ProxyError::UnknownRoute(_) | ProxyError::NotFound(_) => {
                (StatusCode::NOT_FOUND, "invalid_request_error", false)
            }
            ProxyError::MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                false,
            ),
        };
        Class {
            status,
            kind,
            operator_visible,
        }
    }

    /// The kind of a failed upstream attempt, for `aisix_upstream_failures_total`.
    pub fn failure_kind(&self) -> &'static str {
        match self {
            ProxyError::Timeout(_) => "timeout",
            ProxyError::ProviderUnreachable { .. } => "unreachable",
            // A 5xx answer or a connection broken mid-answer.
            ProxyError::UpstreamFailed { .. } => "server_error",
            ProxyError::UpstreamRejected { status, .. }
                if *status == StatusCode::TOO_MANY_REQUESTS =>
            {
                "rate_limited"
            }
            ProxyError::UpstreamRejected { .. } => "rejected",
            ProxyError::NotImplemented(_) => "unsupported",
            _ => "other",
        }
    }

    /// Renders the error in `envelope`, with its `Retry-After`.
    pub fn into_response_in(self, envelope: Envelope) -> Response {
        match envelope {
            Envelope::OpenAi => self.into_openai_response(),
            Envelope::Anthropic => self.into_anthropic_response(),
        }
    }

    /// Renders the Anthropic envelope: `{"type":"error","error":{"type","message"}}`,
    /// the type chosen by status as Anthropic's SDKs expect.
    pub fn into_anthropic_response(self) -> Response {
        let status = self.class().status;
        let message = match &self {
            ProxyError::UpstreamRejected { error, .. } => error.message.clone(),
            _ => self.to_string(),
        };
        #[derive(Serialize)]
        struct Envelope<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            error: Error<'a>,
        }
        #[derive(Serialize)]
        struct Error<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            message: &'a str,
        }
        let body = Envelope {
            kind: "error",
            error: Error {
                kind: anthropic_error_type(status),
                message: &message,
            },
        };
        let mut response = json_response(status, serde_json::to_vec(&body).unwrap_or_default());
        self.annotate(&mut response);
        response
    }

    /// Renders the OpenAI envelope: `{"error":{"message","type","param"?,"code"?}}`.
    pub fn into_openai_response(self) -> Response {
        let class = self.class();
        let message = self.to_string();
        let body = match &self {
            ProxyError::UpstreamRejected { error, .. } => OpenAiEnvelope::new(
                &error.message,
                &error.kind,
                error.param.as_deref(),
                error.code.as_deref(),
            )
            .to_json(),
            ProxyError::InvalidRequest { param, .. } => {
                OpenAiEnvelope::new(&message, class.kind, *param, None).to_json()
            }
            ProxyError::BudgetDenied(denial) => budget_envelope(class.kind, denial),
            _ => OpenAiEnvelope::new(&message, class.kind, None, None).to_json(),
        };
        let mut response = json_response(class.status, body);
        self.annotate(&mut response);
        response
    }

    /// Adds `Retry-After` and the error type (for the access log and metrics).
    fn annotate(&self, response: &mut Response) {
        response
            .extensions_mut()
            .insert(crate::http::ErrorType(self.class().kind));
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
    }

    /// The upstream's own `Retry-After`, in seconds, whatever its status.
    pub fn upstream_retry_after(&self) -> Option<u64> {
        match self {
            ProxyError::UpstreamRejected { retry_after, .. }
            | ProxyError::UpstreamFailed { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The retry hint sent as `Retry-After`, in seconds.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ProxyError::BudgetDenied(denial) => denial.retry_after_seconds,
            ProxyError::AllCandidatesUnavailable { retry_after, .. }
            | ProxyError::RateLimited { retry_after, .. } => Some(*retry_after),
            // Passed through on upstream 429s only: a 5xx becomes our 502, whose retry
            // hint is not the upstream's to give.
            ProxyError::UpstreamRejected {
                status,
                retry_after,
                ..
            } if *status == StatusCode::TOO_MANY_REQUESTS => *retry_after,
            _ => None,
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        self.into_openai_response()
    }
}

/// Anthropic's error type for a status (the mapping its SDKs use).
pub fn anthropic_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 415 | 422 | 431 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 => "timeout_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    }
}

/// `{"error":{"message","type","code", <the denial's budget fields>}}`.
fn budget_envelope(kind: &str, denial: &BudgetDenial) -> Vec<u8> {
    #[derive(Serialize)]
    struct Envelope<'a> {
        error: Fields<'a>,
    }
    #[derive(Serialize)]
    struct Fields<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        #[serde(flatten)]
        denial: Details<'a>,
    }
    /// The denial without `message`, which comes first.
    #[derive(Serialize)]
    struct Details<'a> {
        code: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        scope: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        scope_ref: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        limit_usd: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        spent_usd: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        period: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        period_resets_at: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_seconds: Option<u64>,
    }
    let envelope = Envelope {
        error: Fields {
            message: &denial.message,
            kind,
            denial: Details {
                code: &denial.code,
                scope: denial.scope.as_deref(),
                scope_ref: denial.scope_ref.as_deref(),
                limit_usd: denial.limit_usd,
                spent_usd: denial.spent_usd,
                period: denial.period.as_deref(),
                period_resets_at: denial.period_resets_at.as_deref(),
                retry_after_seconds: denial.retry_after_seconds,
            },
        },
    };
    serde_json::to_vec(&envelope).unwrap_or_default()
}

#[derive(Serialize)]
struct OpenAiEnvelope<'a> {
    error: OpenAiError<'a>,
}

#[derive(Serialize)]
struct OpenAiError<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    param: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
}

impl<'a> OpenAiEnvelope<'a> {
    fn new(message: &'a str, kind: &'a str, param: Option<&'a str>, code: Option<&'a str>) -> Self {
        Self {
            error: OpenAiError {
                message,
                kind,
                param,
                code,
            },
        }
    }

    fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

pub(crate) fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn render(e: ProxyError) -> (u16, String) {
        let r = e.into_openai_response();
        let status = r.status().as_u16();
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// Golden envelopes, byte for byte.
    #[tokio::test]
    async fn openai_envelopes_are_pinned() {
        let cases = [
            (
                ProxyError::InvalidApiKey("invalid API key"),
                401,
                r#"{"error":{"message":"invalid API key","type":"invalid_api_key"}}"#,
            ),
            (
                ProxyError::PermissionDenied("this API key may not use model 'gpt'".into()),
                403,
                r#"{"error":{"message":"this API key may not use model 'gpt'","type":"permission_denied"}}"#,
            ),
            (
                ProxyError::ModelNotFound("nope".into()),
                404,
                r#"{"error":{"message":"model 'nope' does not exist","type":"model_not_found"}}"#,
            ),
            (
                ProxyError::invalid_request("missing required parameter 'model'", Some("model")),
                400,
                r#"{"error":{"message":"missing required parameter 'model'","type":"invalid_request_error","param":"model"}}"#,
            ),
            (
                ProxyError::BodyTooLarge { limit: 10 },
                413,
                r#"{"error":{"message":"request body exceeds the limit of 10 bytes","type":"invalid_request_error"}}"#,
            ),
            (
                ProxyError::UpstreamFailed {
                    detail: "secret upstream body".into(),
                    retry_after: None,
                },
                502,
                r#"{"error":{"message":"the upstream provider failed to answer","type":"upstream_error"}}"#,
            ),
            (
                ProxyError::Timeout(1500),
                504,
                r#"{"error":{"message":"the upstream provider did not answer within 1500 ms","type":"timeout"}}"#,
            ),
            (
                ProxyError::NotImplemented("x".into()),
                501,
                r#"{"error":{"message":"x","type":"not_implemented"}}"#,
            ),
            (
                ProxyError::ProviderUnavailable("y".into()),
                503,
                r#"{"error":{"message":"y","type":"provider_unavailable"}}"#,
            ),
            (
                ProxyError::ProviderUnreachable {
                    model: "gpt".into(),
                    detail: "connection refused to 10.0.0.1".into(),
                },
                503,
                r#"{"error":{"message":"the upstream provider of model 'gpt' cannot be reached","type":"provider_unavailable"}}"#,
            ),
            (
                ProxyError::NotFound("provider 'x' is not configured".into()),
                404,
                r#"{"error":{"message":"provider 'x' is not configured","type":"invalid_request_error"}}"#,
            ),
            (
                ProxyError::RateLimited {
                    message: "rate limit exceeded: 2 requests per minute for this API key".into(),
                    retry_after: 30,
                },
                429,
                r#"{"error":{"message":"rate limit exceeded: 2 requests per minute for this API key","type":"rate_limit_exceeded"}}"#,
            ),
            (
                ProxyError::AllCandidatesUnavailable {
                    model: "smart".into(),
                    retry_after: 7,
                },
                503,
                r#"{"error":{"message":"every target of model 'smart' is cooling down after failures","type":"all_candidates_unavailable"}}"#,
            ),
            (
                ProxyError::UpstreamRejected {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    error: UpstreamErrorFields {
                        message: "slow down".into(),
                        kind: "requests".into(),
                        param: None,
                        code: Some("rate_limit_exceeded".into()),
                    },
                    retry_after: None,
                },
                429,
                r#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#,
            ),
        ];
        for (error, status, body) in cases {
            assert_eq!(render(error).await, (status, body.to_owned()));
        }
    }

    /// Golden Anthropic envelopes: every row of the status table.
    #[tokio::test]
    async fn anthropic_envelopes_are_pinned() {
        let upstream = |status: u16, message: &str| ProxyError::UpstreamRejected {
            status: StatusCode::from_u16(status).unwrap(),
            error: UpstreamErrorFields {
                message: message.into(),
                kind: "upstream_error".into(),
                param: None,
                code: Some("x".into()),
            },
            retry_after: Some(9),
        };
        let cases = [
            (
                ProxyError::invalid_request("'messages' must be an array", Some("messages")),
                400,
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"'messages' must be an array"}}"#,
            ),
            (
                ProxyError::ContentFiltered {
                    guardrail: "g".into(),
                    stage: "input",
                },
                422,
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"the input was blocked by guardrail 'g'"}}"#,
            ),
            (
                ProxyError::InvalidApiKey("invalid API key"),
                401,
                r#"{"type":"error","error":{"type":"authentication_error","message":"invalid API key"}}"#,
            ),
            (
                ProxyError::PermissionDenied("no".into()),
                403,
                r#"{"type":"error","error":{"type":"permission_error","message":"no"}}"#,
            ),
            (
                ProxyError::ModelNotFound("m".into()),
                404,
                r#"{"type":"error","error":{"type":"not_found_error","message":"model 'm' does not exist"}}"#,
            ),
            (
                upstream(408, "too slow"),
                408,
                r#"{"type":"error","error":{"type":"timeout_error","message":"too slow"}}"#,
            ),
            (
                ProxyError::BodyTooLarge { limit: 10 },
                413,
                r#"{"type":"error","error":{"type":"request_too_large","message":"request body exceeds the limit of 10 bytes"}}"#,
            ),
            (
                ProxyError::RateLimited {
                    message: "slow down".into(),
                    retry_after: 3,
                },
                429,
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
            ),
            (
                ProxyError::ProviderUnavailable("down".into()),
                503,
                r#"{"type":"error","error":{"type":"overloaded_error","message":"down"}}"#,
            ),
            (
                ProxyError::UpstreamFailed {
                    detail: "secret".into(),
                    retry_after: None,
                },
                502,
                r#"{"type":"error","error":{"type":"api_error","message":"the upstream provider failed to answer"}}"#,
            ),
            (
                ProxyError::NotImplemented("nope".into()),
                501,
                r#"{"type":"error","error":{"type":"api_error","message":"nope"}}"#,
            ),
            (
                ProxyError::Timeout(5),
                504,
                r#"{"type":"error","error":{"type":"api_error","message":"the upstream provider did not answer within 5 ms"}}"#,
            ),
        ];
        for (error, status, body) in cases {
            let r = error.into_response_in(Envelope::Anthropic);
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
            let got = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(std::str::from_utf8(&got).unwrap(), body);
        }
        let limited = ProxyError::RateLimited {
            message: "m".into(),
            retry_after: 3,
        };
        assert_eq!(
            limited.into_anthropic_response().headers()[header::RETRY_AFTER],
            "3"
        );
        let r = upstream(429, "busy").into_anthropic_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "9");
    }

    #[tokio::test]
    async fn a_budget_denial_carries_its_fields_and_retry_after() {
        let denial = BudgetDenial {
            message: "Budget exceeded for API key k1.".into(),
            code: "budget_exceeded".into(),
            scope: Some("api_key".into()),
            scope_ref: Some("k1".into()),
            limit_usd: Some(1.5),
            spent_usd: Some(2.0),
            period: Some("monthly".into()),
            period_resets_at: Some("2026-12-01T00:00:00Z".into()),
            retry_after_seconds: Some(3600),
        };
        let response = ProxyError::BudgetDenied(Arc::new(denial)).into_openai_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "3600");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"error":{"message":"Budget exceeded for API key k1.","type":"billing_error","code":"budget_exceeded","scope":"api_key","scope_ref":"k1","limit_usd":1.5,"spent_usd":2.0,"period":"monthly","period_resets_at":"2026-12-01T00:00:00Z","retry_after_seconds":3600}}"#
        );

        let unavailable = BudgetDenial::new("no budget decision", "budget_unavailable");
        let response = ProxyError::BudgetDenied(Arc::new(unavailable)).into_openai_response();
        assert_eq!(response.status(), 429);
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"error":{"message":"no budget decision","type":"billing_error","code":"budget_unavailable"}}"#
        );
    }
}
