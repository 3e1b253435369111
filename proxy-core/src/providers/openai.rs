//! OpenAI and every OpenAI-compatible vendor: bearer credential, OpenAI error bodies,
//! every OpenAI-style endpoint natively, Anthropic callers translated to chat
//! completions.

use axum::http::HeaderMap;
use serde::Deserialize;

use super::provider::{CallerRequest, Outgoing, Payload, Prepared, Provider, TargetModel};
use crate::failure::{ProxyError, UpstreamErrorFields};
use crate::formats::chat::{self, AnthropicMessages, Conversion, OpenAiChat};
use crate::formats::endpoint::{CHAT, Endpoint};
use crate::resources::ProviderKey;

pub struct OpenAiCompatible;

impl Provider for OpenAiCompatible {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn supports(&self, endpoint: Endpoint) -> bool {
        !matches!(endpoint, Endpoint::CountTokens)
    }

    fn build(
        &self,
        request: &CallerRequest<'_>,
        target: &TargetModel<'_>,
    ) -> Result<Prepared, ProxyError> {
        let upstream_model = target.upstream_model;
        let body = request.body;
        let (path, payload, conversion) = match request.endpoint {
            Endpoint::ChatCompletions => (
                CHAT,
                Payload::json(body.upstream_body(upstream_model)),
                Conversion::None,
            ),
            Endpoint::Messages => (
                CHAT,
                Payload::json(chat::translate_request(
                    request.raw,
                    &AnthropicMessages,
                    &OpenAiChat,
                    upstream_model,
                )?),
                Conversion::Translate {
                    upstream: &OpenAiChat,
                    caller: &AnthropicMessages,
                },
            ),
            Endpoint::Forward(path) => (path, request.forwarded(upstream_model)?, Conversion::None),
            Endpoint::CountTokens => {
                return Err(ProxyError::NotImplemented(
                    "count_tokens is not an OpenAI endpoint".into(),
                ));
            }
        };
        Ok(Prepared {
            outgoing: Outgoing {
                path: path.into(),
                payload,
                stream: body.stream,
                json_answer: request.endpoint.answers_json(),
                headers: HeaderMap::new(),
            },
            conversion,
        })
    }

    fn authorize(
        &self,
        request: reqwest::RequestBuilder,
        key: &ProviderKey,
    ) -> reqwest::RequestBuilder {
        request.bearer_auth(key.credential.expose())
    }

    fn error_fields(&self, status: u16, body: &[u8]) -> UpstreamErrorFields {
        upstream_error_fields(status, body)
    }
}

/// Reads an upstream 4xx body: native OpenAI errors keep their fields; anything else
/// becomes a generic `upstream_error` naming the status.
pub fn upstream_error_fields(status: u16, body: &[u8]) -> UpstreamErrorFields {
    #[derive(Deserialize)]
    struct Envelope {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        message: Option<String>,
        #[serde(rename = "type")]
        kind: Option<String>,
        param: Option<String>,
        code: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope { error }) => UpstreamErrorFields {
            message: error
                .message
                .unwrap_or_else(|| format!("the upstream provider answered {status}")),
            kind: error.kind.unwrap_or_else(|| "upstream_error".to_owned()),
            param: error.param,
            code: match error.code {
                Some(serde_json::Value::String(s)) => Some(s),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                _ => None,
            },
        },
        Err(_) => UpstreamErrorFields {
            message: format!("the upstream provider answered {status}"),
            kind: "upstream_error".to_owned(),
            param: None,
            code: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_errors_keep_openai_fields() {
        let f = upstream_error_fields(400, br#"{"error":{"message":"bad","type":"invalid_request_error","param":"x","code":null}}"#);
        assert_eq!(
            (
                f.message.as_str(),
                f.kind.as_str(),
                f.param.as_deref(),
                f.code
            ),
            ("bad", "invalid_request_error", Some("x"), None)
        );
        let f = upstream_error_fields(404, b"<html>");
        assert_eq!(
            (f.message.as_str(), f.kind.as_str()),
            ("the upstream provider answered 404", "upstream_error")
        );
    }
}
