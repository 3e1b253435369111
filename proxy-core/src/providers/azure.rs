//! Azure OpenAI: the OpenAI wire format under deployment URLs,
//! `{api_base}/openai/deployments/{deployment}/{route}?api-version={v}` (the model's
//! `model_name` is the deployment), authenticated by an `api-key` header or by an Entra
//! ID bearer token minted with the key's client credentials (`tokens.rs`).
//! Anthropic callers are translated to chat completions; content-filter refusals come
//! back as `content_filter` errors.

use std::borrow::Cow;

use axum::http::HeaderMap;

use super::openai::upstream_error_fields;
use super::provider::{CallerRequest, Outgoing, Payload, Prepared, Provider, TargetModel, segment};
use super::tokens::{self, Minted};
use crate::failure::{ProxyError, UpstreamErrorFields};
use crate::formats::chat::{self, AnthropicMessages, Conversion, OpenAiChat};
use crate::formats::endpoint::Endpoint;
use crate::resources::{EntraCredential, ProviderKey};

/// The `api-version` sent unless the provider key names one: the current GA version.
pub const DEFAULT_API_VERSION: &str = "2024-10-21";
/// The Responses API is in preview on Azure: its default version.
pub const RESPONSES_API_VERSION: &str = "2025-04-01-preview";
/// What Entra tokens are asked for.
const SCOPE: &str = "https://cognitiveservices.azure.com/.default";

pub struct AzureOpenAi;

impl Provider for AzureOpenAi {
    fn name(&self) -> &'static str {
        "azure-openai"
    }

    fn supports(&self, endpoint: Endpoint) -> bool {
        matches!(
            endpoint,
            Endpoint::ChatCompletions
                | Endpoint::Messages
                | Endpoint::Forward(
                    "/v1/completions"
                        | "/v1/embeddings"
                        | "/v1/responses"
                        | "/v1/images/generations"
                        | "/v1/audio/speech"
                        | "/v1/audio/transcriptions"
                        | "/v1/audio/translations"
                )
        )
    }

    fn build(
        &self,
        request: &CallerRequest<'_>,
        target: &TargetModel<'_>,
    ) -> Result<Prepared, ProxyError> {
        let deployment = target.upstream_model;
        let body = request.body;
        let version = target.key.api_version.as_deref();
        let (route, payload, conversion) = match request.endpoint {
            Endpoint::ChatCompletions => (
                "chat/completions",
                Payload::json(body.upstream_body(deployment)),
                Conversion::None,
            ),
            Endpoint::Messages => (
                "chat/completions",
                Payload::json(chat::translate_request(
                    request.raw,
                    &AnthropicMessages,
                    &OpenAiChat,
                    deployment,
                )?),
                Conversion::Translate {
                    upstream: &OpenAiChat,
                    caller: &AnthropicMessages,
                },
            ),
            // Azure's Responses API names the deployment in the body, not the path.
            Endpoint::Forward("/v1/responses") => {
                let version = version.unwrap_or(RESPONSES_API_VERSION);
                let path = format!("/openai/responses?api-version={version}");
                return Ok(prepared(
                    path,
                    Payload::json(body.with_model(deployment)),
                    request,
                    Conversion::None,
                ));
            }
            Endpoint::Forward(path) => (
                path.trim_start_matches("/v1/"),
                request.forwarded(deployment)?,
                Conversion::None,
            ),
            Endpoint::CountTokens => {
                return Err(ProxyError::NotImplemented(
                    "count_tokens is not an Azure OpenAI endpoint".into(),
                ));
            }
        };
        let path = format!(
            "/openai/deployments/{}/{route}?api-version={}",
            segment(deployment),
            version.unwrap_or(DEFAULT_API_VERSION)
        );
        Ok(prepared(path, payload, request, conversion))
    }

    /// An `api-key` header; keys with Entra client credentials get their bearer token
    /// from the upstream client instead (`tokens.rs`).
    fn authorize(
        &self,
        request: reqwest::RequestBuilder,
        key: &ProviderKey,
    ) -> reqwest::RequestBuilder {
        if key.entra.is_some() {
            return request;
        }
        request.header("api-key", key.credential.expose())
    }

    fn error_fields(&self, status: u16, body: &[u8]) -> UpstreamErrorFields {
        let mut fields = upstream_error_fields(status, body);
        // Azure's content filter refuses with a 400 whose code says so.
        if fields.code.as_deref() == Some("content_filter") {
            fields.kind = "content_filter".to_owned();
        }
        fields
    }
}

fn prepared(
    path: String,
    payload: Payload,
    request: &CallerRequest<'_>,
    conversion: Conversion,
) -> Prepared {
    Prepared {
        outgoing: Outgoing {
            path: Cow::Owned(path),
            payload,
            stream: request.body.stream,
            json_answer: request.endpoint.answers_json(),
            headers: HeaderMap::new(),
        },
        conversion,
    }
}

/// One token from the credential's tenant. Failures never show the secret or what the
/// token endpoint said about it.
pub(super) async fn mint(
    client: &reqwest::Client,
    credential: &EntraCredential,
) -> Result<Minted, String> {
    let failed = |detail: String| {
        format!(
            "Entra ID token for client {}: {detail}",
            credential.client_id
        )
    };
    let url = format!(
        "{}/{}/oauth2/v2.0/token",
        credential.authority_host, credential.tenant_id
    );
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", credential.client_id.as_str()),
        ("client_secret", credential.client_secret.expose()),
        ("scope", SCOPE),
    ];
    tokens::exchange(client.post(url).form(&form))
        .await
        .map_err(failed)
}
