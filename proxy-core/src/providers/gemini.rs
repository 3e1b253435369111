//! Google's Gemini models: the Gemini API (`{api_base}/v1beta/models/{model}:...`,
//! `x-goog-api-key`) and Vertex AI (`{api_base}/v1/projects/{project}/locations/
//! {region}/publishers/google/models/{model}:...`, an OAuth2 bearer token: the key's
//! access token, or one a service account's signed JWT is exchanged for, see
//! [`mint`]). Both `generateContent`, and `streamGenerateContent?alt=sse` for streams.
//! Claude models on Vertex AI (`model_name` starting with `claude`) are Anthropic's
//! messages at `publishers/anthropic/models/{model}:rawPredict`.
//! Chat completions, messages and the Responses API are translated
//! (`formats::chat::GeminiContent`), embeddings too (`batchEmbedContents`, Vertex AI's
//! `predict`, see `formats::embeddings`);
//! Google's error statuses (`RESOURCE_EXHAUSTED`, `PERMISSION_DENIED`...) read as the
//! gateway's codes.

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, RsaKeyPair};
use serde_json::{Value, json};

use super::anthropic::anthropic_error;
use super::provider::{
    CallerRequest, Outgoing, Payload, Prepared, Provider, TargetModel, coded_error, segment,
};
use super::tokens::{self, Minted};
use crate::failure::{ProxyError, UpstreamErrorFields};
use crate::formats::chat::{self, AnthropicMessages, Conversion, GeminiContent, OpenAiChat};
use crate::formats::embeddings::{EmbeddingsRequest, Shape};
use crate::formats::endpoint::{EMBEDDINGS, Endpoint, RESPONSES};
use crate::resources::{ProviderKey, ServiceAccount};

pub struct Gemini;

impl Provider for Gemini {
    fn name(&self) -> &'static str {
        "gemini"
    }

    fn supports(&self, endpoint: Endpoint) -> bool {
        serves(endpoint)
    }

    fn build(
        &self,
        request: &CallerRequest<'_>,
        target: &TargetModel<'_>,
    ) -> Result<Prepared, ProxyError> {
        if request.endpoint == Endpoint::Forward(EMBEDDINGS) {
            return embed(request, target, "/v1beta/models", Shape::Gemini);
        }
        build(request, target, "/v1beta/models")
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

pub struct VertexAi;

impl Provider for VertexAi {
    fn name(&self) -> &'static str {
        "vertex"
    }

    fn supports(&self, endpoint: Endpoint) -> bool {
        serves(endpoint)
    }

    fn build(
        &self,
        request: &CallerRequest<'_>,
        target: &TargetModel<'_>,
    ) -> Result<Prepared, ProxyError> {
        let Some(vertex) = &target.key.vertex else {
            return Err(ProxyError::ProviderUnavailable(format!(
                "provider key '{}' has no Vertex AI project",
                target.key.display_name
            )));
        };
        let project = format!(
            "/v1/projects/{}/locations/{}/publishers",
            segment(&vertex.project),
            vertex.region
        );
        if target.upstream_model.starts_with("claude") {
            return claude(request, target, &format!("{project}/anthropic/models"));
        }
        let prefix = format!("{project}/google/models");
        if request.endpoint == Endpoint::Forward(EMBEDDINGS) {
            return embed(request, target, &prefix, Shape::Vertex);
        }
        build(request, target, &prefix)
    }

    /// The bearer token is added by the upstream client (`tokens.rs`).
    fn authorize(
        &self,
        request: reqwest::RequestBuilder,
        _key: &ProviderKey,
    ) -> reqwest::RequestBuilder {
        request
    }

    /// Claude's errors are Anthropic's (`{"type": "error", ...}`); the platform's own
    /// are Google's.
    fn error_fields(&self, status: u16, body: &[u8]) -> UpstreamErrorFields {
        let error: Value = serde_json::from_slice(body).unwrap_or_default();
        if error["type"] == "error" {
            return anthropic_error(status, &error);
        }
        google_error(status, &error)
    }
}

/// The Anthropic API version Claude on Vertex AI takes, in the body.
const VERTEX_ANTHROPIC_VERSION: &str = "vertex-2023-10-16";

/// Claude on Vertex AI: Anthropic's messages, the model in the URL (`:rawPredict`, or
/// `:streamRawPredict` for streams) and `anthropic_version` in the body instead of
/// `model`. Messages callers are native; chat callers translated.
fn claude(
    request: &CallerRequest<'_>,
    target: &TargetModel<'_>,
    prefix: &str,
) -> Result<Prepared, ProxyError> {
    let (body, conversion) = match request.endpoint {
        Endpoint::Messages => (request.raw.to_vec(), Conversion::None),
        endpoint @ (Endpoint::ChatCompletions | Endpoint::Forward(RESPONSES)) => {
            let caller = chat::caller_format(endpoint).unwrap_or(&OpenAiChat);
            (
                chat::translate_request(
                    request.raw,
                    caller,
                    &AnthropicMessages,
                    target.upstream_model,
                )?,
                Conversion::Translate {
                    upstream: &AnthropicMessages,
                    caller,
                },
            )
        }
        other => {
            return Err(ProxyError::NotImplemented(format!(
                "{} is not served by Claude on Vertex AI",
                other.path()
            )));
        }
    };
    let mut body: Value = serde_json::from_slice(&body).map_err(|_| {
        ProxyError::invalid_request("request body is not a valid JSON object", None)
    })?;
    if let Some(fields) = body.as_object_mut() {
        fields.remove("model");
        fields.insert("anthropic_version".into(), VERTEX_ANTHROPIC_VERSION.into());
    }
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let bytes = target
        .prompt_cache
        .and_then(|ttl| chat::add_cache_breakpoints(&bytes, ttl))
        .unwrap_or(bytes);
    let model = target.upstream_model;
    let action = if request.body.stream {
        "streamRawPredict"
    } else {
        "rawPredict"
    };
    Ok(Prepared {
        outgoing: Outgoing {
            path: format!("{prefix}/{}:{action}", segment(model)).into(),
            payload: Payload::json(bytes),
            stream: request.body.stream,
            json_answer: true,
            headers: HeaderMap::new(),
        },
        conversion,
    })
}

/// What both Google adapters serve: the chat formats, the Responses API and
/// embeddings, translated.
fn serves(endpoint: Endpoint) -> bool {
    chat::caller_format(endpoint).is_some() || endpoint == Endpoint::Forward(EMBEDDINGS)
}

/// An embeddings call as `batchEmbedContents` (Gemini API) or `predict` (Vertex AI).
fn embed(
    request: &CallerRequest<'_>,
    target: &TargetModel<'_>,
    prefix: &str,
    shape: Shape,
) -> Result<Prepared, ProxyError> {
    let embeddings = EmbeddingsRequest::read(request.raw)?;
    let model = target.upstream_model.trim_start_matches("models/");
    let action = match shape {
        Shape::Vertex => "predict",
        _ => "batchEmbedContents",
    };
    Ok(Prepared {
        outgoing: Outgoing {
            path: format!("{prefix}/{}:{action}", segment(model)).into(),
            payload: Payload::json(embeddings.write(shape, model)?),
            stream: false,
            json_answer: true,
            headers: HeaderMap::new(),
        },
        conversion: Conversion::Embeddings {
            shape,
            base64: embeddings.base64,
        },
    })
}

/// The `generateContent` request of a chat or messages call, under `prefix`.
fn build(
    request: &CallerRequest<'_>,
    target: &TargetModel<'_>,
    prefix: &str,
) -> Result<Prepared, ProxyError> {
    let Some(caller) = chat::caller_format(request.endpoint) else {
        return Err(ProxyError::NotImplemented(format!(
            "{} is not a Gemini endpoint",
            request.endpoint.path()
        )));
    };
    let body = chat::translate_request(request.raw, caller, &GeminiContent, target.upstream_model)?;
    let model = target.upstream_model.trim_start_matches("models/");
    let action = if request.body.stream {
        "streamGenerateContent?alt=sse"
    } else {
        "generateContent"
    };
    let path = format!("{prefix}/{}:{action}", segment(model));
    Ok(Prepared {
        outgoing: Outgoing {
            path: path.into(),
            payload: Payload::json(body),
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

/// What Vertex AI tokens are asked for.
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Whether `pem` is an RSA private key in PKCS#8 PEM that can sign.
pub fn is_rsa_pkcs8(pem: &str) -> bool {
    pkcs8_der(pem).is_some_and(|der| RsaKeyPair::from_pkcs8(&der).is_ok())
}

fn pkcs8_der(pem: &str) -> Option<Vec<u8>> {
    match rustls_pemfile::private_key(&mut pem.as_bytes()) {
        Ok(Some(rustls::pki_types::PrivateKeyDer::Pkcs8(der))) => {
            Some(der.secret_pkcs8_der().to_vec())
        }
        _ => None,
    }
}

/// A token for a service account: a JWT (RS256, the key's id as `kid`) asserting the
/// account for the cloud-platform scope, exchanged at the account's `token_uri`
/// (RFC 7523). Failures never show the key.
pub(super) async fn mint(
    client: &reqwest::Client,
    account: &ServiceAccount,
) -> Result<Minted, String> {
    let failed = |detail: &str| format!("Vertex AI token for {}: {detail}", account.client_email);
    let assertion =
        signed_assertion(account).ok_or_else(|| failed("the private key cannot sign"))?;
    let form = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", assertion.as_str()),
    ];
    tokens::exchange(client.post(&account.token_uri).form(&form))
        .await
        .map_err(|e| failed(&e))
}

fn signed_assertion(account: &ServiceAccount) -> Option<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let mut header = json!({"alg": "RS256", "typ": "JWT"});
    if let Some(kid) = &account.private_key_id {
        header["kid"] = kid.as_str().into();
    }
    let claims = json!({"iss": account.client_email, "scope": SCOPE, "aud": account.token_uri,
                        "iat": now, "exp": now + 3600});
    let encode = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let signing_input = format!("{}.{}", encode(&header), encode(&claims));
    let key = RsaKeyPair::from_pkcs8(&pkcs8_der(account.private_key.expose())?).ok()?;
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &signature::RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .ok()?;
    Some(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// A Google API error (`{"error": {code, message, status}}`) as the caller's fields:
/// `upstream_error` with a code saying what kind of refusal it was.
pub fn google_error_fields(status: u16, body: &[u8]) -> UpstreamErrorFields {
    google_error(status, &serde_json::from_slice(body).unwrap_or_default())
}

fn google_error(status: u16, error: &Value) -> UpstreamErrorFields {
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
    coded_error(status, error, code)
}
