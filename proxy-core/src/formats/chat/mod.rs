//! Chat formats and the translation between them, through one canonical form.
//!
//! A caller format (OpenAI chat completions, Anthropic messages) reads a request into
//! the canonical `Request` and writes the canonical `Answer` and stream `Event`s back;
//! an upstream format writes the request and reads the answer and its stream. A
//! request whose caller and upstream speak different formats is read by one and
//! written by the other, so each new format or provider adds one codec, not one
//! converter per pair. A native pair never comes here: its body is sent on as the
//! caller wrote it, `model` rewritten (`RequestBody::with_model`).
//!
//! System prompts, multi-turn conversations, images, tool definitions, tool calls and
//! results, stop reasons, usage (cached tokens included) and prompt-cache markers carry
//! over; parameters the other side has no equivalent for are dropped, and requests that
//! cannot be expressed at all (several choices, server-side tools) are refused with a
//! 400 naming the parameter. The closing events (`[DONE]`, `message_stop`) are only
//! written when the upstream sent its own; an upstream error event or an unreadable
//! event breaks the stream (see `pipeline::stream`).
//!
//! Layout:
//! - `canonical.rs`: the canonical request, answer, usage and stream events.
//! - `codec.rs`: what a caller format and an upstream format each implement.
//! - `openai.rs`, `openai_stream.rs`: OpenAI chat completions.
//! - `anthropic.rs`, `anthropic_stream.rs`: Anthropic messages.
//! - `gemini.rs`: Google's generateContent (Gemini API, Vertex AI), upstream only.
//! - `bedrock.rs`: AWS Bedrock's Converse, upstream only.
//! - `responses.rs`: OpenAI's Responses API, caller only (bridged to providers without
//!   one).
//! - `wire.rs`: what the codecs share (refusals, loose JSON, event writing).

pub mod canonical;

mod anthropic;
mod anthropic_stream;
mod bedrock;
mod codec;
mod gemini;
mod openai;
mod openai_stream;
mod responses;
mod wire;

use bytes::{Bytes, BytesMut};

pub use anthropic::{AnthropicMessages, DEFAULT_MAX_TOKENS, add_cache_breakpoints};
pub use bedrock::BedrockConverse;
pub use codec::{
    CallerCodec, CallerStream, StreamDecoder, StreamEncoder, UpstreamCodec, UpstreamStream,
};
pub use gemini::GeminiContent;
pub use openai::OpenAiChat;
pub use responses::OpenAiResponses;

use crate::failure::ProxyError;
use crate::formats::embeddings::{self, Shape};
use crate::formats::endpoint::Endpoint;
use crate::formats::sse::{self, StreamBreak};
use canonical::{Event, Usage};

/// The chat format an endpoint's callers speak, as a caller and as an upstream format.
pub fn native(
    endpoint: Endpoint,
) -> Option<(&'static dyn CallerCodec, &'static dyn UpstreamCodec)> {
    match endpoint {
        Endpoint::ChatCompletions => Some((&OpenAiChat, &OpenAiChat)),
        Endpoint::Messages => Some((&AnthropicMessages, &AnthropicMessages)),
        Endpoint::CountTokens | Endpoint::Forward(_) => None,
    }
}

/// The caller format of a chat-like endpoint, for providers that translate it: chat
/// completions, messages, and the Responses API (bridged).
pub fn caller_format(endpoint: Endpoint) -> Option<&'static dyn CallerCodec> {
    match endpoint {
        Endpoint::ChatCompletions => Some(&OpenAiChat),
        Endpoint::Messages => Some(&AnthropicMessages),
        Endpoint::Forward(crate::formats::endpoint::RESPONSES) => Some(&OpenAiResponses),
        Endpoint::CountTokens | Endpoint::Forward(_) => None,
    }
}

/// A caller's request body in the upstream's format, for `model`.
pub fn translate_request(
    body: &[u8],
    caller: &dyn CallerCodec,
    upstream: &dyn UpstreamCodec,
    model: &str,
) -> Result<Vec<u8>, ProxyError> {
    upstream.write_request(&caller.read_request(body)?, model)
}

/// How an answer is rewritten on its way to the caller.
#[derive(Clone, Copy)]
pub enum Conversion {
    /// Same format both sides.
    None,
    Translate {
        upstream: &'static dyn UpstreamCodec,
        caller: &'static dyn CallerCodec,
    },
    /// A provider's embeddings answer as OpenAI's list (never streamed).
    Embeddings { shape: Shape, base64: bool },
}

impl std::fmt::Debug for Conversion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conversion::None => "None",
            Conversion::Translate { .. } => "Translate",
            Conversion::Embeddings { .. } => "Embeddings",
        })
    }
}

impl Conversion {
    pub fn is_none(self) -> bool {
        matches!(self, Conversion::None)
    }

    /// A whole answer in the caller's format; one whose upstream names no model
    /// (Bedrock) is said to be from `unnamed`.
    pub fn answer(self, body: Bytes, unnamed: &str) -> Result<Bytes, ProxyError> {
        match self {
            Conversion::None => Ok(body),
            Conversion::Translate { upstream, caller } => {
                let mut answer = upstream.read_answer(&body)?;
                if answer.model.is_empty() {
                    answer.model = unnamed.to_owned();
                }
                Ok(Bytes::from(caller.write_answer(&answer)))
            }
            Conversion::Embeddings { shape, base64 } => {
                embeddings::answer(shape, base64, &body, unnamed)
            }
        }
    }

    /// The event translator for a stream, when one is needed (see
    /// [`StreamTranslator::naming`] for `unnamed`).
    pub fn stream(self, unnamed: &str) -> Option<StreamTranslator> {
        match self {
            Conversion::None | Conversion::Embeddings { .. } => None,
            Conversion::Translate { upstream, caller } => {
                Some(StreamTranslator::new(upstream, caller).naming(unnamed))
            }
        }
    }
}

/// Translates a stream: takes runs of complete upstream events (see
/// `sse::filter_events`) and returns the caller's events for them. A followed stream
/// also keeps what the caller has received, so another upstream can continue it
/// (`continue_with`) into the same caller stream: one id, one message, usage summed.
pub struct StreamTranslator {
    decoder: Box<dyn StreamDecoder>,
    encoder: Box<dyn StreamEncoder>,
    events: Vec<Event>,
    follow: Option<Followed>,
    /// The model a stream whose upstream names none is said to be from.
    unnamed: String,
}

/// What a followed stream has told the caller.
#[derive(Default)]
struct Followed {
    text: String,
    /// A tool call or reasoning was under way: the answer cannot go on as text.
    stuck: bool,
    /// Usage of the upstreams before the current one, and the current one's.
    before: Usage,
    current: Usage,
    /// Whitespace at the end of the text that the continuing upstream was not sent
    /// (Anthropic refuses it), dropped from the start of its continuation.
    unsent: usize,
}

impl StreamTranslator {
    pub fn new(upstream: &dyn UpstreamCodec, caller: &dyn CallerCodec) -> Self {
        Self {
            decoder: upstream.stream_decoder(),
            encoder: caller.stream_encoder(),
            events: Vec::new(),
            follow: None,
            unnamed: String::new(),
        }
    }

    /// Says the stream is from `model` when the upstream names no model (Bedrock).
    pub fn naming(mut self, model: &str) -> Self {
        model.clone_into(&mut self.unnamed);
        self
    }

    /// A translator that keeps what the caller received, for `continue_with`.
    pub fn following(upstream: &dyn UpstreamCodec, caller: &dyn CallerCodec) -> Self {
        Self {
            follow: Some(Followed::default()),
            ..Self::new(upstream, caller)
        }
    }

    /// The answer text the caller has received, when the answer can be continued from
    /// it (a followed stream, only text so far).
    pub fn continuable(&self) -> Option<&str> {
        self.follow
            .as_ref()
            .filter(|f| !f.stuck && !f.text.is_empty())
            .map(|f| f.text.as_str())
    }

    /// Goes on with another upstream's stream, in `upstream`'s format, whose request
    /// carried the text so far as an assistant prefix of `sent` bytes.
    pub fn continue_with(&mut self, upstream: &dyn UpstreamCodec, sent: usize) {
        self.decoder = upstream.stream_decoder();
        if let Some(follow) = &mut self.follow {
            follow.before = follow.before + follow.current;
            follow.current = Usage::default();
            follow.unsent = follow.text.len().saturating_sub(sent);
        }
    }

    /// The caller's events for a run, and the break that stopped it early, if any
    /// (what came before the break is translated).
    pub fn translate(&mut self, run: &[u8]) -> (Bytes, Option<StreamBreak>) {
        let mut out = BytesMut::new();
        for event in sse::events(run).filter(|e| !e.data.trim_ascii().is_empty()) {
            let decoded = self.decoder.decode(&event, &mut self.events);
            for mut event in self.events.drain(..) {
                if let Event::Start { model, .. } = &mut event
                    && model.is_empty()
                {
                    model.clone_from(&self.unnamed);
                }
                let event = match &mut self.follow {
                    Some(follow) => match follow.note(event) {
                        Some(event) => event,
                        None => continue,
                    },
                    None => event,
                };
                self.encoder.encode(event, &mut out);
            }
            if let Err(broke) = decoded {
                return (out.freeze(), Some(broke));
            }
        }
        (out.freeze(), None)
    }
}

impl Followed {
    /// Notes what `event` tells the caller; the event as the caller should get it
    /// (usage summed over upstreams, a continuation's leading whitespace dropped).
    fn note(&mut self, event: Event) -> Option<Event> {
        match event {
            Event::Text(mut text) => {
                if self.unsent > 0 {
                    let mut dropped = 0;
                    for c in text.chars().take_while(|c| c.is_whitespace()) {
                        if dropped + c.len_utf8() > self.unsent {
                            break;
                        }
                        dropped += c.len_utf8();
                    }
                    let rest_is_blank = text[dropped..].trim_start().is_empty();
                    text.drain(..dropped);
                    self.unsent = if rest_is_blank && text.is_empty() {
                        self.unsent - dropped
                    } else {
                        0
                    };
                    if text.is_empty() {
                        return None;
                    }
                }
                self.text.push_str(&text);
                Some(Event::Text(text))
            }
            Event::Usage(usage) => {
                self.current = usage;
                Some(Event::Usage(self.before + usage))
            }
            Event::ToolCall { .. }
            | Event::ToolArguments { .. }
            | Event::Thinking(_)
            | Event::ThinkingSignature(_)
            | Event::RedactedThinking(_) => {
                self.stuck = true;
                Some(event)
            }
            Event::Start { .. } | Event::Stop(_) | Event::End => Some(event),
        }
    }
}

#[cfg(test)]
mod tests;
