//! Translation between the two caller formats: OpenAI chat completions and Anthropic
//! messages, both ways, for requests, whole answers and streams.
//!
//! A request in one format going to an upstream of the other is rewritten before it is
//! sent, and the answer is rewritten on its way back: whole answers at once, streams
//! event by event as the upstream sends them (the caller sees well-formed events of its
//! own format). System prompts, multi-turn conversations, images, tool definitions,
//! tool calls and results, stop reasons and usage carry over; parameters the other side
//! has no equivalent for are dropped, and requests that cannot be expressed at all
//! (several choices, server-side tools) are refused with a 400 naming the parameter.
//!
//! Layout:
//! - `request.rs`: request bodies, both ways.
//! - `response.rs`: whole answers, both ways.
//! - `stream.rs`: stateful event translators, both ways.
//! - `shared.rs`: stop reasons, text and tool-call helpers both directions use.

mod request;
mod response;
mod shared;
mod stream;

pub use request::{chat_to_messages, messages_to_chat};
pub use response::{completion_to_message, message_to_completion};
pub use shared::DEFAULT_MAX_TOKENS;
pub use stream::{AnthropicToOpenAi, OpenAiToAnthropic};

/// How an answer is rewritten on its way to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// Same format both sides.
    None,
    /// An Anthropic upstream answering an OpenAI caller.
    AnthropicToOpenAi,
    /// An OpenAI-compatible upstream answering an Anthropic caller.
    OpenAiToAnthropic,
}

impl Conversion {
    /// A whole answer in the caller's format.
    pub fn answer(self, body: bytes::Bytes) -> Result<bytes::Bytes, crate::failure::ProxyError> {
        match self {
            Conversion::None => Ok(body),
            Conversion::AnthropicToOpenAi => message_to_completion(&body),
            Conversion::OpenAiToAnthropic => completion_to_message(&body),
        }
    }

    /// The event translator for a stream, when one is needed.
    pub fn stream(self) -> Option<StreamTranslator> {
        match self {
            Conversion::None => None,
            Conversion::AnthropicToOpenAi => {
                Some(StreamTranslator::ToOpenAi(AnthropicToOpenAi::new()))
            }
            Conversion::OpenAiToAnthropic => {
                Some(StreamTranslator::ToAnthropic(OpenAiToAnthropic::new()))
            }
        }
    }
}

/// A stream translator of either direction.
pub enum StreamTranslator {
    ToOpenAi(AnthropicToOpenAi),
    ToAnthropic(OpenAiToAnthropic),
}

impl StreamTranslator {
    pub fn translate(&mut self, run: &[u8]) -> bytes::Bytes {
        match self {
            StreamTranslator::ToOpenAi(t) => t.translate(run),
            StreamTranslator::ToAnthropic(t) => t.translate(run),
        }
    }
}
