//! proxy-core: the AISIX data plane.
//!
//! Configuration arrives as source events, becomes an immutable [`snapshot::Snapshot`]
//! in a [`snapshot::SnapshotStore`], and every proxy request reads one snapshot from
//! start to end. The HTTP layer authenticates the caller, resolves the model alias,
//! calls the upstream through a provider adapter and renders every failure in the
//! envelope of its route family.
//!
//! Layout:
//! - `secret`: a string type that never prints its value.
//! - `resources`: resource keys, wire specs and validated types.
//! - `snapshot`: the snapshot, its incremental builder and the store.
//! - `error`: the one proxy error type and its envelopes.
//! - `health`: consecutive upstream failures per model.
//! - `http`: the proxy listener (routes, request ids, drain).
//! - `routing`: candidate order, retries, failover and cooldowns.
//! - `cache`: the response cache of non-streaming chat completions.
//! - `guardrails`: keyword guardrails on input, output and streams.
//! - `sse`: server-sent events re-chunked on event boundaries for filters.
//! - `translate`: OpenAI chat completions <-> Anthropic messages, both ways.
//! - `multipart`: form bodies (audio, images) read and sent on with `model` replaced.
//! - `ratelimit`: request, token and concurrency limits of keys and models.
//! - `upstream`: the upstream HTTP client and provider adapters.
//! - `budget`, `usage`: the two hooks a deployment plugs in (budget decisions, usage
//!   events).

pub mod budget;
pub mod cache;
pub mod error;
pub mod guardrails;
pub mod health;
pub mod http;
pub mod metrics;
pub mod multipart;
pub mod openai;
pub mod ratelimit;
pub mod resources;
pub mod routing;
pub mod secret;
pub mod snapshot;
pub mod sse;
pub mod translate;
pub mod upstream;
pub mod usage;

/// Installs ring as the process-wide rustls crypto provider: the one provider used
/// across the workspace. Safe to call more than once.
pub fn install_crypto_provider() {
    // An Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
