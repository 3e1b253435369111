//! What callers and providers speak: the model-routed endpoints, request bodies read
//! without re-serialising them, server-sent events, forms, token counts, and the chat
//! formats with the translation between them.
//!
//! Layout:
//! - `endpoint`: the model-routed endpoints, their paths and envelopes.
//! - `body`: JSON request bodies (the few fields the proxy reads, `model` rewritten).
//! - `sse`: server-sent events re-chunked on event boundaries for filters.
//! - `eventstream`: AWS event-stream messages (Bedrock streams) as server-sent events.
//! - `multipart`: form bodies (audio, images) read and sent on with `model` replaced.
//! - `tokens`: token counts read from answers and stream events.
//! - `embeddings`: OpenAI embeddings <-> Gemini, Vertex AI and Bedrock embedding APIs.
//! - `chat`: the chat formats (OpenAI chat completions, Anthropic messages) and the
//!   translation between them through one canonical form.

pub mod body;
pub mod chat;
pub mod embeddings;
pub mod endpoint;
pub mod eventstream;
pub mod multipart;
pub mod sse;
pub mod tokens;
