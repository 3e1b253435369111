//! The model-routed endpoints: their paths, their caller format (and so their error
//! envelope), and what the pipeline does differently per endpoint. What each provider
//! makes of them is in `providers`.

use crate::failure::Envelope;

pub const CHAT: &str = "/v1/chat/completions";
pub const MESSAGES: &str = "/v1/messages";
pub const COUNT_TOKENS: &str = "/v1/messages/count_tokens";
pub const RESPONSES: &str = "/v1/responses";
pub const EMBEDDINGS: &str = "/v1/embeddings";

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

    /// Answers of this route are JSON (or server-sent events when streamed); audio
    /// routes answer audio or, by the caller's choice, plain text.
    pub fn answers_json(self) -> bool {
        !matches!(self, Endpoint::Forward(path) if path.starts_with("/v1/audio/"))
    }

    /// Whole answers of this route are kept in the response cache (when it is on).
    pub fn cacheable(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Messages)
    }

    /// The names of the events that close a whole streamed answer on this route (what
    /// a stream must have sent to have ended well); `None` where the route has none.
    pub fn closing_events(self) -> Option<&'static [&'static [u8]]> {
        match self {
            Endpoint::ChatCompletions | Endpoint::Forward("/v1/completions") => Some(&[b"[DONE]"]),
            Endpoint::Messages => Some(&[b"message_stop"]),
            Endpoint::Forward("/v1/responses") => Some(&[
                b"response.completed",
                b"response.incomplete",
                b"response.failed",
            ]),
            Endpoint::CountTokens | Endpoint::Forward(_) => None,
        }
    }

    /// Streams of this route ask the upstream for OpenAI's usage chunk
    /// (`stream_options.include_usage`), taken out again for callers that did not ask.
    pub fn asks_stream_usage(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Forward("/v1/completions")
        )
    }
}
