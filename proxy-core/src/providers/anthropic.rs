//! Anthropic's messages API: `x-api-key` and `anthropic-version`, Anthropic error
//! bodies, messages and count_tokens natively, OpenAI chat and Responses callers
//! translated.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::provider::{
    CallerRequest, Outgoing, Payload, Prepared, Provider, TargetModel, coded_error,
};
use crate::failure::{ProxyError, UpstreamErrorFields};
use crate::formats::body::JsonBody;
use crate::formats::chat::{self, AnthropicMessages, Conversion, OpenAiChat};
use crate::formats::endpoint::{Endpoint, MESSAGES, RESPONSES};
use crate::resources::ProviderKey;

/// The Anthropic API version sent when the caller did not choose one.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

const VERSION: HeaderName = HeaderName::from_static("anthropic-version");
const BETA: HeaderName = HeaderName::from_static("anthropic-beta");

pub struct Anthropic;

impl Provider for Anthropic {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn supports(&self, endpoint: Endpoint) -> bool {
        matches!(
            endpoint,
            Endpoint::ChatCompletions
                | Endpoint::Messages
                | Endpoint::CountTokens
                | Endpoint::Forward(RESPONSES)
        )
    }

    fn build(
        &self,
        request: &CallerRequest<'_>,
        target: &TargetModel<'_>,
    ) -> Result<Prepared, ProxyError> {
        let upstream_model = target.upstream_model;
        // With automatic prompt caching, a generation request without the caller's own
        // markers gets breakpoints on its system prompt and its last message.
        let json = |body: JsonBody| {
            let cached = target
                .prompt_cache
                .filter(|_| request.endpoint != Endpoint::CountTokens)
                .and_then(|ttl| chat::add_cache_breakpoints(&body.contiguous(), ttl));
            match cached {
                Some(bytes) => Payload::json(bytes),
                None => Payload::Json(body),
            }
        };
        let (path, payload, conversion, headers) = match request.endpoint {
            endpoint @ (Endpoint::ChatCompletions | Endpoint::Forward(RESPONSES)) => {
                let caller = chat::caller_format(endpoint).unwrap_or(&OpenAiChat);
                (
                    MESSAGES,
                    json(
                        chat::translate_request(
                            request.raw,
                            caller,
                            &AnthropicMessages,
                            upstream_model,
                        )?
                        .into(),
                    ),
                    Conversion::Translate {
                        upstream: &AnthropicMessages,
                        caller,
                    },
                    headers(None),
                )
            }
            endpoint @ (Endpoint::Messages | Endpoint::CountTokens) => (
                endpoint.path(),
                json(request.body.with_model(upstream_model)),
                Conversion::None,
                headers(Some(request.headers)),
            ),
            Endpoint::Forward(path) => {
                return Err(ProxyError::NotImplemented(format!(
                    "{path} is not an Anthropic endpoint"
                )));
            }
        };
        Ok(Prepared {
            outgoing: Outgoing {
                path: path.into(),
                payload,
                stream: request.body.stream,
                json_answer: request.endpoint.answers_json(),
                headers,
            },
            conversion,
        })
    }

    fn authorize(
        &self,
        request: reqwest::RequestBuilder,
        key: &ProviderKey,
    ) -> reqwest::RequestBuilder {
        request.header("x-api-key", key.credential.expose())
    }

    fn error_fields(&self, status: u16, body: &[u8]) -> UpstreamErrorFields {
        anthropic_error_fields(status, body)
    }

    fn passthrough_defaults(&self, headers: &mut HeaderMap) {
        if !headers.contains_key(VERSION) {
            headers.insert(VERSION, HeaderValue::from_static(ANTHROPIC_VERSION));
        }
    }
}

/// `anthropic-version` (the caller's on native requests, else ours) and, on native
/// requests, the caller's `anthropic-beta`.
fn headers(caller: Option<&HeaderMap>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let theirs = |name: &HeaderName| caller.and_then(|h| h.get(name)).cloned();
    headers.insert(
        VERSION,
        theirs(&VERSION).unwrap_or(HeaderValue::from_static(ANTHROPIC_VERSION)),
    );
    if let Some(beta) = theirs(&BETA) {
        headers.insert(BETA, beta);
    }
    headers
}

/// An Anthropic upstream 4xx as OpenAI-style fields: `upstream_error` with a code
/// saying what kind of refusal it was, and Anthropic's message.
pub fn anthropic_error_fields(status: u16, body: &[u8]) -> UpstreamErrorFields {
    anthropic_error(status, &serde_json::from_slice(body).unwrap_or_default())
}

pub(super) fn anthropic_error(status: u16, error: &Value) -> UpstreamErrorFields {
    let kind = error.pointer("/error/type").and_then(Value::as_str);
    let code = match (kind, status) {
        (Some("rate_limit_error"), _) | (None, 429) => "rate_limit_exceeded",
        (Some("permission_error"), _) | (None, 403) => "permission_denied",
        (Some("not_found_error"), _) | (None, 404) => "model_not_found",
        (Some("request_too_large"), _) | (None, 413) => "request_too_large",
        (Some("authentication_error"), _) | (None, 401) => "upstream_authentication_failed",
        (Some("timeout_error"), _) | (None, 408) => "timeout",
        _ => "invalid_request",
    };
    coded_error(status, error, code)
}
