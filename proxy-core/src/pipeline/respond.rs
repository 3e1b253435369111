//! Respond: the answer on its way out. A stream goes through one event filter
//! (`stream.rs`: translation to the caller's format, the usage tap, removal of the
//! usage chunk the caller did not ask for, output guardrails, how it ends); a whole answer is converted, gives its
//! usage, is checked and is kept in the cache. Either way the usage event and the
//! rate-limit token charge are settled once, and the gateway's headers are added.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::BodyExt;
use tracing::warn;

use super::admit::Admitted;
use super::cache::{Cached, Slot};
use super::dispatch::{Dispatched, Undispatched};
use super::state::{CACHE_STATUS, Call, Inner, SERVED_BY};
use super::stream::AnswerStream;
use crate::failure::ProxyError;
use crate::formats::body::RequestBody;
use crate::formats::chat::Conversion;
use crate::formats::sse;
use crate::formats::tokens::{Read, Tokens};
use crate::hooks::UsageEvent;
use crate::observe::usage::{Pending, unix_now_ms};
use crate::policy::guardrails::{self, Chain, Stage, StreamGuard};
use crate::resources::{Model, ModelTarget};
use crate::snapshot::Snapshot;

/// The response to a dispatched call, or the failure that ended dispatch (its usage
/// recorded against the target last tried).
pub(super) async fn respond(
    state: &Inner,
    snapshot: &Snapshot,
    call: &Call,
    mut admitted: Admitted<'_>,
    request: &RequestBody<'_>,
    dispatched: Result<Dispatched<'_>, Undispatched<'_>>,
    cache: Option<Slot<'_>>,
) -> Result<Response, ProxyError> {
    let Dispatched {
        answer,
        conversion,
        served_by,
        resume,
    } = match dispatched {
        Ok(dispatched) => dispatched,
        Err(Undispatched { error, tried }) => {
            if let Some(tried) = tried {
                let status = error.class().status;
                pending(state, snapshot, call, &mut admitted, request, tried, status)
                    .finish(Tokens::default(), None);
            }
            return Err(error);
        }
    };
    let usage = pending(
        state,
        snapshot,
        call,
        &mut admitted,
        request,
        served_by,
        answer.status,
    );
    let caching = cache.is_some();
    let output = std::mem::take(&mut admitted.guards.output);
    let mut response = if request.stream {
        let strip_usage = call.endpoint.asks_stream_usage() && !request.include_usage();
        let filter = AnswerStream::new(
            call,
            conversion,
            usage,
            strip_usage,
            served_by.name.clone(),
            state.hooks.metrics.clone(),
        );
        let filter = match resume {
            Some(resume) => filter.resumable(resume),
            None => filter,
        };
        let body = sse::filter_stream_kept_alive(answer.body, filter, state.options.sse_keepalive);
        // Output rules see the stream in the caller's format, as it leaves.
        let body = if output.is_empty() {
            body
        } else {
            let guard = StreamGuard::new(
                output,
                call.request_id.clone(),
                call.record.clone(),
                state.hooks.metrics.clone(),
                state.detectors.clone(),
                call.endpoint.envelope(),
            );
            guardrails::guarded(body, guard)
        };
        let content_type = answer.content_type.filter(|_| conversion.is_none());
        build(answer.status, content_type, body, &served_by.name, true)
    } else {
        let whole = Whole {
            status: answer.status,
            content_type: answer.content_type,
            body: answer.body,
            read: answer.read,
            conversion,
        };
        let chain = call.guardrails(&output, Stage::Output, state);
        whole_answer(whole, usage, &chain, served_by, cache, call).await
    };
    response.headers_mut().extend(admitted.quota_headers);
    if caching && response.status().is_success() {
        response
            .headers_mut()
            .insert(CACHE_STATUS, HeaderValue::from_static("miss"));
    }
    Ok(response)
}

/// A whole upstream answer, before conversion.
struct Whole {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Body,
    /// What it says, when read already.
    read: Option<Read>,
    conversion: Conversion,
}

/// A whole answer in the caller's format: usage settled, output guardrails checked,
/// kept in the cache; or the failure of one of those steps in the caller's envelope.
async fn whole_answer(
    whole: Whole,
    usage: Pending,
    output: &Chain<'_>,
    served_by: &Model,
    cache: Option<Slot<'_>>,
    call: &Call,
) -> Response {
    let envelope = call.endpoint.envelope();
    let request_id: &str = &call.request_id;
    let bytes = match whole.body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            warn!(request_id, error = %e, "answer body unreadable");
            Bytes::new()
        }
    };
    let converted = whole.conversion.answer(bytes.clone(), &served_by.name);
    if let Err(e) = &converted {
        e.log(request_id);
    }
    // Output rules run before the usage event is made, so it carries their verdicts.
    let checked = match converted {
        Ok(answer) => output
            .answer(&answer)
            .await
            .map(|masked| masked.unwrap_or(answer)),
        Err(e) => Err(e),
    };
    // Usage is read in the upstream's format, which may say more (cache writes).
    usage.finish_answer(&bytes, whole.read);
    let bytes = match checked {
        Ok(bytes) => bytes,
        Err(e) => return e.into_response_in(envelope),
    };
    let content_type = whole.content_type.filter(|_| whole.conversion.is_none());
    if let Some(slot) = cache {
        slot.put(
            whole.status,
            content_type.clone(),
            &served_by.name,
            bytes.clone(),
        );
    }
    build(
        whole.status,
        content_type,
        Body::from(bytes),
        &served_by.name,
        false,
    )
}

/// A kept answer: output guardrails still apply (they may have changed since); no
/// upstream is called and no tokens are charged.
pub(super) async fn from_cache(
    state: &Inner,
    hit: &Cached,
    admitted: Admitted<'_>,
    call: &Call,
) -> Result<Response, ProxyError> {
    let chain = call.guardrails(&admitted.guards.output, Stage::Output, state);
    let body = chain
        .answer(&hit.body)
        .await?
        .unwrap_or_else(|| hit.body.clone());
    let mut response = build(
        hit.status,
        hit.content_type.clone(),
        Body::from(body),
        &hit.served_by,
        false,
    );
    let headers = response.headers_mut();
    headers.insert(CACHE_STATUS, HeaderValue::from_static("hit"));
    headers.extend(admitted.quota_headers);
    Ok(response)
}

/// The usage event and the token charge of the outcome, settled when it ends.
fn pending(
    state: &Inner,
    snapshot: &Snapshot,
    call: &Call,
    admitted: &mut Admitted<'_>,
    request: &RequestBody<'_>,
    served_by: &Model,
    status: StatusCode,
) -> Pending {
    let model = admitted.model;
    call.record.provider(provider_of(snapshot, served_by));
    let report = state.hooks.usage.clone().map(|sink| {
        let event = UsageEvent {
            event_id: call.call_id.clone(),
            request_id: call.request_id.to_string(),
            api_key_id: admitted.caller.id.to_string(),
            model: model.name.to_string(),
            provider: provider_of(snapshot, served_by),
            served_by: served_by.name.to_string(),
            prompt_tokens: 0,
            completion_tokens: 0,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            cost_usd: 0.0,
            status_code: status.as_u16(),
            stream: request.stream,
            latency_ms: 0,
            ttft_ms: None,
            timestamp_unix_ms: unix_now_ms(),
            finish_reason: None,
            guardrails: Vec::new(),
        };
        (sink, event)
    });
    let cost = served_by.cost.or(model.cost);
    Pending::new(
        report,
        admitted.lease.take(),
        call.record.clone(),
        cost,
        call.started,
    )
}

/// The provider name of a direct model (what usage events report).
fn provider_of(snapshot: &Snapshot, model: &Model) -> String {
    match &model.target {
        ModelTarget::Direct(direct) => {
            snapshot
                .provider_key(&direct.provider_key_id)
                .map_or_else(String::new, |p| match (p.generic, &direct.provider) {
                    (true, Some(provider)) => provider.clone(),
                    _ => p.provider.clone(),
                })
        }
        ModelTarget::Routing(_) => String::new(),
    }
}

/// A successful answer's response: status, content type (the upstream's, or the
/// default of its kind), `Cache-Control: no-cache` for streams, `x-aisix-served-by`.
fn build(
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Body,
    served_by: &str,
    stream: bool,
) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let default_type = if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    headers.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static(default_type)),
    );
    if stream {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    if let Ok(value) = HeaderValue::from_str(served_by) {
        headers.insert(SERVED_BY, value);
    }
    response
}
