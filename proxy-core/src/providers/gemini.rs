//! Google's Gemini API: `{api_base}/v1beta/models/{model}:generateContent`, and
//! `:streamGenerateContent?alt=sse` for streams, authenticated by `x-goog-api-key`.
//! Chat completions and messages are translated (`formats::chat::GeminiContent`);
//! Google's error statuses (`RESOURCE_EXHAUSTED`, `PERMISSION_DENIED`...) read as the
//! gateway's codes.

use axum::http::HeaderMap;
use bytes::Bytes;
use percent_encoding::utf8_percent_encode;
use serde_json::Value;

use super::azure::SEGMENT;
use super::provider::{CallerRequest, Outgoing, Payload, Prepared, Provider, TargetModel};
use crate::failure::{ProxyError, UpstreamErrorFields};
use crate::formats::chat::{
    self, AnthropicMessages, CallerCodec, Conversion, GeminiContent, OpenAiChat,
};
use crate::formats::endpoint::Endpoint;
use crate::resources::ProviderKey;

pub struct Gemini;

impl Provider for Gemini {
    fn name(&self) -> &'static str {
        "gemini"
    }

    fn supports(&self, endpoint: Endpoint) -> bool {
        matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Messages)
    }

    fn build(
        &self,
        request: &CallerRequest<'_>,
        target: &TargetModel<'_>,
    ) -> Result<Prepared, ProxyError> {
        let caller: &'static dyn CallerCodec = match request.endpoint {
            Endpoint::ChatCompletions => &OpenAiChat,
            Endpoint::Messages => &AnthropicMessages,
            other => {
                return Err(ProxyError::NotImplemented(format!(
                    "{} is not a Gemini endpoint",
                    other.path()
                )));
            }
        };
        let body =
            chat::translate_request(request.raw, caller, &GeminiContent, target.upstream_model)?;
        let model = target.upstream_model.trim_start_matches("models/");
        let action = if request.body.stream {
            "streamGenerateContent?alt=sse"
        } else {
            "generateContent"
        };
        let path = format!(
            "/v1beta/models/{}:{action}",
            utf8_percent_encode(model, SEGMENT)
        );
        Ok(Prepared {
            outgoing: Outgoing {
                path: path.into(),
                payload: Payload::Json(Bytes::from(body)),
                stream: request.body.stream,
                json_answer: true,
                headers: HeaderMap::new(),
            },
            conversion: Conversion::Translate {
                upstream: &GeminiContent,
                caller,
            },
        })
    }

    fn authorize(
        &self,
        request: reqwest::RequestBuilder,
        key: &ProviderKey,
    ) -> reqwest::RequestBuilder {
        request.header("x-goog-api-key", key.credential.expose())
    }

    fn error_fields(&self, status: u16, body: &[u8]) -> UpstreamErrorFields {
        google_error_fields(status, body)
    }
}

/// A Google API error (`{"error": {code, message, status}}`) as the caller's fields:
/// `upstream_error` with a code saying what kind of refusal it was.
pub fn google_error_fields(status: u16, body: &[u8]) -> UpstreamErrorFields {
    let error: Value = serde_json::from_slice(body).unwrap_or_default();
    let code = match (
        error.pointer("/error/status").and_then(Value::as_str),
        status,
    ) {
        (Some("RESOURCE_EXHAUSTED"), _) | (None, 429) => "rate_limit_exceeded",
        (Some("PERMISSION_DENIED"), _) | (None, 403) => "permission_denied",
        (Some("NOT_FOUND"), _) | (None, 404) => "model_not_found",
        (Some("UNAUTHENTICATED"), _) | (None, 401) => "upstream_authentication_failed",
        (Some("DEADLINE_EXCEEDED"), _) => "timeout",
        _ => "invalid_request",
    };
    let message = error
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map_or_else(
            || format!("the upstream provider answered {status}"),
            str::to_owned,
        );
    UpstreamErrorFields {
        message,
        kind: "upstream_error".to_owned(),
        param: None,
        code: Some(code.to_owned()),
    }
}
