//! proxy-core: the AISIX data plane.
//!
//! Configuration arrives as source events, becomes an immutable [`snapshot::Snapshot`]
//! in a [`snapshot::SnapshotStore`], and every proxy request reads one snapshot from
//! start to end. The HTTP layer authenticates the caller, resolves the model alias,
//! calls the upstream through a provider adapter and renders every failure in the
//! envelope of its route family.
//!
//! Layout, bottom to top; a module imports only from the layers below it:
//! - `secret`, `resources`, `snapshot`: the resource model and the immutable snapshot.
//! - `hooks`: the two hooks a deployment plugs in (budget decisions, usage events).
//! - `failure`: the one proxy error type, classified once, and its envelopes.
//! - `formats`: endpoints, request bodies, SSE, forms, tokens, the chat codecs and their
//!   canonical form.
//! - `backoff`, `shared`: retry pacing; the Redis connection replicas share limits and
//!   cached answers through.
//! - `policy`: guardrails, rate limits, model health.
//! - `observe`: the request record, metrics and usage accounting.
//! - `providers`: the provider adapters and the upstream client.
//! - `pipeline`: one request's phases (admit, cache, dispatch, respond), passthrough.
//! - `http`: the proxy listener (router, request context, drain).

pub mod backoff;
pub mod failure;
pub mod formats;
pub mod hooks;
pub mod http;
pub mod observe;
pub mod pipeline;
pub mod policy;
pub mod providers;
pub mod resources;
pub mod secret;
pub mod shared;
pub mod snapshot;

/// Installs ring as the process-wide rustls crypto provider: the one provider used
/// across the workspace. Safe to call more than once.
pub fn install_crypto_provider() {
    // An Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
