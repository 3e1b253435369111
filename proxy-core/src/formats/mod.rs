//! What callers and providers speak: the model-routed endpoints, request bodies read
//! without re-serialising them, server-sent events, forms, token counts, and the
//! translation between the OpenAI and Anthropic formats.
//!
//! Layout:
//! - `endpoint`: the model-routed endpoints, their paths and envelopes.
//! - `body`: JSON request bodies (the few fields the proxy reads, `model` rewritten).
//! - `sse`: server-sent events re-chunked on event boundaries for filters.
//! - `multipart`: form bodies (audio, images) read and sent on with `model` replaced.
//! - `tokens`: token counts read from answers and stream events.
//! - `translate`: OpenAI chat completions <-> Anthropic messages, both ways.

pub mod body;
pub mod endpoint;
pub mod multipart;
pub mod sse;
pub mod tokens;
pub mod translate;
