//! The error envelopes of the route families, rendered from a failure's [`Class`].

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;

use super::class::{Class, MAX_RETRY_AFTER_SECS, ProxyError};
use crate::hooks::BudgetDenial;

/// The error envelope of a route family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// `{"error": {"message", "type", "param"?, "code"?}}`
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}`, the type following the status.
    Anthropic,
}

/// Error types of the OpenAI and Anthropic APIs, as an upstream's refusal may carry
/// them.
const KNOWN_UPSTREAM_TYPES: &[&str] = &[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "insufficient_quota",
    "tokens",
    "requests",
    "api_error",
    "server_error",
    "overloaded_error",
];

/// Read by the official OpenAI and Anthropic SDKs before their own retry rule.
pub const SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// The error type of an error response, set where errors are rendered (a response
/// extension the access log and metrics read).
#[derive(Debug, Clone, Copy)]
pub struct ErrorType(pub &'static str);

impl ProxyError {
    /// Renders the error in `envelope`, with its `Retry-After`.
    pub fn into_response_in(self, envelope: Envelope) -> Response {
        let class = self.class();
        let body = match envelope {
            Envelope::OpenAi => self.openai_body(&class),
            Envelope::Anthropic => self.anthropic_body(&class),
        };
        let mut response = json_response(class.status, body);
        response
            .extensions_mut()
            .insert(ErrorType(self.shown_type(&class)));
        let headers = response.headers_mut();
        if let Some(seconds) = class.retry_after {
            let seconds = seconds.min(MAX_RETRY_AFTER_SECS);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(retry) = class.should_retry {
            let value = HeaderValue::from_static(if retry { "true" } else { "false" });
            headers.insert(SHOULD_RETRY, value);
        }
        response
    }

    /// The error type the OpenAI envelope shows, for logs and metrics: an upstream's
    /// refusal keeps the upstream's type when it is one of the APIs' own (the body says
    /// it); any other text is `upstream_error`, so a provider cannot mint label values.
    fn shown_type(&self, class: &Class) -> &'static str {
        match self {
            ProxyError::UpstreamRejected { error, .. } => KNOWN_UPSTREAM_TYPES
                .iter()
                .find(|known| **known == error.kind)
                .copied()
                .unwrap_or(class.kind),
            _ => class.kind,
        }
    }

    /// The message the caller is shown: an upstream 4xx keeps the upstream's.
    fn message(&self) -> String {
        match self {
            ProxyError::UpstreamRejected { error, .. } => error.message.clone(),
            _ => self.to_string(),
        }
    }

    /// `{"type":"error","error":{"type","message"}}`, the type chosen by status as
    /// Anthropic's SDKs expect.
    fn anthropic_body(&self, class: &Class) -> Vec<u8> {
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
            #[serde(skip_serializing_if = "Option::is_none")]
            code: Option<&'static str>,
        }
        let body = Envelope {
            kind: "error",
            error: Error {
                kind: anthropic_error_type(class.status),
                message: &self.message(),
                code: match self {
                    ProxyError::InactiveApiKey { code, .. } => Some(code),
                    _ => None,
                },
            },
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// `{"error":{"message","type","param"?,"code"?}}`.
    fn openai_body(&self, class: &Class) -> Vec<u8> {
        let message = self.to_string();
        match self {
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
            ProxyError::InactiveApiKey { code, .. } => {
                OpenAiEnvelope::new(&message, class.kind, None, Some(code)).to_json()
            }
            _ => OpenAiEnvelope::new(&message, class.kind, None, None).to_json(),
        }
    }
}

/// The last event of a stream that a failure ends after it began, in the caller's
/// format: OpenAI's `data: {"error":{...}}`, Anthropic's `event: error`.
pub fn stream_error_event(error: &ProxyError, envelope: Envelope) -> Bytes {
    let class = error.class();
    match envelope {
        Envelope::OpenAi => {
            let message = error.message();
            let code = match error {
                ProxyError::StreamBroken(broke) => Some(broke.code()),
                _ => None,
            };
            let event = OpenAiEnvelope::new(&message, class.kind, None, code);
            let json = String::from_utf8(event.to_json()).unwrap_or_default();
            Bytes::from(format!("data: {json}\n\n"))
        }
        Envelope::Anthropic => {
            let json = String::from_utf8(error.anthropic_body(&class)).unwrap_or_default();
            Bytes::from(format!("event: error\ndata: {json}\n\n"))
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        self.into_response_in(Envelope::OpenAi)
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

pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http_body_util::BodyExt;

    use super::*;
    use crate::failure::UpstreamErrorFields;

    async fn render(e: ProxyError) -> (u16, String) {
        let r = e.into_response_in(Envelope::OpenAi);
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
                ProxyError::InactiveApiKey {
                    message: "this API key is disabled",
                    code: "api_key_disabled",
                },
                401,
                r#"{"error":{"message":"this API key is disabled","type":"invalid_api_key","code":"api_key_disabled"}}"#,
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
                ProxyError::BodyReadTimeout { millis: 30000 },
                408,
                r#"{"error":{"message":"the request body did not arrive within 30000 ms","type":"invalid_request_error"}}"#,
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
                ProxyError::RateLimiterUnavailable,
                503,
                r#"{"error":{"message":"rate limits cannot be checked: the shared counter store (Redis) is not answering; retry shortly","type":"rate_limiter_unavailable"}}"#,
            ),
            (
                ProxyError::NotReady,
                503,
                r#"{"error":{"message":"the gateway has not loaded its configuration yet; retry shortly","type":"not_ready"}}"#,
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

    #[test]
    fn the_logged_error_type_is_the_bodys_for_known_upstream_types_only() {
        let refused = |kind: &str| ProxyError::UpstreamRejected {
            status: StatusCode::BAD_REQUEST,
            error: UpstreamErrorFields {
                message: "no".into(),
                kind: kind.into(),
                param: None,
                code: None,
            },
            retry_after: None,
        };
        let logged = |error: ProxyError| {
            let response = error.into_response_in(Envelope::OpenAi);
            response.extensions().get::<ErrorType>().map(|e| e.0)
        };
        assert_eq!(
            logged(refused("invalid_request_error")),
            Some("invalid_request_error")
        );
        assert_eq!(
            logged(refused("overloaded_error")),
            Some("overloaded_error")
        );
        // A provider's own words never become a log field or a label value.
        assert_eq!(logged(refused("my\ncustom-type")), Some("upstream_error"));
        assert_eq!(
            logged(ProxyError::ModelNotFound("m".into())),
            Some("model_not_found")
        );
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
                    why: "",
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
                ProxyError::InactiveApiKey {
                    message: "this API key has expired",
                    code: "api_key_expired",
                },
                401,
                r#"{"type":"error","error":{"type":"authentication_error","message":"this API key has expired","code":"api_key_expired"}}"#,
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
                ProxyError::BodyReadTimeout { millis: 500 },
                408,
                r#"{"type":"error","error":{"type":"timeout_error","message":"the request body did not arrive within 500 ms"}}"#,
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
            limited.into_response_in(Envelope::Anthropic).headers()[header::RETRY_AFTER],
            "3"
        );
        let r = upstream(429, "busy").into_response_in(Envelope::Anthropic);
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
        let response =
            ProxyError::BudgetDenied(Arc::new(denial)).into_response_in(Envelope::OpenAi);
        // The header is capped and says not to retry; the body has the true reset.
        assert_eq!(response.headers()[header::RETRY_AFTER], "60");
        assert_eq!(response.headers()[SHOULD_RETRY], "false");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"error":{"message":"Budget exceeded for API key k1.","type":"billing_error","code":"budget_exceeded","scope":"api_key","scope_ref":"k1","limit_usd":1.5,"spent_usd":2.0,"period":"monthly","period_resets_at":"2026-12-01T00:00:00Z","retry_after_seconds":3600}}"#
        );

        let unavailable = BudgetDenial::new("no budget decision", "budget_unavailable");
        let response =
            ProxyError::BudgetDenied(Arc::new(unavailable)).into_response_in(Envelope::OpenAi);
        assert_eq!(response.status(), 429);
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
        // No decision yet (the control plane is away): a later try may pass.
        assert!(response.headers().get(SHOULD_RETRY).is_none());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"error":{"message":"no budget decision","type":"billing_error","code":"budget_unavailable"}}"#
        );
    }
}
