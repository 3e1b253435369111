//! The provider seam: the trait every adapter implements, the caller's request it
//! builds from and the upstream request it builds.

use std::borrow::Cow;

use axum::http::HeaderMap;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, PercentEncode, utf8_percent_encode};

use crate::failure::{ProxyError, UpstreamErrorFields};
use crate::formats::body::{JsonBody, RequestBody};
use crate::formats::chat::Conversion;
use crate::formats::endpoint::Endpoint;
use crate::formats::multipart::Form;
use crate::resources::{PromptCache, ProviderKey};

/// What the caller sent, as read: what an adapter builds its request from.
pub struct CallerRequest<'a> {
    pub endpoint: Endpoint,
    pub body: &'a RequestBody<'a>,
    /// The body's bytes as sent.
    pub raw: &'a [u8],
    pub form: Option<&'a Form>,
    pub headers: &'a HeaderMap,
}

/// The request as the upstream will receive it, and how its answer comes back.
pub struct Prepared {
    pub outgoing: Outgoing,
    pub conversion: Conversion,
}

/// One request to an upstream.
pub struct Outgoing {
    /// The path (and query) under the provider key's `api_base`, e.g. `/v1/messages`.
    pub path: Cow<'static, str>,
    pub payload: Payload,
    /// The answer is relayed as a stream rather than read whole.
    pub stream: bool,
    /// The answer must be JSON (server-sent events when streamed); anything else the
    /// upstream sends with a 2xx is an upstream failure, its body not shown.
    pub json_answer: bool,
    /// Headers the adapter adds (`anthropic-version`, the caller's `anthropic-beta`).
    pub headers: HeaderMap,
}

/// An upstream request body.
pub enum Payload {
    Json(JsonBody),
    /// A form, built for this one attempt (reqwest streams it).
    Form(reqwest::multipart::Form),
}

impl Payload {
    pub fn json(body: impl Into<JsonBody>) -> Self {
        Self::Json(body.into())
    }
}

impl CallerRequest<'_> {
    /// The body of a route forwarded as it is (an OpenAI-style route), for `model`: a
    /// form with its `model` field replaced, or the JSON body with `model` rewritten
    /// (and the usage chunk asked for on streamed routes that have one).
    pub fn forwarded(&self, model: &str) -> Result<Payload, ProxyError> {
        Ok(match self.form {
            Some(form) => Payload::Form(form.with_model(model)?),
            None if self.endpoint.asks_stream_usage() => {
                Payload::json(self.body.upstream_body(model))
            }
            None => Payload::json(self.body.with_model(model)),
        })
    }
}

/// Everything but unreserved characters is encoded in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `text` as one URL path segment (a deployment, a project, a model name).
pub(super) fn segment(text: &str) -> PercentEncode<'_> {
    utf8_percent_encode(text, SEGMENT)
}

/// The caller's fields of an upstream 4xx whose kind the adapter read as `code`:
/// `upstream_error`, the upstream's `error.message` (or one naming the status).
pub(super) fn coded_error(
    status: u16,
    error: &serde_json::Value,
    code: &str,
) -> UpstreamErrorFields {
    let message = error
        .pointer("/error/message")
        .and_then(serde_json::Value::as_str)
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

/// One upstream protocol family.
pub trait Provider: Send + Sync {
    /// The adapter's name, as in a provider key's `adapter`.
    fn name(&self) -> &'static str;

    /// Whether the adapter serves `endpoint` (natively or translated).
    fn supports(&self, endpoint: Endpoint) -> bool;

    /// The upstream request for `target`. Called only for supported endpoints; may
    /// still refuse a request it cannot express (400).
    fn build(
        &self,
        request: &CallerRequest<'_>,
        target: &TargetModel<'_>,
    ) -> Result<Prepared, ProxyError>;

    /// Adds the provider key's credential.
    fn authorize(
        &self,
        request: reqwest::RequestBuilder,
        key: &ProviderKey,
    ) -> reqwest::RequestBuilder;

    /// Signs the built request, where the credential is a signature over it (AWS
    /// Signature V4). Why it could not be signed, when not.
    fn sign(&self, _request: &mut reqwest::Request, _key: &ProviderKey) -> Result<(), String> {
        Ok(())
    }

    /// Streams answer in AWS's binary event-stream framing rather than server-sent
    /// events (they are turned into events on arrival).
    fn aws_event_stream(&self) -> bool {
        false
    }

    /// The seconds a caller is told to wait when the provider throttles (429) without
    /// saying how long.
    fn throttle_hint(&self) -> Option<u64> {
        None
    }

    /// The fields the caller sees of an upstream 4xx body.
    fn error_fields(&self, status: u16, body: &[u8]) -> UpstreamErrorFields;

    /// Headers a passthrough request carries unless the caller sent them.
    fn passthrough_defaults(&self, _headers: &mut HeaderMap) {}
}

/// What an adapter needs of the direct model it builds a request for.
pub struct TargetModel<'a> {
    /// The provider's name for the model.
    pub upstream_model: &'a str,
    /// Automatic prompt-cache breakpoints (Anthropic-family targets).
    pub prompt_cache: Option<PromptCache>,
    /// The provider key the target uses.
    pub key: &'a ProviderKey,
}

impl dyn Provider {
    /// The upstream request for `request`, or 501 when the adapter does not serve its
    /// endpoint.
    pub fn prepare(
        &self,
        request: &CallerRequest<'_>,
        target: &TargetModel<'_>,
    ) -> Result<Prepared, ProxyError> {
        if !self.supports(request.endpoint) {
            return Err(ProxyError::NotImplemented(format!(
                "provider adapter '{}' does not implement {}",
                self.name(),
                request.endpoint.path()
            )));
        }
        self.build(request, target)
    }
}
