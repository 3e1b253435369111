//! Provider adapters behind one trait, and the upstream HTTP client they share.
//!
//! A [`Provider`] knows one upstream protocol family: which endpoints it serves (the
//! rest answer 501 `not_implemented`), how a caller's request becomes its request
//! (path, body, headers) and how its answer comes back (a `Conversion` of whole
//! answers and stream events), how its credential is sent, and how its error bodies
//! read. A native pair (OpenAI caller to an OpenAI-compatible provider, Anthropic to
//! Anthropic) is a byte-preserving fast path: only `model` is rewritten.
//!
//! | endpoint | OpenAI-compatible | Anthropic |
//! |---|---|---|
//! | `/v1/chat/completions` | native | translated to `/v1/messages` |
//! | `/v1/messages` | translated to `/v1/chat/completions` | native |
//! | `/v1/messages/count_tokens` | 501 | native |
//! | `/v1/responses` | native | bridged: translated to `/v1/messages` |
//! | completions, embeddings, rerank, audio, images | native | 501 |
//!
//! Azure OpenAI (`azure.rs`) serves what OpenAI does under its deployment URLs, except
//! rerank and image edits and variations. Gemini (`gemini.rs`) serves chat completions,
//! messages and responses translated to `generateContent`, and embeddings; Bedrock
//! (`bedrock.rs`) the same translated to Converse (embeddings on Titan and Cohere
//! models), every request signed with AWS Signature V4. The full table is in
//! docs/behaviour.md.
//!
//! Layout:
//! - `mod.rs`: the registry: which adapter serves a provider key.
//! - `provider.rs`: the trait, the request an adapter builds from, what it builds.
//! - `openai.rs`: OpenAI and every OpenAI-compatible vendor.
//! - `anthropic.rs`: Anthropic's messages API.
//! - `azure.rs`: Azure OpenAI, and the Entra ID tokens its keys may use.
//! - `gemini.rs`: Google's Gemini API and Vertex AI (chat completions and messages,
//!   translated), and Vertex's service-account tokens.
//! - `bedrock.rs`: AWS Bedrock's Converse API and Signature V4.
//! - `tokens.rs`: bearer tokens minted from credentials (Entra ID, service accounts).
//! - `client.rs`: the upstream client: send, timeouts, stream relay, passthrough.
//! - `connect.rs`: the connection pool under it: TCP, TLS, connect timeouts.

pub mod anthropic;
pub mod azure;
pub mod bedrock;
pub mod client;
pub mod connect;
pub mod gemini;
pub mod openai;
mod provider;
mod tokens;

use crate::failure::ProxyError;
use crate::resources::Adapter;

pub use provider::{CallerRequest, Outgoing, Payload, Prepared, Provider, TargetModel};

/// The adapter of a provider key, or 501 for a family this build does not speak.
pub fn adapter(adapter: &Adapter) -> Result<&'static dyn Provider, ProxyError> {
    match adapter {
        Adapter::OpenAi => Ok(&openai::OpenAiCompatible),
        Adapter::Anthropic => Ok(&anthropic::Anthropic),
        Adapter::AzureOpenAi => Ok(&azure::AzureOpenAi),
        Adapter::Gemini => Ok(&gemini::Gemini),
        Adapter::Vertex => Ok(&gemini::VertexAi),
        Adapter::Bedrock => Ok(&bedrock::Bedrock),
        Adapter::Other(name) => Err(ProxyError::NotImplemented(format!(
            "provider adapter '{name}' is not available in this build"
        ))),
    }
}

/// The adapter whose credential and defaults passthrough uses: the key's own, and
/// for a family this build does not speak, a bearer token (the common convention).
pub fn for_passthrough(adapter: &Adapter) -> &'static dyn Provider {
    match adapter {
        Adapter::Anthropic => &anthropic::Anthropic,
        Adapter::AzureOpenAi => &azure::AzureOpenAi,
        Adapter::Gemini => &gemini::Gemini,
        Adapter::Vertex => &gemini::VertexAi,
        Adapter::Bedrock => &bedrock::Bedrock,
        Adapter::OpenAi | Adapter::Other(_) => &openai::OpenAiCompatible,
    }
}
