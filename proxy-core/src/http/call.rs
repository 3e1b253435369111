//! One model-routed call, whatever its endpoint: authenticate, read the body, resolve
//! the alias, check access, guardrails, rate limits and budget, then call the upstream
//! of each candidate in turn until one answers, converting the answer to the caller's
//! format when the upstream speaks the other one.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::basic::authenticate;
use super::endpoint::Endpoint;
use super::{CACHE_STATUS, CALL_ID, ProxyState, Record, SERVED_BY, client_ip};
use crate::budget::Verdict;
use crate::cache::{CacheKey, ResponseCache};
use crate::error::{Envelope, ProxyError};
use crate::guardrails::{self, Stage, StreamGuard};
use crate::multipart::{self, Form};
use crate::openai::RequestBody;
use crate::ratelimit::{self, Lease, Scope};
use crate::resources::{ApiKey, Guardrail, Model, ModelTarget, RateLimit};
use crate::routing::{Next, Plan};
use crate::snapshot::Snapshot;
use crate::sse::{self, Filtered};
use crate::translate::Conversion;
use crate::upstream::{Answer, Target};
use crate::usage::{Pending, Tokens, UsageEvent, unix_now_ms};

/// Runs one call of `endpoint`; failures are rendered in the endpoint's envelope.
pub(super) async fn run(
    endpoint: Endpoint,
    state: ProxyState,
    peer: SocketAddr,
    record: Record,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = record.request_id().clone();
    let call = Call {
        endpoint,
        request_id: &request_id,
        call_id: uuid::Uuid::new_v4().to_string(),
        started: Instant::now(),
        record,
    };
    let mut response = match handle(&state, peer, &call, &headers, body).await {
        Ok(response) => response,
        Err(error) => {
            log_failure(&request_id, &error);
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

/// One call: its endpoint, ids and when it began.
struct Call<'a> {
    endpoint: Endpoint,
    request_id: &'a str,
    /// `x-aisix-call-id`, also the usage event's id.
    call_id: String,
    started: Instant,
    /// Facts for the access log and metrics.
    record: Record,
}

async fn handle(
    state: &ProxyState,
    peer: SocketAddr,
    call: &Call<'_>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ProxyError> {
    let request_id = call.request_id;
    let endpoint = call.endpoint;
    let snapshot = state.0.store.load();
    let caller = authenticate(&snapshot, headers, endpoint.envelope())?;
    call.record.caller(&caller.id);
    // A form (audio, images) is routed by its text fields and sent on as a form. A
    // body of a type the endpoint does not read is refused before it is read.
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    let forms = !endpoint.has_messages();
    check_content_type(content_type, forms)?;
    let bytes = read_body(body, headers, state.0.options.body_limit).await?;
    let (form, fields) = if forms && multipart::is_form(content_type) {
        let form = Form::parse(bytes.clone(), content_type.unwrap_or_default()).await?;
        let fields = Bytes::from(form.text_fields_json());
        (Some(form), fields)
    } else {
        (None, bytes.clone())
    };
    let request = RequestBody::parse(&fields)?;
    if endpoint.has_messages() {
        request.require_array("messages")?;
    }
    let model = snapshot
        .model(&request.model)
        .ok_or_else(|| ProxyError::ModelNotFound(request.model.clone()))?;
    call.record.model(&model.name);
    if !caller.allows(&model.name) {
        return Err(ProxyError::PermissionDenied(format!(
            "this API key may not use model '{}'",
            model.name
        )));
    }
    let client = client_ip(peer.ip(), headers, &state.0.options);
    if !model.admits(client) {
        return Err(ProxyError::PermissionDenied(format!(
            "client address {client} may not use model '{}'",
            model.name
        )));
    }
    let guards = guardrails::applicable(&snapshot, &model.name, &caller.id);
    if !guards.input.is_empty() {
        let text = guardrails::request_text(&request, endpoint.has_messages());
        guardrails::scan(&guards.input, &text, Stage::Input, request_id)?;
    }
    let mut lease = admit(state, caller, Some(model))?;
    if let Some(gate) = &state.0.hooks.budget
        && let Verdict::Deny(denial) = gate.check(&caller.id).await
    {
        return Err(ProxyError::BudgetDenied(denial));
    }
    let quota_headers = lease.as_ref().map(quota_headers).unwrap_or_default();
    // The usage event and the token charge of the outcome (built once, for the answer).
    let mut usage = |served_by: &Model, status: StatusCode| {
        let report = state.0.hooks.usage.clone().map(|sink| {
            let event = UsageEvent {
                event_id: call.call_id.clone(),
                request_id: request_id.to_owned(),
                api_key_id: caller.id.to_string(),
                model: model.name.to_string(),
                provider: provider_of(&snapshot, served_by),
                served_by: served_by.name.to_string(),
                prompt_tokens: 0,
                completion_tokens: 0,
                cost_usd: 0.0,
                status_code: status.as_u16(),
                stream: request.stream,
                latency_ms: 0,
                ttft_ms: None,
                timestamp_unix_ms: unix_now_ms(),
            };
            (sink, event)
        });
        let cost = served_by.cost.or(model.cost);
        Pending::new(
            report,
            lease.take(),
            call.record.clone(),
            cost,
            call.started,
        )
    };
    let cache = match &state.0.cache {
        Some(cache) if endpoint.cacheable() && !request.stream && !refuses_cache(headers) => {
            ResponseCache::key(endpoint.path(), &caller.id, &model.name, &bytes)
                .map(|key| (cache, key))
        }
        _ => None,
    };
    if let Some((cache, key)) = &cache
        && let Some(hit) = cache.get(key)
    {
        // Guardrails still apply (they may have changed); no upstream, no tokens charged.
        guardrails::check_answer(&guards.output, &hit.body, request_id)?;
        let mut response = build_response(
            hit.status,
            hit.content_type.clone(),
            Body::from(hit.body.clone()),
            &hit.served_by,
            false,
        );
        let headers = response.headers_mut();
        headers.insert(CACHE_STATUS, HeaderValue::from_static("hit"));
        headers.extend(quota_headers);
        return Ok(response);
    }
    let plan = state.0.routing.plan(&snapshot, model)?;
    let sent = Sent {
        request: &request,
        raw: &bytes,
        form: form.as_ref(),
        headers,
    };
    let (answer, conversion, served_by) = match dispatch(state, &snapshot, &plan, call, &sent).await
    {
        Ok(dispatched) => dispatched,
        Err((error, tried)) => {
            if let Some(tried) = tried {
                usage(tried, error.class().status).finish(Tokens::default(), None);
            }
            return Err(error);
        }
    };
    let pending = usage(served_by, answer.status);
    let output = Output {
        guardrails: guards.output,
        request_id,
        envelope: endpoint.envelope(),
        conversion,
        cache,
        strip_usage: endpoint.asks_stream_usage() && request.stream && !request.include_usage(),
        record: call.record.clone(),
    };
    let mut response = respond(answer, &served_by.name, request.stream, pending, output).await;
    response.headers_mut().extend(quota_headers);
    if cache.is_some() && response.status().is_success() {
        response
            .headers_mut()
            .insert(CACHE_STATUS, HeaderValue::from_static("miss"));
    }
    Ok(response)
}

/// Tries the plan's candidates in turn (retries with backoff, failover, cooldowns,
/// health) until one answers. Otherwise: the failure to report, and the target it came
/// from (`None` when no target was tried).
async fn dispatch<'s>(
    state: &ProxyState,
    snapshot: &'s Snapshot,
    plan: &Plan<'s>,
    call: &Call<'_>,
    sent: &Sent<'_>,
) -> Result<(Answer, Conversion, &'s Arc<Model>), (ProxyError, Option<&'s Arc<Model>>)> {
    let request_id = call.request_id;
    let health = &state.0.health;
    let mut last_failure = None;
    'candidates: for candidate in plan.candidates.iter().copied() {
        let mut attempt_number = 0;
        loop {
            attempt_number += 1;
            let error = match attempt(state, snapshot, candidate, call, sent).await {
                Ok((answer, conversion)) => {
                    health.success(&candidate.name);
                    state.0.routing.recovered(&candidate.name);
                    return Ok((answer, conversion, candidate));
                }
                Err(error) => error,
            };
            state
                .0
                .hooks
                .metrics
                .record_upstream_failure(&candidate.name, error.failure_kind());
            let upstream_fault = matches!(
                &error,
                ProxyError::UpstreamFailed { .. }
                    | ProxyError::ProviderUnreachable { .. }
                    | ProxyError::Timeout(_)
            ) || matches!(&error, ProxyError::UpstreamRejected { status, .. } if status.as_u16() == 429);
            if upstream_fault {
                health.failure(&candidate.name);
            }
            match plan.next(&error, attempt_number) {
                Next::Retry(wait) => {
                    warn!(request_id, model = %candidate.name, attempt = attempt_number, retry_in_ms = wait.as_millis() as u64, error = %error, detail = ?error, "upstream attempt failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Next::Fallback { cool_down } => {
                    warn!(request_id, model = %candidate.name, attempt = attempt_number, error = %error, detail = ?error, "upstream attempt failed; trying the next target");
                    if cool_down {
                        state
                            .0
                            .routing
                            .cool_down(candidate, error.upstream_retry_after());
                    }
                    last_failure = Some((error, candidate));
                    continue 'candidates;
                }
                Next::Answer => {
                    last_failure = Some((error, candidate));
                    break 'candidates;
                }
            }
        }
    }
    Err(match last_failure {
        Some((error, candidate)) => (error, Some(candidate)),
        None => (
            ProxyError::ProviderUnavailable(format!(
                "model '{}' has no available target",
                plan.model
            )),
            None,
        ),
    })
}

/// Counts the request against the caller key's and the model's rate limits.
pub(super) fn admit(
    state: &ProxyState,
    caller: &ApiKey,
    model: Option<&Model>,
) -> Result<Option<Lease>, ProxyError> {
    let unlimited = RateLimit::default();
    let mut scopes = Vec::new();
    if caller.rate_limit != unlimited {
        scopes.push((Scope::ApiKey(caller.id.clone()), caller.rate_limit.clone()));
    }
    if let Some(model) = model.filter(|m| m.rate_limit != unlimited) {
        scopes.push((Scope::Model(model.name.clone()), model.rate_limit.clone()));
    }
    if scopes.is_empty() {
        return Ok(None);
    }
    state
        .0
        .limiter
        .admit(scopes, ratelimit::unix_ms())
        .map(Some)
        .map_err(|refusal| ProxyError::RateLimited {
            message: refusal.message,
            retry_after: refusal.retry_after_secs,
        })
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the caller key's limits.
fn quota_headers(lease: &Lease) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (family, quota) in [("requests", lease.requests), ("tokens", lease.tokens)] {
        let Some(quota) = quota else { continue };
        for (name, value) in [
            ("limit", quota.limit.to_string()),
            ("remaining", quota.remaining.to_string()),
            ("reset", ratelimit::format_reset(quota.reset_ms)),
        ] {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(format!("x-ratelimit-{name}-{family}").as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
    }
    headers
}

/// The provider name of a direct model (what usage events report).
fn provider_of(snapshot: &Snapshot, model: &Model) -> String {
    match &model.target {
        ModelTarget::Direct(direct) => snapshot
            .provider_key(&direct.provider_key_id)
            .map_or_else(String::new, |p| p.provider.clone()),
        ModelTarget::Routing(_) => String::new(),
    }
}

/// What the caller sent, as read.
struct Sent<'a> {
    request: &'a RequestBody<'a>,
    raw: &'a [u8],
    form: Option<&'a Form>,
    headers: &'a HeaderMap,
}

/// Sends the call to one direct model: the request as its adapter wants it.
async fn attempt(
    state: &ProxyState,
    snapshot: &Snapshot,
    model: &Arc<Model>,
    call: &Call<'_>,
    body: &Sent<'_>,
) -> Result<(Answer, Conversion), ProxyError> {
    let unavailable = || {
        ProxyError::ProviderUnavailable(format!(
            "model '{}' has no usable provider key",
            model.name
        ))
    };
    let ModelTarget::Direct(direct) = &model.target else {
        return Err(unavailable());
    };
    let provider_key = snapshot
        .provider_key(&direct.provider_key_id)
        .ok_or_else(unavailable)?;
    let prepared = call.endpoint.prepare(
        &provider_key.adapter,
        body.request,
        body.raw,
        body.form,
        &direct.model_name,
        body.headers,
    )?;
    let target = Target {
        model,
        upstream_model: &direct.model_name,
        provider_key,
    };
    debug!(request_id = call.request_id, model = %model.name, upstream_model = target.upstream_model, path = prepared.outgoing.path, "dispatching");
    let sent = Instant::now();
    let answer = state
        .0
        .upstream
        .send(&target, prepared.outgoing, call.request_id)
        .await;
    state
        .0
        .hooks
        .metrics
        .record_upstream(&model.name, sent.elapsed());
    Ok((answer?, prepared.conversion))
}

/// What happens to an answer on its way out: output guardrails, and the cache slot
/// a whole successful answer is kept in.
struct Output<'a> {
    guardrails: Vec<Arc<Guardrail>>,
    request_id: &'a str,
    /// The caller's format (of the error event ending a blocked stream).
    envelope: Envelope,
    /// From the upstream's format to the caller's.
    conversion: Conversion,
    cache: Option<(&'a ResponseCache, CacheKey)>,
    /// The gateway asked for the usage chunk of this stream; the caller did not.
    strip_usage: bool,
    /// Where a stream cut by a guardrail is noted.
    record: Record,
}

/// `Cache-Control: no-cache` or `no-store` on the request: neither read nor fill the
/// cache.
fn refuses_cache(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| {
            matches!(
                d.trim().to_ascii_lowercase().as_str(),
                "no-cache" | "no-store"
            )
        })
}

/// Builds the response. A stream goes through one event filter: the usage tap
/// (records usage when the stream ends), the removal of the usage chunk the caller did
/// not ask for, the output guardrails. A whole answer (already in memory) gives its
/// usage, is checked, and is kept in the cache.
async fn respond(
    answer: Answer,
    served_by: &str,
    stream: bool,
    usage: Pending,
    output: Output<'_>,
) -> Response {
    let body = if stream {
        let mut translator = output.conversion.stream();
        let mut tap = usage.tap();
        let mut guard = (!output.guardrails.is_empty()).then(|| {
            StreamGuard::new(output.guardrails, output.request_id.into(), output.envelope)
        });
        let strip = output.strip_usage;
        let record = output.record;
        sse::filter_events(answer.body, move |events| {
            let events = match &mut translator {
                Some(translator) => translator.translate(&events),
                None => events,
            };
            tap.observe(&events);
            let events = if strip {
                sse::without_usage_chunk(events)
            } else {
                events
            };
            match &mut guard {
                Some(guard) => {
                    let filtered = guard.check(events);
                    if matches!(filtered, Filtered::End(_)) {
                        record.late_error("content_filter");
                    }
                    filtered
                }
                None => Filtered::Send(events),
            }
        })
    } else {
        let bytes = match answer.body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                warn!(error = %e, "answer body unreadable");
                Bytes::new()
            }
        };
        let bytes = match output.conversion.answer(bytes) {
            Ok(bytes) => bytes,
            Err(e) => {
                log_failure(output.request_id, &e);
                usage.finish(Tokens::default(), None);
                return e.into_response_in(output.envelope);
            }
        };
        usage.finish(Tokens::from_json(&bytes).unwrap_or_default(), None);
        if let Err(e) = guardrails::check_answer(&output.guardrails, &bytes, output.request_id) {
            return e.into_response_in(output.envelope);
        }
        if let Some((cache, key)) = output.cache {
            let content_type = answer.content_type.clone();
            cache.put(key, answer.status, content_type, served_by, bytes.clone());
        }
        Body::from(bytes)
    };
    let content_type = match output.conversion {
        Conversion::None => answer.content_type,
        Conversion::AnthropicToOpenAi | Conversion::OpenAiToAnthropic => None,
    };
    build_response(answer.status, content_type, body, served_by, stream)
}

/// A successful answer's response: status, content type (the upstream's, or the
/// default of its kind), `Cache-Control: no-cache` for streams, `x-aisix-served-by`.
fn build_response(
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

/// JSON bodies (`application/json`, `*/*+json`, or no type at all) everywhere, forms
/// where `forms`. `application/x-www-form-urlencoded` is read as JSON too: it is what
/// `curl -d` declares when the caller does not say.
fn check_content_type(content_type: Option<&str>, forms: bool) -> Result<(), ProxyError> {
    let Some(declared) = content_type else {
        return Ok(());
    };
    let essence = declared
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let json = essence == "application/json"
        || essence == "application/x-www-form-urlencoded"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if json || (forms && essence == "multipart/form-data") {
        return Ok(());
    }
    let expected = if forms {
        "application/json or multipart/form-data"
    } else {
        "application/json"
    };
    Err(ProxyError::UnsupportedMediaType(format!(
        "Content-Type '{}' is not supported here: send {expected}",
        declared.chars().take(100).collect::<String>()
    )))
}

/// Reads the whole body, refusing more than `limit` bytes (by Content-Length up front,
/// and while reading for chunked bodies).
pub(super) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: Option<usize>,
) -> Result<bytes::Bytes, ProxyError> {
    let Some(limit) = limit else {
        return body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|_| ProxyError::invalid_request("failed to read the request body", None));
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(_) => Err(ProxyError::invalid_request(
            "failed to read the request body",
            None,
        )),
    }
}

fn log_failure(request_id: &str, error: &ProxyError) {
    let class = error.class();
    if class.operator_visible {
        warn!(request_id, status = class.status.as_u16(), error_type = class.kind, detail = ?error, "request failed");
    } else {
        debug!(request_id, status = class.status.as_u16(), error_type = class.kind, error = %error, "request rejected");
    }
}
