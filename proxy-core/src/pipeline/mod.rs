//! The request pipeline: one model-routed call goes through four phases, each a
//! module with one input and one output.
//!
//! ```text
//! admit    caller key, body, alias, access, input guardrails, rate limits, budget
//!   -> cache     a whole answer kept for the same request, if any
//!   -> dispatch  routing plan, attempts, retries, failover, cooldown, health
//!   -> respond   stream filters (translation, usage, guardrails), usage, headers
//! ```
//!
//! Passthrough (`passthrough`) reuses admit's caller, limit and budget steps and the
//! same upstream client. Failures of any phase are rendered once, in the envelope of
//! the route ([`Endpoint::envelope`]).
//!
//! Layout:
//! - `mod.rs`: the call, phase by phase.
//! - `state.rs`: the shared state and options, the gateway's headers.
//! - `admit.rs`, `cache.rs`, `dispatch.rs`, `respond.rs`: the phases.
//! - `stream.rs`: a streamed answer's filter, and how the stream ends (well or broken).
//! - `resume.rs`: a broken stream continued on the next target (`resume_streams`).
//! - `routing.rs`: candidate order, retries, failover and cooldowns (dispatch's plan).
//! - `passthrough.rs`: `ANY /passthrough/{provider}/{*rest}`.

mod admit;
pub mod cache;
mod dispatch;
pub mod passthrough;
mod respond;
mod resume;
pub mod routing;
mod state;
mod stream;

use std::net::SocketAddr;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use tokio::time::Instant;

use crate::failure::ProxyError;
use crate::formats::endpoint::Endpoint;
use crate::observe::record::Record;
use crate::providers::CallerRequest;

pub use admit::authenticate;
use state::Call;
pub use state::{
    CACHE_STATUS, CALL_ID, ClientTypeRule, Hooks, ProxyOptions, ProxyState, REQUEST_ID, SERVED_BY,
    UrlRewrite, client_ip,
};

/// Runs one call of `endpoint` through the phases; failures are rendered in the
/// endpoint's envelope.
pub async fn call(
    endpoint: Endpoint,
    state: ProxyState,
    peer: SocketAddr,
    record: Record,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let call = Call {
        endpoint,
        request_id: record.request_id().clone(),
        call_id: uuid::Uuid::new_v4().to_string(),
        started: Instant::now(),
        record,
    };
    let mut response = match phases(&state, peer, &call, &headers, body).await {
        Ok(response) => response,
        Err(error) => {
            error.log(&call.request_id);
            error.into_response_in(endpoint.envelope())
        }
    };
    // The seeds scope x-aisix-call-id to chat completions; the id still names the
    // usage event of every call.
    if endpoint == Endpoint::ChatCompletions
        && let Ok(value) = HeaderValue::from_str(&call.call_id)
    {
        response.headers_mut().insert(CALL_ID, value);
    }
    response
}

async fn phases(
    shared: &ProxyState,
    peer: SocketAddr,
    call: &Call,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ProxyError> {
    let state = shared.inner();
    let snapshot = state.store.load();
    let caller = authenticate(&snapshot, headers, call.endpoint.envelope())?;
    call.record.caller(&caller.id);
    let read = admit::read(state, call.endpoint, headers, body).await?;
    let request = read.parse(call.endpoint)?;
    let mut admitted =
        admit::admit(state, &snapshot, call, caller, peer, headers, &request).await?;
    // A mask rewrote the body: what follows (cache, upstream) sees only the new one.
    let rewritten = match admitted.masked.take() {
        Some(_) if read.form.is_some() => {
            return Err(ProxyError::ContentFiltered {
                guardrail: "(masking)".into(),
                stage: "input",
                why: ": a form upload cannot be masked in place, so it is refused",
            });
        }
        Some(bytes) => Some(admit::Read::masked(bytes)),
        None => None,
    };
    let reparsed = rewritten
        .as_ref()
        .map(|r| r.parse(call.endpoint))
        .transpose()?;
    let (read, request) = match (&rewritten, reparsed) {
        (Some(rewritten), Some(reparsed)) => (rewritten, reparsed),
        _ => (&read, request),
    };
    let cache = cache::slot(
        state.cache.as_deref(),
        call.endpoint,
        &admitted.caller.id,
        &admitted.model.name,
        &request,
        &read.bytes,
        headers,
    );
    let hit = match &cache {
        Some(slot) => {
            let started = call.record.clock();
            let hit = slot.get().await;
            let outcome = if hit.is_some() { "hit" } else { "miss" };
            call.record.step("aisix.cache", started, outcome);
            hit
        }
        None => None,
    };
    if let Some(hit) = hit {
        return respond::from_cache(state, &hit, admitted, call).await;
    }
    let caller_request = CallerRequest {
        endpoint: call.endpoint,
        body: &request,
        raw: &read.bytes,
        form: read.form.as_ref(),
        headers,
    };
    let dispatched = dispatch::dispatch(shared, &snapshot, &admitted, call, &caller_request).await;
    respond::respond(
        state, &snapshot, call, admitted, &request, dispatched, cache,
    )
    .await
}
