//! The model-routed endpoints and what each provider adapter makes of them: the
//! upstream path and body, and how the answer is converted back.
//!
//! | endpoint | OpenAI-compatible upstream | Anthropic upstream |
//! |---|---|---|
//! | `/v1/chat/completions` | native | translated to `/v1/messages` |
//! | `/v1/messages` | translated to `/v1/chat/completions` | native |
//! | `/v1/messages/count_tokens` | 501 | native |
//! | completions, embeddings, responses, rerank, audio, images | native | 501 |
//!
//! Any other adapter answers 501 `not_implemented`.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

use crate::error::{Envelope, ProxyError};
use crate::multipart::Form;
use crate::openai::RequestBody;
use crate::resources::Adapter;
use crate::translate::{self, Conversion};
use crate::upstream::{ANTHROPIC_VERSION, Outgoing, Payload};

const CHAT: &str = "/v1/chat/completions";
const MESSAGES: &str = "/v1/messages";
const COUNT_TOKENS: &str = "/v1/messages/count_tokens";

/// A proxy route that resolves a model alias and calls an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Messages,
    CountTokens,
    /// An OpenAI-style route forwarded with its body, only `model` rewritten.
    Forward(&'static str),
}

/// The OpenAI-style routes forwarded as they are.
pub const FORWARDED: &[&str] = &[
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/rerank",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
];

/// The request as the upstream will receive it, and how its answer comes back.
pub struct Prepared {
    pub outgoing: Outgoing,
    pub conversion: Conversion,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => CHAT,
            Endpoint::Messages => MESSAGES,
            Endpoint::CountTokens => COUNT_TOKENS,
            Endpoint::Forward(path) => path,
        }
    }

    pub fn envelope(self) -> Envelope {
        match self {
            Endpoint::Messages | Endpoint::CountTokens => Envelope::Anthropic,
            Endpoint::ChatCompletions | Endpoint::Forward(_) => Envelope::OpenAi,
        }
    }

    /// The body is a conversation: `messages` required, guardrails read its text.
    pub fn has_messages(self) -> bool {
        !matches!(self, Endpoint::Forward(_))
    }

    /// Whole answers of this route are kept in the response cache (when it is on).
    pub fn cacheable(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Messages)
    }

    /// Streams of this route ask the upstream for OpenAI's usage chunk
    /// (`stream_options.include_usage`), taken out again for callers that did not ask.
    pub fn asks_stream_usage(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Forward("/v1/completions")
        )
    }

    /// Builds the upstream request for a target of `adapter` serving `upstream_model`.
    pub fn prepare(
        self,
        adapter: &Adapter,
        request: &RequestBody<'_>,
        raw: &[u8],
        form: Option<&Form>,
        upstream_model: &str,
        caller_headers: &HeaderMap,
    ) -> Result<Prepared, ProxyError> {
        let json = |body: Vec<u8>| Payload::Json(Bytes::from(body));
        let (path, payload, conversion, headers) = match (self, adapter) {
            (_, Adapter::Other(name)) => {
                return Err(ProxyError::NotImplemented(format!(
                    "provider adapter '{name}' is not available in this build"
                )));
            }
            (Endpoint::ChatCompletions, Adapter::OpenAi) => (
                CHAT,
                json(request.upstream_body(upstream_model)),
                Conversion::None,
                HeaderMap::new(),
            ),
            (Endpoint::ChatCompletions, Adapter::Anthropic) => (
                MESSAGES,
                json(translate::chat_to_messages(raw, upstream_model)?),
                Conversion::AnthropicToOpenAi,
                anthropic_headers(None),
            ),
            (Endpoint::Messages, Adapter::OpenAi) => (
                CHAT,
                json(translate::messages_to_chat(raw, upstream_model)?),
                Conversion::OpenAiToAnthropic,
                HeaderMap::new(),
            ),
            (Endpoint::Messages | Endpoint::CountTokens, Adapter::Anthropic) => (
                self.path(),
                json(request.with_model(upstream_model)),
                Conversion::None,
                anthropic_headers(Some(caller_headers)),
            ),
            (Endpoint::Forward(path), Adapter::OpenAi) => {
                let payload = match form {
                    Some(form) => Payload::Form(form.with_model(upstream_model)?),
                    None if self.asks_stream_usage() => json(request.upstream_body(upstream_model)),
                    None => json(request.with_model(upstream_model)),
                };
                (path, payload, Conversion::None, HeaderMap::new())
            }
            (
                Endpoint::CountTokens | Endpoint::Forward(_),
                Adapter::OpenAi | Adapter::Anthropic,
            ) => {
                return Err(ProxyError::NotImplemented(format!(
                    "provider adapter '{}' does not implement {}",
                    adapter.name(),
                    self.path()
                )));
            }
        };
        Ok(Prepared {
            outgoing: Outgoing {
                path,
                payload,
                stream: request.stream,
                headers,
            },
            conversion,
        })
    }
}

/// `anthropic-version` (the caller's on native requests, else ours) and, on native
/// requests, the caller's `anthropic-beta`.
fn anthropic_headers(caller: Option<&HeaderMap>) -> HeaderMap {
    const VERSION: HeaderName = HeaderName::from_static("anthropic-version");
    const BETA: HeaderName = HeaderName::from_static("anthropic-beta");
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
